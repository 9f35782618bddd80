"""The launcher: every policy of starting, supervising, replacing and stopping a cluster's processes,
once, for every backend (backend.py: local processes from a fork server, or Ray actors across nodes).

What it decides (a backend only carries it out):
  - start order: a private Redis (when checkpointing needs one and no `redis_url` is given), the
    controller, then the KV stores and the expert workers together, then the attention workers once
    every expert serves (a request they take at once must find every expert), each step waited for
    through the controller's view;
  - placement: the control plane (controller, Redis) on the head node; workers dealt over the other
    nodes (launch/nodes.py), a KV store on every worker node; cores per worker (`cpu_affinity: auto`,
    launch/cpus.py) planned per node, a replacement keeping its predecessor's where it stays on the
    node, a worker that scaling added or that moved getting the least used cores of its node;
  - supervision: a process that exited for any reason (a signal, an uncaught exception, leaving on its
    own, its node lost) is reported to the controller (which fences it and reroutes at once) and
    replaced at once on its node, or on the surviving node with the fewest of its role; a second
    death within 2 s backs off exponentially; CRASH_LOOP starts in CRASH_WINDOW_S end the cluster
    with a clear error (`fatal`) instead of a restart loop. A dead controller is started again (it
    recovers its state from Redis); a dead Redis too (empty: checkpoint commits resume with the next
    block, the controller rewrites its state);
  - the controller's orders (start, stop, restart-all), each carried out at most once, by id;
  - the restart-everything baseline: "warm" (the fair one) restarts every worker at once from the warm
    fork servers, as resilient mode forks its replacements; "cold" starts fresh interpreters, expert
    workers first and then attention workers, as a naively restarted deployment would;
  - stop: SIGTERM to every worker (they drain), a grace period, the controller, then SIGKILL for
    what is left, and the backend's own processes.

Replacements are forked warm on every node, so no import competes with serving; a replacement that
joins a serving cluster loads its weights on a thread of the lowest CPU priority that ends once it is
loaded (workers/common.py), so it serves at the priority it started with, whoever the user is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc

from resilient_moe import auth
from resilient_moe.controller.client import ControllerClient
from resilient_moe.controller.records import kv_store_name
from resilient_moe.deployment import DeploymentConfig, FrontendConfig, WorkerConfig
from resilient_moe.errors import ClusterError
from resilient_moe.launch import nodes as node_policy
from resilient_moe.launch.backend import Backend, NodeExit
from resilient_moe.launch.cpus import cpu_plan
from resilient_moe.launch.node_spawner import FORK_SERVER
from resilient_moe.procs import process_alive
from resilient_moe.proto import controller_pb2 as pb

log = logging.getLogger("resilient_moe.launcher")

CRASH_LOOP = 10  # starts of one process within CRASH_WINDOW_S after which the launcher gives up
CRASH_WINDOW_S = 60.0
WORKER_ROLES = ("attention", "expert")


@dataclass
class Process:
    """One process of the cluster as the launcher tracks it."""

    name: str
    role: str  # a WorkerConfig role, or "redis"
    index: int
    node: str
    pid: int = 0
    cpus: tuple[int, ...] = ()
    exited: bool = False  # its exit was seen


def _affinity(pid: int, role: str) -> tuple[int, ...]:
    """The cores a process of this host is pinned to (an adopted worker's), () when not a worker or unknown."""
    if role not in WORKER_ROLES:
        return ()
    try:
        return tuple(sorted(os.sched_getaffinity(pid)))
    except OSError:
        return ()


def role_of(name: str) -> tuple[str, int]:
    """(role, index) a process name stands for: "aw-1" -> ("attention", 1), "kv-store-2" -> ("kv_store", 2)."""
    if name in ("controller", "redis"):
        return name, 0
    if name == "kv-store" or name.startswith("kv-store-"):
        return "kv_store", int(name[len("kv-store-"):] or 0)
    prefix, _, index = name.partition("-")
    return {"ew": "expert", "aw": "attention", "fe": "frontend"}[prefix], int(index)


class Launcher:
    """A cluster of the deployment's roles on `backend` (see the module docstring)."""

    def __init__(self, deployment: DeploymentConfig, backend: Backend,
                 log_dir: str | os.PathLike[str] | None = None, frontend: FrontendConfig | None = None) -> None:
        """`frontend`: with it, the deployment's `frontends` frontend processes serve the HTTP API."""
        self.deployment = deployment
        self.backend = backend
        self.frontend = frontend
        self.cluster_id = secrets.token_hex(4)
        self._tmp = None
        if log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"rmoe-{self.cluster_id}-")
            log_dir = self._tmp.name
        self.log_dir = Path(log_dir).resolve()  # absolute: redis-server changes its directory
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.controller_address = ""  # known once started
        self.head = ""
        self.procs: dict[str, Process] = {}  # name -> its current process
        self.placed: dict[str, str] = {}  # name -> node it runs on (or is to run on)
        self.lost_nodes: set[str] = set()  # nodes lost with their processes: nothing new goes there
        self.replaced: list[tuple[str, str, str]] = []  # (name, node it died on, node of its replacement)
        self._retired: list[Process] = []  # replaced or stopped processes (a hung one may linger until stop)
        self.client: ControllerClient | None = None
        self.fatal: str | None = None  # why the cluster cannot recover (the launcher gave up); None while it can
        self.restarts: list[tuple[float, float]] = []  # (began, ready) of each restart-all, time.monotonic()
        # While set, the launcher takes no orders (they wait, persisted, at the controller): an operator's
        # maintenance switch, and how tests make an order the controller issued go untaken.
        self.hold_orders = threading.Event()
        self._stopping = threading.Event()
        self._spawn_lock = threading.RLock()
        self._restarting = False  # a restart-all order is being carried out (exits are then expected)
        self._restarted_generation = 0
        self._orders_done: set[tuple] = set()
        self._respawn_due: dict[str, tuple[float, int]] = {}  # name -> (monotonic time it may start, pid it replaces)
        self._spawn_times: dict[str, list[float]] = {}
        self._threads: list[threading.Thread] = []
        self._planned_cpus: dict[str, tuple[int, ...]] = {}  # the start's plan, per worker
        self._redis_config = b""
        self._redis_binary = ""
        self._redis_dir: tempfile.TemporaryDirectory | None = None
        self._adopted_dirs: list[str] = []
        # Faults of the processes the controller does not track (Redis, the controller itself), waiting
        # to reach the controller (controller/fault_records.py); the controller's for a new one's first call.
        self._fault_reports: list[pb.FaultRecord] = []
        self._fault_lock = threading.Lock()
        self._faults_sent: set[int] = set()  # ids of the records above sent without their replacement
        self._next_fault_flush = 0.0

    # ---- what the API and the tests read -----------------------------------------------------

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    @property
    def nodes(self) -> dict[str, str]:
        """Process name -> the node it runs on ("" locally: this host)."""
        return {name: p.node for name, p in self.procs.items()}

    @property
    def cpus(self) -> dict[str, tuple[int, ...]]:
        return {name: p.cpus for name, p in self.procs.items() if p.cpus}

    @property
    def retired(self) -> list[int]:
        return [p.pid for p in self._retired]

    @property
    def fork_server(self):
        """The local backend's fork server (None under Ray)."""
        return getattr(self.backend, "fork_server", None)

    @property
    def checkpointing(self) -> bool:
        return self.deployment.resilience and self.deployment.kv_checkpoint

    def state(self) -> pb.ClusterState:
        assert self.client is not None
        return self.client.get_state()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        self.backend.signal(p.node, p.pid, sig)

    def kill_node(self, node: str) -> None:
        """Take a whole node down (chaos: node-kill); what it ran is replaced like any death."""
        if node not in set(self.nodes.values()):
            raise ClusterError(f"no process of the cluster runs on node {node!r}")
        self.backend.kill_node(node)

    def alive_pids(self) -> list[int]:
        """Processes of the cluster (and replaced ones) still running on this host."""
        return [pid for pid in [*self.pids.values(), *self.retired] if process_alive(pid)]

    def log_tail(self, name: str, lines: int = 30) -> str:
        p = self.procs.get(name)
        return self.backend.log_tail(p.node if p else self.head, str(self._log_path(name)), lines)

    def _log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    # ---- start ------------------------------------------------------------------------------

    def start(self) -> "Launcher":
        if self.procs:
            raise ClusterError(f"cluster {self.cluster_id} is already started")
        deadline = time.monotonic() + self.deployment.startup_timeout_s
        try:
            self.backend.open(self.cluster_id, auth.ensure_secret())
            self.head = self.backend.head()
            worker_nodes = node_policy.worker_nodes(self.head, self.backend.nodes())
            dep = self.deployment
            experts = [f"ew-{i}" for i in range(dep.expert_workers)]
            attention = [f"aw-{i}" for i in range(dep.attention_workers)]
            self.placed.update(node_policy.spread_workers(experts + attention, worker_nodes))
            stores = self._plan_stores(worker_nodes)
            self._plan_cpus(attention + experts)
            if self.checkpointing and not self.deployment.redis_url:  # while the fork servers import
                self.deployment = dataclasses.replace(self.deployment, redis_url=self._start_redis())
            self.backend.wait_ready(max(1.0, deadline - time.monotonic()))
            self.controller_address = self.backend.control_address(self.cluster_id, self.head)
            self._spawn("controller", self.head)
            self.client = ControllerClient(self.controller_address)
            self._wait(["controller"], deadline, "the controller", registered_only=True)
            for name in stores + experts:
                self._spawn(name, self.placed[name])
            self._wait(experts + stores, deadline, "expert workers and the KV stores")
            for name in attention:
                self._spawn(name, self.placed[name])
            self._wait(attention, deadline, "attention workers")
            frontends = self._plan_frontends()
            for name in frontends:
                self._spawn(name, self.placed[name])
            self._wait(frontends, deadline, "frontends")
            for target, what in ((self._follow_orders, "launcher-orders"), (self._supervise, "launcher-supervisor"),
                                 (self._report_faults, "launcher-faults")):
                thread = threading.Thread(target=target, name=what, daemon=True)
                thread.start()
                self._threads.append(thread)
        except BaseException:
            self.stop()
            raise
        log.info("cluster %s ready (%s): %s", self.cluster_id, self.backend.kind,
                 ", ".join(f"{n}={p.pid}" + (f"@{p.node[:8]}" if p.node else "") for n, p in self.procs.items()))
        return self

    def _plan_frontends(self) -> list[str]:
        """Frontends (with frontend settings): dealt over every node, the head's first, so that more than
        one node serves the API when there are several."""
        if self.frontend is None or self.deployment.frontends == 0:
            return []
        names = [f"fe-{i}" for i in range(self.deployment.frontends)]
        self.placed.update(node_policy.spread_workers(names, self.backend.nodes()))
        return names

    def _plan_stores(self, worker_nodes: list[str]) -> list[str]:
        """KV stores (with checkpointing): at least one on every worker node, so that each attention
        worker's primary store is on its node and its replicas (kv_replicas) on others."""
        if not self.checkpointing:
            return []
        if not self.deployment.redis_url and shutil.which("redis-server") is None:
            log.warning("redis-server is not installed and no redis_url was given: KV checkpointing and "
                        "controller recovery are OFF (install redis-server, or set kv_checkpoint: false "
                        "to silence this)")
            self.deployment = dataclasses.replace(self.deployment, kv_checkpoint=False)
            return []
        count = max(self.deployment.kv_stores, len(worker_nodes))
        if count != self.deployment.kv_stores:
            self.deployment = dataclasses.replace(self.deployment, kv_stores=count)
        stores = [kv_store_name(i) for i in range(count)]
        self.placed.update({name: worker_nodes[i % len(worker_nodes)] for i, name in enumerate(stores)})
        return stores

    def _plan_cpus(self, workers: list[str]) -> dict[str, tuple[int, ...]]:
        """Cores of each node dealt to the workers placed there (attention workers first)."""
        if self.deployment.cpu_affinity != "auto":
            return {}
        by_node: dict[str, list[str]] = {}
        for name in workers:
            by_node.setdefault(self.placed[name], []).append(name)
        for node, names in by_node.items():
            self._planned_cpus.update(cpu_plan(self.backend.cores(node), names))
        return self._planned_cpus

    def _cpus_for(self, name: str, node: str) -> tuple[int, ...]:
        """The cores a worker starting on `node` gets: its plan or its predecessor's on the same node;
        else as many of the node's least used cores as its predecessor had (one for a new worker)."""
        role, _ = role_of(name)
        if self.deployment.cpu_affinity != "auto" or role not in WORKER_ROLES:
            return ()
        current = self.procs.get(name)
        if current is not None and current.node == node and current.cpus:
            return current.cpus
        planned = self._planned_cpus.get(name)
        if planned and self.placed.get(name) == node and current is None:
            return planned
        cores = self.backend.cores(node)
        used = Counter(c for p in self.procs.values() if p.node == node and p.name != name and not p.exited
                       for c in p.cpus)
        want = len(current.cpus) if current is not None and current.cpus else 1
        return tuple(sorted(sorted(cores, key=lambda c: (used[c], c))[:want]))

    def worker_config(self, name: str) -> WorkerConfig:
        """The configuration the current process of `name` was started with."""
        return self._config(self.procs[name])

    def _config(self, p: Process) -> WorkerConfig:
        dep = dataclasses.replace(self.deployment, host=self.backend.host(p.node))
        nodes = {n for n in self.placed.values()}
        worker_nodes = tuple(sorted(self.placed.items())) if p.role == "controller" and len(nodes) > 1 else ()
        return WorkerConfig(p.name, p.role, p.index, self.cluster_id, self.controller_address, dep, cpus=p.cpus,
                            node=p.node, worker_nodes=worker_nodes,
                            frontend=self.frontend if p.role == "frontend" else None)

    def _spawn(self, name: str, node: str, cold: bool = False) -> Process:
        role, index = role_of(name)
        with self._spawn_lock:  # stop() takes it too: nothing is started behind its back
            if self._stopping.is_set():
                raise ClusterError(f"cluster {self.cluster_id} is stopping; not starting {name}")
            now = time.monotonic()
            times = [t for t in self._spawn_times.get(name, []) if now - t < CRASH_WINDOW_S] + [now]
            self._spawn_times[name] = times
            if len(times) > CRASH_LOOP:
                self._fail(f"{name} was started {len(times)} times in {CRASH_WINDOW_S:.0f}s and keeps exiting; "
                           f"its log ({self._log_path(name)}) ends with:\n{self.log_tail(name, 12)}")
                raise ClusterError(self.fatal)
            process = Process(name, role, index, node, cpus=self._cpus_for(name, node))
            process.pid = self.backend.spawn(node, name, role, self._config(process).to_json(),
                                             str(self._log_path(name)), cold=cold, cpus=process.cpus)
            old = self.procs.get(name)
            if old is not None and old.pid != process.pid:
                self._retired.append(old)
            self.procs[name] = process
            self.placed[name] = node
            return process

    def _start_redis(self, timeout_s: float = 10.0) -> str:
        """A private redis-server on the head node, and its URL; it requires a password derived from the
        cluster secret, which the URL carries to every client; the server reads it with the rest of its
        configuration from stdin, so it is on no command line."""
        binary = shutil.which("redis-server")
        self._redis_dir = tempfile.TemporaryDirectory(prefix=f"rmoe-{self.cluster_id}-redis-")
        listen, url = self.backend.redis_endpoint(self.head, self._redis_dir.name, auth.derived_key("redis"))
        self._redis_config = "\n".join([
            *listen, 'save ""', "appendonly no", f"dir {self._redis_dir.name}",
            f"logfile {self._log_path('redis')}", f"requirepass {auth.derived_key('redis')}", "",
        ]).encode()
        self._redis_binary = binary
        self._launch_redis(url, timeout_s)
        return url

    def _launch_redis(self, url: str, timeout_s: float) -> None:
        import redis

        process = Process("redis", "redis", 0, self.head)
        process.pid = self.backend.run(self.head, "redis", [self._redis_binary, "-"], self._redis_config,
                                       str(self._log_path("redis")))
        with self._spawn_lock:
            old = self.procs.get("redis")
            if old is not None:
                self._retired.append(old)
            self.procs["redis"] = process
        client = redis.Redis.from_url(url, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if process.exited or time.monotonic() > deadline:
                        how = "it exited" if process.exited else f"not answering after {timeout_s:g}s"
                        raise ClusterError(f"redis-server did not start ({how}); see {self._log_path('redis')}") from None
                    if not self._threads:  # before supervision runs, its exit is looked for here
                        for ne in self.backend.exits(0.0):
                            self._on_exit(ne)
                    time.sleep(0.02)
        finally:
            client.close()

    def _wait(self, names: list[str], deadline: float, what: str, registered_only: bool = False) -> None:
        """Until the current processes of `names` are ready (their pids, not older incarnations');
        `registered_only`: until the controller answers at all."""
        assert self.client is not None
        while True:
            if not self._threads:  # before supervision runs, exits are looked for here
                for ne in self.backend.exits(0.0):
                    self._on_exit(ne)
            dead = [n for n in names if self.procs[n].exited]
            if dead:
                raise ClusterError(f"{dead[0]} exited while starting {what}:\n{self.log_tail(dead[0])}")
            if self.fatal:
                raise ClusterError(self.fatal)
            try:
                state = self.client.get_state(timeout_s=1.0)
                if registered_only:
                    return
                ready = {w.name for w in state.workers if w.state == pb.READY and w.name in self.procs
                         and w.pid == self.procs[w.name].pid}
                if all(n in ready for n in names):
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}; logs in {self.log_dir}")
            time.sleep(0.01)

    # ---- a supervisor that may die: leases, hand-over and adoption ---------------------------

    def hold_lease(self, key: str, lease_s: float) -> None:
        """From now on every process of the cluster outlives this launcher, for as long as someone renews
        `key` in the cluster's Redis (supervisor.py), and stops by itself `lease_s` after the last renewal."""
        self.backend.hold_lease(self.deployment.redis_url, key, lease_s)

    def handover(self) -> dict:
        """Everything a launcher in another process needs to adopt this cluster (`adopt`), as JSON: its
        identity and deployment, the frontends' settings, Redis's configuration, where its processes are."""
        return {"cluster_id": self.cluster_id, "controller_address": self.controller_address, "head": self.head,
                "deployment": self.deployment.to_dict(),
                "frontend": dataclasses.asdict(self.frontend) if self.frontend is not None else None,
                "log_dir": str(self.log_dir), "log_dir_temporary": self._tmp is not None, "placed": dict(self.placed),
                "redis": {"binary": self._redis_binary, "config": self._redis_config.decode(),
                          "dir": self._redis_dir.name if self._redis_dir is not None else ""},
                "backend": self.backend.handover()}

    def adopt(self, handover: dict) -> "Launcher":
        """Supervise a running cluster (another launcher's `handover`, that launcher gone): nothing is
        restarted; processes that died meanwhile are replaced as any death is (the controller's orders,
        sent again to whoever listens, name the workers; the control plane and frontends are checked here)."""
        self.cluster_id = handover["cluster_id"]
        self.controller_address = handover["controller_address"]
        self.head = handover["head"]
        self.placed = dict(handover["placed"])
        redis = handover["redis"]
        self._redis_binary, self._redis_config = redis["binary"], redis["config"].encode()
        self._adopted_dirs = [d for d in (redis["dir"], handover["log_dir"] if handover["log_dir_temporary"] else "") if d]
        for node, name, pid in self.backend.adopt(self.cluster_id, auth.secret(), handover["backend"]):
            role, index = role_of(name)
            self.procs[name] = Process(name, role, index, node, pid, cpus=_affinity(pid, role))
        self.client = ControllerClient(self.controller_address)
        expected = ["controller", *(["redis"] if self._redis_binary else []),
                    *(f"fe-{i}" for i in range(self.deployment.frontends if self.frontend is not None else 0))]
        for name in expected:
            if name not in self.procs:
                log.warning("%s is gone since the last supervisor left; starting it again", name)
                if name == "redis":
                    threading.Thread(target=self._restart_redis, daemon=True).start()
                else:
                    self._respawn_due[name] = (time.monotonic(), 0)
        for target, what in ((self._follow_orders, "launcher-orders"), (self._supervise, "launcher-supervisor"),
                             (self._report_faults, "launcher-faults")):
            thread = threading.Thread(target=target, name=what, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("adopted cluster %s: %s", self.cluster_id, ", ".join(f"{n}={p.pid}" for n, p in self.procs.items()))
        return self

    # ---- supervision: no process of the cluster stays dead --------------------------------

    def _supervise(self) -> None:
        """Take every exit the backend reports and start what is due (see the module docstring)."""
        while not self._stopping.is_set():
            try:
                for ne in self.backend.exits(0.02):
                    self._on_exit(ne)
                now = time.monotonic()
                for name, (due, dead_pid) in list(self._respawn_due.items()):
                    if now >= due and not self._stopping.is_set():
                        del self._respawn_due[name]
                        current = self.procs.get(name)
                        if current is None or current.exited or current.pid == dead_pid:  # not replaced meanwhile
                            self._respawn(name)
            except ClusterError as e:
                if not self._stopping.is_set():
                    log.error("%s", e)
            except Exception:  # one bad pass must never stop supervision
                if not self._stopping.is_set():
                    log.exception("supervision pass failed")
                    self._stopping.wait(0.1)

    def _on_exit(self, ne: NodeExit) -> None:
        name, pid, how = ne.exit.name, ne.exit.pid, ne.exit.how
        if ne.node_lost:
            self.lost_nodes.add(ne.node)
            how += f" (node {ne.node[:12]} lost)"
        if name == FORK_SERVER:  # reported once a new one runs (its roles' exits come first)
            now = time.time()
            self.report_fault(pb.FaultRecord(component=name, role="fork_server", pid=pid, cause=how,
                                             detail=f"{how}; every process it started died with it",
                                             detected_at=now, replaced_at=now))
            return
        process = self.procs.get(name)
        if process is None or process.pid != pid or process.node != ne.node:
            for old in self._retired:
                if old.pid == pid and old.node == ne.node:
                    old.exited = True
            if name in self.procs:  # replaced already: declared dead before its exit was seen
                self._report_exit_status(name, pid, how)
            return  # replaced or stopped already (a fenced one leaving)
        process.exited = True
        self.backend.release(ne.node, name, pid)
        if self._stopping.is_set() or self.fatal:
            return
        if name in self._respawn_due:  # due to start again already
            self._report_exit_status(name, pid, how)
            return
        log.warning("%s (pid %d%s) %s", name, pid, f" on node {ne.node[:12]}" if ne.node else "", how)
        if name in ("redis", "controller") and self.head in self.lost_nodes:
            self._fail(f"{name} was lost with the head node; the cluster's metadata is gone: start it again")
            return
        if name in ("redis", "controller"):
            self.report_fault(pb.FaultRecord(component=name, role=name, pid=pid, cause=how, detail=how,
                                              detected_at=time.time()))
        if name == "redis":
            threading.Thread(target=self._restart_redis, name="redis-restart", daemon=True).start()
            return
        if name == "controller":
            if not self.checkpointing:
                self._fail("the controller died, and without Redis (kv_checkpoint off) its state cannot be "
                           "recovered; restart the cluster")
                return
            self._respawn_due[name] = (time.monotonic(), pid)
            return
        if self.client is not None:  # the controller fences it and reroutes at once, without waiting for heartbeats
            self.client.report_failure("launcher", name, 0, f"process {pid} {how}", wait=False)
        if self.deployment.resilience and not self._restarting:
            recent = [t for t in self._spawn_times.get(name, []) if time.monotonic() - t < 2.0]
            self._respawn_due[name] = (time.monotonic() + (0.5 * 2 ** (len(recent) - 1) if recent else 0.0), pid)

    def _restart_redis(self) -> None:
        """A dead private Redis is started again, empty (see the module docstring)."""
        log.warning("redis-server exited; starting it again")
        try:
            self._launch_redis(self.deployment.redis_url, 10.0)
        except ClusterError as e:
            log.error("%s", e)
            return
        with self._fault_lock:  # its fault record gets the time the new one answered
            for report in [r for r in self._fault_reports if r.component == "redis"][-1:]:
                report.replaced_at = time.time()

    # ---- fault records of what the controller cannot see --------------------------------------

    def _report_exit_status(self, name: str, pid: int, how: str) -> None:
        """How a worker the controller declared dead already ended: it makes the controller's fault record
        exact (a peer's report of the closed link came first). Sent once (hence "replaced")."""
        if name in ("redis", "controller"):
            return  # reported as faults of their own
        now = time.time()
        self.report_fault(pb.FaultRecord(component=name, role=role_of(name)[0], pid=pid, cause=how,
                                         detail=f"process {pid} {how}", detected_at=now, replaced_at=now))

    def report_fault(self, record: pb.FaultRecord) -> None:
        """Send `record` to the controller (now, or once one answers; again once `replaced_at` is set)."""
        with self._fault_lock:
            self._fault_reports.append(record)
        self._next_fault_flush = 0.0

    def _report_faults(self) -> None:
        """Off the supervision loop (a controller that does not answer must not delay a restart)."""
        while not self._stopping.wait(0.05):
            try:
                self._flush_fault_reports()
            except Exception:  # one bad pass must never stop the reports
                log.exception("reporting fault records failed")

    def _flush_fault_reports(self) -> None:
        """Send the waiting fault records: each once at once, and again (an update) once its replacement
        serves; a controller that does not answer is tried again in half a second. The controller's own
        record is replaced the moment a new controller answers. What is sent is a copy taken under the
        lock: a replacement time set while a send is in flight goes out with the next one."""
        if not self._fault_reports or self.client is None or time.monotonic() < self._next_fault_flush:
            return
        with self._fault_lock:
            pending = [r for r in self._fault_reports if id(r) not in self._faults_sent or r.replaced_at]
        for record in pending:
            with self._fault_lock:
                sent = pb.FaultRecord()
                sent.CopyFrom(record)
            if sent.component == "controller" and not sent.replaced_at:
                sent.replaced_at = time.time()  # if this call succeeds, a new controller serves
            refused = False
            try:
                self.client.record_fault(sent, timeout_s=0.5)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    self._next_fault_flush = time.monotonic() + 0.5
                    return
                log.error("the controller refused a fault record of %s: %s", record.component, e.details())
                refused = True
            with self._fault_lock:
                if sent.replaced_at or refused:  # done with it
                    self._fault_reports.remove(record)
                    self._faults_sent.discard(id(record))
                else:  # sent; sent again once its replacement serves
                    self._faults_sent.add(id(record))

    def _replacement_node(self, name: str) -> str:
        """Where `name` starts again: the control plane on the head; a worker on its node unless that
        node was lost, else on the surviving node with the fewest of its role, off the head while
        another node survives."""
        if name in ("controller", "redis"):
            return self.head
        alive = [n for n in self.backend.nodes() if n not in self.lost_nodes]
        if role_of(name)[0] == "frontend":  # frontends may serve from any node, the head's included
            return node_policy.replacement_node(name, self.placed, alive)
        return node_policy.replacement_node(name, self.placed, node_policy.worker_nodes(self.head, alive) or alive)

    def _respawn(self, name: str) -> None:
        old = self.procs.get(name)
        node = self._replacement_node(name)
        if name == "controller":
            log.warning("starting a new controller (it recovers the cluster's state from Redis)")
        else:
            log.info("starting %s for %s on %s", "a replacement" if old else "a new worker", name,
                     f"node {node[:12]}" if node else "this host")
        self._spawn(name, node)
        if old is not None and name != "controller":
            self.replaced.append((name, old.node, node))

    def _fail(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
            log.error("the cluster cannot recover: %s", reason)

    # ---- the controller's orders ------------------------------------------------------------

    def _follow_orders(self) -> None:
        """Carry out the controller's orders: start a worker (a replacement, or one the roster gained),
        drain and stop one it lost, or (baseline) restart everything. A (re)connected stream sends every
        outstanding order again, so each is carried out at most once, by id."""
        assert self.client is not None
        while not self._stopping.is_set():
            if self.hold_orders.is_set():
                self._stopping.wait(0.05)
                continue
            try:
                stream = self.client.stub.LauncherCommands(pb.WatchRequest(name="launcher"), wait_for_ready=True)
                for order in stream:
                    if self._stopping.is_set():
                        return
                    if self.hold_orders.is_set():
                        stream.cancel()  # untaken: the controller sends it again once orders are followed
                        break
                    key = (order.id, order.action, order.worker, order.pid, order.generation)
                    if key in self._orders_done:
                        continue
                    self._orders_done.add(key)
                    try:
                        self._carry_out(order)
                    except Exception:
                        log.exception("launcher order %d (%s %s) failed", order.id, order.action, order.worker)
            except Exception:
                if self._stopping.wait(0.05):
                    return

    def _carry_out(self, order: pb.LauncherCommand) -> None:
        """One order. Each is idempotent: a start for a process that was already replaced, a stop for
        one that is already gone, and a restart generation already carried out change nothing."""
        if order.action == "start":  # the supervisor starts it, unless it was replaced meanwhile
            self._respawn_due.setdefault(order.worker, (time.monotonic(), order.pid))
        elif order.action == "stop":
            self._stop_worker(order.worker, order.pid)
        elif order.action == "restart-all":
            if order.generation <= self._restarted_generation:
                return
            self._restarting = True
            try:
                for _ in range(5):  # bounded: a cluster that cannot come back is left for an operator
                    if self._stopping.is_set():
                        break
                    try:
                        self.restart_all(reason=f"restart generation {order.generation}")
                        break
                    except ClusterError as e:  # a worker died while starting again: once more
                        log.error("restart-all failed (%s); trying again", e)
                self._restarted_generation = order.generation
            finally:
                self._restarting = False
        else:
            log.error("unknown launcher order %r for %s; ignored", order.action, order.worker)

    def _stop_worker(self, name: str, pid: int) -> None:
        """The roster lost `name`: it is no longer supervised (its exit is not replaced), and SIGTERM
        makes it drain (an attention worker hands its requests over; an expert worker finishes its
        parts) and leave. Killed at `stop` if it is still there then."""
        with self._spawn_lock:
            process = self.procs.get(name)
            if process is None or process.pid != pid:
                return  # replaced or stopped already
            del self.procs[name]
            self._respawn_due.pop(name, None)
            self._retired.append(process)
        log.info("stopping %s (pid %d): removed from the roster", name, pid)
        self.backend.signal(process.node, pid, signal.SIGTERM)

    def drain_frontends(self, timeout_s: float, stop: threading.Event | None = None) -> bool:
        """SIGTERM every frontend (each stops admitting, finishes what it has and leaves; none is replaced)
        and wait until they all left, at most `timeout_s` or until `stop` is set; True when they did."""
        with self._spawn_lock:
            frontends = [p for p in self.procs.values() if p.role == "frontend"]
            for p in frontends:
                del self.procs[p.name]
                self._respawn_due.pop(p.name, None)
                self._retired.append(p)
        for p in frontends:
            self.backend.signal(p.node, p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            if all(p.exited or p.node in self.lost_nodes for p in frontends):
                return True
            time.sleep(0.05)
        return all(p.exited for p in frontends)

    def restart_all(self, reason: str) -> None:
        """The restart-everything baseline (see the module docstring for "warm" and "cold")."""
        began = time.monotonic()
        self.restarts.append((began, 0.0))  # (began, 0.0) while it runs; (began, ready) once done
        cold = self.deployment.baseline_restart == "cold"
        log.warning("restarting every worker (%s, %s)", reason, self.deployment.baseline_restart)
        workers = [p for p in self.procs.values() if p.role in WORKER_ROLES]
        for p in workers:
            self.backend.signal(p.node, p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(p.exited or p.node in self.lost_nodes for p in workers):
            time.sleep(0.01)  # the supervisor sees the exits (and any lost node)
        experts = sorted(p.name for p in workers if p.role == "expert")
        attention = sorted(p.name for p in workers if p.role == "attention")
        for group in ([experts, attention] if cold else [experts + attention]):
            for name in group:
                old = self.procs[name]
                node = self._replacement_node(name)
                self._spawn(name, node, cold=cold)
                if node != old.node:
                    self.replaced.append((name, old.node, node))
            self._wait(group, time.monotonic() + self.deployment.startup_timeout_s, "workers to be ready again")
        self.restarts[-1] = (began, time.monotonic())
        log.warning("restart-all (%s) done in %.2fs", "cold" if cold else "warm", self.restarts[-1][1] - began)

    # ---- stop -------------------------------------------------------------------------------

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every worker, wait up to `grace_s`, then the controller, then SIGKILL the rest and
        stop the backend's own processes."""
        self._stopping.set()
        with self._spawn_lock:
            procs = list(self.procs.values())
            retired = list(self._retired)
        for p in retired:
            if not p.exited:
                self.backend.signal(p.node, p.pid, signal.SIGKILL)
        frontends = [p for p in procs if p.role == "frontend"]
        workers = [p for p in procs if p.role not in ("controller", "redis", "frontend")]
        controller = [p for p in procs if p.role == "controller"]
        # Frontends drain first (new requests get 503, those in flight finish), while every worker serves.
        for group, wait_s in ((frontends, self.deployment.drain_timeout_s + grace_s), (workers, grace_s),
                              (controller, 2.0)):
            for p in group:
                self.backend.signal(p.node, p.pid, signal.SIGTERM)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and not all(p.exited or p.node in self.lost_nodes for p in group):
                for ne in self.backend.exits(0.02):
                    self._on_exit(ne)
        for p in procs:
            if not p.exited and p.role != "redis":
                self.backend.signal(p.node, p.pid, signal.SIGKILL)
        redis = [p for p in procs if p.role == "redis" and not p.exited]
        for p in redis:  # last: the controller wrote its state there
            self.backend.signal(p.node, p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while redis and time.monotonic() < deadline and not all(p.exited for p in redis):
            for ne in self.backend.exits(0.02):
                self._on_exit(ne)
        for p in redis:
            if not p.exited:
                self.backend.signal(p.node, p.pid, signal.SIGKILL)
        if self.client is not None:
            self.client.close()
        for thread in self._threads:
            thread.join(2)
        try:
            self.backend.close()
        finally:
            if self._redis_dir is not None:
                self._redis_dir.cleanup()
            if self._tmp is not None:
                self._tmp.cleanup()
            for directory in self._adopted_dirs:  # a dead predecessor's temporary directories
                shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> "Launcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

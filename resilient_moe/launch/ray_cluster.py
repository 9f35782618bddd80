"""Ray launcher: the same roles as the local launcher, as Ray actors spread over the nodes of a Ray cluster.

Each process of the cluster (controller, KV store, expert and attention workers, a private Redis) runs
under a `RoleHost` actor pinned to one node (node-affinity scheduling, `launch/nodes.py` decides which):
the actor starts the role's `main(config)` in a child process of its own, which dies with the actor
(parent-death signal). So a node that is lost, or an actor Ray kills, takes exactly its processes with it.

The control plane (controller, Redis, and the caller: frontend, HTTP API) stays on the head node, the
driver's; attention and expert workers go round-robin over the other nodes, and each of those nodes
gets a KV store: an attention worker checkpoints into the store on its node and replicates to
`kv_replicas` stores on other nodes (default 1 under Ray), so a lost node loses no checkpoint. The controller
listens for gRPC on TCP; expert workers publish a shm and a TCP address, and each attention worker links
over shm to the expert workers on its node and over TCP to the others (`link.choose_address`).

Detection. A lost node breaks every link to its workers at once (the kernel closes their sockets),
so attention workers fail over and frontends move requests without waiting for anyone. Ray's
actor-death signal is the backstop: the supervisor waits on every actor's exit, reports a death to the
controller (which fences the incarnation) and starts a replacement, on the same node when only the
process died, else on the surviving node with the fewest workers of its role.

The cluster secret (resilient_moe.auth) is made here and handed to every actor as an argument; the
actor installs it (environment of its child), so it never appears on a command line.

What a loss of the head node costs: the frontend and its token logs, the controller and Redis go with
it (and with Redis the commit records that say which checkpoint blocks are valid), so every stream in
flight ends; workers on the other nodes keep their processes
but have no one to serve until a new head starts the cluster again.

Importing this module imports Ray (the `ray` extra); the local launcher never does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from resilient_moe import auth
from resilient_moe.deployment import DeploymentConfig, WorkerConfig
from resilient_moe.controller.client import ControllerClient
from resilient_moe.controller.records import kv_store_name
from resilient_moe.launch import nodes as node_policy
from resilient_moe.errors import ClusterError
from resilient_moe.launch.local import LocalCluster
from resilient_moe.proto import controller_pb2 as pb

log = logging.getLogger("resilient_moe.launcher.ray")

ACTOR_START_TIMEOUT_S = 60.0


def _reachable(node: dict, timeout_s: float = 0.3) -> bool:
    """Whether the node's raylet accepts a TCP connection (refused or silent: the node is lost)."""
    try:
        socket.create_connection((node["NodeManagerAddress"], int(node["NodeManagerPort"])), timeout_s).close()
        return True
    except (OSError, KeyError, ValueError):
        return False


class RoleHost:
    """A Ray actor that runs one process of the cluster (a role, or redis-server) as its child.

    `where` says where it runs; `run` starts the child; `wait_exit` returns its exit code once it has
    exited (the supervisor keeps one call outstanding); the child dies with the actor."""

    def __init__(self, secret_hex: str) -> None:
        from resilient_moe.launch.fork_server import die_with_parent

        auth.install(secret_hex)  # the child inherits it through the environment, never argv
        # The actor dies with its node's raylet (its parent) at once, and its child with it: left alone, a
        # Ray worker notices a dead raylet only some 0.6 s later, serving meanwhile as if its node lived.
        try:
            if os.path.basename(os.readlink(f"/proc/{os.getppid()}/exe")) == "raylet":
                die_with_parent(os.getppid())
        except OSError:
            pass
        self.proc: subprocess.Popen | None = None
        self.log_path = ""

    def where(self) -> dict:
        """The node id (hex), its IP, and a free TCP port on it (for a listener the driver must name)."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return {"node": ray.get_runtime_context().get_node_id(), "ip": ip, "port": port, "actor_pid": os.getpid()}

    def run(self, argv: list[str], log_path: str, stdin: str = "") -> int:
        """Start the child; `stdin` is written to its standard input and closed (its configuration)."""
        from resilient_moe.launch.fork_server import die_with_parent

        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        actor_pid = os.getpid()
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=lambda: die_with_parent(actor_pid))
        try:
            self.proc.stdin.write(stdin.encode())
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it exited at once; wait_exit reports how
        return self.proc.pid

    def wait_exit(self) -> int:
        assert self.proc is not None
        return self.proc.wait()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclasses.dataclass
class _Process:
    """One process of the cluster as the launcher tracks it."""

    name: str
    actor: object  # the RoleHost handle
    node: str
    ip: str
    pid: int
    exit_ref: object  # ObjectRef of wait_exit(): ready once the process (or its actor) is gone
    exited: bool = False  # its exit was handled (replaced, or left to a restart of everything)


class RayCluster:
    """A controller, KV stores (with checkpointing: one per worker node), E expert and A attention workers
    as Ray actors;
    the interface of `LocalCluster` (start, state, kill, restart_all, stop, pids, fatal)."""

    def __init__(self, deployment: DeploymentConfig, log_dir: str | os.PathLike[str] | None = None,
                 fork_server: object = None) -> None:
        """`fork_server` is accepted for the local launcher's signature and not used (actors start cold)."""
        self.deployment = deployment
        self.cluster_id = secrets.token_hex(4)
        self.secret = auth.new_secret()
        auth.install(self.secret)  # this process (the frontend) proves it too
        self._tmp = None
        if log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"rmoe-{self.cluster_id}-")
            log_dir = self._tmp.name
        self.log_dir = Path(log_dir).resolve()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.controller_address = ""
        self.head = ""  # node id of the head (the driver's node)
        self.procs: dict[str, _Process] = {}
        self.placed: dict[str, str] = {}  # worker -> node it runs on (or is to run on)
        self.lost_nodes: set[str] = set()  # nodes whose actors Ray declared dead: no replacements go there
        self.retired: list[int] = []
        self.client: ControllerClient | None = None
        self.fatal: str | None = None
        self.restarts: list[tuple[float, float]] = []
        self.hold_orders = threading.Event()
        self.replaced: list[tuple[str, str, str]] = []  # (worker, node it died on, node of its replacement)
        self._own_ray = False
        self._stopping = threading.Event()
        self._lock = threading.RLock()
        self._restarting = False
        self._restarted_generation = 0
        self._orders_done: set[tuple] = set()
        self._replacing: set[str] = set()
        self._threads: list[threading.Thread] = []

    # ---- what the API reads ----------------------------------------------------------------

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    @property
    def nodes(self) -> dict[str, str]:
        """Process name -> the Ray node id (hex) it runs on."""
        return {name: p.node for name, p in self.procs.items()}

    @property
    def checkpointing(self) -> bool:
        return self.deployment.resilience and self.deployment.kv_checkpoint

    def state(self) -> pb.ClusterState:
        assert self.client is not None
        return self.client.get_state()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        ray.get(self.procs[name].actor.signal.remote(sig), timeout=10)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.is_file():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ---- start ------------------------------------------------------------------------------

    def _connect_ray(self) -> None:
        if ray.is_initialized():
            return
        env = {key: os.environ[key] for key in ("PYTHONPATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") if key in os.environ}
        runtime_env = {"env_vars": env} if env else None
        address = self.deployment.ray_address or None
        ray.init(address=address, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False,
                 configure_logging=False)
        self._own_ray = True

    def alive_nodes(self) -> list[str]:
        """Ray's live nodes whose raylet still accepts a connection (Ray itself declares a node dead only
        after missed health checks), in a stable order (the head first)."""
        alive = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and _reachable(n))
        return sorted(alive, key=lambda n: n != self.head)

    def _launch(self, name: str, node: str, argv_for) -> _Process:
        """Start an actor on `node` and, in it, the child `argv_for(where)` gives (argv, stdin); wait
        until it runs."""
        actor = ray.remote(RoleHost).options(
            num_cpus=0, max_concurrency=4, max_restarts=0, name=f"rmoe-{self.cluster_id}-{name}-{secrets.token_hex(2)}",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        ).remote(self.secret.hex())
        try:
            where = ray.get(actor.where.remote(), timeout=ACTOR_START_TIMEOUT_S)
            argv, stdin = argv_for(where)
            pid = ray.get(actor.run.remote(argv, str(self.log_dir / f"{name}.log"), stdin),
                          timeout=ACTOR_START_TIMEOUT_S)
        except (GetTimeoutError, RayActorError) as e:
            ray.kill(actor, no_restart=True)
            if node not in self.alive_nodes():
                self.lost_nodes.add(node)  # no second try there
            raise ClusterError(f"could not start {name} on node {node[:12]}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
        process = _Process(name, actor, where["node"], where["ip"], pid, actor.wait_exit.remote())
        with self._lock:
            old = self.procs.get(name)
            if old is not None and old.pid != pid:
                self.retired.append(old.pid)
            self.procs[name] = process
            self.placed[name] = where["node"]
        log.info("%s started: pid %d on node %s (%s)", name, pid, where["node"][:12], where["ip"])
        return process

    def _start_role(self, name: str, node: str, background: bool = False) -> _Process:
        """`background`: a replacement joining a serving cluster (its start-up yields the CPU)."""
        role, index = LocalCluster.role_of(name)

        def argv(where: dict) -> tuple[list[str], str]:
            dep = dataclasses.replace(self.deployment, host=where["ip"])
            config = WorkerConfig(name, role, index, self.cluster_id, self.controller_address, dep, node=where["node"])
            argv = [sys.executable, "-m", "resilient_moe.launch.child", role]
            return argv + (["--background"] if background else []), config.to_json()

        return self._launch(name, node, argv)

    def _start_redis(self) -> str:
        """A private redis-server on the head node, on TCP (workers on other nodes reach it)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ClusterError("redis-server is not installed and no redis_url was given; or set kv_checkpoint: false")
        chosen: dict = {}
        password = secrets.token_hex(16)  # in its configuration on stdin, and in the URL workers get on theirs

        def argv(where: dict) -> tuple[list[str], str]:
            chosen.update(where)
            config = (f"bind {where['ip']}\nport {where['port']}\nrequirepass {password}\nsave \"\"\n"
                      f"appendonly no\ndir {self.log_dir}\n")
            return [binary, "-"], config

        self._launch("redis", self.head, argv)
        url = f"redis://:{password}@{chosen['ip']}:{chosen['port']}/0"
        import redis

        client = redis.Redis.from_url(url, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return url
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise ClusterError(f"redis-server did not start; see {self.log_dir / 'redis.log'}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def start(self) -> "RayCluster":
        if self.procs:
            raise ClusterError(f"cluster {self.cluster_id} is already started")
        dep = self.deployment
        deadline = time.monotonic() + dep.startup_timeout_s
        try:
            self._connect_ray()
            self.head = ray.get_runtime_context().get_node_id()
            workers_on = node_policy.worker_nodes(self.head, self.alive_nodes())
            experts = [f"ew-{i}" for i in range(dep.expert_workers)]
            attention = [f"aw-{i}" for i in range(dep.attention_workers)]
            self.placed.update(node_policy.spread_workers(experts + attention, workers_on))
            stores = []
            if self.checkpointing:  # a KV store on every worker node: each attention worker's primary is on
                # its node, its replicas (kv_replicas) on others, so a checkpoint outlives its node
                count = max(dep.kv_stores, len(workers_on))
                self.deployment = dep = dataclasses.replace(dep, kv_stores=count)
                stores = [kv_store_name(i) for i in range(count)]
                self.placed.update({name: workers_on[i % len(workers_on)] for i, name in enumerate(stores)})
                if not dep.redis_url:
                    self.deployment = dep = dataclasses.replace(dep, redis_url=self._start_redis())
            self._start_controller()
            self.client = ControllerClient(self.controller_address)
            self._wait(lambda s: True, deadline, "controller")
            self._start_all(stores + experts, deadline)
            self._wait(lambda s: LocalCluster._all_ready(s, experts + stores), deadline,
                       "expert workers and the KV stores")
            self._start_all(attention, deadline)
            self._wait(lambda s: LocalCluster._all_ready(s, attention), deadline, "attention workers")
            for target, what in ((self._follow_commands, "launcher-commands"), (self._supervise, "launcher-supervisor")):
                thread = threading.Thread(target=target, name=what, daemon=True)
                thread.start()
                self._threads.append(thread)
        except BaseException:
            self.stop()
            raise
        log.info("Ray cluster %s ready: %s", self.cluster_id,
                 ", ".join(f"{n}={p.pid}@{p.node[:8]}" for n, p in self.procs.items()))
        return self

    def _start_controller(self) -> None:
        """On the head, listening for gRPC on TCP at a port its actor found free; it plans shadows
        knowing each worker's node."""

        def argv(where: dict) -> tuple[list[str], str]:
            # A restarted controller takes its predecessor's address: every client keeps dialling it.
            self.controller_address = self.controller_address or f"{where['ip']}:{where['port']}"
            dep = dataclasses.replace(self.deployment, host=where["ip"])
            config = WorkerConfig("controller", "controller", 0, self.cluster_id, self.controller_address, dep,
                                  node=where["node"], worker_nodes=tuple(sorted(self.placed.items())))
            return [sys.executable, "-m", "resilient_moe.launch.child", "controller"], config.to_json()

        self._launch("controller", self.head, argv)

    def _start_all(self, names: list[str], deadline: float) -> None:
        """Start several workers at once (each actor's start-up overlaps the others')."""
        errors: list[BaseException] = []

        def one(name: str) -> None:
            try:
                self._start_role(name, self.placed[name])
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()))
        if errors:
            raise errors[0]

    def _wait(self, done, deadline: float, what: str) -> pb.ClusterState:
        assert self.client is not None
        while True:
            gone = [name for name, p in list(self.procs.items()) if ray.wait([p.exit_ref], timeout=0)[0]]
            if gone:
                raise ClusterError(f"{gone[0]} exited while starting {what}:\n{self.log_tail(gone[0])}")
            try:
                state = self.client.get_state(timeout_s=1.0)
                if done(state):
                    return state
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out starting {what}; logs in {self.log_dir}")
            time.sleep(0.02)

    # ---- supervision ------------------------------------------------------------------------

    def _supervise(self) -> None:
        """Wait on every process's exit: a dead one is reported to the controller (which fences it) and
        replaced, on a surviving node when its actor (so perhaps its node) was lost."""
        while not self._stopping.is_set():
            try:
                with self._lock:
                    watched = {p.exit_ref: p for p in self.procs.values()
                               if p.name not in self._replacing and not p.exited}
                if not watched:
                    self._stopping.wait(0.05)
                    continue
                ready, _ = ray.wait(list(watched), num_returns=1, timeout=0.05)
                if ready:
                    ready, _ = ray.wait(list(watched), num_returns=len(watched), timeout=0)
                for ref in ready:
                    process = watched[ref]
                    try:
                        how, node_lost = f"exited with code {ray.get(ref, timeout=1)}", False
                    except (RayActorError, GetTimeoutError) as e:
                        how, node_lost = f"was lost with its Ray actor ({type(e).__name__})", True
                    self._on_exit(process, how, node_lost)
            except Exception:  # one bad pass must never stop supervision
                if not self._stopping.is_set():
                    log.exception("supervision pass failed")
                    self._stopping.wait(0.1)

    def _on_exit(self, process: _Process, how: str, node_lost: bool) -> None:
        with self._lock:
            if self._stopping.is_set() or self.procs.get(process.name) is not process or process.name in self._replacing:
                return
            process.exited = True
            if node_lost:
                self.lost_nodes.add(process.node)
            log.warning("%s (pid %d on node %s) %s", process.name, process.pid, process.node[:12], how)
            if process.name == "redis" or (process.name == "controller" and not self.checkpointing):
                self.fatal = self.fatal or (f"{process.name} on the head node {how}; the cluster's metadata is "
                                            "gone: start the cluster again")
                return
            if process.name == "controller":  # it recovers the cluster's state from Redis, at the same address
                self._replacing.add(process.name)
                threading.Thread(target=self._replace, args=(process,), daemon=True).start()
                return
            if self.client is not None:
                self.client.report_failure("launcher", process.name, 0, f"process {process.pid} {how}", wait=False)
            if not self.deployment.resilience or self._restarting:
                return  # the baseline: the controller orders a restart of everything
            self._replacing.add(process.name)
        threading.Thread(target=self._replace, args=(process,), name=f"replace-{process.name}", daemon=True).start()

    def _replace(self, dead: _Process) -> None:
        try:
            try:
                ray.kill(dead.actor, no_restart=True)
            except Exception:  # already gone with its node
                pass
            for attempt in range(3):  # bounded: a node that dies under us while starting is skipped next time
                if self._stopping.is_set():
                    return
                worker = dead.name not in ("controller", "redis")  # the control plane stays on the head
                off = self.lost_nodes | {self.head} if worker and self._head_spare() else self.lost_nodes
                node = node_policy.replacement_node(dead.name, self.placed, self.alive_nodes(), off)
                try:
                    if dead.name == "controller":
                        self._start_controller()
                    else:
                        self._start_role(dead.name, node, background=True)
                    self.replaced.append((dead.name, dead.node, node))
                    return
                except ClusterError as e:
                    log.error("replacement %d for %s failed: %s", attempt + 1, dead.name, e)
                    self.lost_nodes.add(node)
            self.fatal = self.fatal or f"no replacement for {dead.name} could be started"
        except Exception as e:  # noqa: BLE001
            log.exception("replacing %s failed", dead.name)
            self.fatal = self.fatal or f"replacing {dead.name} failed: {e}"
        finally:
            with self._lock:
                self._replacing.discard(dead.name)

    def _head_spare(self) -> bool:
        """Workers stay off the head while another node survives."""
        return any(n != self.head and n not in self.lost_nodes for n in self.alive_nodes())

    # The controller's orders, followed as the local launcher follows them (each at most once, by id;
    # held while `hold_orders` is set): start (a replacement; the supervisor usually got there first),
    # stop, restart-all. Only `_carry_out` differs.
    _follow_commands = LocalCluster._follow_commands

    def _carry_out(self, command: pb.LauncherCommand) -> None:
        if command.action == "start":
            with self._lock:
                current = self.procs.get(command.worker)
                running = current is not None and not ray.wait([current.exit_ref], timeout=0)[0]
                if command.worker in self._replacing or (running and current.pid != command.pid):
                    return  # replaced already (or being replaced)
                if current is None:  # a worker the roster gained
                    role_nodes = node_policy.worker_nodes(self.head, self.alive_nodes())
                    self.placed[command.worker] = node_policy.replacement_node(
                        command.worker, self.placed, [n for n in role_nodes if n not in self.lost_nodes] or role_nodes)
                    self._replacing.add(command.worker)
                    threading.Thread(target=self._start_new, args=(command.worker,), daemon=True).start()
                    return
            if running:  # the controller gave up on it (silent): the supervisor sees it exit and replaces it
                try:
                    self.kill(command.worker, signal.SIGKILL)
                except (RayActorError, GetTimeoutError):
                    pass  # gone already, with its actor
        elif command.action == "stop":
            with self._lock:
                current = self.procs.get(command.worker)
                if current is None or current.pid != command.pid:
                    return
                del self.procs[command.worker]
                self.retired.append(current.pid)
            current.actor.signal.remote(signal.SIGTERM)  # it drains and leaves; its actor is killed at stop
        elif command.action == "restart-all":
            if command.generation <= self._restarted_generation:
                return
            self._restarting = True
            try:
                for _ in range(5):
                    if self._stopping.is_set():
                        break
                    try:
                        self.restart_all(reason=f"restart generation {command.generation}")
                        break
                    except ClusterError as e:
                        log.error("restart-all failed (%s); trying again", e)
                self._restarted_generation = command.generation
            finally:
                self._restarting = False
        else:
            log.error("unknown launcher order %r for %s; ignored", command.action, command.worker)

    def _start_new(self, name: str) -> None:
        try:
            self._start_role(name, self.placed[name], background=True)
        except ClusterError as e:
            log.error("%s", e)
        finally:
            with self._lock:
                self._replacing.discard(name)

    def restart_all(self, reason: str) -> None:
        """The restart-everything baseline: every worker's actor is killed and started again (a fresh
        interpreter each), expert workers first, on the surviving nodes."""
        began = time.monotonic()
        self.restarts.append((began, 0.0))
        log.warning("restarting every worker (%s)", reason)
        with self._lock:
            workers = [p for n, p in self.procs.items() if n.startswith(("ew-", "aw-"))]
            for p in workers:
                self._replacing.add(p.name)
        try:
            # Actors already lost with their node show it within moments: no worker goes back there.
            refs = {p.exit_ref: p for p in workers}
            gone, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0.3)
            for ref in gone:
                try:
                    ray.get(ref, timeout=1)
                except (RayActorError, GetTimeoutError):
                    self.lost_nodes.add(refs[ref].node)
            for p in workers:
                try:
                    ray.kill(p.actor, no_restart=True)
                except Exception:
                    pass
            alive = [n for n in node_policy.worker_nodes(self.head, self.alive_nodes()) if n not in self.lost_nodes]
            names = sorted(p.name for p in workers)
            for name in names:
                self.placed[name] = node_policy.replacement_node(name, self.placed, alive or [self.head])
            experts = [n for n in names if n.startswith("ew-")]
            attention = [n for n in names if n.startswith("aw-")]
            deadline = time.monotonic() + self.deployment.startup_timeout_s
            self._start_all(experts, deadline)
            self._wait_fresh(experts, deadline)
            self._start_all(attention, deadline)
            self._wait_fresh(attention, deadline)
            self.replaced += [(p.name, p.node, self.placed[p.name]) for p in workers if p.node != self.placed[p.name]]
        finally:
            with self._lock:
                self._replacing.difference_update(p.name for p in workers)
        self.restarts[-1] = (began, time.monotonic())
        log.warning("restart-all done in %.2fs", self.restarts[-1][1] - began)

    def _wait_fresh(self, names: list[str], deadline: float) -> None:
        assert self.client is not None
        while time.monotonic() < deadline:
            try:
                state = self.client.get_state(timeout_s=1.0)
                pids = self.pids
                ready = {w.name for w in state.workers if w.state == pb.READY and w.pid == pids.get(w.name)}
                if all(n in ready for n in names):
                    return
            except Exception:
                pass
            time.sleep(0.02)
        raise ClusterError(f"timed out waiting for {', '.join(names)} to be ready again")

    # ---- stop -------------------------------------------------------------------------------

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every worker, wait up to `grace_s`, then kill every actor (their children die with
        them), the controller and Redis last; shut Ray down if this launcher started it."""
        self._stopping.set()
        with self._lock:
            procs = list(self.procs.values())
        workers = [p for p in procs if p.name not in ("controller", "redis")]
        try:
            if ray.is_initialized():
                for p in workers:
                    p.actor.signal.remote(signal.SIGTERM)
                if workers:
                    ray.wait([p.exit_ref for p in workers], num_returns=len(workers), timeout=grace_s)
                for p in procs:
                    try:
                        ray.kill(p.actor, no_restart=True)
                    except Exception:
                        pass
        finally:
            if self.client is not None:
                self.client.close()
            for t in self._threads:
                t.join(2)
            if self._own_ray and ray.is_initialized():
                ray.shutdown()
            if self._tmp is not None:
                self._tmp.cleanup()

    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


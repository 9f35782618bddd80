"""The Ray backend: the nodes of a Ray cluster, each with a `NodeHost` actor that holds the node's fork
server (node_spawner.py), so every role on every node is forked warm, a replacement on a surviving
node included, and each node reports its processes' exits the same way as the local backend.

Lifetimes. A NodeHost dies with its node's raylet at once (parent-death signal; left alone a Ray worker
notices a dead raylet only some 0.6 s later, serving meanwhile as if its node lived), its fork server
and plain processes die with it, and the roles with the fork server: a lost node, or a NodeHost that
Ray kills, takes exactly that node's processes with it. Losing a node is seen two ways: the node's
raylet stops accepting connections (checked every EXIT_POLL_S; Ray itself declares a node dead only
after missed health checks), or the NodeHost's outstanding call fails; either way every process of
that node is reported lost with it.

Placement. Where each role goes is the launcher's policy (launch/nodes.py), expressed to Ray as
node-affinity scheduling. Placement groups would let Ray choose nodes, but a replacement must start
on a surviving node within milliseconds of the loss, while a placement group's bundle on a dead node
waits for Ray to declare that node dead (seconds) before it is placed again; and the controller plans
shadows knowing each worker's node before it starts. So nodes are chosen here and Ray is told.

Resources. Each role that is given cores (`cpu_affinity: auto`) holds a `CpuReservation` actor on its
node with as many CPUs as it has cores, so Ray's scheduler (and other users of the cluster) sees
them taken; on a node whose CPUs are all reserved already (a replacement after a node loss) it
reserves what is left and says so in the log.

Security. The cluster secret reaches each NodeHost as an actor argument and is installed there (in
memory: auth.py); the NodeHost hands it to its fork server through an inherited pipe, and the fork
server to each role over its socketpair. Nothing secret is on a command line or in an environment, and
the NodeHost, its fork server and every role are non-dumpable (procs.harden_process).

Importing this module imports Ray (the `ray` extra); the local backend never does.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from resilient_moe import auth
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.errors import ClusterError
from resilient_moe.launch.backend import Backend, NodeExit
from resilient_moe.launch.node_spawner import Exit

log = logging.getLogger("resilient_moe.launcher.ray")

CALL_TIMEOUT_S = 60.0
NAMESPACE = "resilient-moe"  # a NodeHost call that takes longer: its node is taken for lost
EXIT_POLL_S = 0.1  # how often raylets are checked for reachability


class NodeHost:
    """A Ray actor holding one node's `NodeSpawner` (see the module docstring)."""

    def __init__(self, secret_hex: str) -> None:
        from resilient_moe.launch.fork_server import die_with_parent
        from resilient_moe.launch.node_spawner import NodeSpawner
        from resilient_moe.procs import harden_process

        harden_process()  # it holds the secret (memory only: its roles get it from their fork server)
        auth.install(secret_hex)
        try:
            if os.path.basename(os.readlink(f"/proc/{os.getppid()}/exe")) == "raylet":
                die_with_parent(os.getppid())
        except OSError:
            pass
        self.spawner = NodeSpawner()
        self.spawner.start()  # its imports run while the other nodes' do

    def where(self) -> dict:
        return {**self.spawner.where(), "node": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address()}

    def wait_ready(self, timeout_s: float) -> None:
        self.spawner.wait_ready(timeout_s)

    def free_port(self, host: str) -> int:
        return self.spawner.free_port(host)

    def spawn(self, name: str, role: str, config_json: str, log_path: str, cold: bool) -> int:
        return self.spawner.spawn(name, role, config_json, log_path, cold=cold)

    def run(self, name: str, argv: list[str], stdin: bytes, log_path: str) -> int:
        return self.spawner.run(name, argv, stdin, log_path)

    def signal(self, pid: int, sig: int) -> None:
        self.spawner.signal(pid, sig)

    def exits(self, timeout_s: float) -> list[tuple[str, int, str, int | None]]:
        """A long poll: the exits seen, as soon as there is one, or none after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.spawner.exits()
            if found or time.monotonic() >= deadline:
                return [(e.name, e.pid, e.how, e.code) for e in found]
            time.sleep(0.005)

    def log_tail(self, path: str, lines: int) -> str:
        return self.spawner.log_tail(path, lines)

    def kill_node(self) -> None:
        """The node's loss, for real: SIGKILL its raylet (everything of ours there dies with it)."""
        parent = os.getppid()
        os.kill(parent, 9)

    def hold_lease(self, url: str, key: str, lease_s: float) -> None:
        """This node's processes outlive the driver while `key` is renewed; once its fork server stopped
        (the lease lapsed), this detached actor leaves too."""
        self.spawner.hold_lease(url, key, lease_s)
        threading.Thread(target=self._leave_with_fork_server, name="lease", daemon=True).start()

    def _leave_with_fork_server(self) -> None:
        while self.spawner.fork_server is not None and self.spawner.fork_server.alive:
            time.sleep(1.0)
        os._exit(0)

    def children(self) -> list[tuple[str, int]]:
        """(name, pid) of every process this node runs (for a driver that adopts the cluster)."""
        return [(name, pid) for pid, name in self.spawner.running().items()]

    def shutdown(self) -> None:
        self.spawner.shutdown()


class CpuReservation:
    """Holds CPUs of a node in Ray's books for one role process (it does nothing else)."""

    def ready(self) -> bool:
        return True


def _passed_env() -> dict[str, str]:
    """What the roles on every node must see as this process does (the package's path, loopback clusters)."""
    return {k: os.environ[k] for k in ("PYTHONPATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") if k in os.environ}


def _reachable(address: tuple[str, int], timeout_s: float = 0.3) -> bool:
    """Whether a raylet accepts a TCP connection (refused or silent: its node is lost)."""
    try:
        socket.create_connection(address, timeout_s).close()
        return True
    except OSError:
        return False


class RayBackend(Backend):
    """The nodes of a Ray cluster (see the module docstring)."""

    kind = "ray"

    def __init__(self, deployment: DeploymentConfig) -> None:
        self.address = deployment.ray_address or None
        # With a lease (a cluster with Redis: supervisor.py) the NodeHosts outlive the driver, for as long
        # as a supervisor renews it: detached actors, in a namespace of their own, found again by name.
        self.detached = deployment.resilience and deployment.kv_checkpoint
        self._own_ray = False
        self._head = ""
        self._secret_hex = ""
        self._cluster_id = ""
        self._lock = threading.RLock()
        self.hosts: dict[str, object] = {}  # node -> its NodeHost, once ready
        self._where: dict[str, dict] = {}  # node -> NodeHost.where()
        self._raylets: dict[str, tuple[str, int]] = {}  # node -> raylet's (ip, port)
        self._capacity: dict[str, float] = {}  # node -> its CPUs in Ray's books
        self._polls: dict[object, str] = {}  # outstanding NodeHost.exits ref -> node
        self._running: dict[str, dict[int, str]] = {}  # node -> pid -> name of what we started there, not seen exiting
        self._reservations: dict[tuple[str, str, int], tuple[object, float]] = {}  # (node, name, pid) -> (actor, cpus)
        self._lost: set[str] = set()
        self._pending_lost: list[NodeExit] = []
        self._checked_at = 0.0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # ---- nodes ------------------------------------------------------------------------------

    def open(self, cluster_id: str, secret: bytes) -> None:
        if not ray.is_initialized():
            env = _passed_env()
            ray.init(address=self.address, include_dashboard=False, runtime_env={"env_vars": env} if env else None,
                     log_to_driver=False, configure_logging=False, namespace=NAMESPACE)
            self._own_ray = True
        self._cluster_id, self._secret_hex = cluster_id, secret.hex()
        self._head = ray.get_runtime_context().get_node_id()
        pending = {node: self._new_host(node) for node in self._ray_nodes()}
        for node, host in pending.items():
            try:
                self._adopt(node, host, ray.get(host.where.remote(), timeout=CALL_TIMEOUT_S))
            except (GetTimeoutError, RayActorError) as e:
                log.warning("node %s: no NodeHost could start there (%s); not using it", node[:12], type(e).__name__)
        if self._head not in self.hosts:
            raise ClusterError(f"could not start on the head node {self._head[:12]}")
        self._watcher = threading.Thread(target=self._watch_nodes, name="ray-nodes", daemon=True)
        self._watcher.start()

    def _ray_nodes(self) -> list[str]:
        nodes = []
        for n in ray.nodes():
            if n.get("Alive"):
                self._raylets.setdefault(n["NodeID"], (n["NodeManagerAddress"], int(n["NodeManagerPort"])))
                self._capacity.setdefault(n["NodeID"], float(n.get("Resources", {}).get("CPU", 0.0)))
                nodes.append(n["NodeID"])
        return nodes

    def _new_host(self, node: str):
        # Ray starts its workers at nice 15 (RAY_worker_niceness), so that its own daemons stay responsive;
        # the roles are the service, so the NodeHost (whose children they are) asks for the normal priority.
        return ray.remote(NodeHost).options(
            num_cpus=0, max_concurrency=16, max_restarts=0, name=self._host_name(node), namespace=NAMESPACE,
            lifetime="detached" if self.detached else None,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            runtime_env={"env_vars": {**_passed_env(), "RAY_worker_niceness": "0"}},
        ).remote(self._secret_hex)

    def _host_name(self, node: str) -> str:
        return f"rmoe-{self._cluster_id}-node-{node[:12]}"

    def hold_lease(self, url: str, key: str, lease_s: float) -> None:
        with self._lock:
            hosts = list(self.hosts.values())
        ray.get([h.hold_lease.remote(url, key, lease_s) for h in hosts], timeout=CALL_TIMEOUT_S)

    def handover(self) -> dict:
        return {"ray_address": ray.get_runtime_context().gcs_address, "head": self._head,
                "nodes": sorted(self.hosts)}

    def adopt(self, cluster_id: str, secret: bytes, handover: dict) -> list[tuple[str, str, int]]:
        if not ray.is_initialized():
            env = _passed_env()
            ray.init(address=handover["ray_address"], include_dashboard=False, log_to_driver=False,
                     configure_logging=False, namespace=NAMESPACE, runtime_env={"env_vars": env} if env else None)
        self._cluster_id, self._secret_hex, self._head = cluster_id, secret.hex(), handover["head"]
        self._ray_nodes()
        running = []
        for node in handover["nodes"]:
            try:
                host = ray.get_actor(self._host_name(node), namespace=NAMESPACE)
                where = ray.get(host.where.remote(), timeout=CALL_TIMEOUT_S)
                children = ray.get(host.children.remote(), timeout=CALL_TIMEOUT_S)
            except (ValueError, GetTimeoutError, RayActorError):
                continue  # that node is gone
            self._adopt(node, host, where)
            with self._lock:
                self._running[node] = {pid: name for name, pid in children}
            running += [(node, name, pid) for name, pid in children]
        self._watcher = threading.Thread(target=self._watch_nodes, name="ray-nodes", daemon=True)
        self._watcher.start()
        return running

    def _adopt(self, node: str, host, where: dict) -> None:
        with self._lock:
            self.hosts[node] = host
            self._where[node] = where
            self._running.setdefault(node, {})
            self._polls[host.exits.remote(0.5)] = node

    def _watch_nodes(self) -> None:
        """Nodes that join later (a replacement for a lost one) get a NodeHost, used once it is ready."""
        while not self._stop.wait(1.0):
            try:
                for node in self._ray_nodes():
                    if node in self.hosts or node in self._lost:
                        continue
                    host = self._new_host(node)
                    where = ray.get(host.where.remote(), timeout=CALL_TIMEOUT_S)
                    ray.get(host.wait_ready.remote(CALL_TIMEOUT_S), timeout=CALL_TIMEOUT_S + 5)
                    self._adopt(node, host, where)
                    log.info("node %s joined: its fork server is ready", node[:12])
            except Exception as e:  # noqa: BLE001 (a node that fails to come up is tried again)
                if not self._stop.is_set():
                    log.warning("watching Ray's nodes: %s: %s", type(e).__name__, e)

    def wait_ready(self, timeout_s: float) -> None:
        with self._lock:
            hosts = dict(self.hosts)
        refs = {node: host.wait_ready.remote(timeout_s) for node, host in hosts.items()}
        for node, ref in refs.items():
            try:
                ray.get(ref, timeout=timeout_s + 5)
            except (GetTimeoutError, RayActorError) as e:
                raise ClusterError(f"node {node[:12]}: its fork server did not start ({type(e).__name__})") from None

    def head(self) -> str:
        return self._head

    def nodes(self) -> list[str]:
        with self._lock:
            alive = sorted(n for n in self.hosts if n not in self._lost)
        return sorted(alive, key=lambda n: n != self._head)

    def cores(self, node: str) -> list[int]:
        return list(self._where[node]["cores"])

    def host(self, node: str) -> str:
        return self._where[node]["ip"]

    def _call(self, node: str, method: str, *args):
        host = self.hosts.get(node)
        if host is None or node in self._lost:
            raise ClusterError(f"node {node[:12]} is lost")
        try:
            return ray.get(getattr(host, method).remote(*args), timeout=CALL_TIMEOUT_S)
        except (GetTimeoutError, RayActorError) as e:
            raise ClusterError(f"node {node[:12]}: {method} failed ({type(e).__name__})") from None

    def control_address(self, cluster_id: str, node: str) -> str:
        ip = self.host(node)
        return f"{ip}:{self._call(node, 'free_port', ip)}"

    def redis_endpoint(self, node: str, directory: str, password: str) -> tuple[list[str], str]:
        ip = self.host(node)
        port = self._call(node, "free_port", ip)
        return [f"bind {ip}", f"port {port}"], f"redis://:{password}@{ip}:{port}/0"

    # ---- processes --------------------------------------------------------------------------

    def spawn(self, node: str, name: str, role: str, config_json: str, log_path: str, cold: bool = False,
              cpus: tuple[int, ...] = ()) -> int:
        pid = self._call(node, "spawn", name, role, config_json, log_path, cold)
        with self._lock:
            self._running[node][pid] = name
        if cpus:
            self._reserve(node, name, pid, len(cpus))
        return pid

    def _reserve(self, node: str, name: str, pid: int, cores: int) -> None:
        with self._lock:
            taken = sum(c for (n, _, _), (_, c) in self._reservations.items() if n == node)
            cpus = max(0.0, min(float(cores), self._capacity.get(node, 0.0) - taken))
            if cpus < cores:
                log.warning("%s has %d core(s) on node %s, but only %g CPU(s) are left there in Ray's books; "
                            "reserving those", name, cores, node[:12], cpus)
            if cpus <= 0:
                return
            actor = ray.remote(CpuReservation).options(
                num_cpus=cpus, max_restarts=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            ).remote()  # scheduled in the background: the role is running already
            self._reservations[(node, name, pid)] = (actor, cpus)

    def release(self, node: str, name: str, pid: int) -> None:
        with self._lock:
            held = self._reservations.pop((node, name, pid), None)
        if held is not None:
            try:
                ray.kill(held[0], no_restart=True)
            except Exception:  # noqa: BLE001 (gone with its node)
                pass

    def run(self, node: str, name: str, argv: list[str], stdin: bytes, log_path: str) -> int:
        pid = self._call(node, "run", name, argv, stdin, log_path)
        with self._lock:
            self._running[node][pid] = name
        return pid

    def signal(self, node: str, pid: int, sig: int) -> None:
        host = self.hosts.get(node)
        if host is not None and node not in self._lost:
            host.signal.remote(pid, sig)

    def exits(self, timeout_s: float) -> list[NodeExit]:
        out: list[NodeExit] = []
        now = time.monotonic()
        if now - self._checked_at >= EXIT_POLL_S:
            self._checked_at = now
            for node in self.nodes():
                if node in self._raylets and not _reachable(self._raylets[node]):
                    self._lose(node, "its raylet does not answer")
        with self._lock:
            out, self._pending_lost = self._pending_lost, []
            polls = dict(self._polls)
        if out or not polls:
            if not polls:
                time.sleep(timeout_s)
            return out
        ready, _ = ray.wait(list(polls), num_returns=1, timeout=timeout_s)
        if ready:
            ready, _ = ray.wait(list(polls), num_returns=len(polls), timeout=0)
        for ref in ready:
            node = polls[ref]
            with self._lock:
                self._polls.pop(ref, None)
            try:
                found = ray.get(ref, timeout=1)
            except (RayActorError, GetTimeoutError):
                self._lose(node, "its NodeHost was lost")
                continue
            with self._lock:
                for name, pid, how, code in found:
                    self._running.get(node, {}).pop(pid, None)
                    out.append(NodeExit(node, Exit(name, pid, how, code)))
                host = self.hosts.get(node)
                if host is not None and node not in self._lost:
                    self._polls[host.exits.remote(0.5)] = node
        with self._lock:
            out += self._pending_lost
            self._pending_lost = []
        return out

    def _lose(self, node: str, why: str) -> None:
        """Every process of `node` is lost with it."""
        with self._lock:
            if node in self._lost:
                return
            self._lost.add(node)
            host = self.hosts.pop(node, None)
            for ref in [r for r, n in self._polls.items() if n == node]:
                del self._polls[ref]
            running = self._running.pop(node, {})
            self._pending_lost += [NodeExit(node, Exit(name, pid, f"was lost with its node ({why})"), node_lost=True)
                                   for pid, name in running.items()]
        log.warning("node %s lost: %s", node[:12], why)
        if host is not None:
            try:
                ray.kill(host, no_restart=True)
            except Exception:  # noqa: BLE001
                pass

    def kill_node(self, node: str) -> None:
        host = self.hosts.get(node)
        if host is None:
            raise ClusterError(f"node {node[:12]} has no NodeHost of this cluster")
        host.kill_node.remote()

    def log_tail(self, node: str, path: str, lines: int = 30) -> str:
        try:
            return self._call(node, "log_tail", path, lines)
        except ClusterError:
            try:  # a node on this host (a loopback test cluster) leaves its logs readable here
                with open(path, errors="replace") as f:
                    return "\n".join(f.read().splitlines()[-lines:])
            except OSError:
                return "(no log)"

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(3)
        with self._lock:
            hosts = list(self.hosts.values())
            reservations = [actor for actor, _ in self._reservations.values()]
            self.hosts.clear()
            self._reservations.clear()
        try:
            if ray.is_initialized():
                for ref in [h.shutdown.remote() for h in hosts]:
                    try:
                        ray.get(ref, timeout=15)
                    except Exception:  # noqa: BLE001 (gone with its node)
                        pass
                for actor in [*hosts, *reservations]:
                    try:
                        ray.kill(actor, no_restart=True)
                    except Exception:  # noqa: BLE001
                        pass
        finally:
            if self._own_ray and ray.is_initialized():
                ray.shutdown()

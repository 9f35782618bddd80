"""The local backend: every process of the cluster on this host, roles forked from one fork server in
the launcher's process (node_spawner.py), a private Redis on a unix socket in a private directory.

This host is the only node, named by its host name (as its workers report it). Datapath shared memory is
memfd-based (no names in /dev/shm), and lifetimes are chained by parent-death signals (launcher ->
fork server -> roles; launcher -> redis-server), with the fork server leading a process group of its
own, so even a launcher killed with SIGKILL leaves no process behind.

The cluster secret is installed in the launcher's process (in memory, never its environment: auth.py)
before anything starts; the fork server gets it through an inherited pipe, each spawn request gives it
to the fork server over their socketpair, and the forked worker installs it. It is never on a command
line or in an environment.
"""

from __future__ import annotations

import os
import signal
import time

from resilient_moe.deployment import DeploymentConfig
from resilient_moe.launch.backend import Backend, NodeExit
from resilient_moe.launch.fork_server import ForkServer
from resilient_moe.launch.node_spawner import NodeSpawner

NODE = os.uname().nodename  # this host


class LocalBackend(Backend):
    """One node, this host (see the module docstring)."""

    kind = "local"

    def __init__(self, deployment: DeploymentConfig, fork_server: ForkServer | None = None) -> None:
        """`fork_server`: share a running one (tests start many clusters); it is then not stopped here."""
        self.address = deployment.host
        self.spawner = NodeSpawner(fork_server)

    @property
    def fork_server(self) -> ForkServer | None:
        return self.spawner.fork_server

    def open(self, cluster_id: str, secret: bytes) -> None:
        self.spawner.start()

    def wait_ready(self, timeout_s: float) -> None:
        self.spawner.wait_ready(timeout_s)

    def head(self) -> str:
        return NODE

    def nodes(self) -> list[str]:
        return [NODE]

    def cores(self, node: str) -> list[int]:
        return sorted(os.sched_getaffinity(0))

    def host(self, node: str) -> str:
        return self.address

    def control_address(self, cluster_id: str, node: str) -> str:
        return f"unix-abstract:rmoe-{cluster_id}-controller"

    def redis_endpoint(self, node: str, directory: str, password: str) -> tuple[list[str], str]:
        sock = os.path.join(directory, "redis.sock")
        return ["port 0", f"unixsocket {sock}", "unixsocketperm 700"], f"unix://:{password}@{sock}"

    def spawn(self, node: str, name: str, role: str, config_json: str, log_path: str, cold: bool = False,
              cpus: tuple[int, ...] = ()) -> int:
        return self.spawner.spawn(name, role, config_json, log_path, cold=cold)

    def run(self, node: str, name: str, argv: list[str], stdin: bytes, log_path: str) -> int:
        return self.spawner.run(name, argv, stdin, log_path)

    def signal(self, node: str, pid: int, sig: int) -> None:
        self.spawner.signal(pid, sig)

    def exits(self, timeout_s: float) -> list[NodeExit]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.spawner.exits()
            if found or time.monotonic() >= deadline:
                return [NodeExit(NODE, e) for e in found]
            time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))

    def hold_lease(self, url: str, key: str, lease_s: float) -> None:
        self.spawner.hold_lease(url, key, lease_s)

    def handover(self) -> dict:
        return {"fork_server": self.spawner.fork_server.address}

    def adopt(self, cluster_id: str, secret: bytes, handover: dict) -> list[tuple[str, str, int]]:
        return [(NODE, name, pid) for pid, name in self.spawner.adopt(handover["fork_server"]).items()]

    def kill_node(self, node: str) -> None:
        """This host's loss, as far as the cluster goes: SIGKILL its fork server, every role and Redis in
        the same instant (the launcher, which must bring it back, stays)."""
        pids = [self.spawner.fork_server.proc.pid, *self.spawner.pids()]
        for pid in pids:
            self.spawner.signal(pid, signal.SIGKILL)

    def log_tail(self, node: str, path: str, lines: int = 30) -> str:
        return self.spawner.log_tail(path, lines)

    def close(self) -> None:
        self.spawner.shutdown()

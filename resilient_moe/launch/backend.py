"""What a launcher backend supplies: mechanism only (launcher.py holds every policy).

A backend knows how to reach the nodes of its kind of cluster and start processes there: the local
backend has one node, this host, whose processes it starts from a fork server in the launcher's own
process; the Ray backend has the nodes of a Ray cluster, each with a `NodeHost` actor holding that
node's fork server. Both start a node's processes through a `NodeSpawner` (node_spawner.py), so a
role is forked warm on every node and every node reports its exits the same way.

Everything here is asked for by the launcher, which decides what, where and when; a backend never
replaces, restarts or gives up on anything by itself.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from resilient_moe.launch.node_spawner import Exit


@dataclass(frozen=True)
class NodeExit:
    """A process ended on `node`; `node_lost`: with its whole node (so nothing of ours runs there now)."""

    node: str
    exit: Exit
    node_lost: bool = False


class Backend(abc.ABC):
    """The mechanism a `Launcher` drives (see the module docstring)."""

    kind: str = ""  # "local" or "ray"

    @abc.abstractmethod
    def open(self, cluster_id: str, secret: bytes) -> None:
        """Reach the cluster (start a fork server; join Ray and put a NodeHost on every node). Fork
        servers import in the background: `wait_ready` waits for them."""

    @abc.abstractmethod
    def wait_ready(self, timeout_s: float) -> None:
        """Every node's fork server answers."""

    @abc.abstractmethod
    def head(self) -> str:
        """The node of the control plane (the caller's node)."""

    @abc.abstractmethod
    def nodes(self) -> list[str]:
        """The nodes that are alive now, the head first; stable order otherwise."""

    @abc.abstractmethod
    def cores(self, node: str) -> list[int]:
        """The cores processes on `node` may run on."""

    @abc.abstractmethod
    def host(self, node: str) -> str:
        """The address processes on `node` listen on and publish (127.0.0.1 on one host)."""

    @abc.abstractmethod
    def control_address(self, cluster_id: str, node: str) -> str:
        """Where a controller on `node` listens for gRPC (a unix socket locally, TCP across nodes)."""

    @abc.abstractmethod
    def redis_endpoint(self, node: str, directory: str, password: str) -> tuple[list[str], str]:
        """(redis-server configuration lines that make it listen, the URL its clients use, with the
        password) for a Redis on `node` whose files go in `directory`."""

    @abc.abstractmethod
    def spawn(self, node: str, name: str, role: str, config_json: str, log_path: str, cold: bool = False,
              cpus: tuple[int, ...] = ()) -> int:
        """Start a role on `node` (warm, or `cold`: a fresh interpreter); its pid. `cpus`: the cores it
        is given, which the backend reserves where its scheduler knows cores (Ray)."""

    @abc.abstractmethod
    def run(self, node: str, name: str, argv: list[str], stdin: bytes, log_path: str) -> int:
        """Start a plain process (redis-server) on `node`; its pid."""

    @abc.abstractmethod
    def signal(self, node: str, pid: int, sig: int) -> None:
        """Signal a process on `node` (nothing if it or its node is gone)."""

    @abc.abstractmethod
    def exits(self, timeout_s: float) -> list[NodeExit]:
        """Processes that ended since the last call, waiting at most `timeout_s` for one."""

    def release(self, node: str, name: str, pid: int) -> None:
        """A process is gone or stopped: free what the backend holds for it (a CPU reservation)."""

    @abc.abstractmethod
    def hold_lease(self, url: str, key: str, lease_s: float) -> None:
        """From now on the cluster's processes outlive this launcher, for as long as someone renews `key`
        in Redis at `url` (then they stop by themselves: fork_server.py)."""

    @abc.abstractmethod
    def handover(self) -> dict:
        """What a launcher that adopts the cluster needs to reach its processes (JSON-able)."""

    @abc.abstractmethod
    def adopt(self, cluster_id: str, secret: bytes, handover: dict) -> list[tuple[str, str, int]]:
        """Reach the processes of a running cluster (`handover` from its previous launcher) instead of
        starting any; (node, name, pid) of every one that runs."""

    @abc.abstractmethod
    def kill_node(self, node: str) -> None:
        """Take a whole node down at once, as a power cut would (chaos: node-kill)."""

    @abc.abstractmethod
    def log_tail(self, node: str, path: str, lines: int = 30) -> str:
        """The end of a process's log on `node`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop what is left on every node (the launcher stopped the roles in order first)."""

"""Starting and watching the processes of one node: the mechanism both launcher backends share.

A `NodeSpawner` owns the node's fork server (fork_server.py: roles forked warm, in milliseconds, or
cold, in a fresh interpreter, and the plain processes the cluster runs there, redis-server, all its
children). It runs
in the launcher's own process for the local backend, and inside the node's `NodeHost` actor under
Ray, so that a replacement on any node is a warm fork and every node watches its processes the same
way. `exits()` reports every process that ended, whatever the cause: a role's exit code (from the
fork server), a plain process's, and, when the fork server itself died (taking its roles with it,
parent-death signals), every role it had, after a new fork server is started. What a death means
is the launcher's policy (launcher.py), never decided here.

Lifetimes: every process of the node dies with its fork server, which dies with the process holding
this spawner (parent-death signals) until a lease is set (`hold_lease`: then it outlives it for as
long as a supervisor renews the lease, and a new one may `adopt` it). A parent-death signal follows the
*thread* that forked, not its process, so the fork server is started from one thread that lives as long
as the spawner (`_forker`).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from resilient_moe.errors import ClusterError
from resilient_moe.launch.fork_server import ForkServer

log = logging.getLogger("resilient_moe.launcher")


FORK_SERVER = "fork-server"  # the name its own exit is reported under


@dataclass(frozen=True)
class Exit:
    """A process of the node ended: `how` says how, as observed."""

    name: str
    pid: int
    how: str  # "exited with code 3", "killed by signal 9", "died with the fork server"
    code: int | None = None  # its exit status (negative: the signal), None when unknown


def describe_exit(code: int) -> str:
    """How a process ended, from `os.waitstatus_to_exitcode`-style codes (negative: killed by a signal)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"killed by signal {-code} ({name})"
    return f"exited with code {code}"


class NodeSpawner:
    """The processes of one node (see the module docstring). Thread-safe."""

    def __init__(self, fork_server: ForkServer | None = None) -> None:
        """`fork_server`: share a running one (tests start many clusters); it is then not stopped here."""
        self.fork_server = fork_server
        self._own_fork_server = fork_server is None
        self._lock = threading.Lock()
        self._roles: dict[int, str] = {}  # pid -> name of roles forked and not seen exiting
        self._exits: "queue.SimpleQueue[Exit]" = queue.SimpleQueue()
        self._forker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="node-spawner")  # see the module doc

    # ---- start ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the fork server (its imports run while the caller does other things)."""
        if self.fork_server is None:
            self.fork_server = self._forker.submit(ForkServer).result()

    def wait_ready(self, timeout_s: float) -> None:
        self.start()
        self.fork_server.wait_hello(timeout_s)

    @staticmethod
    def where() -> dict:
        """What the launcher needs to know of this node: its host name, the cores processes may use."""
        return {"hostname": os.uname().nodename, "cores": sorted(os.sched_getaffinity(0)), "pid": os.getpid()}

    @staticmethod
    def free_port(host: str) -> int:
        """A TCP port free on `host` now (for a listener the launcher must name before it starts)."""
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    # ---- processes --------------------------------------------------------------------------

    def spawn(self, name: str, role: str, config_json: str, log_path: str, cold: bool = False) -> int:
        """Fork a role (warm, or `cold`: a fresh interpreter); its pid."""
        self.wait_ready(60)
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with self._lock:  # the exit of a fast-dying child is matched to its name once the pid is known
            pid = self.fork_server.spawn(name, role, config_json, log_path, cold=cold)
            self._roles[pid] = name
        return pid

    def run(self, name: str, argv: list[str], stdin: bytes, log_path: str) -> int:
        """Start a plain process (redis-server) as the fork server's child, so it lives as the roles do;
        `stdin` is its standard input (its configuration: nothing secret on a command line)."""
        self.wait_ready(60)
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            pid = self.fork_server.run(name, argv, stdin, log_path)
            self._roles[pid] = name
        return pid

    def hold_lease(self, url: str, key: str, lease_s: float) -> None:
        """The node's processes outlive this spawner's process while `key` is renewed (fork_server.py)."""
        self.wait_ready(60)
        self.fork_server.hold_lease(url, key, lease_s)

    def adopt(self, address: str) -> dict[int, str]:
        """Take over the fork server at `address` (a new supervisor); pid -> name of what runs there."""
        with self._lock:
            self.fork_server, self._own_fork_server = ForkServer.attach(address), True
            self._roles = dict(self.fork_server.children)
            return dict(self._roles)

    def signal(self, pid: int, sig: int) -> None:
        """Signal a process of this node (nothing if it is gone)."""
        if pid > 0:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def running(self) -> dict[int, str]:
        """pid -> name of every process of this node not known to have exited."""
        with self._lock:
            return dict(self._roles)

    def pids(self) -> list[int]:
        """Every process of this node that is not known to have exited (roles and plain processes)."""
        with self._lock:
            return list(self._roles)

    def exits(self) -> list[Exit]:
        """Every process that ended since the last call (see the module docstring)."""
        self._collect()
        out = []
        while True:
            try:
                out.append(self._exits.get_nowait())
            except queue.Empty:
                return out

    def _collect(self) -> None:
        with self._lock:
            fork_server = self.fork_server
            if fork_server is not None:
                while True:
                    try:
                        message = fork_server.exit_events.get_nowait()
                    except queue.Empty:
                        break
                    name = self._roles.pop(message["pid"], None)
                    if name is not None:
                        code = int(message["code"])
                        self._exits.put(Exit(name, message["pid"], describe_exit(code), code))
                if not fork_server.alive and self._roles:
                    self._replace_fork_server()
                elif not fork_server.alive and self._own_fork_server:
                    self.fork_server = self._forker.submit(ForkServer).result()

    def _replace_fork_server(self) -> None:
        """The fork server died, and every role with it: start a new one and report them all."""
        dead = self.fork_server.proc  # None for one this launcher adopted (it did not start it)
        dead_pid = dead.pid if dead is not None else self.fork_server.pid
        log.error("the fork server (pid %d) died; starting a new one", dead_pid)
        for pid, name in sorted(self._roles.items(), key=lambda item: item[1] != "controller"):  # the controller first
            self._exits.put(Exit(name, pid, "died with the fork server"))
        self._roles.clear()
        try:
            self.fork_server, self._own_fork_server = self._forker.submit(ForkServer).result(), True
        except OSError as e:
            raise ClusterError(f"the fork server died and could not be started again: {e}") from None
        code = dead.poll() if dead is not None else None  # its own exit, reported once its replacement runs
        self._exits.put(Exit(FORK_SERVER, dead_pid, describe_exit(code) if code is not None else "process gone", code))

    def log_tail(self, path: str, lines: int = 30) -> str:
        try:
            return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ---- stop -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the fork server, and with it what is left (the launcher stopped the roles in order first)."""
        if self.fork_server is not None and self._own_fork_server:
            self.fork_server.shutdown()
        elif self.fork_server is not None and self.fork_server.alive:
            try:  # a lent fork server goes back as it came: tied to its owner, not to this cluster's lease
                self.fork_server.release_lease()
            except OSError:
                pass
        self._forker.shutdown(wait=False)

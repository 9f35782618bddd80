"""Fork server for worker processes.

Importing torch costs about two seconds of CPU here, per process. The fork server pays it once: it imports
every role's module, then forks a worker for each request, so a cluster (or a replacement worker
after a failure) starts in milliseconds plus weight loading. It never runs torch ops, threads or
gRPC itself, so forking it is safe.

Protocol: JSON lines over a socketpair with the launcher.
    launcher -> fork server  {"op": "spawn", "name", "role", "config", "log", "cold", "secret"} | {"op": "shutdown"}
    fork server -> launcher  {"op": "hello", "pid"} | {"op": "spawned", "name", "pid"} |
                        {"op": "exited", "name", "pid", "code"}
Lifetime: the fork server dies with the launcher (parent-death signal) and every worker dies with the
fork_server, so a launcher killed with SIGKILL leaves nothing behind.

A "cold" spawn execs a fresh interpreter in the forked child (parent-death signal kept), paying the
imports again: what a restart-everything system pays on every restart, used by that baseline.

Nothing secret or large goes on a command line (any local user can read /proc/PID/cmdline): the
cluster secret ("secret", hex) reaches the child through the socketpair and `auth.install`, which
exports it in the environment a cold child inherits; a cold child reads its WorkerConfig JSON from an
inherited memfd whose number is all its command line says (`--cold ROLE --config-fd N`).

Both ends live here: `ForkServer` is the launcher's (it imports nothing heavy, so a launcher can start the
fork server before it imports torch itself, and the two imports overlap), `serve` the fork server's.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback

from resilient_moe import auth
from resilient_moe.errors import ClusterError

PR_SET_PDEATHSIG = 1

log = logging.getLogger("resilient_moe.launcher")


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` when our parent exits; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)


def die_with_launcher() -> None:
    """`preexec_fn` for a child of the launcher: it gets SIGKILL when the launcher exits."""
    die_with_parent(os.getppid())


class ForkServer:
    """The fork server process and the protocol to it."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resilient_moe.launch.fork_server", str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()],
            preexec_fn=die_with_launcher,
            start_new_session=True,  # its own process group; Ctrl-C in a terminal reaches the launcher only
        )
        theirs.close()
        self.sock = ours
        self._out = ours.makefile("w", buffering=1)
        self._inp = ours.makefile("r")
        self._lock = threading.Lock()
        self.exits: list[dict] = []
        self.exit_events: "queue.SimpleQueue[dict]" = queue.SimpleQueue()  # the same, for the supervisor
        self._spawned: dict[str, int] = {}
        self._spawn_cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="fork_server-reader", daemon=True)
        self._hello = threading.Event()
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self._inp:
                self._on_message(line)
        except OSError:  # the fork server died (reset): `alive` says so, and the supervisor starts another
            pass

    def _on_message(self, line: str) -> None:
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            return
        with self._spawn_cond:
            if message["op"] == "hello":
                self._hello.set()
            elif message["op"] == "spawned":
                self._spawned[message["name"]] = message["pid"]
            elif message["op"] == "exited":
                self.exits.append(message)
                self.exit_events.put(message)
                log.info("%s (pid %d) exited with code %s", message["name"], message["pid"], message["code"])
            self._spawn_cond.notify_all()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_hello(self, timeout_s: float) -> None:
        if not self._hello.wait(timeout_s):
            raise ClusterError(f"the fork server did not start within {timeout_s:.0f}s (exit code {self.proc.poll()})")

    def spawn(self, name: str, role: str, config_json: str, log_path: str, timeout_s: float = 10.0,
              cold: bool = False) -> int:
        """Fork a worker from its WorkerConfig JSON; `cold`: in a fresh interpreter (see the module docstring)."""
        with self._spawn_cond:
            self._spawned.pop(name, None)
        with self._lock:
            self._out.write(json.dumps({"op": "spawn", "name": name, "role": role, "config": config_json,
                                        "log": log_path, "cold": cold, "secret": auth.secret().hex()}) + "\n")
            self._out.flush()
        with self._spawn_cond:
            if not self._spawn_cond.wait_for(lambda: name in self._spawned, timeout_s):
                raise ClusterError(f"the fork server did not fork {name}")
            return self._spawned[name]

    def shutdown(self, timeout_s: float = 10.0) -> None:
        try:
            with self._lock:
                self._out.write(json.dumps({"op": "shutdown"}) + "\n")
                self._out.flush()
        except OSError:
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


def _role_mains() -> dict:
    from resilient_moe.controller import server as controller_server
    from resilient_moe.workers import attention_worker, expert_worker, frontend, kv_store

    return {"controller": controller_server.main, "attention": attention_worker.main, "expert": expert_worker.main,
            "kv_store": kv_store.main, "frontend": frontend.main}


def _run_child(role_main, config_json: str, log_path: str, fork_server_pid: int, sock: socket.socket,
               cold_role: str = "", secret: str = "") -> None:
    """In the forked child: become the worker. Never returns."""
    code = 1
    try:
        die_with_parent(fork_server_pid)
        sock.close()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        # As in every Python process (and a cold child): a write to a socket whose peer is gone raises
        # EPIPE, which the datapath turns into a closed link. With the default action the process would
        # die on the spot, silently, e.g. an attention worker sending tokens to a frontend that left.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        if log_path:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        if secret:
            from resilient_moe import auth

            auth.install(secret)
        if cold_role:
            config_fd = _config_memfd(config_json)
            os.execv(sys.executable, [sys.executable, "-m", "resilient_moe.launch.fork_server", "--cold", cold_role,
                                      "--config-fd", str(config_fd)])
        from resilient_moe.deployment import WorkerConfig

        code = role_main(WorkerConfig.from_json(config_json)) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _config_memfd(config_json: str) -> int:
    """An inheritable memfd holding the config, read from the start (no size limit, unlike a pipe
    that must be drained while it is written)."""
    fd = os.memfd_create("rmoe-worker-config", 0)  # no MFD_CLOEXEC: the exec'd interpreter inherits it
    data = config_json.encode()
    for _ in range(len(data) + 1):
        if not data:
            break
        data = data[os.write(fd, data):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_config_fd(fd: int) -> str:
    with os.fdopen(fd, "rb") as f:
        return f.read().decode()


def serve(sock: socket.socket, launcher_pid: int) -> None:
    mains = _role_mains()
    import torch  # noqa: F401  (imported here so every child inherits it)

    # Everything imported so far lives as long as the workers: out of the garbage collector's sight,
    # a full collection in a worker (which stops its datapath) walks only what the worker made itself.
    gc.freeze()

    children: dict[int, str] = {}
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when workers stop
    out = sock.makefile("w", buffering=1)
    inp = sock.makefile("r")

    def send(message: dict) -> None:
        try:
            out.write(json.dumps(message) + "\n")
            out.flush()  # socket files do not flush on newline, whatever their buffering
        except OSError:
            pass

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            name = children.pop(pid, "?")
            send({"op": "exited", "name": name, "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    send({"op": "hello", "pid": os.getpid()})
    while True:
        ready, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            reap()
        if sock not in ready:
            continue
        line = inp.readline()
        if not line:  # the launcher is gone
            break
        request = json.loads(line)
        if request.get("op") == "shutdown":
            break
        if request.get("op") == "spawn":
            fork_server_pid = os.getpid()
            pid = os.fork()
            if pid == 0:
                _run_child(mains[request["role"]], request["config"], request.get("log", ""), fork_server_pid, sock,
                           cold_role=request["role"] if request.get("cold") else "", secret=request.get("secret", ""))
            children[pid] = request["name"]
            send({"op": "spawned", "name": request["name"], "pid": pid})
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in list(children):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _cold_main(role: str, config_json: str) -> int:
    from resilient_moe.deployment import WorkerConfig

    return _role_mains()[role](WorkerConfig.from_json(config_json)) or 0


def main() -> None:
    if sys.argv[1] == "--cold":
        if len(sys.argv) != 5 or sys.argv[3] != "--config-fd" or not sys.argv[4].isdigit():
            sys.exit("usage: python -m resilient_moe.launch.fork_server --cold ROLE --config-fd FD")
        sys.exit(_cold_main(sys.argv[2], _read_config_fd(int(sys.argv[4]))))
    fd = int(sys.argv[1])
    launcher_pid = int(sys.argv[2])
    die_with_parent(launcher_pid)
    sock = socket.socket(fileno=fd)
    serve(sock, launcher_pid)


if __name__ == "__main__":
    main()

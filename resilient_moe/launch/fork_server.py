"""Fork server for worker processes.

Importing torch costs about two seconds of CPU here, per process. The fork server pays it once: it imports
every role's module, then forks a worker for each request, so a cluster (or a replacement worker
after a failure) starts in milliseconds plus weight loading. It never runs torch ops, threads or
gRPC itself, so forking it is safe.

Protocol: JSON lines over a socketpair with the launcher (or, after an adoption, a unix socket).
    launcher -> fork server  {"op": "spawn", "name", "role", "config", "log", "cold", "secret"} |
                             {"op": "exec", "name", "argv", "stdin", "log"} (a plain process: redis-server) |
                             {"op": "lease", "url", "key", "lease_s"} | {"op": "release"} | {"op": "shutdown"}
    fork server -> launcher  {"op": "hello", "pid", "address", "children": {pid: name}} |
                             {"op": "spawned", "name", "pid"} | {"op": "exited", "name", "pid", "code"}
Lifetime: until a lease is set, the fork server dies with the launcher (parent-death signal) and every
process it started dies with it, so a launcher killed with SIGKILL leaves nothing behind. Once a lease
is set ({"op": "lease"}: a key in Redis that the supervisor renews) the fork server outlives its
launcher: its processes go on serving, and a new supervisor may adopt them by connecting to the fork
server's `address` (an abstract unix socket; it proves the cluster secret: `attach`), which then sends
it every child and every exit it saw meanwhile. When nobody renewed the lease for `lease_s`, the fork
server stops everything it started (SIGTERM, then SIGKILL) and exits: nothing is left running forever.

A "cold" spawn execs a fresh interpreter in the forked child (parent-death signal kept), paying the
imports again: what a restart-everything system pays on every restart, used by that baseline.

Nothing secret or large goes on a command line (any local user can read /proc/PID/cmdline), and no
secret is in any environment (/proc/PID/environ, see auth.py): the fork server gets the cluster secret
from its launcher through an inherited pipe (`auth.handover_fd`, its number in the environment), never
its environment, so a forked child, whose /proc/PID/environ shows the fork server's exec-time block,
shows none either. A warm child gets the secret ("secret", hex) through the socketpair and installs it
(memory only); a cold child gets it through a pipe again, and reads its WorkerConfig JSON from an
inherited memfd whose number is all its command line says (`--cold ROLE --config-fd N`). The fork
server and every role are non-dumpable (`procs.harden_process`); redis-server, exec'd, is not (execve
resets the flag), and holds only a password derived from the secret.

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
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

from resilient_moe import auth
from resilient_moe.errors import ClusterError
from resilient_moe.procs import dumpable, harden_process, process_alive

PR_SET_PDEATHSIG = 1
ADOPT_PURPOSE = "fork-server"
LEASE_CHECK_S = 1.0
STOP_GRACE_S = 5.0  # a lapsed lease: children get this long after SIGTERM before SIGKILL

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
    """The fork server process and the protocol to it (the launcher's end)."""

    def __init__(self, sock: socket.socket | None = None, pid: int = 0) -> None:
        """A new fork server; `sock` and `pid`: one that runs already (`attach`)."""
        self.proc: subprocess.Popen | None = None
        if sock is None:
            ours, theirs = socket.socketpair()
            secret_fd = auth.handover_fd() if auth.has_secret() else None  # none: it refuses adoptions
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "resilient_moe.launch.fork_server", str(theirs.fileno()), str(os.getpid())],
                    pass_fds=[theirs.fileno()] + ([secret_fd] if secret_fd is not None else []),
                    env=auth.child_env(secret_fd),
                    preexec_fn=die_with_launcher,
                    start_new_session=True,  # its own process group; Ctrl-C in a terminal reaches the launcher only
                )
            finally:
                theirs.close()
                if secret_fd is not None:
                    os.close(secret_fd)
            sock, pid = ours, self.proc.pid
        self.pid = pid
        self.address = ""  # where an adopting supervisor reaches it (its hello says)
        self.children: dict[int, str] = {}  # what it said runs, at hello
        self.dumpable = -1  # its dumpable flag, at hello (0: hardened)
        self.sock = sock
        self._out = sock.makefile("w", buffering=1)
        self._inp = sock.makefile("r")
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

    @classmethod
    def attach(cls, address: str, timeout_s: float = 10.0) -> "ForkServer":
        """Take over a running fork server (a new supervisor adopting a cluster), proving the cluster
        secret; its hello lists what runs (`children`) and the exits it saw while nobody listened follow."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout_s)
        try:
            sock.connect("\0" + address.removeprefix("@"))
            credential = auth.Credential.make(ADOPT_PURPOSE, address)
            sock.sendall((json.dumps({"op": "adopt", "auth": credential.to_json()}) + "\n").encode())
        except OSError as e:
            sock.close()
            raise ClusterError(f"cannot reach the fork server at {address}: {e}") from None
        sock.settimeout(None)
        server = cls(sock)
        server.wait_hello(timeout_s)
        return server

    def _on_message(self, line: str) -> None:
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            return
        with self._spawn_cond:
            if message["op"] == "hello":
                self.pid = int(message.get("pid", self.pid))
                self.address = str(message.get("address", ""))
                self.children = {int(pid): str(name) for pid, name in message.get("children", {}).items()}
                self.dumpable = int(message.get("dumpable", -1))
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
        if self.proc is not None:
            return self.proc.poll() is None
        return process_alive(self.pid) and self._reader.is_alive()

    def wait_hello(self, timeout_s: float) -> None:
        if not self._hello.wait(timeout_s):
            code = self.proc.poll() if self.proc is not None else None
            raise ClusterError(f"the fork server did not answer within {timeout_s:.0f}s (exit code {code})")

    def spawn(self, name: str, role: str, config_json: str, log_path: str, timeout_s: float = 10.0,
              cold: bool = False) -> int:
        """Fork a worker from its WorkerConfig JSON; `cold`: in a fresh interpreter (see the module docstring)."""
        with self._spawn_cond:
            self._spawned.pop(name, None)
        self._send({"op": "spawn", "name": name, "role": role, "config": config_json, "log": log_path, "cold": cold,
                    "secret": auth.secret().hex()})
        with self._spawn_cond:
            if not self._spawn_cond.wait_for(lambda: name in self._spawned, timeout_s):
                raise ClusterError(f"the fork server did not fork {name}")
            return self._spawned[name]

    def run(self, name: str, argv: list[str], stdin: bytes, log_path: str, timeout_s: float = 10.0) -> int:
        """Start a plain process (redis-server) as the fork server's child: it lives as the roles do."""
        with self._spawn_cond:
            self._spawned.pop(name, None)
        self._send({"op": "exec", "name": name, "argv": argv, "stdin": stdin.decode(), "log": log_path})
        with self._spawn_cond:
            if not self._spawn_cond.wait_for(lambda: name in self._spawned, timeout_s):
                raise ClusterError(f"the fork server did not start {name}")
            return self._spawned[name]

    def hold_lease(self, url: str, key: str, lease_s: float) -> None:
        """From now on outlive this launcher, for as long as someone renews `key` in Redis at `url`."""
        self._send({"op": "lease", "url": url, "key": key, "lease_s": lease_s})

    def release_lease(self) -> None:
        """Tie the fork server to its launcher's life again (a lent fork server handed back: tests)."""
        self._send({"op": "release"})

    def _send(self, message: dict) -> None:
        with self._lock:
            self._out.write(json.dumps(message) + "\n")
            self._out.flush()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        try:
            self._send({"op": "shutdown"})
        except OSError:
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            deadline = time.monotonic() + timeout_s
            while process_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        self.sock.close()


def _role_mains() -> dict:
    from resilient_moe.controller import server as controller_server
    from resilient_moe.workers import attention_worker, expert_worker, frontend, kv_store

    return {"controller": controller_server.main, "attention": attention_worker.main, "expert": expert_worker.main,
            "kv_store": kv_store.main, "frontend": frontend.main}


def _run_child(role_main, config_json: str, log_path: str, fork_server_pid: int, sock: socket.socket | None,
               cold_role: str = "", secret: str = "") -> None:
    """In the forked child: become the worker. Never returns."""
    code = 1
    try:
        harden_process()  # inherited from the fork server already; every role says so itself
        die_with_parent(fork_server_pid)
        if sock is not None:
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
            auth.install(secret)  # memory only (auth.py)
        if cold_role:
            config_fd = _config_memfd(config_json)
            secret_fd = auth.handover_fd() if secret else None
            os.execve(sys.executable, [sys.executable, "-m", "resilient_moe.launch.fork_server", "--cold", cold_role,
                                       "--config-fd", str(config_fd)], auth.child_env(secret_fd))
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


class _Lease:
    """The supervisor's lease as the fork server sees it (a key in Redis): held while the key exists."""

    def __init__(self, url: str, key: str, lease_s: float) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=0.5)
        self.key, self.lease_s = key, lease_s
        self.seen = time.monotonic()
        self.checked = 0.0

    def lapsed(self) -> bool:
        """True `lease_s` after the last renewal. Checked at most every LEASE_CHECK_S: the key's time to
        live (set to lease_s at each renewal) tells when it was last renewed; a key that is gone, or a
        Redis that cannot be reached (restarting: the supervisor renews it once it is back), counts as
        no renewal since the last one seen."""
        now = time.monotonic()
        if now - self.checked >= LEASE_CHECK_S:
            self.checked = now
            try:
                ttl_ms = self.client.pttl(self.key)
                if ttl_ms is not None and ttl_ms >= 0:
                    self.seen = max(self.seen, now - max(0.0, self.lease_s - ttl_ms / 1000.0))
            except Exception:  # noqa: BLE001 (Redis down: the supervisor restarts it, or it is gone)
                pass
        return now - self.seen > self.lease_s


def _exec_child(argv: list[str], stdin: str, log_path: str, fork_server_pid: int, sock: socket.socket | None) -> None:
    """In the forked child: become a plain process (stdin: its configuration). Never returns."""
    try:
        die_with_parent(fork_server_pid)
        if sock is not None:
            sock.close()
        read, write = os.pipe()
        os.write(write, stdin.encode())  # small (a configuration): fits the pipe
        os.close(write)
        os.dup2(read, 0)
        os.close(read)
        if log_path:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.execve(argv[0], argv, auth.child_env())
    except BaseException:
        traceback.print_exc()
    os._exit(127)


def serve(sock: socket.socket, launcher_pid: int) -> None:
    """The fork server's loop (see the module docstring)."""
    mains = _role_mains()
    import torch  # noqa: F401  (imported here so every child inherits it)

    # Everything imported so far lives as long as the workers: out of the garbage collector's sight,
    # a full collection in a worker (which stops its datapath) walks only what the worker made itself.
    gc.freeze()

    children: dict[int, str] = {}
    pending: list[dict] = []  # exits seen while no launcher listened, for the next one
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when workers stop
    address = f"@rmoe-fork-server-{os.getpid()}-{secrets.token_hex(4)}"
    adopt = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    adopt.bind("\0" + address[1:])
    adopt.listen(4)
    verifier = auth.Verifier(ADOPT_PURPOSE)
    lease: _Lease | None = None
    conn: dict = {"sock": sock, "out": sock.makefile("w", buffering=1), "inp": sock.makefile("r")}

    def send(message: dict) -> None:
        if conn["sock"] is None:
            if message["op"] == "exited":
                pending.append(message)
            return
        try:
            conn["out"].write(json.dumps(message) + "\n")
            conn["out"].flush()  # socket files do not flush on newline, whatever their buffering
        except OSError:
            if message["op"] == "exited":
                pending.append(message)

    def hello() -> None:
        send({"op": "hello", "pid": os.getpid(), "address": address, "dumpable": dumpable(),
              "children": {str(p): n for p, n in children.items()}})
        for message in pending:
            send(message)
        pending.clear()

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

    def take_adopter() -> None:
        new, _ = adopt.accept()
        new.settimeout(5)
        try:
            line = new.makefile("r").readline()
            request = json.loads(line)
            verifier.verify_json(request.get("auth"), address)
        except Exception:  # noqa: BLE001 (anyone may connect; only the cluster's own supervisor is taken)
            new.close()
            return
        new.settimeout(None)
        if conn["sock"] is not None:
            conn["sock"].close()
        conn.update(sock=new, out=new.makefile("w", buffering=1), inp=new.makefile("r"))
        hello()

    hello()
    while True:
        readable = [wake_r, adopt] + ([conn["sock"]] if conn["sock"] is not None else [])
        ready, _, _ = select.select(readable, [], [], LEASE_CHECK_S if lease is not None else None)
        if wake_r in ready:
            os.read(wake_r, 4096)
            reap()
        if adopt in ready:
            take_adopter()
            continue
        if lease is not None and lease.lapsed():
            break  # no supervisor renewed the lease: stop everything
        if conn["sock"] is None or conn["sock"] not in ready:
            continue
        line = conn["inp"].readline()
        if not line:  # the launcher is gone
            conn["sock"].close()
            conn.update(sock=None, out=None, inp=None)
            if lease is None:
                break
            continue  # it may be adopted; the lease decides
        request = json.loads(line)
        op = request.get("op")
        if op == "shutdown":
            break
        if op == "lease":
            lease = _Lease(request["url"], request["key"], float(request["lease_s"]))
            die_with_parent(os.getppid(), 0)  # no longer tied to this launcher's life: the lease is
            continue
        if op == "release":  # tied to the launcher's connection (and its parent's life) again
            lease = None
            die_with_parent(os.getppid())
            continue
        if op in ("spawn", "exec"):
            fork_server_pid = os.getpid()
            pid = os.fork()
            if pid == 0:
                adopt.close()
                if op == "exec":
                    _exec_child(request["argv"], request.get("stdin", ""), request.get("log", ""), fork_server_pid,
                                conn["sock"])
                _run_child(mains[request["role"]], request["config"], request.get("log", ""), fork_server_pid,
                           conn["sock"], cold_role=request["role"] if request.get("cold") else "",
                           secret=request.get("secret", ""))
            children[pid] = request["name"]
            send({"op": "spawned", "name": request["name"], "pid": pid})
    _stop_children(children)


def _stop_children(children: dict[int, str]) -> None:
    """SIGTERM every child (they drain and leave), SIGKILL what is left after STOP_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                children.pop(pid, None)
            else:
                time.sleep(0.02)


def _cold_main(role: str, config_json: str) -> int:
    from resilient_moe.deployment import WorkerConfig

    harden_process()  # execve reset the flag
    auth.receive_handover()

    return _role_mains()[role](WorkerConfig.from_json(config_json)) or 0


def main() -> None:
    if sys.argv[1] == "--cold":
        if len(sys.argv) != 5 or sys.argv[3] != "--config-fd" or not sys.argv[4].isdigit():
            sys.exit("usage: python -m resilient_moe.launch.fork_server --cold ROLE --config-fd FD")
        sys.exit(_cold_main(sys.argv[2], _read_config_fd(int(sys.argv[4]))))
    harden_process()
    auth.receive_handover()  # before anything else: the pipe's number is all the environment says
    fd = int(sys.argv[1])
    launcher_pid = int(sys.argv[2])
    die_with_parent(launcher_pid)
    sock = socket.socket(fileno=fd)
    serve(sock, launcher_pid)


if __name__ == "__main__":
    main()

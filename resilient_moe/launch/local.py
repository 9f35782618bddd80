"""Local launcher: every role as an OS process on this host, started through the fork server.

`LocalCluster` starts the controller, the expert workers and the attention workers, waits until each
reports ready (the controller's view), and tears everything down: SIGTERM, a grace period, SIGKILL.
Lifetimes are chained by parent-death signals (launcher -> fork server -> workers) and the fork server leads a
process group of its own, so even a launcher killed with SIGKILL leaves no process behind. Datapath
shared memory is memfd-based (no names in /dev/shm), so nothing is left there either.

Authentication (DESIGN.md: every connection proves the cluster secret). `start` installs the cluster
secret in this process (`auth.ensure_secret`: a new one unless the process already holds one) before
anything starts; each spawn request gives it to the fork server over their socketpair, and the forked
worker installs it. It is never on a command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from resilient_moe import auth
from resilient_moe.deployment import DeploymentConfig, WorkerConfig
from resilient_moe.controller.client import ControllerClient
from resilient_moe.controller.records import kv_store_name
from resilient_moe.errors import ClusterError
from resilient_moe.launch.cpus import cpu_plan
from resilient_moe.launch.fork_server import ForkServer, die_with_launcher
from resilient_moe.procs import process_alive
from resilient_moe.proto import controller_pb2 as pb

log = logging.getLogger("resilient_moe.launcher")


CRASH_LOOP = 10  # spawns of one worker within CRASH_WINDOW_S after which the launcher gives up
CRASH_WINDOW_S = 60.0


class LocalCluster:
    """A controller, E expert workers and A attention workers on this host; with KV checkpointing
    (the default when resilience is on) also a KV store process and, unless `redis_url` is given, a
    private redis-server (unix socket in a temporary directory, no persistence)."""

    def __init__(
        self,
        deployment: DeploymentConfig,
        log_dir: str | os.PathLike[str] | None = None,
        fork_server: "ForkServer | None" = None,
    ) -> None:
        """`fork_server`: share a running fork server (tests start many clusters); it is then not stopped here."""
        self.deployment = deployment
        self._own_fork_server = fork_server is None
        self.cluster_id = secrets.token_hex(4)
        self.controller_address = f"unix-abstract:rmoe-{self.cluster_id}-controller"
        self._tmp = None
        if log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"rmoe-{self.cluster_id}-")
            log_dir = self._tmp.name
        self.log_dir = Path(log_dir).resolve()  # absolute: redis-server changes its directory
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pids: dict[str, int] = {}
        names = [f"aw-{i}" for i in range(deployment.attention_workers)] + \
                [f"ew-{i}" for i in range(deployment.expert_workers)]
        # worker -> the cores it is pinned to (a replacement gets its predecessor's; none: not pinned)
        self.cpus = cpu_plan(sorted(os.sched_getaffinity(0)), names) if deployment.cpu_affinity == "auto" else {}
        self.retired: list[int] = []  # processes replaced by a new incarnation (a hung one may linger)
        self.fork_server: ForkServer | None = fork_server
        self._exits_seen = 0
        self._commands: threading.Thread | None = None
        self._stopping = threading.Event()
        self._spawn_lock = threading.Lock()
        self._restarting = False  # a restart-all order is being carried out (exits are then expected)
        self._restarted_generation = 0  # the newest restart-all generation carried out
        # Orders carried out, by (id, action, worker, pid, generation): a new stream sends outstanding ones again.
        self._orders_done: set[tuple] = set()
        # While set, the launcher takes no orders (they wait, persisted, at the controller): an operator's
        # maintenance switch, and how tests make an order the controller issued go untaken.
        self.hold_orders = threading.Event()
        self._supervisor: threading.Thread | None = None
        # worker -> (time.monotonic() its replacement may start, pid it replaces); only the supervisor spawns
        self._respawn_due: dict[str, tuple[float, int]] = {}
        self._spawn_times: dict[str, list[float]] = {}  # recent spawns per worker (a crash loop ends the cluster)
        self.fatal: str | None = None  # why the cluster cannot recover (the launcher gave up); None while it can
        self.restarts: list[tuple[float, float]] = []  # (began, ready) of each restart-all, time.monotonic()
        self.client: ControllerClient | None = None
        self.redis: subprocess.Popen | None = None
        self._redis_args: list[str] = []
        self._redis_config = b""  # redis-server's configuration, given on its stdin
        self._redis_dir: tempfile.TemporaryDirectory | None = None

    # ---- start ------------------------------------------------------------------------------

    @property
    def checkpointing(self) -> bool:
        return self.deployment.resilience and self.deployment.kv_checkpoint

    def start_redis(self, timeout_s: float = 10.0) -> str:
        """Start a private redis-server, and a thread that starts it again if it dies; returns its URL.
        It requires a password derived from the cluster secret (`auth.derived_key("redis")`), which the
        URL carries to every client; the server reads it with the rest of its configuration from stdin,
        so it is on no command line."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ClusterError("redis-server is not installed (apt-get install redis-server), and no redis_url "
                               "was given; or set kv_checkpoint: false")
        self._redis_dir = tempfile.TemporaryDirectory(prefix=f"rmoe-{self.cluster_id}-redis-")
        sock = os.path.join(self._redis_dir.name, "redis.sock")
        password = auth.derived_key("redis")
        self._redis_args = [binary, "-"]  # "-": the configuration comes from stdin
        self._redis_config = "\n".join([
            "port 0", f"unixsocket {sock}", "unixsocketperm 700", 'save ""', "appendonly no",
            f"dir {self._redis_dir.name}", f"logfile {self.log_dir / 'redis.log'}", f"requirepass {password}", "",
        ]).encode()
        url = f"unix://:{password}@{sock}"
        self._launch_redis(url, timeout_s)
        threading.Thread(target=self._watch_redis, args=(url,), name="redis-watch", daemon=True).start()
        return url

    def _launch_redis(self, url: str, timeout_s: float) -> None:
        import redis

        log_path = self.log_dir / "redis.log"  # what it says before it opens its logfile (the same) lands there too
        with open(log_path, "ab") as out:
            self.redis = subprocess.Popen(self._redis_args, stdin=subprocess.PIPE, stdout=out, stderr=out,
                                          preexec_fn=die_with_launcher)
        try:
            self.redis.stdin.write(self._redis_config)
            self.redis.stdin.close()
        except OSError:
            pass  # it exited at once: the wait below says so
        self.pids["redis"] = self.redis.pid
        client = redis.Redis.from_url(url, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    code = self.redis.poll()
                    if code is not None or time.monotonic() > deadline:
                        how = f"exited with code {code}" if code is not None else f"not answering after {timeout_s:g}s"
                        raise ClusterError(f"redis-server did not start ({how}); see {log_path}") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def _watch_redis(self, url: str) -> None:
        """A dead private Redis is started again (empty: checkpoint commits resume with the next block,
        the controller rewrites its state; requests moved meanwhile are recomputed)."""
        while not self._stopping.wait(0.2):
            if self.redis is None or self.redis.poll() is None:
                continue
            log.warning("redis-server exited (code %s); starting it again", self.redis.returncode)
            try:
                self._launch_redis(url, 10.0)
            except ClusterError as e:
                log.error("%s", e)

    def worker_config(self, name: str, role: str, index: int) -> WorkerConfig:
        if role in ("attention", "expert") and name not in self.cpus and self.deployment.cpu_affinity == "auto":
            # A worker scaling added: the core fewest workers run on (the others keep theirs).
            used = Counter(core for cores in self.cpus.values() for core in cores)
            self.cpus[name] = (min(sorted(os.sched_getaffinity(0)), key=lambda core: used[core]),)
        return WorkerConfig(name, role, index, self.cluster_id, self.controller_address, self.deployment,
                            cpus=self.cpus.get(name, ()))

    def spawn(self, name: str, role: str, index: int, cold: bool = False) -> int:
        assert self.fork_server is not None
        with self._spawn_lock:  # stop() takes it too: nothing is forked behind its back
            if self._stopping.is_set():
                raise ClusterError(f"cluster {self.cluster_id} is stopping; not starting {name}")
            now = time.monotonic()
            times = [t for t in self._spawn_times.get(name, []) if now - t < CRASH_WINDOW_S] + [now]
            self._spawn_times[name] = times
            if len(times) > CRASH_LOOP:
                self._fail(f"{name} was started {len(times)} times in {CRASH_WINDOW_S:.0f}s and keeps exiting; "
                           f"its log ({self.log_dir / (name + '.log')}) ends with:\n{self.log_tail(name, 12)}")
                raise ClusterError(self.fatal)
            pid = self.fork_server.spawn(name, role, self.worker_config(name, role, index),
                                    str(self.log_dir / f"{name}.log"), cold=cold)
            old = self.pids.get(name)
            if old is not None and old != pid:
                self.retired.append(old)
            self.pids[name] = pid
            return pid

    @staticmethod
    def role_of(name: str) -> tuple[str, int]:
        prefix, _, index = name.partition("-")
        if name == "controller":
            return name, 0
        if name == "kv-store" or name.startswith("kv-store-"):
            return "kv_store", int(name[len("kv-store-"):] or 0)
        return {"ew": "expert", "aw": "attention"}[prefix], int(index)

    def _follow_commands(self) -> None:
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
                for command in stream:
                    if self._stopping.is_set():
                        return
                    if self.hold_orders.is_set():
                        stream.cancel()  # untaken: the controller sends it again once orders are followed
                        break
                    key = (command.id, command.action, command.worker, command.pid, command.generation)
                    if key in self._orders_done:
                        continue
                    self._orders_done.add(key)
                    try:
                        self._carry_out(command)
                    except Exception:
                        log.exception("launcher order %d (%s %s) failed", command.id, command.action, command.worker)
            except Exception:
                if self._stopping.wait(0.05):
                    return

    # ---- supervision: no process of the cluster stays dead --------------------------------

    def _supervise(self) -> None:
        """Every few milliseconds: a dead fork server is started again, a dead controller too, and a
        worker that exited for any reason (a signal, an uncaught exception, leaving on its own) gets a
        replacement at once and is reported to the controller, which fences it and reroutes. A worker
        that keeps dying (CRASH_LOOP spawns in CRASH_WINDOW_S) ends the cluster with a clear error
        (`fatal`) instead of a restart loop."""
        while not self._stopping.wait(0.02):
            try:
                if self.fork_server is not None and not self.fork_server.alive:
                    self._replace_fork_server()
                while self.fork_server is not None:
                    try:
                        message = self.fork_server.exit_events.get_nowait()
                    except queue.Empty:
                        break
                    self._on_exit(message["name"], message["pid"], f"exited with code {message['code']}")
                if not process_alive(self.pids.get("controller", 0)):
                    self._on_exit("controller", self.pids.get("controller", 0), "is gone")
                now = time.monotonic()
                for name, (due, dead_pid) in list(self._respawn_due.items()):
                    if now >= due:
                        del self._respawn_due[name]
                        current = self.pids.get(name, 0)
                        if current == dead_pid or not process_alive(current):  # not replaced meanwhile
                            self._respawn(name)
            except ClusterError as e:
                if not self._stopping.is_set():
                    log.error("%s", e)
            except Exception:  # one bad pass must never stop supervision
                log.exception("supervision pass failed")

    def _on_exit(self, name: str, pid: int, how: str) -> None:
        if self._stopping.is_set() or self.fatal or pid != self.pids.get(name) or name in self._respawn_due:
            return  # shutting down, or a process already replaced (a fenced one leaving)
        log.warning("%s (pid %d) %s", name, pid, how)
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

    def _respawn(self, name: str) -> None:
        if name == "controller":
            log.warning("starting a new controller (it recovers the cluster's state from Redis)")
        else:
            log.info("starting a replacement for %s", name)
        self.spawn(name, *self.role_of(name))

    def _replace_fork_server(self) -> None:
        """The fork server died, and every worker with it: start it again, then a controller and a
        replacement for every worker."""
        log.error("the fork server (pid %d) died; starting a new one and every worker again", self.fork_server.proc.pid)
        dead = {name: pid for name, pid in self.pids.items() if name != "redis"}
        try:
            fork_server = ForkServer()
            fork_server.wait_hello(60)
        except (OSError, ClusterError) as e:
            self._fail(f"the fork server died and could not be started again: {e}")
            return
        self.fork_server, self._own_fork_server = fork_server, True
        for name, pid in sorted(dead.items(), key=lambda item: item[0] != "controller"):  # the controller first
            self._on_exit(name, pid, "died with the fork server")

    def _fail(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
            log.error("the cluster cannot recover: %s", reason)

    def _carry_out(self, command: pb.LauncherCommand) -> None:
        """One order. Each is idempotent: a start for a process that was already replaced, a stop for
        one that is already gone, and a restart generation already carried out change nothing."""
        if command.action == "start":  # the supervisor thread spawns it, unless it was replaced meanwhile
            self._respawn_due.setdefault(command.worker, (time.monotonic(), command.pid))
        elif command.action == "stop":
            self._stop_worker(command.worker, command.pid)
        elif command.action == "restart-all":
            if command.generation <= self._restarted_generation:
                return
            self._restarting = True
            try:
                for _ in range(5):  # bounded: a cluster that cannot come back is left for an operator
                    if self._stopping.is_set():
                        break
                    try:
                        self.restart_all(reason=f"restart generation {command.generation}")
                        break
                    except ClusterError as e:  # a worker died while starting again: once more
                        log.error("restart-all failed (%s); trying again", e)
                self._restarted_generation = command.generation
            finally:
                self._restarting = False
        else:
            log.error("unknown launcher order %r for %s; ignored", command.action, command.worker)

    def _stop_worker(self, name: str, pid: int) -> None:
        """The roster lost `name`: it is no longer supervised (its exit is not replaced), and SIGTERM
        makes it drain (an attention worker hands its requests over; an expert worker finishes its
        parts) and leave. Killed at `stop` if it is still there then."""
        with self._spawn_lock:
            if self.pids.get(name) != pid:
                return  # replaced or stopped already
            del self.pids[name]
            self._respawn_due.pop(name, None)
            self.retired.append(pid)
        log.info("stopping %s (pid %d): removed from the roster", name, pid)
        _signal(pid, signal.SIGTERM)

    def restart_all(self, reason: str) -> None:
        """The restart-everything baseline: kill every worker and start them all again. `baseline_restart`
        says how: "warm" (the fair baseline) forks every worker at once from the warm fork server, as
        resilient mode forks its replacements; "cold" starts fresh interpreters, expert workers first
        and then attention workers, as a naively restarted deployment would."""
        began = time.monotonic()
        self.restarts.append((began, 0.0))  # (began, 0.0) while it runs; (began, ready) once done
        log.warning("restarting every worker (%s, %s)", reason, self.deployment.baseline_restart)
        workers = [n for n in self.pids if n.startswith(("ew-", "aw-"))]
        for name in workers:
            _signal(self.pids[name], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(process_alive(self.pids[n]) for n in workers):
            time.sleep(0.01)
        experts = sorted(n for n in workers if n.startswith("ew-"))
        attention = sorted(n for n in workers if n.startswith("aw-"))
        cold = self.deployment.baseline_restart == "cold"
        for group in ([experts, attention] if cold else [experts + attention]):
            for name in group:
                self.spawn(name, *self.role_of(name), cold=cold)
            self._wait_fresh(group, deadline=time.monotonic() + self.deployment.startup_timeout_s)
        self.restarts[-1] = (began, time.monotonic())
        log.warning("restart-all done in %.2fs", self.restarts[-1][1] - began)

    def _wait_fresh(self, names: list[str], deadline: float) -> None:
        """Wait until the current processes of `names` are ready (their pids, not older incarnations')."""
        assert self.client is not None
        while time.monotonic() < deadline:
            dead = [n for n in names if not process_alive(self.pids[n])]
            if dead:  # killed while starting (e.g. by a chaos run): fail now, the caller retries
                raise ClusterError(f"{', '.join(dead)} died while starting again")
            try:
                state = self.client.get_state(timeout_s=1.0)
                ready = {w.name for w in state.workers if w.state == pb.READY and w.pid == self.pids.get(w.name)}
                if all(n in ready for n in names):
                    return
            except Exception:
                pass
            time.sleep(0.02)
        raise ClusterError(f"timed out waiting for {', '.join(names)} to be ready again")

    def start(self) -> "LocalCluster":
        if self.pids:
            raise ClusterError(f"cluster {self.cluster_id} is already started")
        dep = self.deployment
        deadline = time.monotonic() + dep.startup_timeout_s
        auth.ensure_secret()
        try:
            if self.fork_server is None:
                self.fork_server = ForkServer()
            if self.checkpointing and not dep.redis_url:  # while the fork server imports
                if shutil.which("redis-server") is None:
                    log.warning("redis-server is not installed and no redis_url was given: KV checkpointing and "
                                "controller recovery are OFF (install redis-server, or set kv_checkpoint: false "
                                "to silence this)")
                    self.deployment = dep = dataclasses.replace(dep, kv_checkpoint=False)
                else:
                    self.deployment = dep = dataclasses.replace(dep, redis_url=self.start_redis())
            self.fork_server.wait_hello(dep.startup_timeout_s)
            self._exits_seen = len(self.fork_server.exits)
            self.spawn("controller", "controller", 0)
            self.client = ControllerClient(self.controller_address)
            self._wait(lambda s: True, deadline, "controller")
            # The KV store and the expert workers start together; attention workers once the experts serve
            # (a request they take at once must find every expert).
            experts = [f"ew-{i}" for i in range(dep.expert_workers)]
            stores = [kv_store_name(i) for i in range(dep.kv_stores)] if self.checkpointing else []
            for i, name in enumerate(stores):
                self.spawn(name, "kv_store", i)
            for i, name in enumerate(experts):
                self.spawn(name, "expert", i)
            self._wait(lambda s: self._all_ready(s, experts + stores), deadline, "expert workers and the KV stores")
            attention = [f"aw-{i}" for i in range(dep.attention_workers)]
            for i, name in enumerate(attention):
                self.spawn(name, "attention", i)
            self._wait(lambda s: self._all_ready(s, attention), deadline, "attention workers")
            self._commands = threading.Thread(target=self._follow_commands, name="launcher-commands", daemon=True)
            self._commands.start()
            self._supervisor = threading.Thread(target=self._supervise, name="launcher-supervisor", daemon=True)
            self._supervisor.start()
        except BaseException:
            self.stop()
            raise
        log.info("cluster %s ready: %s", self.cluster_id, ", ".join(f"{n}={p}" for n, p in self.pids.items()))
        return self

    @staticmethod
    def _all_ready(state: pb.ClusterState, names: list[str]) -> bool:
        ready = {w.name for w in state.workers if w.state == pb.READY}
        return all(n in ready for n in names)

    def _wait(self, done, deadline: float, what: str) -> pb.ClusterState:
        assert self.client is not None and self.fork_server is not None
        while True:
            ours = [e for e in self.fork_server.exits[self._exits_seen:] if e["pid"] in self.pids.values()]
            if ours:
                dead = ours[0]
                raise ClusterError(f"{dead['name']} exited with code {dead['code']} while starting {what}:\n"
                                   f"{self.log_tail(dead['name'])}")
            try:
                state = self.client.get_state(timeout_s=1.0)
                if done(state):
                    return state
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out starting {what}; logs in {self.log_dir}")
            time.sleep(0.01)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.is_file():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ---- inspection and faults --------------------------------------------------------------

    def state(self) -> pb.ClusterState:
        assert self.client is not None
        return self.client.get_state()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pids[name], sig)

    def alive_pids(self) -> list[int]:
        return [pid for pid in [*self.pids.values(), *self.retired] if process_alive(pid)]

    # ---- stop -------------------------------------------------------------------------------

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every worker, wait up to `grace_s`, SIGKILL the rest, stop the fork server."""
        self._stopping.set()
        with self._spawn_lock:
            pass  # a spawn under way has recorded its pid
        for pid in self.retired:
            _signal(pid, signal.SIGKILL)
        for name, pid in self.pids.items():
            if name != "controller":
                _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(process_alive(p) for n, p in self.pids.items() if n != "controller"):
            time.sleep(0.02)
        _signal(self.pids.get("controller", 0), signal.SIGTERM)
        while time.monotonic() < deadline + 2 and process_alive(self.pids.get("controller", 0)):
            time.sleep(0.02)
        for pid in self.pids.values():
            _signal(pid, signal.SIGKILL)
        if self.client is not None:
            self.client.close()
        if self.redis is not None:
            self.redis.terminate()
            try:
                self.redis.wait(5)
            except subprocess.TimeoutExpired:
                self.redis.kill()
                self.redis.wait()
        if self._redis_dir is not None:
            self._redis_dir.cleanup()
        if self.fork_server is not None and self._own_fork_server:
            self.fork_server.shutdown()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal(pid: int, sig: int) -> None:
    if pid > 0:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    """Start a cluster, print {"pids": {...}, "controller": ...} on one line, run until SIGTERM/SIGINT."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m resilient_moe.launch.local")
    parser.add_argument("--model", required=True)
    parser.add_argument("--attention-workers", type=int, default=1)
    parser.add_argument("--expert-workers", type=int, default=2)
    parser.add_argument("--transport", default="shm")
    args = parser.parse_args(argv)
    dep = DeploymentConfig(model=args.model, attention_workers=args.attention_workers,
                           expert_workers=args.expert_workers, transport=args.transport)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with LocalCluster(dep) as cluster:
        pids = dict(cluster.pids, fork_server=cluster.fork_server.proc.pid)
        print(json.dumps({"pids": pids, "controller": cluster.controller_address}), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

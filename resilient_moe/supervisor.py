"""`resilient-moe serve`: the supervisor of a cluster and its frontends, in one command.

What `serve` runs is a supervisor: it starts, replaces and stops the cluster's processes (the launcher,
launch/launcher.py) and does nothing on the request path. The HTTP API is served by `frontends`
frontend processes (workers/frontend.py) that share one address (SO_REUSEPORT: the kernel spreads
connections over them, and a dead one's share goes to the survivors at once); the supervisor only holds
the port (bound, not listening) so that a taken port fails before anything starts and every frontend
gets the same one. With `frontends: 0` the API runs in the supervisor's own process instead (tests and
debugging; then the supervisor is on the request path).

A supervisor that may die. With the cluster's Redis (the default: a private one), the supervisor holds a
lease there (kvstore/keys.py `supervisor_key`), renewed every third of `supervisor_lease_s`, and every
process of the cluster outlives it: frontends and workers go on serving if it is SIGKILLed. Running the
same `serve` command again (the same host and port) while the lease holds adopts the running cluster:
nothing restarts, no request is lost, and it supervises from then on. It finds the cluster through a
hand-over file (`state_dir`/serve-HOST-PORT.json, readable by this user only: it holds the cluster
secret and the admin token) that the supervisor writes once the cluster serves. A second supervisor
while one is alive is refused with an error that names the running one. When no supervisor renews
the lease for `supervisor_lease_s`, every process stops by itself (fork_server.py): nothing is left
running forever.

`ServingStack` is the whole thing as an object (tests start it in-process with a shared fork server);
`run` is the command's body: start with progress, print where everything is, serve until Ctrl-C or
SIGTERM, drain (new requests get 503 and /ready answers 503, requests in flight finish, within the
deployment's drain_timeout_s), then shut everything down so no process is left. A second signal stops
at once.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from resilient_moe import auth
from resilient_moe.controller.client import ControllerClient
from resilient_moe.deployment import DeploymentConfig, FrontendConfig
from resilient_moe.kvstore.keys import supervisor_key
from resilient_moe.launch import make_cluster
from resilient_moe.launch.fork_server import ForkServer
from resilient_moe.launch.launcher import Launcher
from resilient_moe.model.config import ModelConfig
from resilient_moe.procs import process_alive
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend_server import FrontendServer, ServeError, bind_socket
from resilient_moe.server.metrics import STATE_NAMES, ServingMetrics

log = logging.getLogger("resilient_moe.server")

ADMIN_TOKEN_ENV = "RESILIENT_MOE_ADMIN_TOKEN"

__all__ = ["ADMIN_TOKEN_ENV", "ServeError", "ServingStack", "default_state_dir", "run", "watch_startup"]


def default_state_dir() -> Path:
    """Where `serve` leaves the hand-over of the cluster it supervises: $XDG_STATE_HOME/resilient-moe, or
    ~/.local/state/resilient-moe."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "resilient-moe"


def watch_startup(cluster: Launcher, say: Callable[[str], None], stop: threading.Event,
                  progress_every_s: float = 1.0) -> None:
    """Report each worker's progress (registered -> loading weights, with the bytes read so far, at
    most every `progress_every_s` -> ready) until `stop` is set."""
    while not cluster.controller_address:  # known once the launcher reached its backend
        if stop.wait(0.05):
            return
    client = ControllerClient(cluster.controller_address)
    seen: dict[str, int] = {}
    loaded: dict[tuple[str, int], tuple[float, float]] = {}  # incarnation -> (bytes read last reported, when)
    began = time.monotonic()
    try:
        while True:
            last = stop.wait(0.1)  # one more pass after `stop`, so the final transitions are shown
            try:
                state = client.get_state(timeout_s=0.5)
            except Exception:
                if last:
                    return
                continue
            for w in state.workers:
                done = w.load.get("loaded_bytes", 0.0) if w.state == pb.LOADING else 0.0
                reported, when = loaded.get((w.name, w.incarnation), (0.0, 0.0))
                if done > reported and time.monotonic() - when >= progress_every_s:
                    loaded[(w.name, w.incarnation)] = (done, time.monotonic())
                    say(f"  {time.monotonic() - began:6.1f}s  {w.name:<10} loading weights: {done / 1e6:,.1f} MB read")
                if seen.get(w.name) == w.state:
                    continue
                seen[w.name] = w.state
                if w.state == pb.STARTING:
                    continue  # not started yet: the launcher's own progress comes first
                what = {pb.LOADING: f"registered (pid {w.pid}), loading weights", pb.READY: "ready"}.get(
                    w.state, STATE_NAMES.get(w.state, "?"))
                if w.role == pb.EXPERT and w.state == pb.READY:
                    what += f" ({len(w.experts)} experts held)"
                say(f"  {time.monotonic() - began:6.1f}s  {w.name:<10} {what}")
            if last:
                return
    finally:
        client.close()


class ServingStack:
    """A cluster (a `Launcher` over the local or the Ray backend) and its HTTP frontends (see the module doc)."""

    def __init__(
        self,
        deployment: DeploymentConfig,
        host: str = "127.0.0.1",
        port: int = 8000,
        admin_token: str | None = None,
        model_name: str | None = None,
        max_waiting: int = 256,
        request_timeout_s: float = 120.0,
        redis_url: str | None = None,
        fork_server: ForkServer | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        progress: Callable[[str], None] | None = None,
        api_keys: tuple[str, ...] = (),
        state_dir: str | os.PathLike[str] | None = None,
        **frontend_options,
    ) -> None:
        """`admin_token` None: take RESILIENT_MOE_ADMIN_TOKEN, else generate one. `port` 0: any free port.
        `api_keys`: /v1/* needs one of them (none: /v1 is open). `frontend_options`: more FrontendConfig
        settings (connection limits)."""
        if redis_url is not None:
            deployment = dataclasses.replace(deployment, redis_url=redis_url)
        self.deployment = deployment
        self.redis_url = redis_url
        self.host = host
        self.port = port
        self.admin_token = admin_token or os.environ.get(ADMIN_TOKEN_ENV) or secrets.token_urlsafe(24)
        self.admin_token_generated = not (admin_token or os.environ.get(ADMIN_TOKEN_ENV))
        self.model_dir = Path(deployment.model)
        self.model_name = model_name or self.model_dir.name
        self.fork_server = fork_server
        self.log_dir = log_dir
        self.say = progress or (lambda text: None)
        self.api_keys = tuple(api_keys)
        self.frontend_config = FrontendConfig(host=host, port=port, model_name=self.model_name,
                                              admin_token=self.admin_token, api_keys=self.api_keys,
                                              max_waiting=max_waiting, request_timeout_s=request_timeout_s,
                                              **frontend_options)
        self.cluster: Launcher | None = None
        self.server: FrontendServer | None = None  # the in-process frontend (frontends: 0)
        self.metrics = ServingMetrics()
        self._port_hold: socket.socket | None = None  # frontends: the port, bound but not listening
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.adopted = False  # this supervisor took over a running cluster
        self._lease = threading.Event()  # set: stop renewing
        self._lease_thread: threading.Thread | None = None
        self._redis = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def frontend(self):
        """The in-process frontend's `Frontend` (frontends: 0), else None."""
        return self.server.frontend if self.server is not None else None

    @property
    def app(self):
        """The in-process frontend's FastAPI app (frontends: 0), else None."""
        return self.server.app if self.server is not None else None

    @property
    def handover_path(self) -> Path:
        return self.state_dir / f"serve-{self.host.replace(':', '_')}-{self.port}.json"

    def start(self) -> "ServingStack":
        if self.port and self.deployment.frontends:
            handover = self._running_cluster()
            if handover is not None:
                return self._adopt(handover)
        try:
            ModelConfig.from_pretrained(self.model_dir)
            dep = self.deployment
            in_process = dep.frontends == 0
            if in_process:
                sock = bind_socket(self.host, self.port)  # fails now if the port is taken
                self.port = sock.getsockname()[1]
                sock.close()
            else:
                self._port_hold = bind_socket(self.host, self.port, listen=False)
                self.port = self._port_hold.getsockname()[1]
            self.frontend_config = dataclasses.replace(self.frontend_config, port=self.port)
            self.say(f"starting a cluster of {dep.attention_workers} attention and {dep.expert_workers} expert "
                     f"workers ({dep.transport}, {dep.micro_batches} micro-batches)"
                     + ("" if in_process else f" and {dep.frontends} frontends") + f" for {self.model_dir}")
            self.cluster = make_cluster(dep, log_dir=self.log_dir, fork_server=self.fork_server,
                                        frontend=None if in_process else self.frontend_config)
            auth.ensure_secret()  # before the startup watcher's first call to the controller
            done = threading.Event()
            watcher = threading.Thread(target=watch_startup, args=(self.cluster, self.say, done),
                                       name="startup-progress", daemon=True)
            watcher.start()
            try:
                self.cluster.start()
            finally:
                done.set()
                watcher.join(2)
            if in_process:
                self.server = FrontendServer("frontend", self.cluster.controller_address, self.cluster.deployment,
                                             self.frontend_config, self.cluster.cluster_id, cluster=self.cluster,
                                             metrics=self.metrics).start()
            elif self.cluster.deployment.redis_url:
                self._hold_lease()
        except BaseException:
            self.stop()
            raise
        # What start-up made (torch, the app, the tokenizer) lives as long as the server: out of the
        # garbage collector's sight, a full collection (which stalls every stream) walks only requests.
        gc.freeze()
        return self

    @property
    def serving(self) -> bool:
        if self.server is not None:
            return self.server.serving
        return self.cluster is not None and self.cluster.fatal is None

    def drain(self, timeout_s: float | None = None, stop: threading.Event | None = None) -> bool:
        """Stop admitting (new requests and /ready get 503) and wait until every request in flight has
        finished, at most `timeout_s` (the deployment's drain_timeout_s) or until `stop` is set; True
        when none is left."""
        timeout_s = self.deployment.drain_timeout_s if timeout_s is None else timeout_s
        if self.server is not None:
            return self.server.drain(timeout_s, stop)
        if self.cluster is None:
            return True
        return self.cluster.drain_frontends(timeout_s, stop)

    # ---- the lease, the hand-over file, adoption ----------------------------------------------

    def _hold_lease(self) -> None:
        """Take the lease, let the cluster outlive this process while it is renewed, renew it, and write
        the hand-over file."""
        import redis

        cluster = self.cluster
        self._redis = redis.Redis.from_url(cluster.deployment.redis_url, socket_timeout=1.0)
        key, lease_s = supervisor_key(cluster.cluster_id), cluster.deployment.supervisor_lease_s
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        self._redis.set(key, record, px=max(1000, int(lease_s * 1000)))
        cluster.hold_lease(key, lease_s)
        self._lease.clear()
        self._lease_thread = threading.Thread(target=self._renew, args=(key, record, lease_s), name="lease",
                                              daemon=True)
        self._lease_thread.start()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        handover = {"handover": cluster.handover(), "secret": auth.secret().hex(), "port": self.port,
                    "host": self.host, "model_name": self.model_name}
        fd = os.open(self.handover_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(handover, f)

    def _renew(self, key: str, record: str, lease_s: float) -> None:
        """Every third of the lease (a renewal may fail: Redis restarting; the next one makes up for it)."""
        while not self._lease.wait(lease_s / 3):
            try:
                self._redis.set(key, record, px=max(1000, int(lease_s * 1000)))
            except Exception as e:  # noqa: BLE001
                log.warning("cannot renew the supervisor's lease: %s", e)

    def _running_cluster(self) -> dict | None:
        """The hand-over of a cluster serving this address whose supervisor is gone (None: none, or its
        lease lapsed: a stale file, removed); raises ServeError when its supervisor still runs."""
        import redis

        try:
            with open(self.handover_path) as f:
                handover = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ServeError(f"{self.handover_path}: cannot read the running cluster's hand-over ({e}); "
                             "remove it if no cluster serves this address") from None
        inner = handover["handover"]
        client = redis.Redis.from_url(inner["deployment"]["redis_url"], socket_timeout=1.0)
        try:
            auth.install(handover["secret"])
            lease = client.get(supervisor_key(inner["cluster_id"]))
        except redis.RedisError:
            lease = None
        finally:
            client.close()
        if lease is None:
            self.handover_path.unlink(missing_ok=True)  # its lease lapsed: that cluster stopped by itself
            return None
        holder = json.loads(lease)
        if holder.get("host") == socket.gethostname() and process_alive(int(holder.get("pid", 0))):
            raise ServeError(f"a supervisor already serves this cluster on {self.host}:{self.port}: pid "
                             f"{holder['pid']}, since {time.strftime('%H:%M:%S', time.localtime(holder['started']))}; "
                             f"stop it first (Ctrl-C, or SIGTERM to {holder['pid']})")
        return {**handover, "previous_supervisor": {**holder, "seen_gone_at": time.time()}}

    def _adopt(self, handover: dict) -> "ServingStack":
        """Supervise the running cluster of `handover`: nothing restarts."""
        inner = handover["handover"]
        self.say(f"adopting the running cluster {inner['cluster_id']} on {self.host}:{self.port} "
                 "(its supervisor is gone)")
        deployment = DeploymentConfig.from_dict(inner["deployment"], source=str(self.handover_path))
        self.deployment = deployment
        frontend = FrontendConfig(**inner["frontend"]) if inner["frontend"] else None
        if frontend is not None:
            self.frontend_config, self.admin_token = frontend, frontend.admin_token
            self.admin_token_generated = False
        self.model_name = handover.get("model_name", self.model_name)
        self._port_hold = bind_socket(self.host, self.port, listen=False)
        self.cluster = make_cluster(deployment, log_dir=inner["log_dir"], fork_server=None, frontend=frontend)
        self.cluster.adopt(inner)
        self.adopted = True
        self._hold_lease()
        previous = handover.get("previous_supervisor") or {}
        self.cluster.report_fault(pb.FaultRecord(  # its death as a fault record, replaced by this process
            component="supervisor", role="supervisor", pid=int(previous.get("pid", 0)), cause="process gone",
            detail=f"its lease was still held and its process gone; adopted by pid {os.getpid()}",
            detected_at=float(previous.get("seen_gone_at", time.time())), replaced_at=time.time()))
        return self

    def stop(self) -> None:
        """Stop the API, then every process of the cluster (frontends drain first)."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        self._lease.set()
        if self.cluster is not None:
            self.cluster.stop()
            if self._redis is not None:
                self.handover_path.unlink(missing_ok=True)
            self.cluster = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._port_hold is not None:
            self._port_hold.close()
            self._port_hold = None

    def __enter__(self) -> "ServingStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def banner(self) -> str:
        assert self.cluster is not None
        pids = ", ".join(f"{name}={pid}" for name, pid in self.cluster.pids.items())
        token_note = " (generated; set --admin-token or RESILIENT_MOE_ADMIN_TOKEN to choose one)" \
            if self.admin_token_generated else ""
        lines = [
            f"resilient-moe is serving {self.model_name!r}",
            f"  OpenAI API    {self.url}/v1   (e.g. POST {self.url}/v1/completions)",
            f"  API keys      {len(self.api_keys)} (send 'Authorization: Bearer <key>')" if self.api_keys
            else "  API keys      none: /v1 is open to anyone who reaches this address",
            f"  health        {self.url}/health   readiness {self.url}/ready",
            f"  metrics       {self.url}/metrics",
            f"  API schema    {self.url}/docs",
            f"  dashboard     {self.url}/dashboard#token={self.admin_token}",
            f"  admin token   {self.admin_token}{token_note}",
            f"  processes     {pids}",
            f"  worker logs   {self.cluster.log_dir}",
            "press Ctrl-C to stop",
        ]
        return "\n".join(lines)


def run(stack: ServingStack, say: Callable[[str], None] = print) -> int:
    """Start `stack`, serve until SIGINT/SIGTERM, stop it. Returns the exit status."""
    stop = threading.Event()
    now = threading.Event()  # a second signal: stop without draining
    serving = threading.Event()

    def on_signal(signum, frame) -> None:
        if stop.is_set():
            now.set()
        stop.set()
        if not serving.is_set():
            raise KeyboardInterrupt  # still starting: unwind start(), which stops what it began

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            stack.start()
        except KeyboardInterrupt:
            say("interrupted while starting; everything started so far was stopped")
            return 130
        serving.set()
        say(stack.banner())
        while not stop.wait(0.5):
            if not stack.serving:
                say("the HTTP server stopped unexpectedly; shutting down")
                return 1
            if stack.cluster is not None and stack.cluster.fatal:
                say(f"error: the cluster cannot recover: {stack.cluster.fatal}\nshutting down")
                return 1
        timeout = stack.deployment.drain_timeout_s
        say(f"draining: new requests get 503; waiting up to {timeout:g}s for the requests in flight "
            "(signal again to stop now) ...")
        began = time.monotonic()
        drained = stack.drain(timeout, stop=now)
        say(f"drained in {time.monotonic() - began:.1f}s" if drained else
            "stopping with requests still in flight")
        say("shutting down ...")
        return 0
    finally:
        stack.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if serving.is_set():
            say("stopped")


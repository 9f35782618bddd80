"""`resilient-moe serve`: a local cluster, its frontend and the HTTP API, in one command.

`ServingStack` is the whole thing as an object (tests start it in-process with a shared fork_server);
`run` is the command's body: start with progress, print where everything is, serve until Ctrl-C or
SIGTERM, drain (new requests get 503 and /ready answers 503, requests in flight finish, within the
deployment's drain_timeout_s), then shut everything down (API, frontend, workers, controller) so no
process is left. A second signal stops at once.
"""

from __future__ import annotations

import dataclasses
import gc
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
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.model.config import ModelConfig
from resilient_moe.controller.client import ControllerClient
from resilient_moe.engine.tokenizer import TextTokenizer
from resilient_moe.errors import ResilientMoeError
from resilient_moe.launch import make_cluster
from resilient_moe.launch.launcher import Launcher
from resilient_moe.launch.fork_server import ForkServer
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.api import ServerSettings, create_app
from resilient_moe.server.frontend import Frontend
from resilient_moe.server.metrics import STATE_NAMES, ServingMetrics

log = logging.getLogger("resilient_moe.server")

ADMIN_TOKEN_ENV = "RESILIENT_MOE_ADMIN_TOKEN"


class ServeError(ResilientMoeError):
    """The server could not start (port taken, cluster failed...)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the API's listening socket first, so a taken port fails before any worker starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


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
    """A cluster (a `Launcher` over the local or the Ray backend), a `Frontend` on it and the API served by uvicorn on a thread of this process."""

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
    ) -> None:
        """`admin_token` None: take RESILIENT_MOE_ADMIN_TOKEN, else generate one. `port` 0: any free port.
        `redis_url` goes to the deployment when it has such a setting (kept here until then).
        `api_keys`: /v1/* needs one of them (none: /v1 is open)."""
        if redis_url is not None and "redis_url" in DeploymentConfig.__dataclass_fields__:
            deployment = dataclasses.replace(deployment, redis_url=redis_url)
        self.deployment = deployment
        self.redis_url = redis_url
        self.host = host
        self.port = port
        self.admin_token = admin_token or os.environ.get(ADMIN_TOKEN_ENV) or secrets.token_urlsafe(24)
        self.admin_token_generated = not (admin_token or os.environ.get(ADMIN_TOKEN_ENV))
        self.model_dir = Path(deployment.model)
        self.model_name = model_name or self.model_dir.name
        self.max_waiting = max_waiting
        self.request_timeout_s = request_timeout_s
        self.fork_server = fork_server
        self.log_dir = log_dir
        self.say = progress or (lambda text: None)
        self.api_keys = tuple(api_keys)
        self.cluster: Launcher | None = None
        self.frontend: Frontend | None = None
        self.metrics = ServingMetrics()
        self.app = None  # the FastAPI app, once started
        self._server = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "ServingStack":
        import uvicorn

        try:
            model_config = ModelConfig.from_pretrained(self.model_dir)
            tokenizer = TextTokenizer.from_dir(self.model_dir)
            self._sock = bind_socket(self.host, self.port)
            self.port = self._sock.getsockname()[1]
            dep = self.deployment
            self.say(f"starting a cluster of {dep.attention_workers} attention and {dep.expert_workers} expert "
                     f"workers ({dep.transport}, {dep.micro_batches} micro-batches) for {self.model_dir}")
            self.cluster = make_cluster(dep, log_dir=self.log_dir, fork_server=self.fork_server)
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
            engine = dep.engine
            max_model_len = min(engine.max_model_len or model_config.max_position_embeddings,
                                model_config.max_position_embeddings)
            # Capacity follows the attention workers serving, up and down (Frontend.capacity), for the
            # frontend and the API's admission alike.
            self.frontend = Frontend(self.cluster.controller_address, max_unfinished=None,
                                     per_attention_worker=engine.max_num_seqs, probe_interval_s=dep.probe_interval_s,
                                     probe_misses=dep.probe_misses).start(timeout_s=dep.startup_timeout_s)
            settings = ServerSettings(
                model_name=self.model_name, max_model_len=max_model_len, vocab_size=model_config.vocab_size,
                max_running=None, max_waiting=self.max_waiting, request_timeout_s=self.request_timeout_s,
                host=self.host,
            )
            self.app = app = create_app(self.frontend, self.cluster, tokenizer, self.model_name, self.admin_token,
                                        settings=settings, metrics=self.metrics, api_keys=self.api_keys)
            config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=3,
                                    access_log=False)
            self._server = uvicorn.Server(config)
            self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                            name="uvicorn", daemon=True)
            self._thread.start()
            deadline = time.monotonic() + 30
            while not self._server.started:
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    raise ServeError("the HTTP server did not start")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        # What start-up made (torch, the app, the tokenizer) lives as long as the server: out of the
        # garbage collector's sight, a full collection (which stalls every stream) walks only requests.
        gc.freeze()
        return self

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def drain(self, timeout_s: float | None = None, stop: threading.Event | None = None) -> bool:
        """Stop admitting (new requests and /ready get 503) and wait until every request in flight has
        finished, at most `timeout_s` (the deployment's drain_timeout_s) or until `stop` is set; True
        when none is left."""
        if self.app is None or self.frontend is None:
            return True
        timeout_s = self.deployment.drain_timeout_s if timeout_s is None else timeout_s
        server = self.app.state.server
        server.start_draining("the server is shutting down")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            if not server.in_flight() and not self.frontend.unfinished():
                return True
            time.sleep(0.05)
        return not server.in_flight() and not self.frontend.unfinished()

    def stop(self) -> None:
        """Stop the API (open streams get a few seconds), then the frontend, then every worker."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        self._server = self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.frontend is not None:
            self.frontend.close()
            self.frontend = None
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

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
        ]
        if self.redis_url and "redis_url" not in DeploymentConfig.__dataclass_fields__:
            lines.append(f"  note          --redis-url {self.redis_url} is recorded but not used by this version")
        lines.append("press Ctrl-C to stop")
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


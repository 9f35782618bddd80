"""One frontend's HTTP tier: the OpenAI-compatible API (api.py) over a `Frontend` (frontend.py: links to
every attention worker, token logs), served by uvicorn on the cluster's one address.

Every frontend of a cluster listens on the same host and port with SO_REUSEPORT, so the kernel spreads
new connections over them, and a dead frontend's share goes to the survivors at once. A frontend runs in
a frontend role process (workers/frontend.py) or, with `frontends: 0`, in the supervisor's own process
(tests, debugging); this class is the same in both.

Connections are bounded (connections.py: a head deadline, a connection cap; limits.py: a body deadline;
uvicorn: idle keep-alive), so slow or idle clients cannot pin a frontend.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Mapping

from resilient_moe.controller.client import ControllerClient
from resilient_moe.deployment import DeploymentConfig, FrontendConfig
from resilient_moe.engine.tokenizer import TextTokenizer
from resilient_moe.errors import ResilientMoeError
from resilient_moe.kvstore.keys import supervisor_key
from resilient_moe.model.config import ModelConfig
from resilient_moe.procs import process_alive
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.api import ServerSettings, create_app
from resilient_moe.server.cluster_monitor import ClusterSource
from resilient_moe.server.connections import ConnectionLimits, guarded_protocol
from resilient_moe.server.frontend import Frontend
from resilient_moe.server.idempotency import DeliveryLog, RequestStore
from resilient_moe.server.metrics import ServingMetrics

log = logging.getLogger("resilient_moe.server")


class ServeError(ResilientMoeError):
    """The server could not start (port taken, cluster failed...)."""


def bind_socket(host: str, port: int, reuse_port: bool = True, listen: bool = True) -> socket.socket:
    """The API's socket on host:port. `reuse_port`: SO_REUSEPORT, so that every frontend of the cluster
    shares the port (all of one user); `listen` False: only hold the port (the supervisor reserves it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    if listen:
        sock.listen(2048)
    sock.set_inheritable(False)
    return sock


class ControlPlane:
    """The cluster's Redis and the supervisor's lease in it (kvstore/keys.py `supervisor_key`), as a
    frontend sees them. `in_supervisor`: this frontend runs inside the supervisor's process (`frontends:
    0`), which holds no lease: the supervisor is up while this process answers."""

    def __init__(self, redis_client, cluster_id: str, in_supervisor: bool = False) -> None:
        self.redis, self.cluster_id, self.in_supervisor = redis_client, cluster_id, in_supervisor

    def lease(self) -> dict | None:
        """The supervisor's lease record ({"pid", "host", "started"}), None when none holds it; raises
        when Redis does not answer."""
        record = self.redis.get(supervisor_key(self.cluster_id))
        return json.loads(record) if record else None

    def health(self) -> dict[str, float]:
        """`redis_up` (1: a read answered), and `supervisor_up`: 1 while the lease is held and its holder
        runs (checked when it is on this host: a SIGKILLed supervisor shows at once, not when its lease
        lapses); left out while Redis does not answer, since the lease cannot be read then."""
        try:
            lease = self.lease()
        except Exception:  # noqa: BLE001 (down, restarting, or too slow)
            return {"redis_up": 0.0, **({"supervisor_up": 1.0} if self.in_supervisor else {})}
        if self.in_supervisor:
            return {"redis_up": 1.0, "supervisor_up": 1.0}
        holds = lease is not None and (lease.get("host") != socket.gethostname()
                                       or process_alive(int(lease.get("pid", 0))))
        return {"redis_up": 1.0, "supervisor_up": 1.0 if holds else 0.0}


class ControllerSource:
    """The cluster as a frontend process sees it: the controller's view (a `ClusterSource`), and the
    supervisor that holds the cluster's lease in Redis (when there is one)."""

    def __init__(self, client: ControllerClient, control_plane: ControlPlane | None = None) -> None:
        self.client = client
        self.controller_address = client.address
        self.control_plane = control_plane

    def _supervisor(self) -> dict[str, int]:
        if self.control_plane is None:
            return {}
        try:
            lease = self.control_plane.lease()
            return {"supervisor": int(lease["pid"])} if lease else {}
        except Exception:  # noqa: BLE001 (Redis down, or no supervisor right now)
            return {}

    def state(self) -> pb.ClusterState:
        return self.client.get_state()

    @property
    def pids(self) -> Mapping[str, int]:
        try:
            workers = {w.name: w.pid for w in self.state().workers if w.pid}
        except Exception:  # noqa: BLE001 (the controller is being replaced: nothing to list now)
            workers = {}
        return {**workers, **self._supervisor()}

    @property
    def nodes(self) -> Mapping[str, str]:
        try:
            return {w.name: w.node for w in self.state().workers}
        except Exception:  # noqa: BLE001
            return {}

    def kill_node(self, node: str) -> None:
        """Ask the supervisor (through the controller's orders) to take a node down."""
        self.client.kill_node(node)


class FrontendServer:
    """The HTTP API of one frontend (see the module docstring)."""

    def __init__(self, name: str, controller_address: str, deployment: DeploymentConfig, config: FrontendConfig,
                 cluster_id: str, cluster: ClusterSource | None = None, metrics: ServingMetrics | None = None) -> None:
        """`cluster`: where /admin reads the cluster (None: the controller's view)."""
        self.name = name
        self.cluster_id = cluster_id
        self.controller_address = controller_address
        self.deployment = deployment
        self.config = config
        self.cluster = cluster
        self.metrics = metrics or ServingMetrics()
        self.model_dir = deployment.model
        self.port = config.port
        self.frontend: Frontend | None = None
        self.app = None
        self.refusals: dict[str, int] = {}  # connections refused by the limits (connections.py)
        self._server = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.delivery: DeliveryLog | None = None

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    def start(self) -> "FrontendServer":
        import uvicorn

        try:
            model_config = ModelConfig.from_pretrained(self.model_dir)
            tokenizer = TextTokenizer.from_dir(self.model_dir)
            self._sock = bind_socket(self.config.host, self.config.port)
            self.port = self._sock.getsockname()[1]
            dep = self.deployment
            engine = dep.engine
            max_model_len = min(engine.max_model_len or model_config.max_position_embeddings,
                                model_config.max_position_embeddings)
            # Capacity follows the attention workers serving, up and down (Frontend.capacity), for the
            # frontend and the API's admission alike. Each frontend admits up to the cluster's capacity: with
            # N frontends at most N times that many requests run or wait at the attention workers.
            store = control_plane = None
            if dep.redis_url:  # keyed requests (Idempotency-Key) outlive this frontend: their records go there
                import redis

                client = redis.Redis.from_url(dep.redis_url, socket_timeout=2.0)
                store = RequestStore(client, self.cluster_id, dep.resume_grace_s + self.config.request_timeout_s,
                                     self.config.idempotency_ttl_s)
                self.delivery = DeliveryLog(store)
                self.metrics.merged.share(client, self.cluster_id, self.name)  # /metrics: every frontend's
                control_plane = ControlPlane(client, self.cluster_id, in_supervisor=self.cluster is not None)
                self.metrics.control_plane = control_plane
            self.frontend = Frontend(self.controller_address, name=self.name, max_unfinished=None,
                                     per_attention_worker=engine.max_num_seqs, probe_interval_s=dep.probe_interval_s,
                                     probe_misses=dep.probe_misses, delivery=self.delivery).start(
                timeout_s=dep.startup_timeout_s)
            settings = ServerSettings(
                model_name=self.config.model_name or os.path.basename(os.path.normpath(self.model_dir)),
                max_model_len=max_model_len, vocab_size=model_config.vocab_size, max_running=None,
                max_waiting=self.config.max_waiting, request_timeout_s=self.config.request_timeout_s,
                host=self.config.host, body_timeout_s=self.config.body_timeout_s,
            )
            cluster = self.cluster or ControllerSource(self.frontend.client, control_plane)
            self.app = create_app(self.frontend, cluster, tokenizer, settings.model_name, self.config.admin_token,
                                  settings=settings, metrics=self.metrics, api_keys=self.config.api_keys,
                                  requests=store, resume_grace_s=dep.resume_grace_s)
            protocol = guarded_protocol(ConnectionLimits(self.config.header_timeout_s, self.config.max_connections),
                                        self.refusals)
            config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=3,
                                    access_log=False, http=protocol, timeout_keep_alive=self.config.keepalive_s)
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
        return self

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def drain(self, timeout_s: float, stop: threading.Event | None = None) -> bool:
        """Stop admitting (new requests and /ready get 503) and wait until every request in flight has
        finished, at most `timeout_s` or until `stop` is set; True when none is left."""
        if self.app is None or self.frontend is None:
            return True
        server = self.app.state.server
        server.start_draining("the server is shutting down")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            if not server.in_flight() and not self.frontend.unfinished():
                return True
            time.sleep(0.05)
        return not server.in_flight() and not self.frontend.unfinished()

    def stop(self) -> None:
        """Stop the API (open streams get a few seconds), then the frontend's links."""
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
        if self.delivery is not None:
            self.delivery.close()
            self.delivery = None
            self.metrics.merged.close()

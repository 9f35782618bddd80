"""The frontend role process: one HTTP frontend of the cluster (server/frontend_server.py: the API, a
tokenizer, links to every attention worker), on the cluster's shared address (SO_REUSEPORT).

It registers with the controller as a FRONTEND (so /admin/cluster, the dashboard and `status` list it
with its pid and node) and heartbeats its load. SIGTERM drains it: new requests get 503, those in
flight finish (within drain_timeout_s), then it leaves; the launcher starts a replacement when one dies.
"""

from __future__ import annotations

import logging
import signal
import threading

from resilient_moe.controller.client import ControllerClient, worker_info
from resilient_moe.deployment import WorkerConfig
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend_server import FrontendServer
from resilient_moe.workers.common import configure_process

log = logging.getLogger("resilient_moe.frontend")


def main(config: WorkerConfig) -> int:
    dep = config.deployment
    if config.frontend is None:
        raise SystemExit(f"{config.name}: a frontend needs its frontend settings")
    configure_process(config)
    client = ControllerClient(config.controller_address)
    reply = client.register(worker_info(config.name, pb.FRONTEND, config.index, host=dep.host, node=config.node),
                            timeout_s=dep.startup_timeout_s)
    server = FrontendServer(config.name, config.controller_address, dep, config.frontend, config.cluster_id)
    stop = threading.Event()
    fenced = threading.Event()

    def on_fenced() -> None:
        log.warning("%s incarnation %d was fenced; stopping", config.name, reply.incarnation)
        fenced.set()
        stop.set()

    def stats() -> dict[str, float]:
        if server.app is None or server.frontend is None:
            return {"loading": 1.0}
        api = server.app.state.server
        return {**server.frontend.stats(), "api_running": float(api.admission.running),
                "api_waiting": float(api.admission.waiting),
                **{f"http_{k}": float(v) for k, v in server.refusals.items()}}

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client.start_heartbeats(config.name, reply.incarnation, dep.heartbeat_interval_s, stats, on_fenced)
    server.start()
    client.ready(config.name, reply.incarnation, data_address=server.url)
    log.info("%s serving at %s", config.name, server.url)
    try:
        while not stop.wait(0.5):  # a timed wait lets the SIGTERM handler run
            if not server.serving:
                log.error("%s: the HTTP server stopped", config.name)
                return 1
        if not fenced.is_set():
            server.drain(dep.drain_timeout_s)
    finally:
        server.stop()
        if not fenced.is_set():
            client.deregister(config.name, reply.incarnation)
        client.close()
    return 3 if fenced.is_set() else 0

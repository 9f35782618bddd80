"""The KV checkpoint store process: it owns the host memory that attention workers checkpoint their KV
cache into (kvstore/memory_layout.py has the layout), so that the checkpoints outlive any attention worker.

It creates the memory (a region per attention worker, made when the first request for it comes: the
store grows as attention workers are added, without a restart), hands regions to attention workers of
its node that prove the cluster secret (a `MemfdServer`: they write and read it directly), serves it over TCP (kvstore/remote.py: replicas
written by attention workers of other nodes, restores that read them), publishes both addresses and
heartbeats. If it dies, the launcher starts a new one; attention workers whose primary it was map the
new store (and let go of the old memory) and checkpoint every running request again from its start;
those that kept a replica in it ship their live blocks again.
"""

from __future__ import annotations

import logging
import signal
import threading

from resilient_moe.deployment import WorkerConfig
from resilient_moe.controller.client import ControllerClient, worker_info
from resilient_moe.kvstore.remote import StoreServer
from resilient_moe.kvstore.memory_layout import MemfdServer, StoreMemory, layout_for
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.workers.common import configure_process

log = logging.getLogger("resilient_moe.kv_store")


def main(config: WorkerConfig) -> int:
    """Run the store until SIGTERM or until the controller fences this incarnation."""
    dep = config.deployment
    configure_process(config)
    layout = layout_for(config)
    client = ControllerClient(config.controller_address)
    reply = client.register(worker_info(config.name, pb.KV_STORE, config.index, host=dep.host, node=config.node),
                            timeout_s=dep.startup_timeout_s)
    memory = StoreMemory(layout, f"rmoe-{config.cluster_id}-{config.name}")  # the name has "kv-store" in it
    server = StoreServer(memory, config.name, reply.incarnation, host=dep.host).start()
    stop = threading.Event()
    fenced = threading.Event()

    def on_fenced() -> None:
        log.warning("%s incarnation %d was fenced; stopping", config.name, reply.incarnation)
        fenced.set()
        stop.set()

    def stats() -> dict[str, float]:
        return {"bytes": float(memory.nbytes), "regions": float(memory.regions),
                "blocks": float(memory.regions * layout.region_blocks),
                "resident_bytes": float(memory.resident_bytes()), **server.stats()}

    client.start_heartbeats(config.name, reply.incarnation, dep.heartbeat_interval_s, stats, on_fenced)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    handoff = MemfdServer(memory, f"@rmoe-{config.cluster_id}-{config.name}-{reply.incarnation}")
    address = f"{handoff.address};{server.address}"
    client.ready(config.name, reply.incarnation, data_address=address)
    log.info("%s ready: regions of %d blocks of %d tokens (%.1f MiB each, made as attention workers ask) at %s",
             config.name, layout.region_blocks, layout.block_size, layout.region_bytes / 2**20, address)
    try:
        while not stop.wait(0.5):  # a timed wait lets the SIGTERM handler run
            pass
    finally:
        if not fenced.is_set():
            client.deregister(config.name, reply.incarnation)
        client.close()
        handoff.close()
        server.close()
        memory.close()
    return 3 if fenced.is_set() else 0

"""The KV checkpoint store: a process that owns host memory for the committed KV of every attention worker.

It creates one anonymous shared-memory file (memfd: it vanishes with the last process that maps it,
so nothing can leak in /dev/shm) and publishes where to find it through the controller as
`memfd:{pid}:{fd}:{bytes}`. Attention workers map it and write into it directly: one-sided, no
request to this process per write. Its layout (`StoreLayout`) is a pure function of the model and
the deployment, so every worker computes the same one. A store on another host would serve the same
layout over TCP instead (not built).
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import threading
from dataclasses import dataclass

import torch

from resilient_moe.config import ModelConfig, WorkerConfig
from resilient_moe.controller.client import ControllerClient, worker_info
from resilient_moe.errors import ConfigError
from resilient_moe.model.checkpoint import torch_dtype
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.workers.common import configure_process

log = logging.getLogger("resilient_moe.kv_store")


@dataclass(frozen=True)
class StoreLayout:
    """Store memory as a tensor [L, 2, G, rows, d] (K and V of every layer, like the KV cache), cut
    into blocks of `block_size` rows; attention worker i owns blocks [i * per_worker, (i+1) * per_worker)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int
    num_blocks: int
    attention_workers: int

    @classmethod
    def for_deployment(cls, model: ModelConfig, store_bytes: int, block_size: int, dtype: torch.dtype,
                       attention_workers: int) -> "StoreLayout":
        row = 2 * model.num_layers * model.num_kv_heads * model.head_dim * dtype.itemsize
        blocks = store_bytes // (row * block_size)
        if blocks < attention_workers:
            raise ConfigError(f"kv_store_bytes ({store_bytes}) holds {blocks} blocks of {block_size} tokens "
                              f"({row} bytes per token): fewer than one per attention worker")
        return cls(model.num_layers, model.num_kv_heads, model.head_dim, dtype, block_size, blocks, attention_workers)

    @property
    def rows(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.rows * self.head_dim * self.dtype.itemsize

    @property
    def per_worker(self) -> int:
        return self.num_blocks // self.attention_workers

    def region(self, worker_index: int) -> range:
        start = (worker_index % self.attention_workers) * self.per_worker
        return range(start, start + self.per_worker)

    def view(self, buffer) -> torch.Tensor:
        flat = torch.frombuffer(buffer, dtype=self.dtype, count=self.nbytes // self.dtype.itemsize)
        return flat.view(self.num_layers, 2, self.num_kv_heads, self.rows, self.head_dim)


def parse_address(address: str) -> tuple[int, int, int]:
    """`memfd:{pid}:{fd}:{bytes}` -> (pid, fd, bytes); ValueError naming the problem otherwise."""
    parts = address.split(":")
    if len(parts) != 4 or parts[0] != "memfd" or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"not a KV store address (memfd:PID:FD:BYTES): {address!r}")
    return int(parts[1]), int(parts[2]), int(parts[3])


def map_store(address: str) -> mmap.mmap:
    """Map a store published at `address` (same host, same user)."""
    pid, fd, size = parse_address(address)
    path = f"/proc/{pid}/fd/{fd}"
    handle = os.open(path, os.O_RDWR)
    try:
        if os.fstat(handle).st_size < size:
            raise ValueError(f"{path} is smaller than the {size} bytes the store announced")
        return mmap.mmap(handle, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(handle)


def layout_for(config: WorkerConfig) -> StoreLayout:
    dep = config.deployment
    return StoreLayout.for_deployment(ModelConfig.from_pretrained(dep.model), dep.kv_store_bytes,
                                      dep.engine.block_size, torch_dtype(dep.engine.dtype), dep.attention_workers)


def main(config: WorkerConfig) -> int:
    """Run the store until SIGTERM or until the controller fences this incarnation."""
    dep = config.deployment
    configure_process(config)
    layout = layout_for(config)
    client = ControllerClient(config.controller_address)
    reply = client.register(worker_info(config.name, pb.KV_STORE, 0, host=dep.host), timeout_s=dep.startup_timeout_s)
    fd = os.memfd_create(f"rmoe-{config.cluster_id}-kv-store", 0)
    os.ftruncate(fd, layout.nbytes)  # pages are allocated as attention workers first write them
    stop = threading.Event()
    fenced = threading.Event()

    def on_fenced() -> None:
        log.warning("%s incarnation %d was fenced; stopping", config.name, reply.incarnation)
        fenced.set()
        stop.set()

    def stats() -> dict[str, float]:
        return {"bytes": float(layout.nbytes), "blocks": float(layout.num_blocks),
                "resident_bytes": float(os.fstat(fd).st_blocks * 512)}

    client.start_heartbeats(config.name, reply.incarnation, dep.heartbeat_interval_s, stats, on_fenced)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    address = f"memfd:{os.getpid()}:{fd}:{layout.nbytes}"
    client.ready(config.name, reply.incarnation, data_address=address)
    log.info("%s ready: %d blocks of %d tokens (%.1f MiB) at %s", config.name, layout.num_blocks, layout.block_size,
             layout.nbytes / 2**20, address)
    try:
        while not stop.wait(0.5):  # a timed wait lets the SIGTERM handler run
            pass
    finally:
        if not fenced.is_set():
            client.deregister(config.name, reply.incarnation)
        client.close()
        os.close(fd)
    return 3 if fenced.is_set() else 0

"""The KV checkpoint store's memory: its layout, its ownership words, and how attention workers map it.

The store process (workers/kv_store.py) creates one anonymous shared-memory file (memfd: it vanishes
with the last process that maps it, so nothing can leak in /dev/shm) and publishes where to find it
through the controller as `memfd:{pid}:{fd}:{bytes};tcp:{host}:{port}`. Attention workers on its node map
it and write into it directly: one-sided, no request to the store process per write. The same memory is
served over TCP (kvstore/remote.py) to attention workers that keep a replica of their checkpoints in
this store, and to restores that read a replica; the server applies the rules below itself
(`claim_region`, `write_blocks`, `read_stamped` are the one statement of them, for both paths). The layout is a pure function of the
model and the deployment, so every worker computes the same one:

    offset 0                 owners  uint64 [attention_workers]  incarnation owning each region (0: none)
    OWNERS_BYTES aligned     stamps  uint64 [num_blocks, 2]     (writer incarnation, generation) per block
    header_bytes             rows    dtype  [L, rows, W]        every layer's KV rows (W = model.kv_row_width)

Attention worker i owns blocks [i * per_worker, (i+1) * per_worker); there is a region for every
attention worker the deployment may run (`max_attention_workers`, for scaling), used or not. Because writes are one-sided,
ownership is enforced by the writers and verified by the readers: a worker claims its region by
writing its incarnation into `owners[i]` and checks it before every write (a fenced predecessor that
wakes up sees its successor's incarnation and stops); each block's stamp is set to (incarnation,
odd generation) before its rows are written and to the next even generation after, and a restore
accepts a block only if the stamp equals what the commit record names, before and after its copy.
So a late write by a fenced worker into a block its successor reused is always detected.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import torch

from resilient_moe.config import ModelConfig, WorkerConfig
from resilient_moe.errors import ConfigError
from resilient_moe.model.checkpoint import torch_dtype

_PAGE = 4096


@dataclass(frozen=True)
class StoreLayout:
    """Where everything lies in the store's memory (see the module docstring)."""

    num_layers: int
    row_width: int  # elements one token keeps per layer (K and V, or a latent)
    dtype: torch.dtype
    block_size: int
    num_blocks: int
    attention_workers: int

    @classmethod
    def for_deployment(cls, model: ModelConfig, store_bytes: int, block_size: int, dtype: torch.dtype,
                       attention_workers: int) -> "StoreLayout":
        row = model.num_layers * model.kv_row_width * dtype.itemsize
        header = _header_bytes(attention_workers, store_bytes // (row * block_size))
        blocks = (store_bytes - header) // (row * block_size)
        if blocks < attention_workers:
            raise ConfigError(f"kv_store_bytes ({store_bytes}) holds {blocks} blocks of {block_size} tokens "
                              f"({row} bytes per token): fewer than one per attention worker")
        return cls(model.num_layers, model.kv_row_width, dtype, block_size, blocks, attention_workers)

    @property
    def rows(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def header_bytes(self) -> int:
        return _header_bytes(self.attention_workers, self.num_blocks)

    @property
    def nbytes(self) -> int:
        return self.header_bytes + self.num_layers * self.rows * self.row_width * self.dtype.itemsize

    @property
    def per_worker(self) -> int:
        return self.num_blocks // self.attention_workers

    def region(self, worker_index: int) -> range:
        start = (worker_index % self.attention_workers) * self.per_worker
        return range(start, start + self.per_worker)

    def views(self, buffer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(owners [A] int64, stamps [num_blocks, 2] int64, rows [L, rows, W]) over the store's memory."""
        owners = torch.frombuffer(buffer, dtype=torch.int64, count=self.attention_workers)
        stamps = torch.frombuffer(buffer, dtype=torch.int64, count=2 * self.num_blocks,
                                  offset=_owners_bytes(self.attention_workers)).view(self.num_blocks, 2)
        rows = torch.frombuffer(buffer, dtype=self.dtype, count=self.num_layers * self.rows * self.row_width,
                                offset=self.header_bytes).view(self.num_layers, self.rows, self.row_width)
        return owners, stamps, rows


def _owners_bytes(attention_workers: int) -> int:
    return -(-8 * attention_workers // 64) * 64


def _header_bytes(attention_workers: int, num_blocks: int) -> int:
    return -(-(_owners_bytes(attention_workers) + 16 * max(0, num_blocks)) // _PAGE) * _PAGE


def claim_region(owners: torch.Tensor, index: int, incarnation: int) -> str | None:
    """Make `incarnation` the owner of region `index` unless a newer one owns it; the refusal otherwise."""
    current = int(owners[index])
    if current > incarnation:
        return f"region {index} belongs to incarnation {current}"
    owners[index] = incarnation  # the predecessor's writes stop here
    return None


def write_blocks(owners: torch.Tensor, stamps: torch.Tensor, table: torch.Tensor, index: int, incarnation: int,
                 blocks: torch.Tensor, gens: torch.Tensor,
                 parts: list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]) -> str | None:
    """Write rows of region `index` as `incarnation`, stamps odd while the rows are copied and `gens`
    (even) after; the refusal when the region is no longer this incarnation's. `parts`: (layers, store
    rows [m], their KV rows [len(layers), m, W])."""
    owner = int(owners[index])
    if owner != incarnation:
        return f"region {index} now belongs to incarnation {owner}"
    stamps[blocks, 0] = incarnation
    stamps[blocks, 1] = gens - 1  # odd: being written
    for layers, rows, data in parts:
        for i, layer in enumerate(layers):
            table[layer].index_copy_(0, rows, data[i])
    stamps[blocks, 1] = gens
    return None


def read_stamped(stamps: torch.Tensor, table: torch.Tensor, blocks: torch.Tensor,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(stamps [k, 2], rows [L, k * block_size, W]) of `blocks` [k]: every layer's rows, and each
    block's stamp where it was the same before and after the copy ((-1, -1) where it changed)."""
    before = stamps[blocks].clone()
    rows = (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)  # [k * bs]
    data = table.index_select(1, rows)
    changed = (stamps[blocks] != before).any(dim=1)
    before[changed] = -1
    return before, data


def split_address(address: str) -> tuple[str, str]:
    """A store's published address -> (its `memfd:` part, its `tcp:` part); either may be ""."""
    memfd = tcp = ""
    for part in address.split(";"):
        if part.startswith("memfd:"):
            memfd = part
        elif part.startswith("tcp:"):
            tcp = part
    return memfd, tcp


def parse_address(address: str) -> tuple[int, int, int]:
    """`memfd:{pid}:{fd}:{bytes}` (or a store address that has one) -> (pid, fd, bytes); ValueError
    naming the problem otherwise."""
    if ";" in address:
        address = split_address(address)[0]
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
                                      dep.engine.block_size, torch_dtype(dep.engine.dtype), dep.attention_regions)

"""KV checkpoint replicas: which stores an attention worker uses, and shipping its writes to a replica.

Placement (`place_stores`, a pure function). An attention worker's primary store is a store on its own
node (it maps that store's memory and writes one-sided); its `kv_replicas` replica stores are on other
nodes, reached over TCP (remote.py), so that a node loss leaves a copy. Nodes are compared by
`StoreRef.node` (the Ray node id, else the host). When no store on another node exists (the local
launcher: one node) any store other than the primary serves as a replica. Stores are spread: attention
worker i takes the (i mod n)-th candidate, so no one store carries every worker.

Launchers. `kv_stores` store processes run (workers/kv_store.py, `main(WorkerConfig(name, "kv_store",
index, ...))`, names from controller/state.py `kv_store_name`: "kv-store", "kv-store-1", ...); the
controller's roster has them, so a dead one is replaced like any worker. A store listens for TCP on
its deployment's `host` (port 0) and publishes `memfd:...;tcp:HOST:PORT`: a launcher that spreads
stores over nodes gives each store a `host` other nodes can reach, and puts one store on every node
that runs attention workers (their primary must be mappable); `place_stores` then keeps replicas off
the writer's node by itself.

Shipping (`ReplicaShipper`). One thread per replica store takes the writes the checkpointer thread made
into the primary, in order, and sends them in batches (one WRITE frame each), into the writer's own
region of the replica store (the same block numbers as in the primary; the CLAIM makes the region
when the writer is new to that store, an attention worker added by scaling, say). A write counts as
replicated once the store acked it; the checkpointer then records in the commit record which blocks the
replica holds. A replica that fails (unreachable, refused) is dropped: its shipper stops, the writer
carries on with the primary only, and nothing waits on it; a replacement store (a new incarnation)
gets a new shipper, and the live blocks are shipped to it again (the checkpointer's `_Reship`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from resilient_moe.errors import ResilientMoeError
from resilient_moe.kvstore.remote import RemoteStore
from resilient_moe.kvstore.memory_layout import StoreLayout, split_address

log = logging.getLogger("resilient_moe.kv_replication")

MAX_BATCH_BYTES = 32 << 20  # rows in one WRITE frame
LINGER_S = 0.005  # a frame waits this long for more writes to join it
MAX_QUEUED = 256  # writes waiting for one replica before new ones are dropped (that replica stops)


@dataclass(frozen=True)
class StoreRef:
    """A KV store as an attention worker sees it in the cluster view."""

    name: str
    index: int
    incarnation: int
    address: str  # "memfd:@SOCKET:BYTES;tcp:HOST:PORT" (memory_layout.py)
    node: str
    live: bool = True

    @property
    def tcp(self) -> str:
        return split_address(self.address)[1]


def place_stores(node: str, index: int, stores: list[StoreRef], replicas: int) -> tuple[StoreRef | None, list[StoreRef]]:
    """(primary, replicas) of attention worker `index` on `node` among `stores` (dead ones included,
    so that a death does not move every worker's choice: the caller uses only the live ones)."""
    stores = sorted(stores, key=lambda s: s.index)
    local = [s for s in stores if s.node == node]
    primary = local[index % len(local)] if local else None
    others = [s for s in stores if s.node != node] or [s for s in stores if s is not primary]
    if not others or replicas <= 0:
        return primary, []
    start = index % len(others)
    rotated = others[start:] + others[:start]
    return primary, rotated[:replicas]


@dataclass
class ReplicaWrite:
    """Rows written into the primary, to be written into a replica the same way (same blocks and stamps)."""

    blocks: torch.Tensor  # [k]
    gens: torch.Tensor  # [k]
    parts: list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]
    acks: list[tuple[str, int, int]] = field(default_factory=list)  # (request id, first block, end block) it covers

    @property
    def nbytes(self) -> int:
        return sum(data.nbytes for _, _, data in self.parts)

    def split(self, max_bytes: int, block_size: int) -> list["ReplicaWrite"]:
        """Writes of whole blocks of about `max_bytes` each that together are this one (a long prompt's
        rows must not make one frame over the store's limit); the acks ride on the last, sent last."""
        k = self.blocks.numel()
        chunks = min(k, -(-self.nbytes // max_bytes))
        if chunks <= 1:
            return [self]
        out = []
        for group in torch.arange(k).tensor_split(chunks):
            blocks = self.blocks[group]
            parts = []
            for layers, rows, data in self.parts:
                keep = torch.isin(rows // block_size, blocks)  # [m]
                parts.append((layers, rows[keep], data[:, keep]))
            out.append(ReplicaWrite(blocks, self.gens[group], parts))
        out[-1].acks = self.acks
        return out


class ReplicaShipper:
    """Ships one attention worker's writes to one replica store (see the module docstring)."""

    def __init__(self, store: StoreRef, layout: StoreLayout, region: int, incarnation: int, client: str,
                 on_acked: Callable[[int, list[tuple[str, int, int]]], None], timeout_s: float = 2.0) -> None:
        self.store = store
        self.layout = layout
        self.region = region
        self.incarnation = incarnation
        self.client = client
        self.on_acked = on_acked
        self.timeout_s = timeout_s
        self.failed = ""  # why this replica was given up ("" while it works)
        self.fenced = False  # the store refused this writer (a successor owns the region): never again
        self.counters = {"writes": 0, "blocks": 0, "bytes": 0, "errors": 0, "dropped": 0}
        self._queue: deque[ReplicaWrite] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self._conn: RemoteStore | None = None
        self._thread = threading.Thread(target=self._run, name=f"kv-replica-{store.name}", daemon=True)
        self._thread.start()

    def ship(self, item: ReplicaWrite) -> None:
        """Queue `item` (never blocks); dropped, and this replica given up, when it is failing or full."""
        with self._cond:
            if self.failed or self._stop:
                self.counters["dropped"] += 1
                return
            if len(self._queue) >= MAX_QUEUED:
                self._fail(f"{len(self._queue)} writes wait for it")
                return
            self._queue.append(item)
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def _fail(self, reason: str) -> None:
        """Called with the lock held."""
        if not self.failed:
            self.failed = reason
            log.warning("KV replica %s (incarnation %d) given up: %s; checkpointing to the primary only until "
                        "it is replaced", self.store.name, self.store.incarnation, reason)
        self.counters["dropped"] += len(self._queue)
        self._queue.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._stop and sum(item.nbytes for item in self._queue) < MAX_BATCH_BYTES:
                    self._cond.wait(LINGER_S)  # let the next writes join this frame (fewer frames and acks)
                if self._stop:
                    self._close_conn()
                    return
                batch = self._take()
                self._busy = True
            try:
                self._send(batch)
                self.on_acked(self.store.incarnation, [a for item in batch for a in item.acks])
            except (ResilientMoeError, OSError) as e:
                self.counters["errors"] += 1
                self.fenced = "fenced:" in str(e)
                with self._cond:
                    self._fail(str(e))
                self._close_conn()
            except Exception as e:  # noqa: BLE001 (a bug here must not end checkpointing)
                log.exception("KV replica shipping failed")
                with self._cond:
                    self._fail(f"{type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self._busy = False

    def _take(self) -> list[ReplicaWrite]:
        """Writes for one frame: in order, no block twice, about MAX_BATCH_BYTES at most."""
        first = self._queue.popleft().split(MAX_BATCH_BYTES, self.layout.block_size)
        self._queue.extendleft(reversed(first[1:]))
        batch = [first[0]]
        seen = set(batch[0].blocks.tolist())
        size = batch[0].nbytes
        while self._queue:
            nxt = self._queue[0]
            blocks = set(nxt.blocks.tolist())
            if size + nxt.nbytes > MAX_BATCH_BYTES or blocks & seen:
                break
            batch.append(self._queue.popleft())
            seen |= blocks
            size += nxt.nbytes
        return batch

    def _send(self, batch: list[ReplicaWrite]) -> None:
        if self._conn is None:
            self._conn = RemoteStore(self.store.tcp, self.layout, self.client, self.timeout_s)
            self._conn.claim(self.region, self.incarnation)
        blocks = torch.cat([item.blocks for item in batch])
        gens = torch.cat([item.gens for item in batch])
        parts = [part for item in batch for part in item.parts]
        self._conn.write(self.region, self.incarnation, blocks, gens, parts)
        self.counters["writes"] += 1
        self.counters["blocks"] += blocks.numel()
        self.counters["bytes"] += sum(item.nbytes for item in batch)

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self, wait: bool = True) -> None:
        """Stop shipping; `wait`: until a send under way ends (else its thread closes the connection)."""
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._cond.notify()
        if wait:
            self._thread.join(timeout=self.timeout_s + 1.0)
            self._close_conn()

"""Restoring a request's checkpointed KV on the attention worker that adopted it (after its first
worker failed or drained): read its commit record, check each block's stamp against it before and
after copying the rows out, and hand back the verified prefix; the engine recomputes only the rest.

A record names the primary store that holds the request's blocks and, per replica store, how many
leading blocks it holds (commit_records.py); the blocks lie in the writer's region (memory_layout.py),
another region of the same store than this worker's own. The restore reads the primary's copy if
that store is alive (the dead writer's region mapped when the store is this worker's own primary,
over TCP otherwise) and its stamps check out,
else the copy of a replica that holds the most, and recomputes what no copy holds. It then takes the
records over, so that a woken predecessor can no longer commit to them. Redis down or slower than its
timeout means nothing is restored (the request is recomputed from its token log), never a wait.
It runs on the checkpoint thread (kvstore/checkpoint.py), never on the engine thread.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import redis
import torch

from resilient_moe.engine.kv_cache import LayerWindows, RestoredRows
from resilient_moe.engine.sequence import Sequence
from resilient_moe.errors import ResilientMoeError
from resilient_moe.kvstore import keys
from resilient_moe.kvstore.commit_records import CommitRecord, parse_record, replica_fields, takeover_fields
from resilient_moe.kvstore.memory_layout import MappedStore, StoreLayout, stamped_prefix
from resilient_moe.kvstore.prefix_index import PrefixEntry
from resilient_moe.kvstore.remote import RemoteStore

log = logging.getLogger("resilient_moe.kv_checkpoint")

Restored = tuple[RestoredRows | None, int, str]  # (rows, n: positions [0, n) verified, source "local"|"replica"|"")


class Restorer:
    """Reads requests' checkpointed KV back for one attention worker (see the module doc)."""

    def __init__(self, layout: StoreLayout, windows: LayerWindows, redis_client, cluster_id: str, owner: str,
                 incarnation: int, counters: dict[str, int]) -> None:
        """`counters`: the checkpointer's, which this adds its restore counts to."""
        self.layout = layout
        self.windows = windows
        self.bs = layout.block_size
        self.redis = redis_client
        self.cluster_id = cluster_id
        self.owner = owner
        self.incarnation = incarnation
        self.counters = counters
        self.live_stores: dict[int, str] = {}  # incarnation -> TCP address of every live store
        self.mapped_store = 0  # this worker's primary, mapped (0: none)
        self._mapped: MappedStore | None = None
        self._readers: dict[int, RemoteStore] = {}  # TCP connections restores read through
        self._redis_down_until = 0.0

    def use_mapping(self, store: int, mapped: MappedStore | None) -> None:
        """The primary store as mapped now (0 and None: none, e.g. while a new one is mapped); the
        checkpointer owns the mapping (and unmaps it)."""
        self.mapped_store, self._mapped = store, mapped

    def restore(self, seqs: list[Sequence]) -> list[Restored]:
        """The verified prefix of each request's checkpoint (nothing, to recompute, when Redis fails or
        is slower than its timeout), counted."""
        results: list[Restored] = [(None, 0, "")] * len(seqs)
        try:
            results = self._read_checkpoints(seqs)
        except Exception as e:  # noqa: BLE001 (Redis down or slow: recompute from the token log)
            log.warning("cannot restore %d requests from the KV store (%s); recomputing", len(seqs), e)
            self._redis_down_until = time.monotonic() + 1.0
        for data, n, source in results:
            if n > 0:
                self.counters["restored"] += 1
                self.counters[f"restored_{source}"] += 1
                self.counters["restored_tokens"] += n
                self.counters["restored_bytes"] += data.nbytes  # what was read back from the store
            else:
                self.counters["restore_misses"] += 1
        return results

    def read_prefix(self, seq: Sequence, run: list[PrefixEntry]) -> tuple[RestoredRows | None, int]:
        """Rows of the prefix-index entries `run` (one writer, one region: prefix_index.usable_run), as
        positions [0, n) from its first block on, n whole blocks: the leading blocks whose stamps are the
        entries' before and after the copy, checked as a failover restore checks a commit record's; a
        store mapped here must also still give the region to that writer (else it was fenced). Nothing
        (0) when the store is gone or the read fails: the caller computes those blocks."""
        head = run[0]
        if head.store == self.mapped_store and self._mapped is not None:
            try:
                region = self._mapped.region(self.layout.region_of(head.block))
            except (OSError, ValueError) as e:
                log.debug("%s: cannot map the region of store block %d (%s)", seq.request_id, head.block, e)
                return None, 0
            if int(region.owner[0]) != head.incarnation:
                self.counters["prefix_fenced"] += 1  # a successor claimed the region: its writer is gone
                return None, 0
        store_blocks = torch.tensor([e.block for e in run], dtype=torch.long)
        expected = torch.tensor([[e.incarnation, e.gen] for e in run], dtype=torch.long)  # [k, 2]
        try:
            data, n = self._read_copy(seq, head.store, store_blocks, expected, len(run) * self.bs, [],
                                      mismatches="prefix_stamp_mismatches")
        except (ResilientMoeError, OSError, ValueError) as e:
            self.counters["prefix_read_errors"] += 1
            self._drop_reader(head.store)
            log.debug("%s: cannot read prefix blocks from store incarnation %d (%s)", seq.request_id, head.store, e)
            return None, 0
        n = n // self.bs * self.bs
        return (data, n) if n > 0 else (None, 0)

    def close(self) -> None:
        for store in list(self._readers):
            self._drop_reader(store)

    def _read_checkpoints(self, seqs: list[Sequence]) -> list[Restored]:
        if time.monotonic() < self._redis_down_until or (self._mapped is None and not self.live_stores):
            return [(None, 0, "")] * len(seqs)  # Redis failed a moment ago (do not wait on it again), or no store
        commit_keys = [keys.commit_key(self.cluster_id, seq.request_id) for seq in seqs]
        pipe = self.redis.pipeline(transaction=False)
        for seq, key in zip(seqs, commit_keys):
            pipe.hgetall(key)
            pipe.lrange(keys.blocks_key(self.cluster_id, seq.request_id), 0, -1)
        raw = pipe.execute(raise_on_error=False)  # a key of the wrong type fails its request only
        for error in raw:
            if isinstance(error, redis.ConnectionError | redis.TimeoutError):
                raise error  # Redis itself failed: recompute them all
        records = list(zip(raw[::2], raw[1::2]))  # (hash, block list) of each
        for store in [s for s in self._readers if s not in self.live_stores]:
            self._drop_reader(store)  # that store is gone
        results = [self._read_blocks(seq, record, entries) for seq, (record, entries) in zip(seqs, records)]
        # Take the records over now, so a woken predecessor can no longer commit to them.
        pipe = self.redis.pipeline(transaction=False)
        for seq, key, (record, _) in zip(seqs, commit_keys, records):
            pipe.delete(keys.blocks_key(self.cluster_id, seq.request_id))  # none of it is this worker's
            pipe.hset(key, mapping=takeover_fields(self.owner, self.incarnation))
            replicas = replica_fields(record) if isinstance(record, dict) else []
            if replicas:
                pipe.hdel(key, *replicas)  # the predecessor's replicas hold none of this worker's blocks
            pipe.delete(keys.tokens_key(self.cluster_id, seq.request_id))  # this worker's commits rebuild it
        try:
            pipe.execute()
        except Exception as e:  # noqa: BLE001
            log.warning("could not take over the commit records of %d restored requests: %s", len(seqs), e)
        return results

    def _read_blocks(self, seq: Sequence, raw: dict | Exception, entries: list | Exception) -> Restored:
        """The longest verified prefix any store that the record names holds: the primary's copy first,
        then the replicas'."""
        record = self._usable(raw, entries, seq)
        if record is None:
            return None, 0, ""
        n = record.n
        best: Restored = (None, 0, "")
        for store, held, source in record.holders:
            count = min(-(-n // self.bs), held)
            if count <= 0 or (store != self.mapped_store and store not in self.live_stores):
                continue  # nothing there, or that store is gone
            store_blocks = torch.tensor(record.blocks[:count], dtype=torch.long)
            expected = torch.tensor([[record.writer, g] for g in record.gens[:count]], dtype=torch.long)  # [count, 2]
            try:
                data, got = self._read_copy(seq, store, store_blocks, expected, min(n, count * self.bs), record.gaps)
            except (ResilientMoeError, OSError, ValueError) as e:  # that store died or refused: try the next copy
                self.counters["restore_read_errors"] += 1
                self._drop_reader(store)
                log.warning("%s: cannot read its KV from store incarnation %d (%s); trying another copy",
                            seq.request_id, store, e)
                continue
            if got > best[1]:
                best = (data, got, source)
            if got >= n:
                break
        return best

    def _read_copy(self, seq: Sequence, store: int, store_blocks: torch.Tensor, expected: torch.Tensor, n: int,
                   gaps: list[tuple[int, int]], mismatches: str = "restore_stamp_mismatches",
                   ) -> tuple[RestoredRows | None, int]:
        """Rows of `store_blocks` in store `store` that carry the stamps `expected`, checked before and
        after the copy (sliding layers' within their window only), and n; mapped when it is this
        worker's primary, over TCP otherwise (RemoteStoreError when that fails). A block found with
        another stamp is counted in `mismatches` (a prefix read expects some: blocks are freed and reused)."""
        count = store_blocks.numel()
        if store == self.mapped_store and self._mapped is not None:
            region = self._mapped.region(self.layout.region_of(int(store_blocks[0])))  # the writer's (made if new)
            good = stamped_prefix(region, store_blocks, expected)
            data = None
            while True:  # n only shrinks: at most once more per block found rewritten during the copy
                n = self.windows.restorable(min(n, good * self.bs), gaps)  # a shorter prefix: an earlier window
                if n <= 0:
                    break
                positions = torch.arange(n)
                local = (store_blocks - region.first_block)[positions // self.bs] * self.bs + positions % self.bs
                data = RestoredRows.read(region.rows, self.windows, local)
                checked = stamped_prefix(region, store_blocks, expected)  # unchanged while we copied?
                if checked * self.bs >= n:
                    break
                good = checked
        elif store in self.live_stores:
            stamps, rows = self._reader(store).read(store_blocks)  # rows: [L, count * bs, W], in block order
            ok = (stamps == expected).all(dim=1)
            bad = (~ok).nonzero()
            good = int(bad[0]) if bad.numel() else count
            n = self.windows.restorable(min(n, good * self.bs), gaps)
            data = RestoredRows.read(rows, self.windows, torch.arange(n)) if n > 0 else None
        else:
            return None, 0
        if good < count and mismatches != "restore_stamp_mismatches":
            self.counters[mismatches] += 1
        elif good < count:
            self.counters["restore_stamp_mismatches"] += 1
            log.warning("%s: store block %d was rewritten after its commit (a fenced writer?); restoring %d "
                        "positions from store incarnation %d", seq.request_id, int(store_blocks[good]), max(n, 0), store)
        return (data, n) if n > 0 else (None, 0)

    def _reader(self, store: int) -> RemoteStore:
        reader = self._readers.get(store)
        if reader is None:
            reader = self._readers[store] = RemoteStore(self.live_stores[store], self.layout, self.owner)
        return reader

    def _drop_reader(self, store: int) -> None:
        reader = self._readers.pop(store, None)
        if reader is not None:
            reader.close()

    def _usable(self, raw: dict | Exception, entries: list | Exception, seq: Sequence) -> CommitRecord | None:
        """The record if it fits this request and this layout, trimmed to what a restore may use (at
        least one position is computed, for the next token's logits); None when there is nothing to
        restore, or the record is malformed (logged and counted: the request is recomputed)."""
        try:
            for value in (raw, entries):
                if isinstance(value, Exception):  # e.g. WRONGTYPE: a key that is not a hash or a list
                    raise ValueError(f"Redis refused to read it: {value}")
            record = parse_record(raw, entries)
        except ValueError as e:
            self.counters["restore_malformed_records"] += 1
            log.warning("malformed commit record for %s (%s); recomputing", seq.request_id, e)
            return None
        if record is None or record.block_size != self.bs:
            return None  # none, or written with another layout
        n = min(record.n, seq.num_tokens - 1)
        count = -(-n // self.bs) if n > 0 else 0
        if n <= 0 or len(record.blocks) < count or len(record.gens) < count:
            return None
        if count:
            region = self.layout.region_of(record.blocks[0])
            own = range(region * self.layout.region_blocks, (region + 1) * self.layout.region_blocks)
            if not 0 <= region < self.layout.max_regions or any(b not in own for b in record.blocks[:count]):
                self.counters["restore_malformed_records"] += 1
                log.warning("malformed commit record for %s (field 'blocks': not all in one region of the store); "
                            "recomputing", seq.request_id)
                return None
        return dataclasses.replace(record, n=n)

"""Incremental, asynchronous KV checkpoints from an attention worker into the KV store.

The engine thread does two small things: after each step, `after_step` gathers the KV rows of the
blocks that became full since each request's last commit into one staging tensor (whole blocks
only; a restore recomputes the partial last block), and between steps `finished_restores` hands
back restores that are ready. Everything that waits on anything (the store's memory, Redis) runs
on one background thread, so neither a slow Redis nor a big restore ever holds up a decode step:

  - writes: the thread copies staged rows into the store's shared memory (one-sided) under the
    store's ownership protocol (memory_layout.py: region owner word, per-block stamps), then commits
    every staged snapshot in one pipelined Redis round trip (commit_records.py: `n`, positions [0, n)
    complete, and only what changed since the request's last commit: the store blocks it added and
    their generations). A request's commits are ordered, so a commit record never claims rows that
    are not in the store yet. The thread keeps each request's block list as it sent it (`_Sent`):
    a delta Redis could not apply (a commit lost in an outage) is answered RESEND, and the next
    commit of that request sends the whole list again. Sliding-window layers are written
    only inside their window, and restored only there (engine/kv_cache.py, `LayerWindows`).
  - restores (a request moved here from a failed worker; restore.py): the thread reads the commit
    record, checks each block's stamp against it before and after copying the rows out, and hands
    back the verified prefix; the engine thread copies it into the KV cache and recomputes only the rest.
  - prefix reuse across workers (kvstore/prefix_index.py): with `publish_prefixes`, every full block
    a write puts into the store is also named in Redis under its chained prefix hash (keys.py
    `prefix_key`), in the commit's round trip; `request_prefix` looks the blocks a new request misses
    in the local prefix cache up there, and the thread reads the run it finds with the stamp checks
    of a restore (restore.py `read_prefix`); `finished_prefixes` hands the rows back.
  - a new store (the old one died and was restarted): the thread maps it, lets go of the old memory,
    and every running request is checkpointed again from its start.
  - replicas (`kv_replicas`, kvstore/replication.py): every write made into the primary is handed to
    one shipper thread per replica store, which sends it over TCP in batches; once a replica acks, the
    thread records in the commit record which of the request's blocks it holds (`replica:{store}`,
    keys.py). A replica that fails is given up (the writer carries on with the primary); a replacement
    store gets the live blocks again, read from the primary (`_Reship`).

Failures never block or corrupt serving:
  - the store region is full: that request stops being checkpointed (counted); its last commit
    stays valid, and a restore recomputes the rest;
  - Redis is down or slow (socket timeout): commits fail and are counted; the pending queue is
    bounded, and when it is full new snapshots are dropped and their requests stop being
    checkpointed (a later commit could otherwise claim rows that were never written);
  - a record another worker took over (after this one was fenced) is never overwritten (commits are
    conditional on the owner, a Lua script), and a region another incarnation claimed is never
    written again (the writes are refused and counted);
  - a block whose stamp does not match its record (a fenced worker wrote it late) is not restored.
Blocks of a dead predecessor with the same name (same store region) stay pinned until the request
that owned them has been restored elsewhere or its record expired.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from resilient_moe import staging
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.engine.kv_cache import RestoredRows
from resilient_moe.engine.sequence import Sequence
from resilient_moe.kvstore import keys
from resilient_moe.kvstore.commit_records import (COMMIT_SCRIPT, COMMITTED, REPLICA_SCRIPT, RESEND, CommitDelta,
                                                  gaps_field, list_fields, parse_entries)
from resilient_moe.kvstore.memory_layout import (MappedStore, Region, StoreLayout, block_rows, claim_region,
                                                 stamped_prefix, write_blocks)
from resilient_moe.kvstore.replication import ReplicaShipper, ReplicaWrite, StoreRef
from resilient_moe.kvstore.prefix_index import MAX_PREFIX_BLOCKS, PrefixEntry, usable_run
from resilient_moe.kvstore.restore import Restorer

log = logging.getLogger("resilient_moe.kv_checkpoint")

MAX_PENDING = 256  # snapshots waiting for the background thread (the commit buffer bound)
PREFIX_WAIT_S = 0.05  # no prefix lookup is queued while a commit round trip has waited longer than this
REPLICA_RETRY_S = 2.0  # a replica given up while its store still serves is tried again this often

@dataclass
class _Tracked:
    committed: int = 0  # positions [0, committed) are snapshotted (and will be committed in order)
    blocks: list[int] = field(default_factory=list)  # store block of each logical block
    gens: list[int] = field(default_factory=list)  # generation each block is stamped with once written
    tokens: int = 0  # output tokens already in the tokens list (commits send only the ones after)
    broken: bool = False  # stopped checkpointing (store full or a dropped snapshot)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # spans whose sliding-layer rows were skipped


@dataclass
class _Sent:
    """A request's block list as the checkpoint thread sent it to Redis (what its record holds once
    every commit sent so far applied)."""

    blocks: list[int] = field(default_factory=list)
    gens: list[int] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)
    resend: bool = False  # a delta did not apply: the next commit sends the whole list


@dataclass
class _Write:
    store: int  # incarnation of the store it was staged for
    # (layers, store rows [m], their KV rows [len(layers), m, W]): sliding layers' parts hold fewer rows
    parts: list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]
    blocks: torch.Tensor  # [k] store blocks the rows fill (whole blocks)
    gens: torch.Tensor  # [k] their generations (even: written)
    # (request id, n, index of the first new block, the new blocks, their gens, position of the first
    # new output token, the new output tokens): only what changed since the request's last commit
    commits: list[tuple[str, int, int, list[int], list[int], int, list[int]]]
    gaps: dict[str, list[tuple[int, int]]]  # request id -> its skipped sliding-layer spans so far
    acks: list[tuple[str, int, int]] = field(default_factory=list)  # (request id, first, end block) written
    copy: staging.SideCopy | None = None  # the KV rows on their way to host memory (on a GPU)
    prefixes: list[tuple[bytes, int, int]] = field(default_factory=list)  # (chained hash, store block, gen) of full blocks

    def host_parts(self) -> list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]:
        """`parts` with their rows in host memory: waits (on the checkpoint thread) for the side copy."""
        if self.copy is not None:
            self.parts = [(layers, rows, data) for (layers, rows, _), data in zip(self.parts, self.copy.wait())]
            self.copy = None
        return self.parts


@dataclass
class _Release:
    request_id: str
    blocks: list[int]


@dataclass
class _Restore:
    seq: Sequence


@dataclass
class _PrefixLookup:
    seq: Sequence
    start: int  # its first `start` full blocks are in the local prefix cache
    hashes: list[bytes]  # the chained hashes of its next full blocks, to look up


@dataclass
class _Attach:
    address: str
    store: int


@dataclass
class _Replicas:
    stores: list[StoreRef]  # the replica stores to ship to from now on
    # request id -> (its committed store blocks, their generations): to ship again to a new replica
    live: dict[str, tuple[list[int], list[int]]]


@dataclass
class _Acked:
    store: int  # the replica store's incarnation
    acks: list[tuple[str, int, int]]  # (request id, first block, end block) it now holds


class KVCheckpointer:
    """Checkpoints one attention worker's KV cache into its region of the KV store (see the module doc)."""

    def __init__(self, engine: LLMEngine, layout: StoreLayout, index: int, redis_client, cluster_id: str,
                 owner: str, incarnation: int, wake: Callable[[], None] = lambda: None) -> None:
        """`index`: the worker's region; `wake` is called (from the thread) when a restore is ready."""
        self.engine = engine
        self.cache = engine.cache
        self.windows = engine.cache.windows
        self.layout = layout
        self.index = index
        self.region = layout.region(index)
        self.redis = redis_client
        self.cluster_id = cluster_id
        self.owner = owner
        self.incarnation = incarnation
        self.wake = wake
        self.bs = layout.block_size
        self.store_incarnation = 0  # the store the engine thread stages for (0: none yet)
        self.tracked: dict[str, _Tracked] = {}
        self._next_gen = 2
        self._free: deque[int] = deque(self.region)
        self._pinned: dict[int, str] = {}  # store block -> request id of a predecessor's record
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: deque[_Write | _Release | _Restore | _PrefixLookup | _Attach | _Replicas | _Acked] = deque()
        self._restored: deque[tuple[Sequence, torch.Tensor | None, int]] = deque()
        self._prefixes: deque[tuple[Sequence, int, RestoredRows | None]] = deque()
        # Prefix reuse across workers (the attention worker sets these from its deployment and cluster views)
        self.publish_prefixes = False
        self.fenced: frozenset[tuple[str, int]] = frozenset()  # (name, incarnation) the controller fenced
        self._prefix_down_until = 0.0  # a lookup failed: none until then
        self._stop = False
        self._busy = False  # the thread is carrying out a batch it took
        self._refused = False
        self._commit_since: float | None = None  # monotonic start of the commit round trip under way
        self._sent: dict[str, _Sent] = {}  # the thread's: each request's record as sent
        self._queued: list[tuple[int, str]] = []  # (position in the pipeline, request id) of each commit queued
        # The store's memory, touched by the thread only.
        self._store: MappedStore | None = None  # the primary, as mapped (its regions: this worker's, restores')
        self._region: Region | None = None  # this worker's region of it
        self._mapped_store = 0
        self._ready_store = 0  # the store whose region is claimed and pinned: snapshots may start
        # Replicas (engine thread: the incarnations asked for; the thread: their shippers and what they hold).
        self.replica_stores: tuple[int, ...] = ()
        self._replica_refs: list[StoreRef] = []
        self._replica_retry_at = 0.0
        self._shippers: dict[int, ReplicaShipper] = {}
        self._held: dict[int, dict[str, int]] = {}  # replica incarnation -> request id -> leading blocks it holds
        self._shipped = {"writes": 0, "blocks": 0, "bytes": 0, "errors": 0, "dropped": 0}  # of closed shippers
        self.counters = {"commits": 0, "commit_errors": 0, "commit_resends": 0, "dropped": 0, "store_full": 0, "restored": 0,
                         "restored_local": 0, "restored_replica": 0, "replica_acks": 0, "replica_reships": 0,
                         "replica_reshipped_blocks": 0, "restore_read_errors": 0,
                         "restored_tokens": 0, "restored_bytes": 0, "restore_misses": 0,
                         "restore_stamp_mismatches": 0, "restore_malformed_records": 0,
                         "pinned_blocks": 0, "writes_refused": 0, "store_attaches": 0,
                         "prefix_published": 0, "prefix_lookups": 0, "prefix_found_blocks": 0, "prefix_fenced": 0,
                         "prefix_stamp_mismatches": 0, "prefix_read_errors": 0, "prefix_lookup_errors": 0}
        self.restorer = Restorer(layout, self.windows, redis_client, cluster_id, owner, incarnation, self.counters)
        self._commit = redis_client.register_script(COMMIT_SCRIPT)
        self._replica_commit = redis_client.register_script(REPLICA_SCRIPT)
        self._thread = threading.Thread(target=self._run, name="kv-checkpoint", daemon=True)
        self._thread.start()

    # ---- engine thread ----------------------------------------------------------------------

    def attach(self, address: str, store_incarnation: int) -> None:
        """Use the store published at `address` from now on: a first store, or one that replaced a dead
        store. Every request is checkpointed again from its start (the old blocks are gone)."""
        if store_incarnation == self.store_incarnation:
            return
        replacing = self.store_incarnation != 0
        self.store_incarnation = store_incarnation
        with self._cond:
            self._pending = deque(p for p in self._pending if not isinstance(p, (_Write, _Release)))
            self._pending.append(_Attach(address, store_incarnation))
            self._free = deque(self.region)
            self._pinned.clear()
            self._cond.notify()
        for t in self.tracked.values():
            t.committed, t.blocks, t.gens, t.broken, t.gaps = 0, [], [], False, []  # its tokens list stays valid
        if replacing:
            log.warning("KV store replaced (incarnation %d): checkpointing %d requests again from their start",
                        store_incarnation, len(self.tracked))

    def use_replicas(self, stores: list[StoreRef], live: list[StoreRef] | None = None) -> None:
        """Ship every write to `stores` from now on (a new one first gets every live block again);
        `live`: every store that serves now, which restores may read (None: unchanged)."""
        if live is not None:
            self.restorer.live_stores = {s.incarnation: s.tcp for s in live if s.tcp}
        wanted = tuple(sorted(s.incarnation for s in stores))
        if wanted == self.replica_stores:
            return
        self.replica_stores = wanted
        self._replica_refs = list(stores)
        current = self._ready_store == self.store_incarnation != 0
        live_blocks = {r: (t.blocks[:-(-t.committed // self.bs)], t.gens[:-(-t.committed // self.bs)])
                       for r, t in self.tracked.items() if t.committed > 0 and not t.broken} if current else {}
        with self._cond:
            self._pending.append(_Replicas(list(stores), live_blocks))
            self._cond.notify()

    def after_step(self, final: bool = False) -> None:
        """Snapshot the rows every request completed since its last commit; release finished ones.
        `final`: the last snapshot of a draining worker, which writes no block again: the partial last
        block too, so the adopter restores every position instead of recomputing the tail."""
        if self._ready_store != self.store_incarnation or self.store_incarnation == 0 or self._refused:
            return  # no store yet, or it is being mapped (its predecessor's blocks are not pinned yet)
        if any(s.failed and not s.fenced for s in list(self._shippers.values())) \
                and time.monotonic() >= self._replica_retry_at:
            self._replica_retry_at = time.monotonic() + REPLICA_RETRY_S  # a transient failure: try it again
            self.replica_stores = ()
            self.use_replicas(self._replica_refs)
        scheduler = self.engine.scheduler
        live = {s.request_id: s for s in scheduler.running}
        for s in scheduler.waiting:
            live.setdefault(s.request_id, s)
        for request_id in [r for r in self.tracked if r not in live]:
            self._release(request_id)
        src_parts, dst_parts, recent_parts, new_blocks, new_gens, commits, acks = [], [], [], [], [], [], []
        prefixes: list[tuple[bytes, int, int]] = []
        publish = self.publish_prefixes and not self.windows.windowed  # a windowed block is not whole in the store
        for seq in scheduler.running:
            t = self.tracked.get(seq.request_id)
            if t is None:
                t = self.tracked[seq.request_id] = _Tracked()
            # Whole blocks only (a block is never written twice): the tail is recomputed on restore.
            n = seq.num_cached if final else seq.num_cached // self.bs * self.bs
            if t.broken or n <= t.committed:
                continue
            if not self._ensure_blocks(t, n):
                t.broken = True
                self.counters["store_full"] += 1
                log.warning("KV store region full: no longer checkpointing %s beyond %d tokens", seq.request_id,
                            t.committed)
                continue
            first, last = t.committed // self.bs, -(-n // self.bs)
            positions = torch.arange(t.committed, n)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            blocks = torch.tensor(t.blocks, dtype=torch.long)
            src_parts.append(table[positions // self.bs] * self.bs + positions % self.bs)
            dst_parts.append(blocks[positions // self.bs] * self.bs + positions % self.bs)
            recent_parts.append(positions >= self.windows.first_written(n))  # sliding layers write these only
            t.gaps = self.windows.add_gap(t.gaps, t.committed, n)
            gens = list(range(self._next_gen, self._next_gen + 2 * (last - first), 2))
            self._next_gen += 2 * (last - first)
            t.gens.extend(gens)
            new_blocks.extend(t.blocks[first:last])
            new_gens.extend(gens)
            acks.append((seq.request_id, first, last))
            commits.append((seq.request_id, n, first, t.blocks[first:last], gens, t.tokens, seq.output_ids[t.tokens:]))
            if publish and n // self.bs > first:
                hashes = scheduler.prefix_hashes(seq, n // self.bs)
                prefixes += [(hashes[i], t.blocks[i], t.gens[i]) for i in range(first, n // self.bs)]
            t.committed, t.tokens = n, len(seq.output_ids)
        if not commits:
            return
        src, dst, recent = torch.cat(src_parts), torch.cat(dst_parts), torch.cat(recent_parts)
        parts = [(self.windows.full, dst, self.cache.gather(src, self.windows.full))]
        if self.windows.windowed:
            parts.append((self.windows.windowed, dst[recent], self.cache.gather(src[recent], self.windows.windowed)))
        item = _Write(self.store_incarnation, parts, torch.tensor(new_blocks, dtype=torch.long),
                      torch.tensor(new_gens, dtype=torch.long), commits,
                      {request_id: list(self.tracked[request_id].gaps) for request_id, *_ in commits}, acks,
                      staging.SideCopy([data for *_, data in parts]), prefixes)
        with self._cond:
            if sum(isinstance(p, _Write) for p in self._pending) >= MAX_PENDING:
                self.counters["dropped"] += 1
                for request_id, *_ in commits:
                    self.tracked[request_id].broken = True
                return
            self._pending.append(item)
            self._cond.notify()

    def _ensure_blocks(self, t: _Tracked, n: int) -> bool:
        need = -(-n // self.bs) - len(t.blocks)
        if need <= 0:
            return True
        with self._lock:
            if len(self._free) < need:
                return False
            t.blocks.extend(self._free.popleft() for _ in range(need))
        return True

    def _release(self, request_id: str) -> None:
        t = self.tracked.pop(request_id)
        with self._cond:
            self._pending.append(_Release(request_id, t.blocks))
            self._cond.notify()

    def request_restore(self, seq: Sequence) -> None:
        """Look for `seq`'s checkpointed KV (a request moved here from a failed worker), off this thread;
        the answer comes back through `finished_restores`."""
        with self._cond:
            self._pending.append(_Restore(seq))
            self._cond.notify()

    def request_prefix(self, seq: Sequence) -> bool:
        """A new request: look the full blocks of its prompt that the local prefix cache misses up in the
        prefix index, off this thread (the answer comes back through `finished_prefixes`). False when
        there is nothing to look up (all cached, too short, reuse off, no store yet): queue it as usual."""
        allocator = self.engine.allocator
        if not (self.publish_prefixes and allocator.caching and not self.windows.windowed and self._ready_store) \
                or seq.block_table or self._refused or self._stop:
            return False
        since = self._commit_since
        now = time.monotonic()
        if now < self._prefix_down_until or (since is not None and now - since > PREFIX_WAIT_S):
            return False  # Redis failed a moment ago, or the thread waits on it: a new request never waits too
        hashes = self.engine.scheduler.prefix_hashes(seq)
        start = len(allocator.match(hashes))
        if start >= len(hashes):
            return False
        with self._cond:
            self._pending.append(_PrefixLookup(seq, start, hashes[start : start + MAX_PREFIX_BLOCKS]))
            self._cond.notify()
        return True

    def finished_prefixes(self) -> list[tuple[Sequence, int, RestoredRows | None]]:
        """(seq, start, rows or None) of prefix lookups that are ready: rows hold whole blocks from its
        block `start` on, verified (None: nothing usable, compute it all)."""
        out = []
        while self._prefixes:
            out.append(self._prefixes.popleft())
        return out

    def settled(self) -> bool:
        """Is every snapshot staged so far written and its commit sent (a draining worker hands its
        requests over once it is)?"""
        with self._lock:
            return not self._pending and not self._busy

    def finished_restores(self) -> list[tuple[Sequence, RestoredRows | None, int]]:
        """(seq, rows or None, n) of restores that are ready: positions [0, n) are verified."""
        out = []
        while self._restored:
            out.append(self._restored.popleft())
        return out

    # ---- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        last_pin_check = time.monotonic()
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    if not self._cond.wait(1.0):
                        break
                if self._stop:
                    return
                batch = list(self._pending)
                self._pending.clear()
                self._busy = True
            try:
                self._process(batch)
                if self._pinned and time.monotonic() - last_pin_check > 1.0:
                    last_pin_check = time.monotonic()
                    self._check_pins()
            except Exception:
                log.exception("checkpoint thread error")
            finally:
                with self._lock:
                    self._busy = False

    def _process(self, batch: list) -> None:
        """Carry out a batch in order, with one Redis round trip for all its commits and deletes, and
        one each to read and to take over the records of all its restores."""
        pipe = None
        restores, lookups = [], []
        for item in batch:
            if isinstance(item, _Attach):
                if pipe is not None:
                    self._execute(pipe)
                    pipe = None
                self._attach(item)
            elif isinstance(item, _Restore):
                restores.append(item.seq)
            elif isinstance(item, _PrefixLookup):
                lookups.append(item)
            elif isinstance(item, _Write):
                if item.store == self._mapped_store and self._write(item):
                    pipe = pipe or self.redis.pipeline(transaction=False)
                    self._queue_commits(pipe, item)
                    self._queue_prefixes(pipe, item)
                    for shipper in self._shippers.values():
                        shipper.ship(ReplicaWrite(item.blocks, item.gens, item.parts, item.acks))
            elif isinstance(item, _Release):
                pipe = pipe or self.redis.pipeline(transaction=False)
                pipe.delete(keys.commit_key(self.cluster_id, item.request_id),
                            keys.blocks_key(self.cluster_id, item.request_id),
                            keys.tokens_key(self.cluster_id, item.request_id))
                self._sent.pop(item.request_id, None)
                for held in self._held.values():
                    held.pop(item.request_id, None)
                with self._lock:
                    self._free.extend(b for b in item.blocks if b in self.region)
            elif isinstance(item, _Replicas):
                self._set_replicas(item)
            elif isinstance(item, _Acked):
                pipe = pipe or self.redis.pipeline(transaction=False)
                self._queue_replica_commits(pipe, item)
        if restores:
            for seq, (data, n, _) in zip(restores, self.restorer.restore(restores)):
                self._restored.append((seq, data, n))
            self.wake()
        if lookups:
            self._look_up_prefixes(lookups)
        if pipe is not None:
            self._execute(pipe)

    def _queue_prefixes(self, pipe, item: _Write) -> None:
        """Name each full block the write put into the store under its chained hash (the rows are there
        now: `_write` came first)."""
        for block_hash, block, gen in item.prefixes:
            entry = PrefixEntry(item.store, block, self.incarnation, gen, self.owner)
            pipe.set(keys.prefix_key(self.cluster_id, block_hash), entry.encode(), ex=keys.PREFIX_TTL_S)
        self.counters["prefix_published"] += len(item.prefixes)

    def _look_up_prefixes(self, lookups: list[_PrefixLookup]) -> None:
        """One Redis round trip for every lookup, then each one's run read from its store and checked."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            for lookup in lookups:
                pipe.mget([keys.prefix_key(self.cluster_id, h) for h in lookup.hashes])
            found = pipe.execute(raise_on_error=False)
        except Exception as e:  # noqa: BLE001 (Redis down or slow: compute them)
            self.counters["prefix_lookup_errors"] += 1
            self._prefix_down_until = time.monotonic() + 1.0
            log.debug("prefix lookup failed (%s): computing %d prompts", e, len(lookups))
            found = [None] * len(lookups)
        fenced = self.fenced  # the latest view's (swapped whole by the engine thread)
        for lookup, raw in zip(lookups, found):
            self.counters["prefix_lookups"] += 1
            rows = None
            try:
                if isinstance(raw, list):
                    entries = [PrefixEntry.parse(r) for r in raw]
                    if entries and entries[0] is not None and (entries[0].owner, entries[0].incarnation) in fenced:
                        self.counters["prefix_fenced"] += 1
                    run = usable_run(entries, self.layout, fenced)
                    if run:
                        rows, n = self.restorer.read_prefix(lookup.seq, run)
                        self.counters["prefix_found_blocks"] += n // self.bs
                elif raw is not None:
                    self.counters["prefix_lookup_errors"] += 1
            except Exception:  # noqa: BLE001 (whatever it is, the request is answered: it computes its prompt)
                self.counters["prefix_read_errors"] += 1
                rows = None
                log.exception("%s: prefix read failed; computing it", lookup.seq.request_id)
            self._prefixes.append((lookup.seq, lookup.start, rows))
        self.wake()

    def _attach(self, item: _Attach) -> None:
        old = self._store
        self._store = self._region = None  # no view of the old memory may outlive its unmap
        self.restorer.use_mapping(0, None)
        if old is not None:
            old.close()
        self._mapped_store = self._ready_store = 0
        for held in self._held.values():
            held.clear()  # every request is written again from its start, to the replicas too
        self._sent.clear()  # and its record starts a new block list
        store = None
        try:
            store = MappedStore(item.address, self.layout, who=f"{self.owner}/{self.incarnation}")
            region = store.region(self.index)  # the store makes it if this worker is new (scaled up)
        except (OSError, ValueError) as e:  # AuthError is an OSError
            if store is not None:
                store.close()
            log.warning("cannot map the KV store at %s (%s): not checkpointing until a store can be used",
                        item.address, e)
            return
        refusal = claim_region(region, self.incarnation)
        if refusal:
            store.close()
            self._refuse(refusal)
            return
        self._store, self._region = store, region
        self._mapped_store = item.store
        self.restorer.use_mapping(item.store, store)
        self.counters["store_attaches"] += 1
        self._pin_predecessor_blocks()
        self._ready_store = item.store
        log.info("checkpointing into KV store incarnation %d (%s), region %d: %d blocks", item.store,
                 item.address, self.index, len(self.region))

    def _refuse(self, reason: str) -> None:
        """Another incarnation owns the region: this one was fenced and must never write again."""
        self.counters["writes_refused"] += 1
        if not self._refused:
            self._refused = True
            log.warning("KV checkpoint writes refused: %s; incarnation %d stops checkpointing", reason,
                        self.incarnation)

    def _write(self, item: _Write) -> bool:
        """Copy staged rows into the store under the ownership protocol; False if refused."""
        refusal = "this incarnation was fenced" if self._refused else \
            write_blocks(self._region, self.incarnation, item.blocks, item.gens,
                         item.host_parts())  # into shared memory: one-sided
        if refusal:
            self._refuse(refusal)
            return False
        return True

    # ---- replicas (the thread) ----------------------------------------------------------------

    def _set_replicas(self, item: _Replicas) -> None:
        """Ship to `item.stores` from now on; a store new to this worker first gets every live block,
        read from the primary (what the store it replaces held is lost with it)."""
        wanted = {s.incarnation: s for s in item.stores}
        for incarnation in [i for i in self._shippers if i not in wanted]:
            self._close_shipper(incarnation)
        for incarnation, store in wanted.items():
            if incarnation in self._shippers and self._shippers[incarnation].failed:
                self._close_shipper(incarnation)  # tried again: from a new connection, with every live block
            if incarnation in self._shippers:
                continue
            self._shippers[incarnation] = ReplicaShipper(store, self.layout, self.index, self.incarnation, self.owner,
                                                         self._on_acked)
            self._held[incarnation] = {}
            log.info("replicating KV checkpoints to %s (incarnation %d, %s)", store.name, incarnation, store.tcp)
            if item.live and self._region is not None:
                self._reship(self._shippers[incarnation], item.live)

    def _reship(self, shipper: ReplicaShipper, live: dict[str, tuple[list[int], list[int]]]) -> None:
        """Ship every live committed block (whose stamp is still as committed) to a new replica."""
        total = 0
        for request_id, (blocks, gens) in live.items():
            store_blocks = torch.tensor(blocks, dtype=torch.long)
            expected = torch.tensor([[self.incarnation, g] for g in gens], dtype=torch.long).view(-1, 2)
            good = stamped_prefix(self._region, store_blocks, expected)
            if good == 0:
                continue
            rows = block_rows(store_blocks[:good], self.bs)  # store-wide, as the replica numbers them too
            layers = tuple(range(self.layout.num_layers))
            data = self._region.rows.index_select(1, rows - self._region.first_row)  # [L, good * bs, W]
            shipper.ship(ReplicaWrite(store_blocks[:good], expected[:good, 1].clone(), [(layers, rows, data)],
                                      [(request_id, 0, good)]))
            total += good
        self.counters["replica_reships"] += 1
        self.counters["replica_reshipped_blocks"] += total
        log.info("shipping %d live blocks of %d requests to the new replica %s", total, len(live), shipper.store.name)

    def _on_acked(self, store: int, acks: list[tuple[str, int, int]]) -> None:
        """A shipper's thread: the replica holds these blocks now (recorded by the checkpoint thread)."""
        with self._cond:
            self._pending.append(_Acked(store, acks))
            self._cond.notify()

    def _queue_replica_commits(self, pipe, item: _Acked) -> None:
        held = self._held.get(item.store)
        if held is None:
            return  # a replica given up meanwhile
        changed = set()
        for request_id, first, end in item.acks:
            if first <= held.get(request_id, 0) < end:  # contiguous: it holds every block before
                held[request_id] = end
                changed.add(request_id)
        if changed:  # one script call for all of them
            self._replica_commit(keys=[keys.commit_key(self.cluster_id, r) for r in changed],
                                 args=[self.owner, str(self.incarnation), f"replica:{item.store}",
                                       *(str(held[r]) for r in changed)], client=pipe)
        self.counters["replica_acks"] += len(changed)

    def _close_shipper(self, incarnation: int) -> None:
        shipper = self._shippers.pop(incarnation)
        self._held.pop(incarnation, None)
        shipper.close(wait=False)
        for k, v in shipper.counters.items():
            self._shipped[k] += v

    def _queue_commits(self, pipe, item: _Write) -> None:
        """One COMMIT_SCRIPT call per request: what changed since its last commit (the whole list when
        it starts anew or a delta did not apply)."""
        for request_id, n, first, blocks, gens, first_token, tokens in item.commits:
            sent = self._sent.get(request_id)
            if first == 0 or sent is None:
                if first != 0:
                    continue  # nothing sent to build on (cannot happen: a request's first commit starts at 0)
                sent = self._sent[request_id] = _Sent()
            if first > len(sent.blocks):
                continue  # an earlier commit of it was never sent: its record stays as it was
            del sent.blocks[first:], sent.gens[first:]
            sent.blocks += blocks
            sent.gens += gens
            gaps = item.gaps[request_id]
            fields = {}
            if sent.resend or first == 0:
                first, blocks, gens = 0, sent.blocks, sent.gens
                fields = list_fields(self.bs, item.store, self.owner, self.incarnation) | gaps_field(gaps)
                # a new list drops the replica fields; a resent one names the same blocks: keep what replicas hold
                fields |= {f"replica:{store}": str(held[request_id]) for store, held in self._held.items()
                           if held.get(request_id)}
            elif gaps != sent.gaps:
                fields = gaps_field(gaps)
            sent.gaps, sent.resend = gaps, False
            delta = CommitDelta(n, first, blocks, gens, first_token, tokens, fields)
            self._queued.append((len(pipe), request_id))
            self._commit(keys=[keys.commit_key(self.cluster_id, request_id), keys.blocks_key(self.cluster_id, request_id),
                               keys.tokens_key(self.cluster_id, request_id)],
                         args=delta.args(self.owner, self.incarnation, keys.COMMIT_TTL_S), client=pipe)

    def _execute(self, pipe) -> None:
        queued, self._queued = self._queued, []
        self._commit_since = time.monotonic()
        try:
            results = pipe.execute(raise_on_error=False)
            self.counters["commits"] += sum(1 for r in results if r == COMMITTED)
            failed = sum(1 for r in results if isinstance(r, Exception))
            error = next((r for r in results if isinstance(r, Exception)), None)
            for position, request_id in queued:
                if results[position] == RESEND and request_id in self._sent:
                    self._sent[request_id].resend = True  # its next commit sends the whole list
                    self.counters["commit_resends"] += 1
        except Exception as e:  # noqa: BLE001 (any Redis failure: down, timeout)
            failed = 1
            error = e
        finally:
            self._commit_since = None
        if failed:
            self.counters["commit_errors"] += failed
            if self.counters["commit_errors"] in (1, 10, 100, 1000):
                log.warning("checkpoint commit failed (%d so far): %s", self.counters["commit_errors"], error)

    def _pin_predecessor_blocks(self) -> None:
        """Blocks of this region still named by a predecessor's commit records are not ours yet."""
        try:
            found = [key.decode().rsplit(":", 1)[1]
                     for key in self.redis.scan_iter(match=keys.commit_pattern(self.cluster_id), count=1000)]
            pipe = self.redis.pipeline(transaction=False)
            for request_id in found:
                pipe.hmget(keys.commit_key(self.cluster_id, request_id), ["owner", "incarnation"])
                pipe.lrange(keys.blocks_key(self.cluster_id, request_id), 0, -1)
            results = pipe.execute(raise_on_error=False) if found else []
            for request_id, (owner, writer), entries in zip(found, results[::2], results[1::2]):
                if isinstance(owner, Exception) or owner is None or owner.decode() != self.owner \
                        or int(writer or 0) == self.incarnation:
                    continue  # a predecessor's, in whichever store (a replica holds the same blocks)
                try:
                    if isinstance(entries, Exception):
                        raise ValueError(str(entries))
                    blocks, _ = parse_entries(entries)
                except ValueError as e:  # its blocks cannot be known, so they cannot be restored either
                    log.warning("commit record of %s is malformed (%s): its blocks are not pinned", request_id, e)
                    continue
                for b in blocks:
                    if b in self.region:
                        self._pinned[b] = request_id
        except Exception as e:  # noqa: BLE001
            log.warning("could not scan for a predecessor's checkpoints (%s); its blocks are not pinned", e)
        if self._pinned:
            with self._lock:
                self._free = deque(b for b in self._free if b not in self._pinned)
            self.counters["pinned_blocks"] = len(self._pinned)
            log.info("%d store blocks pinned by a predecessor's checkpoints", len(self._pinned))

    def _check_pins(self) -> None:
        """Unpin blocks whose request was restored elsewhere (record taken over) or expired."""
        for request_id in set(self._pinned.values()):
            record = self.redis.hmget(keys.commit_key(self.cluster_id, request_id), ["owner", "incarnation"])
            owner = record[0].decode() if record[0] else None
            if owner == self.owner and record[1] and int(record[1]) != self.incarnation:
                continue  # still the predecessor's, waiting to be restored
            freed = [b for b, r in self._pinned.items() if r == request_id]
            with self._lock:
                for b in freed:
                    del self._pinned[b]
                self._free.extend(freed)
        self.counters["pinned_blocks"] = len(self._pinned)

    # ---- stats and shutdown -----------------------------------------------------------------

    def lag_tokens(self) -> int:
        """Positions computed but not yet snapshotted, partial last blocks included (requests no
        longer checkpointed excluded)."""
        scheduler = self.engine.scheduler
        return sum(max(0, s.num_cached - self.tracked[s.request_id].committed)
                   for s in scheduler.running if s.request_id in self.tracked and not self.tracked[s.request_id].broken)

    def stats(self) -> dict[str, float]:
        with self._lock:
            pending = len(self._pending)
            free = len(self._free)
        shippers = list(self._shippers.values())
        since = self._commit_since
        shipped = {f"ckpt_replica_{k}": float(v + sum(s.counters[k] for s in shippers)) for k, v in self._shipped.items()}
        return {f"ckpt_{k}": float(v) for k, v in self.counters.items()} | shipped | {
            "ckpt_pending": float(pending), "ckpt_free_blocks": float(free), "ckpt_lag_tokens": float(self.lag_tokens()),
            # how long the Redis round trip under way has waited (0: none): a stalled Redis shows here first
            "ckpt_commit_wait_s": time.monotonic() - since if since is not None else 0.0,
            "ckpt_store": float(self.store_incarnation), "ckpt_replicas": float(sum(not s.failed for s in shippers)),
            "ckpt_replica_pending": float(sum(s.pending() for s in shippers))}

    def stop(self, fenced: bool = False) -> None:
        """Stop at once (this worker was fenced or is leaving): pending snapshots are not written. A
        fenced worker's are refused, and so is anything it snapshots later (counted and logged)."""
        with self._cond:
            self._stop = True
            writes = sum(isinstance(p, _Write) for p in self._pending)
            self._pending.clear()
            self._cond.notify()
        for shipper in list(self._shippers.values()):
            shipper.close(wait=False)
        if fenced:  # its successor may own those blocks now: nothing it snapshots is written any more
            self._refuse(f"this incarnation was fenced ({writes} snapshots were not yet written)")

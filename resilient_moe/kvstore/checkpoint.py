"""Incremental, asynchronous KV checkpoints from an attention worker into the KV store, and restore.

After every engine step, `after_step` gathers the K/V rows of the blocks that became full since the
request's last commit into one staging tensor: that small gather is the only work on the decode path.
Checkpointing whole blocks (every `block_size` tokens of a request, not every token) keeps the
per-step cost low; a restore recomputes the partial last block (fewer than `block_size` positions). A background thread copies the staging tensor into the store's
shared memory (one-sided) and then commits, in one pipelined Redis round trip, `n` (positions
[0, n) complete), the store blocks and the request record. A request's commits are ordered, so a
commit record never claims rows that are not in the store yet.

Failures never block or corrupt serving:
  - the store region is full: that request stops being checkpointed (counted); its last commit
    stays valid, and a restore recomputes the rest;
  - Redis is down or slow (socket timeout): commits fail and are counted; the pending queue is
    bounded, and when it is full new snapshots are dropped and their requests stop being
    checkpointed (a later commit could otherwise claim rows that were never written);
  - a record another worker took over (after this one was fenced) is never overwritten: commits
    are conditional on the owner (a Lua script).
Blocks of a dead predecessor with the same name (same store region) stay pinned until the request
that owned them has been restored elsewhere or its record expired.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from resilient_moe.engine.engine import LLMEngine
from resilient_moe.engine.sequence import Sequence
from resilient_moe.kvstore import keys
from resilient_moe.kvstore.store import StoreLayout

log = logging.getLogger("resilient_moe.kv_checkpoint")

MAX_PENDING = 256  # snapshots waiting for the background thread (the commit buffer bound)

# Commit only if the record is absent or ours: KEYS = commit key, request key; ARGV = owner,
# incarnation, ttl, then field/value pairs for the commit record, then "|", then the request record.
COMMIT_SCRIPT = """
local owner = redis.call('HGET', KEYS[1], 'owner')
local inc = redis.call('HGET', KEYS[1], 'incarnation')
if owner and (owner ~= ARGV[1] or inc ~= ARGV[2]) then return 0 end
local i = 4
local target = KEYS[1]
while i <= #ARGV do
  if ARGV[i] == '|' then
    target = KEYS[2]
    i = i + 1
  else
    redis.call('HSET', target, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""


@dataclass
class _Tracked:
    committed: int = 0  # positions [0, committed) are snapshotted (and will be committed in order)
    blocks: list[int] = field(default_factory=list)  # store block of each logical block
    broken: bool = False  # stopped checkpointing (store full or a dropped snapshot)


@dataclass
class _Write:
    rows: torch.Tensor  # [m] store rows
    data: torch.Tensor  # [L, 2, G, m, d]
    commits: list[tuple[str, int, list[int], list[int]]]  # (request id, n, blocks, output ids)


@dataclass
class _Release:
    request_id: str
    blocks: list[int]


class KVCheckpointer:
    def __init__(self, engine: LLMEngine, layout: StoreLayout, store: torch.Tensor, region: range, redis_client,
                 cluster_id: str, owner: str, incarnation: int, store_incarnation: int) -> None:
        self.engine = engine
        self.cache = engine.cache
        self.layout = layout
        self.store = store  # [L, 2, G, rows, d] over the store's shared memory
        self.redis = redis_client
        self.cluster_id = cluster_id
        self.owner = owner
        self.incarnation = incarnation
        self.store_incarnation = store_incarnation
        self.bs = layout.block_size
        self.tracked: dict[str, _Tracked] = {}
        self._free: deque[int] = deque(region)
        self._pinned: dict[int, str] = {}  # store block -> request id of a predecessor's record
        self._lock = threading.Lock()
        self._pending: deque[_Write | _Release] = deque()
        self._cond = threading.Condition(self._lock)
        self._stop = False
        self._redis_down_until = 0.0
        self.counters = {"commits": 0, "commit_errors": 0, "dropped": 0, "store_full": 0, "restored": 0,
                         "restored_tokens": 0, "restore_misses": 0, "pinned_blocks": 0}
        self._commit = redis_client.register_script(COMMIT_SCRIPT)
        self._pin_predecessor_blocks(region)
        self._thread = threading.Thread(target=self._run, name="kv-checkpoint", daemon=True)
        self._thread.start()

    # ---- decode path (engine thread) --------------------------------------------------------

    def after_step(self) -> None:
        """Snapshot the rows every request completed since its last commit; release finished ones."""
        scheduler = self.engine.scheduler
        live = {s.request_id: s for s in scheduler.running}
        for s in scheduler.waiting:
            live.setdefault(s.request_id, s)
        for request_id in [r for r in self.tracked if r not in live]:
            self._release(request_id)
        src_parts, dst_parts, commits = [], [], []
        for seq in scheduler.running:
            t = self.tracked.get(seq.request_id)
            if t is None:
                t = self.tracked[seq.request_id] = _Tracked()
            n = seq.num_cached // self.bs * self.bs  # whole blocks only: the tail is recomputed on restore
            if t.broken or n <= t.committed:
                continue
            if not self._ensure_blocks(t, n):
                t.broken = True
                self.counters["store_full"] += 1
                log.warning("KV store region full: no longer checkpointing %s beyond %d tokens", seq.request_id,
                            t.committed)
                continue
            positions = torch.arange(t.committed, n)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            blocks = torch.tensor(t.blocks, dtype=torch.long)
            src_parts.append(table[positions // self.bs] * self.bs + positions % self.bs)
            dst_parts.append(blocks[positions // self.bs] * self.bs + positions % self.bs)
            commits.append((seq.request_id, n, list(t.blocks), list(seq.output_ids)))
            t.committed = n
        if not commits:
            return
        src, dst = torch.cat(src_parts), torch.cat(dst_parts)
        data = torch.stack([torch.stack([self.cache.keys[l].index_select(1, src), self.cache.values[l].index_select(1, src)])
                            for l in range(len(self.cache.keys))])
        with self._cond:
            writes = sum(isinstance(p, _Write) for p in self._pending)
            if writes >= MAX_PENDING:
                self.counters["dropped"] += 1
                for request_id, *_ in commits:
                    self.tracked[request_id].broken = True
                return
            self._pending.append(_Write(dst, data, commits))
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

    # ---- restore (engine thread, when a moved request arrives) ------------------------------

    def restore(self, seq: Sequence) -> int:
        """Fill `seq`'s KV from its last commit (by whichever worker made it); returns the positions
        restored (0: nothing usable, so the engine recomputes everything)."""
        if time.monotonic() < self._redis_down_until:
            self.counters["restore_misses"] += 1
            return 0  # Redis failed a moment ago: do not wait on it again for every adopted request
        try:
            record = self.redis.hgetall(keys.commit_key(self.cluster_id, seq.request_id))
        except Exception as e:  # Redis down: recompute from the token log
            log.warning("cannot read the commit record of %s (%s); recomputing", seq.request_id, e)
            self._redis_down_until = time.monotonic() + 1.0
            self.counters["restore_misses"] += 1
            return 0
        n, blocks = self._usable(record, seq)
        if n <= 0:
            self.counters["restore_misses"] += 1
            return 0
        allocator = self.engine.allocator
        need = -(-seq.num_tokens // self.bs)
        if allocator.num_free < need:
            self.counters["restore_misses"] += 1
            return 0
        seq.block_table = allocator.allocate(need)
        positions = torch.arange(n)
        store_blocks = torch.tensor(blocks, dtype=torch.long)
        src = store_blocks[positions // self.bs] * self.bs + positions % self.bs
        table = torch.tensor(seq.block_table, dtype=torch.long)
        dst = table[positions // self.bs] * self.bs + positions % self.bs
        data = self.store.index_select(3, src)  # [L, 2, G, n, d]: the one copy out of the store
        for layer in range(len(self.cache.keys)):
            self.cache.keys[layer].index_copy_(1, dst, data[layer, 0])
            self.cache.values[layer].index_copy_(1, dst, data[layer, 1])
        seq.num_cached = n
        self.counters["restored"] += 1
        self.counters["restored_tokens"] += n
        try:  # take the record over now, so a woken predecessor can no longer commit to it
            self.redis.hset(keys.commit_key(self.cluster_id, seq.request_id),
                            mapping={"owner": self.owner, "incarnation": str(self.incarnation), "n": "0",
                                     "blocks": "[]"})
        except Exception as e:
            log.warning("could not take over the commit record of %s: %s", seq.request_id, e)
        return n

    def _usable(self, record: dict, seq: Sequence) -> tuple[int, list[int]]:
        """(n, blocks) of a commit record that fits this request and this store; (0, []) otherwise."""
        if not record:
            return 0, []
        try:
            fields = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                      for k, v in record.items()}
            n = int(fields["n"])
            blocks = [int(b) for b in json.loads(fields["blocks"])]
            if int(fields["store"]) != self.store_incarnation or int(fields["block_size"]) != self.bs:
                return 0, []  # written into a store that is gone, or with another layout
        except (KeyError, ValueError, TypeError) as e:
            log.warning("malformed commit record for %s (%s); recomputing", seq.request_id, e)
            return 0, []
        n = min(n, seq.num_tokens - 1)  # at least one position is computed, for the next token's logits
        if n <= 0 or len(blocks) < -(-n // self.bs) or any(not 0 <= b < self.layout.num_blocks for b in blocks):
            return 0, []
        return n, blocks

    # ---- background thread ------------------------------------------------------------------

    def _run(self) -> None:
        last_pin_check = time.monotonic()
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    if not self._cond.wait(1.0):
                        break
                if self._stop:
                    return
                item = self._pending.popleft() if self._pending else None
            try:
                if isinstance(item, _Write):
                    self._write(item)
                elif isinstance(item, _Release):
                    self._forget(item)
                if self._pinned and time.monotonic() - last_pin_check > 1.0:
                    last_pin_check = time.monotonic()
                    self._check_pins()
            except Exception:
                log.exception("checkpoint thread error")

    def _write(self, item: _Write) -> None:
        self.store.index_copy_(3, item.rows, item.data)  # into shared memory: one-sided
        try:
            pipe = self.redis.pipeline(transaction=False)
            for request_id, n, blocks, output_ids in item.commits:
                record = ["n", str(n), "blocks", json.dumps(blocks), "block_size", str(self.bs),
                          "store", str(self.store_incarnation), "time", f"{time.time():.3f}",
                          "owner", self.owner, "incarnation", str(self.incarnation),
                          "|", "output_ids", json.dumps(output_ids), "aw", self.owner]
                self._commit(keys=[keys.commit_key(self.cluster_id, request_id),
                                   keys.request_key(self.cluster_id, request_id)],
                             args=[self.owner, str(self.incarnation), str(keys.COMMIT_TTL_S), *record], client=pipe)
            results = pipe.execute()
            self.counters["commits"] += sum(1 for r in results if r == 1)
        except Exception as e:
            self.counters["commit_errors"] += 1
            if self.counters["commit_errors"] in (1, 10, 100, 1000):
                log.warning("checkpoint commit failed (%d so far): %s", self.counters["commit_errors"], e)

    def _forget(self, item: _Release) -> None:
        try:
            self.redis.delete(keys.commit_key(self.cluster_id, item.request_id),
                              keys.request_key(self.cluster_id, item.request_id))
        except Exception as e:
            log.warning("could not delete the records of %s: %s", item.request_id, e)
        with self._lock:
            self._free.extend(item.blocks)

    def _pin_predecessor_blocks(self, region: range) -> None:
        """Blocks of this region still named by a predecessor's commit records are not ours yet."""
        try:
            for key in self.redis.scan_iter(match=keys.commit_pattern(self.cluster_id), count=500):
                owner = self.redis.hget(key, "owner")
                if owner is None or owner.decode() != self.owner:
                    continue
                blocks = json.loads(self.redis.hget(key, "blocks") or b"[]")
                request_id = key.decode().rsplit(":", 1)[1]
                for b in blocks:
                    if b in region:
                        self._pinned[b] = request_id
        except Exception as e:
            log.warning("could not scan for a predecessor's checkpoints (%s); its blocks are not pinned", e)
        if self._pinned:
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
        return {f"ckpt_{k}": float(v) for k, v in self.counters.items()} | {
            "ckpt_pending": float(pending), "ckpt_free_blocks": float(free), "ckpt_lag_tokens": float(self.lag_tokens())}

    def stop(self) -> None:
        """Stop at once (this worker was fenced or is leaving): pending snapshots are not written."""
        with self._cond:
            self._stop = True
            self._pending.clear()
            self._cond.notify()

"""The cross-worker prefix index: which store block holds the KV of a full block with a given chained
prefix hash (engine/kv_cache.py `block_hashes`), so that an attention worker that misses a prefix in
its own cache can read it from the KV store instead of computing it (keys.py `prefix_key`).

An entry is a hint, never trusted. The block it names belongs to a request's checkpoint and is freed
with that request, then reused for other rows; so a reader uses an entry only as a failover restore
uses a commit record (kvstore/restore.py): the block's stamp must be (writer incarnation, generation)
as the entry names them, before and after its rows are copied, the writer must not be fenced, and,
where the store is mapped, its region must still be the writer's. Anything else is a miss, and the
request computes those blocks as it would have without the index.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from resilient_moe.kvstore.memory_layout import StoreLayout

MAX_PREFIX_BLOCKS = 256  # blocks one lookup asks the index for (a bound on its Redis reply)


@dataclass(frozen=True)
class PrefixEntry:
    """Where one full block was checkpointed: store incarnation, store block, writer and its stamp."""

    store: int
    block: int
    incarnation: int  # the writer's (its stamps name it)
    gen: int
    owner: str  # the writer's name

    def encode(self) -> str:
        return f"{self.store}:{self.block}:{self.incarnation}:{self.gen}:{self.owner}"  # owner last: it may hold ':'

    @classmethod
    def parse(cls, raw: bytes | str | None) -> "PrefixEntry | None":
        """The entry, or None when absent or malformed (a miss)."""
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        parts = text.split(":", 4)
        if len(parts) != 5 or not parts[4]:
            return None
        try:
            store, block, incarnation, gen = (int(p) for p in parts[:4])
        except ValueError:
            return None
        if store < 1 or block < 0 or incarnation < 1 or gen < 2 or gen % 2:
            return None  # an odd generation is a block being written: never committed as such
        return cls(store, block, incarnation, gen, parts[4])


def usable_run(entries: list[PrefixEntry | None], layout: StoreLayout,
               fenced: Container[tuple[str, int]]) -> list[PrefixEntry]:
    """The leading entries that one read can restore: present, by one writer (owner, incarnation) into
    one store and one region of it, that writer not fenced, no block named twice."""
    if not entries or entries[0] is None:
        return []
    head = entries[0]
    if (head.owner, head.incarnation) in fenced or not 0 <= head.block < layout.max_blocks:
        return []
    region = layout.region_of(head.block)
    run, seen = [], set()
    for entry in entries:
        if entry is None or (entry.store, entry.owner, entry.incarnation) != (head.store, head.owner, head.incarnation) \
                or not 0 <= entry.block < layout.max_blocks or layout.region_of(entry.block) != region \
                or entry.block in seen:
            break
        seen.add(entry.block)
        run.append(entry)
    return run

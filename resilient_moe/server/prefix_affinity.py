"""A frontend's guess at which attention worker holds a new prompt's prefix in its prefix cache: the
prefixes it sent each one lately (engine/kv_cache.py holds the cache itself; the placement policy that
uses the guess is controller/placement.py's `choose_attention_worker`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

BLOCK_TOKENS = 16  # granularity of the prefixes remembered (the engine's default block size)


class RecentPrefixes:
    """Which prompt prefixes each attention worker was sent lately, in blocks of BLOCK_TOKENS: a
    frontend's guess at what its prefix cache holds (the worker evicts on its own, so only a guess).
    Each worker keeps at most `capacity` block hashes, least recently sent forgotten first."""

    def __init__(self, capacity: int = 16384) -> None:
        self.capacity = capacity
        self._seen: dict[str, OrderedDict[int, None]] = {}

    @staticmethod
    def hashes(prompt_ids: Sequence[int]) -> list[int]:
        """Chained hashes of the prompt's full blocks (tuples of ints hash the same in every process)."""
        out, parent, bs = [], 0, BLOCK_TOKENS
        for start in range(0, len(prompt_ids) - bs + 1, bs):
            parent = hash((parent, tuple(prompt_ids[start : start + bs])))
            out.append(parent)
        return out

    def shared(self, hashes: Sequence[int], workers: Sequence[str]) -> dict[str, int]:
        """Tokens of the prompt with `hashes` that each of `workers` was sent as a prefix lately."""
        shared = {}
        for name in workers:
            seen = self._seen.get(name, {})
            n = 0
            while n < len(hashes) and hashes[n] in seen:
                n += 1
            shared[name] = n * BLOCK_TOKENS
        return shared

    def add(self, worker: str, hashes: Sequence[int]) -> None:
        seen = self._seen.setdefault(worker, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def forget(self, worker: str) -> None:
        """The worker is gone (a replacement starts with an empty cache)."""
        self._seen.pop(worker, None)

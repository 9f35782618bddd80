"""Paged KV cache: fixed-size blocks of token slots, handed out to sequences by a block allocator.

Two cache types share one contract (`row_width`, `gather`, `scatter`, `windows`, `num_layers`, `dtype`,
`nbytes`, `num_blocks`, `block_size`): `KVCache` holds K and V per token and layer; `LatentKVCache`
holds DeepSeek's latent attention row (latent + rotary key) instead. `new_kv_cache` picks the model's.
`LayerWindows` says which cached positions each layer can still read (sliding-window layers only
their window), and `RestoredRows` is a request's KV read back from a checkpoint in that form.
`BlockAllocator` hands out the blocks and, with prefix caching, keeps computed full blocks under the
chained hash of their tokens (`block_hashes`) for later requests to reuse.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from resilient_moe import staging
from resilient_moe.engine.config import EngineConfig
from resilient_moe.model.config import ModelConfig
from resilient_moe.errors import ConfigError
from resilient_moe.model.attention_side import KVCacheView

DEFAULT_KV_CACHE_TOKENS = 32768
MAX_GAPS = 16  # skipped spans a request's checkpoint keeps apart (LayerWindows.add_gap)


def cache_blocks(model: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> int:
    """Number of blocks the engine's capacity setting (tokens or bytes) buys."""
    bytes_per_token = model.num_layers * model.kv_row_width * dtype.itemsize
    if engine.kv_cache_tokens is not None:
        tokens = engine.kv_cache_tokens
    elif engine.kv_cache_bytes is not None:
        tokens = engine.kv_cache_bytes // bytes_per_token
    else:
        tokens = DEFAULT_KV_CACHE_TOKENS
    blocks = tokens // engine.block_size
    if blocks < 1:
        raise ConfigError(
            f"KV cache capacity holds {tokens} tokens, less than one block of {engine.block_size}; "
            f"each token needs {bytes_per_token} bytes"
        )
    return blocks


@dataclass(frozen=True)
class LayerWindows:
    """Which cached positions of a request each layer can still read: what a KV checkpoint must keep.

    A full-attention layer reads every earlier position. A sliding-window layer of window w lets a query
    at position q read keys in (q - w, q] only, so once positions [0, n) are cached, no later query (at
    n or after) reads its rows before `first_needed(n)` = n - w + 1. In the checkpoint (rows [L, n, W]
    per token, kvstore/checkpoint.py) that means:

      - restore: a request restored at n gets every position of the full layers and only the window
        [first_needed(n), n) of the sliding ones: w - 1 rows per sliding layer instead of n, read from
        the store and written into the cache (GPT-OSS: half its layers; at 4k context with a window of
        128, the restore moves about half the bytes);
      - checkpoint: a write that commits positions [c, n) writes the sliding layers' rows from
        `first_written(n)` on only: the window of n - slack, where slack (a block) lets a restore a few
        positions short of the commit (the frontend had not seen the last tokens yet) still find its
        window. Rows already out of the window when their block is written (a long prompt's,
        committed in one go) are never gathered nor written; decode-time blocks are always inside it.
        The spans skipped are the request's `gaps`, kept in its commit record, so that a restore at a
        shorter prefix (a block found rewritten, or many fewer tokens delivered than committed) moves
        back to the longest prefix whose window was written (`restorable`) instead of reading rows
        that are not there.

    Not done, and what it costs: the store still reserves a row for every layer of every position (its
    layout is [L, rows, W]), so a windowed model fits no more tokens in it; reclaiming the sliding
    layers' old rows would need a second, recycled region of the store for them. Layers with different
    windows are treated alike with the largest (GPT-OSS has one), reading a few rows more than needed.
    """

    full: tuple[int, ...]  # layers that read every position
    windowed: tuple[int, ...]  # sliding-window layers
    window: int | None  # the largest window among them (None: no sliding layer)
    slack: int = 0  # positions short of a commit at which a restore still finds the window written

    @classmethod
    def of(cls, model: ModelConfig, slack: int = 0) -> "LayerWindows":
        windows = model.sliding_windows
        windowed = tuple(i for i, w in enumerate(windows) if w is not None)
        return cls(tuple(i for i, w in enumerate(windows) if w is None), windowed,
                   max((windows[i] for i in windowed), default=None), slack)

    def first_needed(self, n: int) -> int:
        """First position sliding layers still read once positions [0, n) are cached."""
        return 0 if self.window is None else max(0, n - self.window + 1)

    def first_written(self, n: int) -> int:
        """First position whose sliding-layer rows a write committing n keeps."""
        return self.first_needed(max(0, n - self.slack))

    def gap(self, committed: int, n: int) -> tuple[int, int] | None:
        """The positions of a write of [committed, n) whose sliding-layer rows it skips, if any."""
        first = self.first_written(n)
        return (committed, first) if first > committed else None

    def add_gap(self, gaps: list[tuple[int, int]], committed: int, n: int) -> list[tuple[int, int]]:
        """`gaps` after a write of [committed, n), at most MAX_GAPS of them (a record stays small however
        long the request): the two oldest merge, as if the rows between them had been skipped too, so a
        restore may step back further than it had to, never onto rows that are not there."""
        gap = self.gap(committed, n)
        if gap is None:
            return gaps
        gaps = [*gaps, gap]
        if len(gaps) > MAX_GAPS:
            gaps[:2] = [(gaps[0][0], gaps[1][1])]
        return gaps

    def restorable(self, n: int, gaps: Sequence[Sequence[int]]) -> int:
        """The longest prefix p <= n whose window [first_needed(p), p) overlaps none of `gaps` (the
        [start, end) spans whose sliding rows were skipped). A gap's start is where its write began, a
        commit point whose window the writes before it covered, so stepping back to it always ends."""
        if self.window is None:
            return n  # nothing is ever skipped
        for start, end in sorted(gaps, reverse=True):
            if start < n and self.first_needed(n) < end:
                n = start
        return n


@dataclass
class RestoredRows:
    """A request's checkpointed KV read back for a restore, in `LayerWindows` form (rows as `gather`
    returns them): every position [0, n) of the full layers, and [first, n) of the sliding layers."""

    windows: LayerWindows
    n: int
    first: int
    full: torch.Tensor  # [len(windows.full), n, W]
    windowed: torch.Tensor  # [len(windows.windowed), n - first, W]

    @classmethod
    def read(cls, table: torch.Tensor, windows: LayerWindows, rows: torch.Tensor) -> "RestoredRows":
        """From `table` [L, R, W] (the store's rows), `rows` [n]: the rows of positions [0, n) in order."""
        n = rows.shape[0]
        first = windows.first_needed(n)
        return cls(windows, n, first, select_rows(table, windows.full, rows),
                   select_rows(table, windows.windowed, rows[first:]))

    @property
    def nbytes(self) -> int:
        return self.full.nbytes + self.windowed.nbytes

    def scatter_into(self, cache: "KVCache | LatentKVCache", slots: torch.Tensor) -> None:
        """Write into the cache slots [n] of positions [0, n); sliding layers' older slots are left as
        they are (masked out for every query that can still come)."""
        device = cache.keys[0].device
        slots = slots.to(device)
        cache.scatter(slots, staging.to_device(self.full, device), self.windows.full)
        cache.scatter(slots[self.first :], staging.to_device(self.windowed, device), self.windows.windowed)


def select_rows(table: torch.Tensor, layers: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
    """table [L, R, W] -> [len(layers), n, W]: rows `rows` [n] of each of `layers`."""
    out = table.new_empty((len(layers), rows.shape[0], table.shape[2]))
    for i, layer in enumerate(layers):
        torch.index_select(table[layer], 0, rows, out=out[i])
    return out


def block_hashes(parent: bytes, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of the full blocks of `tokens` (a partial last block has none): block i's is
    sha256(hash of block i-1, its tokens), the first's parent is `parent` (the model's identity, see
    `prefix_root`). Equal hashes mean equal tokens at equal positions after an equal prefix, so equal KV."""
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = hashlib.sha256(parent)
        digest.update(array("q", tokens[start : start + block_size]).tobytes())
        parent = digest.digest()
        out.append(parent)
    return out


def prefix_root(model_dir: str, dtype: torch.dtype, kernels: str) -> bytes:
    """The hash every request's first block chains from: what else the KV of equal tokens depends on."""
    return hashlib.sha256(f"{model_dir}|{dtype}|{kernels}".encode()).digest()


class BlockAllocator:
    """KV cache blocks: a free list, and with `caching` an automatic prefix cache over it.

    Without caching a block is free or held by one sequence. With it, every block has a reference
    count (the sequences whose block table holds it), and a full, computed block can be registered
    under the chained hash of its tokens (`block_hashes`); a later request whose prefix hashes the same
    takes those blocks (`match`, `acquire`) instead of computing them. A cached block whose count falls
    to 0 stays cached and evictable: it counts as free, and is reused for other tokens (evicted, least
    recently freed first) only once no uncached block is left. A registered block is never written
    again while it is cached: its holders only write positions after their computed ones.
    """

    def __init__(self, num_blocks: int, caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.caching = caching
        self._free: deque[int] = deque(range(num_blocks))  # refcount 0 and not cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0 and cached, least recent first
        self._refs = [0] * num_blocks
        self._block_of: dict[bytes, int] = {}  # hash -> cached block
        self._hash_of: dict[int, bytes] = {}  # cached block -> hash
        self.num_evictions = 0  # cached blocks given to other tokens

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: uncached free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, count: int) -> list[int]:
        """`count` blocks for new tokens, each held once: uncached ones first, then the least recently
        freed cached ones (their hash is forgotten)."""
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} KV blocks with {self.num_free} free")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
                self.num_evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one hold on each of `blocks` (a sequence's table, first block first). They are released
        last block first, so a request's deeper blocks are evicted before the prefix others share."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f"KV block {block} freed more often than held"
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (nothing is held yet: see `acquire`)."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_reclaimed(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` (a `match`) acquiring takes out of the free count (those nobody holds)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def acquire(self, blocks: list[int]) -> list[int]:
        """Hold cached `blocks` (a `match`) once more each; returns them."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        return blocks

    def register(self, block: int, block_hash: bytes) -> None:
        """`block` (held, full and computed) holds the tokens hashed `block_hash`: later requests may
        reuse it. A hash already cached keeps its block (this one stays private to its holder)."""
        if not self.caching or block in self._hash_of or block_hash in self._block_of:
            return
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block


class KVCache(KVCacheView):
    """K and V slot tensors for every layer: [G, num_blocks * block_size, d] each.

    Whatever a cache holds per token, it moves rows through one contract (what the KV checkpoint
    store uses, for every cache type): `gather(slots, layers)` -> [len(layers), n, row_width] and its
    inverse `scatter`, where a row is everything one token keeps in one layer (here its K then its V,
    head-major); `layers` defaults to all of them, and `windows` says which rows each layer still needs.
    """

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        slots = num_blocks * block_size
        shape = (model.num_kv_heads, slots, model.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
        super().__init__(keys, values)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_layers = model.num_layers
        self.dtype = dtype
        self.row_width = 2 * model.num_kv_heads * model.head_dim
        self.windows = LayerWindows.of(model, slack=block_size)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def gather(self, slots: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Rows of `slots` [n] from `layers` (default: all), as a new tensor [len(layers), n, row_width]."""
        layers = range(self.num_layers) if layers is None else layers
        slots = slots.to(self.keys[0].device)  # host indices (the block tables live on the host)
        n = slots.shape[0]
        out = torch.empty((len(layers), n, self.row_width), dtype=self.dtype, device=self.keys[0].device)
        half = self.row_width // 2
        for i, layer in enumerate(layers):
            # [G, n, d] -> [n, G, d] -> [n, G*d]
            out[i, :, :half] = self.keys[layer].index_select(1, slots).transpose(0, 1).reshape(n, half)
            out[i, :, half:] = self.values[layer].index_select(1, slots).transpose(0, 1).reshape(n, half)
        return out

    def scatter(self, slots: torch.Tensor, data: torch.Tensor, layers: Sequence[int] | None = None) -> None:
        """Write rows `data` [len(layers), n, row_width] (as `gather` returns them) into `slots` [n]."""
        layers = range(self.num_layers) if layers is None else layers
        n = slots.shape[0]
        groups, _, dim = self.keys[0].shape
        half = self.row_width // 2
        for i, layer in enumerate(layers):
            self.keys[layer].index_copy_(1, slots, data[i, :, :half].reshape(n, groups, dim).transpose(0, 1))
            self.values[layer].index_copy_(1, slots, data[i, :, half:].reshape(n, groups, dim).transpose(0, 1))


class LatentKVCache(KVCacheView):
    """Latent attention rows for every layer: [1, num_blocks * block_size, C + r] each (model/mla.py).

    A token keeps its normed latent (C = kv_lora_rank) and its rotary key (r = qk_rope_head_dim) per
    layer, nothing per head. Seen through `KVCacheView`, the rows are the keys of one shared kv head and
    their first C columns (a view, no copy) its values. A row is what `gather` and `scatter` move.
    """

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        assert model.mla is not None
        slots = num_blocks * block_size
        rows = [torch.zeros((1, slots, model.mla.latent_width), dtype=dtype, device=device) for _ in range(model.num_layers)]
        super().__init__(rows, [r[..., : model.mla.kv_lora_rank] for r in rows])
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_layers = model.num_layers
        self.dtype = dtype
        self.row_width = model.mla.latent_width
        self.windows = LayerWindows.of(model, slack=block_size)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys)  # the values are views into the same rows

    def gather(self, slots: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Rows of `slots` [n] from `layers` (default: all), as a new tensor [len(layers), n, row_width]."""
        layers = range(self.num_layers) if layers is None else layers
        slots = slots.to(self.keys[0].device)
        out = torch.empty((len(layers), slots.shape[0], self.row_width), dtype=self.dtype, device=self.keys[0].device)
        for i, layer in enumerate(layers):
            torch.index_select(self.keys[layer][0], 0, slots, out=out[i])
        return out

    def scatter(self, slots: torch.Tensor, data: torch.Tensor, layers: Sequence[int] | None = None) -> None:
        """Write rows `data` [len(layers), n, row_width] (as `gather` returns them) into `slots` [n]."""
        layers = range(self.num_layers) if layers is None else layers
        for i, layer in enumerate(layers):
            self.keys[layer][0].index_copy_(0, slots, data[i])


def new_kv_cache(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> KVCache | LatentKVCache:
    """The cache type the model's attention needs."""
    cache_type = LatentKVCache if model.mla is not None else KVCache
    return cache_type(model, num_blocks, block_size, dtype, device)

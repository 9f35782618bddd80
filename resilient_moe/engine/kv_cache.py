"""Paged KV cache: fixed-size blocks of token slots, handed out to sequences by a block allocator.

Two cache types share one contract (`row_width`, `gather`, `scatter`, `num_layers`, `dtype`, `nbytes`,
`num_blocks`, `block_size`): `KVCache` holds K and V per token and layer; `LatentKVCache` holds
DeepSeek's latent attention row (latent + rotary key) instead. `new_kv_cache` picks the model's.
"""

from __future__ import annotations

from collections import deque

import torch

from resilient_moe.config import EngineConfig, ModelConfig
from resilient_moe.errors import ConfigError
from resilient_moe.model.attention_side import KVCacheView

DEFAULT_KV_CACHE_TOKENS = 32768


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


class BlockAllocator:
    """Free list of KV cache blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks with {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class KVCache(KVCacheView):
    """K and V slot tensors for every layer: [G, num_blocks * block_size, d] each.

    Whatever a cache holds per token, it moves rows through one contract (what the KV checkpoint
    store uses, for every cache type): `gather(slots)` -> [L, n, row_width] and its inverse `scatter`,
    where a row is everything one token keeps in one layer (here its K then its V, head-major).
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

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of `slots` [n] from every layer, as a new tensor [L, n, row_width]."""
        n = slots.shape[0]
        out = torch.empty((self.num_layers, n, self.row_width), dtype=self.dtype, device=self.keys[0].device)
        half = self.row_width // 2
        for layer in range(self.num_layers):
            # [G, n, d] -> [n, G, d] -> [n, G*d]
            out[layer, :, :half] = self.keys[layer].index_select(1, slots).transpose(0, 1).reshape(n, half)
            out[layer, :, half:] = self.values[layer].index_select(1, slots).transpose(0, 1).reshape(n, half)
        return out

    def scatter(self, slots: torch.Tensor, data: torch.Tensor) -> None:
        """Write rows `data` [L, n, row_width] (as `gather` returns them) into `slots` [n]."""
        n = slots.shape[0]
        groups, _, dim = self.keys[0].shape
        half = self.row_width // 2
        for layer in range(self.num_layers):
            self.keys[layer].index_copy_(1, slots, data[layer, :, :half].reshape(n, groups, dim).transpose(0, 1))
            self.values[layer].index_copy_(1, slots, data[layer, :, half:].reshape(n, groups, dim).transpose(0, 1))


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

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys)  # the values are views into the same rows

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of `slots` [n] from every layer, as a new tensor [L, n, row_width]."""
        return torch.stack([rows[0].index_select(0, slots) for rows in self.keys])

    def scatter(self, slots: torch.Tensor, data: torch.Tensor) -> None:
        """Write rows `data` [L, n, row_width] (as `gather` returns them) into `slots` [n]."""
        for layer, rows in enumerate(self.keys):
            rows[0].index_copy_(0, slots, data[layer])


def new_kv_cache(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> KVCache | LatentKVCache:
    """The cache type the model's attention needs."""
    cache_type = LatentKVCache if model.mla is not None else KVCache
    return cache_type(model, num_blocks, block_size, dtype, device)

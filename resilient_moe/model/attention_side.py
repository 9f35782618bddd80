"""The attention side of an MoE model: everything except the routed experts.

It holds the embedding, every layer's attention, norms and router, the dense MLP layers, the
shared experts, the final norm and the LM head. Per layer it exposes the steps of DESIGN.md's
"one decode step" separately (attention, route, combine) so that the routed-expert call in between
can be a function call (colocated) or a round trip to expert workers (disaggregated).

Shape letters: T tokens, D hidden, H query heads, G kv heads, R = H // G, d head dim, L keys,
E experts, K experts per token, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from resilient_moe.config import ModelConfig
from resilient_moe.model import ops
from resilient_moe.model.checkpoint import Checkpoint
from resilient_moe.model.rope import RotaryTable

# Prefill attention runs over at most this many query tokens at a time, to bound the score matrix.
_PREFILL_CHUNK_TOKENS = 256


@dataclass
class PrefillSpan:
    """One sequence with several new tokens in a batch (a prefill, or a recompute after restore)."""

    start: int  # first row in the batch
    length: int  # new tokens
    key_slots: torch.Tensor  # [L] cache slots of positions 0..L-1 (padded with slot 0)
    positions: torch.Tensor  # [length] absolute positions of the new tokens


@dataclass
class AttentionBatch:
    """Where each token of a (micro-)batch sits, computed once per step and shared by all layers."""

    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    decode_rows: torch.Tensor  # [B] rows of the sequences that add exactly one token
    decode_key_slots: torch.Tensor  # [B, L] cache slots of each decode sequence's keys (padded)
    prefills: list[PrefillSpan]
    last_rows: torch.Tensor  # [S] row of each sequence's last token (its logits are sampled)
    cos: torch.Tensor | None = None  # [T, d], filled by AttentionSide.prepare
    sin: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[B, L] True where a key is not visible to the sequence's new token."""
        key = ("decode", window)
        if key not in self._masks:
            query_pos = self.positions[self.decode_rows].unsqueeze(1)  # [B, 1]
            key_pos = torch.arange(self.decode_key_slots.shape[1], device=query_pos.device).unsqueeze(0)
            self._masks[key] = _invisible(query_pos, key_pos, window)
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor:
        """[n, L] True where key j is not visible to new token i of prefill span `index`."""
        key = ("prefill", index, window)
        if key not in self._masks:
            span = self.prefills[index]
            query_pos = span.positions.unsqueeze(1)  # [n, 1]
            key_pos = torch.arange(span.key_slots.shape[0], device=query_pos.device).unsqueeze(0)
            self._masks[key] = _invisible(query_pos, key_pos, window)
        return self._masks[key]


def _invisible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    hidden = key_pos > query_pos
    if window is not None:
        hidden |= (query_pos - key_pos) >= window
    return hidden


class KVCacheView:
    """The per-layer K and V slot tensors an attention side writes to and reads from."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys  # per layer [G, slots, d]: kv-head-major, so gathered keys feed bmm without copies
        self.values = values


class _Layer:
    """Weights of one decoder layer on the attention side (names follow the HF checkpoint)."""

    def __init__(self, cfg: ModelConfig, names: dict[str, torch.Tensor], layer: int, router_name: str) -> None:
        p = f"model.layers.{layer}"
        get = names.get
        self.input_norm = names[f"{p}.input_layernorm.weight"]
        self.post_norm = names[f"{p}.post_attention_layernorm.weight"]
        attn = f"{p}.self_attn"
        self.q, self.k, self.v, self.o = (
            ops.Linear(names[f"{attn}.{proj}.weight"], get(f"{attn}.{proj}.bias"))
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
        )
        self.q_norm = get(f"{p}.self_attn.q_norm.weight")
        self.k_norm = get(f"{p}.self_attn.k_norm.weight")
        self.sparse = cfg.sparse_layers[layer]
        self.window = cfg.sliding_windows[layer]
        self.router = ops.Linear(names[router_name]) if self.sparse else None
        self.dense_gate_up = None
        self.dense_down = None
        self.shared_gate_up = None
        self.shared_down = None
        self.shared_gate = None
        if not self.sparse:
            self.dense_gate_up = ops.Linear(torch.cat([names[f"{p}.mlp.gate_proj.weight"], names[f"{p}.mlp.up_proj.weight"]]))
            self.dense_down = ops.Linear(names[f"{p}.mlp.down_proj.weight"])
        elif cfg.shared_expert_intermediate_size:
            s = f"{p}.mlp.shared_expert"
            self.shared_gate_up = ops.Linear(torch.cat([names[f"{s}.gate_proj.weight"], names[f"{s}.up_proj.weight"]]))
            self.shared_down = ops.Linear(names[f"{s}.down_proj.weight"])
            self.shared_gate = ops.Linear(names[f"{p}.mlp.shared_expert_gate.weight"])


class AttentionSide:
    """Embedding, attention, routers, dense and shared MLPs, final norm and LM head of a model."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_positions: int | None = None,
    ) -> None:
        cfg = checkpoint.cfg
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        names = checkpoint.load(list(checkpoint.names.attention_shapes), dtype, self.device)
        self.embed_tokens = names["model.embed_tokens.weight"]
        self.final_norm = names["model.norm.weight"]
        self.lm_head = ops.Linear(self.embed_tokens if cfg.tie_word_embeddings else names["lm_head.weight"])
        self.layers = [_Layer(cfg, names, i, checkpoint.names.router(i)) for i in range(cfg.num_layers)]
        self.rotary = RotaryTable(cfg.rope, cfg.head_dim, max_positions or cfg.max_position_embeddings, dtype, self.device)
        self.scale = cfg.head_dim**-0.5
        self.eps = cfg.rms_norm_eps

    # ---- step pieces ------------------------------------------------------------------------

    def prepare(self, batch: AttentionBatch) -> None:
        """Look up the rotary cos/sin of the batch's positions once for all layers."""
        batch.cos, batch.sin = self.rotary.lookup(batch.positions)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embed_tokens)  # [T, D]

    def attention(
        self, layer: int, h: torch.Tensor, batch: AttentionBatch, cache: KVCacheView
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, D] -> (h + attention(norm(h)), post-attention-normed h), writing this batch's K/V."""
        cfg, w = self.cfg, self.layers[layer]
        T = h.shape[0]
        a = ops.rms_norm(h, w.input_norm, self.eps)
        q = w.q(a)  # [T, H*d]
        k = w.k(a)  # [T, G*d]
        v = w.v(a)  # [T, G*d]
        if cfg.qk_norm == "full":
            q = ops.rms_norm(q, w.q_norm, self.eps)
            k = ops.rms_norm(k, w.k_norm, self.eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(T, cfg.num_heads, cfg.head_dim)
        k = k.view(T, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q = ops.rms_norm(q, w.q_norm, self.eps)
            k = ops.rms_norm(k, w.k_norm, self.eps)
        q = ops.apply_rotary(q, batch.cos, batch.sin)
        k = ops.apply_rotary(k, batch.cos, batch.sin)
        cache.keys[layer].index_copy_(1, batch.slot_mapping, k.transpose(0, 1))
        cache.values[layer].index_copy_(1, batch.slot_mapping, v.transpose(0, 1))
        o = self._paged_attention(q, cache.keys[layer], cache.values[layer], batch, w.window)  # [T, H, d]
        h = h + w.o(o.reshape(T, -1))
        return h, ops.rms_norm(h, w.post_norm, self.eps)

    def _paged_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch, window: int | None
    ) -> torch.Tensor:
        G, R, d = self.cfg.num_kv_heads, self.cfg.num_heads // self.cfg.num_kv_heads, self.cfg.head_dim
        out = torch.empty_like(q)  # [T, H, d]
        rows = batch.decode_rows
        if rows.numel():
            B = rows.shape[0]
            slots = batch.decode_key_slots  # [B, L]
            masked = batch.decode_mask(window).unsqueeze(1).expand(B, R, slots.shape[1])  # [B, R, L]
            qd = q[rows].view(B, G, R, d).transpose(0, 1)  # [G, B, R, d]
            flat = slots.reshape(-1)  # index_select is ~4x faster than advanced indexing here
            keys = k_cache.index_select(1, flat).view(G, B, -1, d)  # [G, B, L, d]
            values = v_cache.index_select(1, flat).view(G, B, -1, d)
            o = ops.attention(qd, keys, values, masked, self.scale)  # [G, B, R, d]
            out[rows] = o.transpose(0, 1).reshape(B, G * R, d)
        for index, span in enumerate(batch.prefills):
            keys = k_cache.index_select(1, span.key_slots).unsqueeze(1)  # [G, 1, L, d]
            values = v_cache.index_select(1, span.key_slots).unsqueeze(1)
            mask = batch.prefill_mask(index, window)  # [n, L]
            for lo in range(0, span.length, _PREFILL_CHUNK_TOKENS):
                hi = min(span.length, lo + _PREFILL_CHUNK_TOKENS)
                n = hi - lo
                qp = q[span.start + lo : span.start + hi].view(n, G, R, d).transpose(0, 1).reshape(G, 1, n * R, d)
                masked = mask[lo:hi].repeat_interleave(R, dim=0).unsqueeze(0)  # [1, n*R, L]
                o = ops.attention(qp, keys, values, masked, self.scale)  # [G, 1, n*R, d]
                out[span.start + lo : span.start + hi] = o.view(G, n, R, d).transpose(0, 1).reshape(n, G * R, d)
        return out

    def is_sparse(self, layer: int) -> bool:
        return self.layers[layer].sparse

    def dense_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w = self.layers[layer]
        return ops.swiglu(x, w.dense_gate_up, w.dense_down)

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (expert ids [T, K] int64, weights [T, K]) as the family's router picks them."""
        logits = self.layers[layer].router(x)  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.cfg.top_k, dim=-1)  # [T, K]
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.cfg.router_weights_fp32:
            weights = weights.to(x.dtype)
        return ids, weights

    def shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Gated shared expert output [T, D] (Qwen2-MoE), or None for families without one."""
        w = self.layers[layer]
        if w.shared_gate_up is None:
            return None
        gate = torch.sigmoid(w.shared_gate(x))  # [T, 1]
        return gate * ops.swiglu(x, w.shared_gate_up, w.shared_down)

    def combine(
        self, h: torch.Tensor, expert_out: torch.Tensor, weights: torch.Tensor, shared: torch.Tensor | None
    ) -> torch.Tensor:
        """h [T, D] + sum_k weights[t, k] * expert_out[t, k] (+ shared): expert_out [T, K, D]."""
        weighted = (expert_out * weights.unsqueeze(-1)).to(h.dtype)  # [T, K, D]
        moe = weighted[:, 0]
        for k in range(1, weighted.shape[1]):
            moe = moe + weighted[:, k]
        if shared is not None:
            moe = moe + shared
        return h + moe

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [S, D] of each sequence's last token -> float32 logits [S, V]."""
        return self.lm_head(ops.rms_norm(h, self.final_norm, self.eps)).float()

"""The attention side of an MoE model: everything except the routed experts.

It holds the embedding, every layer's attention, norms and router, the dense MLP layers, the
shared experts, the final norm and the LM head. Per layer it exposes the steps of DESIGN.md's
"one decode step" separately (attention, route, combine) so that the routed-expert call in between
can be a function call (colocated) or a round trip to expert workers (disaggregated).

Shared experts and dense MLP layers (Qwen2-MoE, DeepSeek-V3's shared experts and its first
first_k_dense_replace layers) run here too, for every family: every token needs them, so on expert
workers they would put each token's hidden state on the wire twice more per layer; here they cost no
traffic and overlap the routed experts' round trip (see workers/attention_worker.py).

Attention comes in two forms over one paged core: grouped-query attention (optionally with
per-head sinks, GPT-OSS) whose cache holds K and V, and DeepSeek's latent attention (model/mla.py)
whose cache holds one latent row per token, attended as a single shared key/value head.

Shape letters: T tokens, D hidden, H query heads, G kv heads, R = H // G, d head dim (dv of values),
L keys, E experts, K experts per token, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from resilient_moe.model.config import ModelConfig
from resilient_moe.model import ops, routing
from resilient_moe.model.weights import Checkpoint, TensorNames
from resilient_moe.model.kernel_choice import KernelSet
from resilient_moe.model.mla import LatentAttentionLayer, softmax_scale
from resilient_moe.model.rope import RotaryTable

# Prefill attention runs over at most this many query tokens at a time, to bound the score matrix.
_PREFILL_CHUNK_TOKENS = 256


@dataclass
class PrefillSpan:
    """One sequence with several new tokens in a batch (a prefill, or a recompute after restore)."""

    start: int  # first row in the batch
    length: int  # new tokens
    seq: int  # its sequence's index in the batch
    positions: torch.Tensor  # [length] absolute positions of the new tokens


@dataclass
class AttentionBatch:
    """Where each token of a (micro-)batch sits, computed once per step and shared by all layers.

    Each sequence's keys are named by its block table (key j in slot blocks[block_start[s] + j //
    block_size] * block_size + j % block_size), so nothing here grows with the longest sequence; the
    padded slot tables of the gathering attention path are derived on demand (`key_slots`)."""

    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    row_seq: torch.Tensor  # [T] the sequence (index in the batch) of each row
    seq_lengths: torch.Tensor  # [S] keys of each sequence once this step's are written
    blocks: torch.Tensor  # [sum of blocks] every sequence's block table, one after another
    block_start: torch.Tensor  # [S] where each sequence's table starts in `blocks`
    block_size: int
    decode_rows: torch.Tensor  # [B] rows of the sequences that add exactly one token
    decode_seqs: torch.Tensor  # [B] their sequences
    prefills: list[PrefillSpan]
    last_rows: torch.Tensor  # [S] row of each sequence's last token (its logits are sampled)
    cos: torch.Tensor | None = None  # [T, d], filled by AttentionSide.prepare
    sin: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def key_slots(self, seqs: torch.Tensor, length: int) -> torch.Tensor:
        """[n, length] cache slot of key position j of each of `seqs` [n]; slot 0 past its length."""
        bs = self.block_size
        j = torch.arange(length, device=seqs.device)  # [L]
        valid = j.unsqueeze(0) < self.seq_lengths[seqs].unsqueeze(1)  # [n, L]
        index = torch.where(valid, self.block_start[seqs].unsqueeze(1) + (j // bs).unsqueeze(0), 0)
        return torch.where(valid, self.blocks[index] * bs + j % bs, 0)

    @property
    def decode_key_slots(self) -> torch.Tensor:
        """[B, L] cache slots of each decode sequence's keys, padded to a multiple of KEY_PAD (gathering path)."""
        key = ("decode_slots",)
        if key not in self._masks:
            longest = int(self.seq_lengths[self.decode_seqs].max()) if self.decode_seqs.numel() else 0
            self._masks[key] = self.key_slots(self.decode_seqs, ops.padded_key_length(longest) if longest else 0)
        return self._masks[key]

    def span_key_slots(self, index: int) -> torch.Tensor:
        """[L] cache slots of prefill span `index`'s keys, padded to a multiple of KEY_PAD (gathering path)."""
        key = ("span_slots", index)
        if key not in self._masks:
            span = self.prefills[index]
            length = ops.padded_key_length(int(span.positions[-1]) + 1)
            seq = torch.tensor([span.seq], device=self.positions.device)
            self._masks[key] = self.key_slots(seq, length)[0]
        return self._masks[key]

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[B, L] True where a key is not visible to the sequence's new token."""
        key = ("decode", window)
        if key not in self._masks:
            query_pos = self.positions[self.decode_rows].unsqueeze(1)  # [B, 1]
            key_pos = torch.arange(self.decode_key_slots.shape[1], device=query_pos.device).unsqueeze(0)
            self._masks[key] = _invisible(query_pos, key_pos, window)
        return self._masks[key]

    def slot_table(self) -> torch.Tensor:
        """[S, L] cache slots of each sequence's keys (L the longest), for kernels that take slot tables."""
        key = ("slot_table",)
        if key not in self._masks:
            seqs = torch.arange(self.seq_lengths.shape[0], device=self.positions.device)
            self._masks[key] = self.key_slots(seqs, int(self.seq_lengths.max()))
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor:
        """[n, L] True where key j is not visible to new token i of prefill span `index`."""
        key = ("prefill", index, window)
        if key not in self._masks:
            span = self.prefills[index]
            query_pos = span.positions.unsqueeze(1)  # [n, 1]
            key_pos = torch.arange(self.span_key_slots(index).shape[0], device=query_pos.device).unsqueeze(0)
            self._masks[key] = _invisible(query_pos, key_pos, window)
        return self._masks[key]


def _invisible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    hidden = key_pos > query_pos
    if window is not None:
        hidden |= (query_pos - key_pos) >= window
    return hidden


class KVCacheView:
    """The per-layer K and V slot tensors an attention side writes to and reads from.

    With latent attention, keys[layer] is the latent row tensor [1, slots, C + r] and values[layer]
    a view of its first C columns: writing a row into the keys fills both.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys  # per layer [G, slots, d]: kv-head-major, so gathered keys feed bmm without copies
        self.values = values  # per layer [G, slots, dv]


class _Layer:
    """Weights of one decoder layer on the attention side (names follow the HF checkpoint)."""

    def __init__(self, cfg: ModelConfig, names: dict[str, torch.Tensor], layer: int, tensor_names: TensorNames,
                 kernels: KernelSet) -> None:
        p = f"model.layers.{layer}"
        get = names.get
        linear = kernels.linear
        self.input_norm = names[f"{p}.input_layernorm.weight"]
        self.post_norm = names[f"{p}.post_attention_layernorm.weight"]
        self.latent = LatentAttentionLayer(cfg, names, p, kernels) if cfg.mla is not None else None
        if self.latent is None:
            attn = f"{p}.self_attn"
            # q, k and v as one product (one pass over the layer's input, one threaded job instead of
            # three); every output column is still its own reduction, so the bits are those of three.
            weights = [names[f"{attn}.{proj}.weight"] for proj in ("q_proj", "k_proj", "v_proj")]
            biases = [get(f"{attn}.{proj}.bias") for proj in ("q_proj", "k_proj", "v_proj")]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
            self.qkv = linear(torch.cat(weights), bias)  # [H*d + 2*G*d, D]
            self.qkv_split = [w.shape[0] for w in weights]
            self.o = linear(names[f"{attn}.o_proj.weight"], get(f"{attn}.o_proj.bias"))
        self.q_norm = get(f"{p}.self_attn.q_norm.weight")
        self.k_norm = get(f"{p}.self_attn.k_norm.weight")
        self.sinks = get(f"{p}.self_attn.sinks")  # [H]
        self.sparse = cfg.sparse_layers[layer]
        self.window = cfg.sliding_windows[layer]
        self.router = None
        self.correction_bias = None
        self.dense_gate_up = None
        self.dense_down = None
        self.shared_gate_up = None
        self.shared_down = None
        self.shared_gate = None
        if not self.sparse:
            self.dense_gate_up = linear(torch.cat([names[f"{p}.mlp.gate_proj.weight"], names[f"{p}.mlp.up_proj.weight"]]))
            self.dense_down = linear(names[f"{p}.mlp.down_proj.weight"])
            return
        router_bias = tensor_names.router_bias(layer)
        self.router = linear(names[tensor_names.router(layer)], None if router_bias is None else names[router_bias])
        correction = tensor_names.correction_bias(layer)
        self.correction_bias = None if correction is None else names[correction]  # [E]
        shared = tensor_names.shared_expert(layer)
        if shared is not None:
            s = shared.prefix
            self.shared_gate_up = linear(torch.cat([names[f"{s}.gate_proj.weight"], names[f"{s}.up_proj.weight"]]))
            self.shared_down = linear(names[f"{s}.down_proj.weight"])
            self.shared_gate = None if shared.gate is None else linear(names[shared.gate])


class AttentionSide:
    """Embedding, attention, routers, dense and shared MLPs, final norm and LM head of a model."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_positions: int | None = None,
        kernels: KernelSet | None = None,
    ) -> None:
        cfg = checkpoint.cfg
        self.kernels = kernels or KernelSet()
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        tensor_names = checkpoint.names
        float32 = tensor_names.float32_names
        names = checkpoint.load([n for n in tensor_names.attention_shapes if n not in float32], dtype, self.device)
        names.update(checkpoint.load(sorted(float32), torch.float32, self.device))
        self.embed_tokens = names["model.embed_tokens.weight"]
        self.final_norm = names["model.norm.weight"]
        self.lm_head = self.kernels.linear(self.embed_tokens if cfg.tie_word_embeddings else names["lm_head.weight"])
        self.layers = [_Layer(cfg, names, i, tensor_names, self.kernels) for i in range(cfg.num_layers)]
        self.rotary = RotaryTable(cfg.rope, cfg.head_dim, max_positions or cfg.max_position_embeddings, dtype, self.device)
        self.scale = softmax_scale(cfg.mla, cfg.rope) if cfg.mla is not None else cfg.head_dim**-0.5
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
        a = self.kernels.rms_norm(h, w.input_norm, self.eps)
        if w.latent is not None:
            q, rows = w.latent.project(a, batch.cos, batch.sin)  # [T, H, C + r], [T, C + r]
            cache.keys[layer].index_copy_(1, batch.slot_mapping, rows.unsqueeze(0))
            o = self._paged_attention(q, cache.keys[layer], cache.values[layer], batch, w.window, None)  # [T, H, C]
            h = h + w.latent.output(o)
            return h, self.kernels.rms_norm(h, w.post_norm, self.eps)
        q, k, v = w.qkv(a).split(w.qkv_split, dim=1)  # [T, H*d], [T, G*d], [T, G*d]
        if cfg.qk_norm == "full":
            q = self.kernels.rms_norm(q, w.q_norm, self.eps)
            k = self.kernels.rms_norm(k, w.k_norm, self.eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(T, cfg.num_heads, cfg.head_dim)
        k = k.view(T, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q = self.kernels.rms_norm(q, w.q_norm, self.eps)
            k = self.kernels.rms_norm(k, w.k_norm, self.eps)
        q = ops.apply_rotary(q, batch.cos, batch.sin)
        k = ops.apply_rotary(k, batch.cos, batch.sin)
        cache.keys[layer].index_copy_(1, batch.slot_mapping, k.transpose(0, 1))
        cache.values[layer].index_copy_(1, batch.slot_mapping, v.transpose(0, 1))
        o = self._paged_attention(q, cache.keys[layer], cache.values[layer], batch, w.window, w.sinks)  # [T, H, d]
        h = h + w.o(o.reshape(T, -1))
        return h, self.kernels.rms_norm(h, w.post_norm, self.eps)

    def _paged_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: AttentionBatch,
        window: int | None,
        sinks: torch.Tensor | None,
    ) -> torch.Tensor:
        """q [T, H, d] over cached keys [G, slots, d] and values [G, slots, dv] -> [T, H, dv]; sinks [H] or None."""
        if self.kernels.paged_for(q):  # one kernel over every row, decode and prefill alike, reading the cache in place
            return self.kernels.paged_attention(q, k_cache, v_cache, batch, self.scale, window, sinks)
        T, H, d = q.shape
        G, dv = k_cache.shape[0], v_cache.shape[2]
        R = H // G
        group_sinks = None if sinks is None else sinks.view(G, 1, R)  # one per query row of a kv group
        out = q.new_empty((T, H, dv))
        rows = batch.decode_rows
        if rows.numel():
            B = rows.shape[0]
            slots = batch.decode_key_slots  # [B, L]
            masked = batch.decode_mask(window).unsqueeze(1).expand(B, R, slots.shape[1])  # [B, R, L]
            qd = q[rows].view(B, G, R, d).transpose(0, 1)  # [G, B, R, d]
            flat = slots.reshape(-1)  # index_select is ~4x faster than advanced indexing here
            keys = k_cache.index_select(1, flat).view(G, B, -1, d)  # [G, B, L, d]
            values = v_cache.index_select(1, flat).view(G, B, -1, dv)
            o = self.kernels.attention(qd, keys, values, masked, self.scale, group_sinks)  # [G, B, R, dv]
            out[rows] = o.transpose(0, 1).reshape(B, G * R, dv)
        for index, span in enumerate(batch.prefills):
            key_slots = batch.span_key_slots(index)  # [L]
            keys = k_cache.index_select(1, key_slots).unsqueeze(1)  # [G, 1, L, d]
            values = v_cache.index_select(1, key_slots).unsqueeze(1)  # [G, 1, L, dv]
            mask = batch.prefill_mask(index, window)  # [n, L]
            for lo in range(0, span.length, _PREFILL_CHUNK_TOKENS):
                hi = min(span.length, lo + _PREFILL_CHUNK_TOKENS)
                n = hi - lo
                qp = q[span.start + lo : span.start + hi].view(n, G, R, d).transpose(0, 1).reshape(G, 1, n * R, d)
                masked = mask[lo:hi].repeat_interleave(R, dim=0).unsqueeze(0)  # [1, n*R, L]
                span_sinks = None if group_sinks is None else group_sinks.repeat(1, 1, n)  # [G, 1, n*R]
                o = self.kernels.attention(qp, keys, values, masked, self.scale, span_sinks)  # [G, 1, n*R, dv]
                out[span.start + lo : span.start + hi] = o.view(G, n, R, dv).transpose(0, 1).reshape(n, G * R, dv)
        return out

    def is_sparse(self, layer: int) -> bool:
        return self.layers[layer].sparse

    def dense_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w = self.layers[layer]
        return ops.swiglu(x, w.dense_gate_up, w.dense_down)

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (expert ids [T, K] int64, weights [T, K]) as the family's router picks them.

        The weights include everything the family scales expert outputs by (DeepSeek's
        routed_scaling_factor too), so combining is a plain weighted sum wherever the experts ran.
        """
        cfg, w = self.cfg, self.layers[layer]
        router = cfg.router
        if router.scoring == "sigmoid_grouped":
            logits = w.router(x.float())  # [T, E], in float32 as DeepSeek routes
            ids, weights = routing.grouped_sigmoid_topk(
                logits, w.correction_bias, cfg.top_k, router.n_group, router.topk_group, cfg.norm_topk_prob,
                router.routed_scaling_factor,
            )
        elif router.scoring == "topk_softmax":
            ids, weights = routing.topk_then_softmax(w.router(x), cfg.top_k)
        else:
            ids, weights = routing.softmax_then_topk(w.router(x), cfg.top_k, cfg.norm_topk_prob)
        if not cfg.router_weights_fp32:
            weights = weights.to(x.dtype)
        return ids, weights

    def shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Shared expert output [T, D]: sigmoid-gated (Qwen2-MoE) or plain (DeepSeek-V3); None without one."""
        w = self.layers[layer]
        if w.shared_gate_up is None:
            return None
        out = ops.swiglu(x, w.shared_gate_up, w.shared_down)  # [T, D]
        if w.shared_gate is None:
            return out
        return torch.sigmoid(w.shared_gate(x)) * out

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
        return self.lm_head(self.kernels.rms_norm(h, self.final_norm, self.eps)).float()

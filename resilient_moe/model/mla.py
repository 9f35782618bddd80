"""Multi-head latent attention (DeepSeek-V2/V3): the projections around a latent KV cache.

Per token and layer the cache keeps one row [c | k_r]: the normed latent c (C = kv_lora_rank) and the
rotary key k_r (r = qk_rope_head_dim) that every head shares. transformers expands every cached latent
into per-head keys and values with kv_b_proj at each step. Here kv_b_proj is absorbed into the query
and the output instead: with W_uk[h] [n, C] and W_uv[h] [v, C] its key and value halves for head h,

    q_nope . (W_uk[h] c) = (W_uk[h]^T q_nope) . c        sum_j p_j (W_uv[h] c_j) = W_uv[h] (sum_j p_j c_j)

so attention runs straight over the cached rows, as one key/value head shared by all H heads (keys:
the whole row; values: its first C elements), with queries [W_uk^T q_nope | rotated q_rope]. A decode
step then reads C + r numbers per context token and head instead of re-expanding the context, and
equals transformers' result up to float rounding.

Shape letters: T tokens, D hidden, H heads, n qk_nope_head_dim, r qk_rope_head_dim, v v_head_dim,
C kv_lora_rank.
"""

from __future__ import annotations

import torch

from resilient_moe.model.config import ModelConfig, RopeConfig
from resilient_moe.model import ops
from resilient_moe.model.families import LatentAttentionConfig
from resilient_moe.model.kernel_choice import KernelSet
from resilient_moe.model.rope import yarn_mscale

# transformers builds q_a_layernorm and kv_a_layernorm with this eps, not the config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def softmax_scale(mla: LatentAttentionConfig, rope: RopeConfig) -> float:
    """1/sqrt(n + r), times YaRN's mscale(factor, mscale_all_dim) squared when the rope is scaled
    (the query and the key each carry one mscale in DeepSeek's formulation)."""
    scale = mla.qk_head_dim**-0.5
    if rope.rope_type != "default" and rope.mscale_all_dim:
        mscale = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale *= mscale * mscale
    return scale


def _deinterleave_rope(weight: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Reorder the last `rope_dim` rows of each head block [.., n + r, ...] from pairs (x0, x1), (x2, x3), ...
    to halves (x0, x2, ...), (x1, x3, ...), so the usual rotate-half rotation computes the interleaved one
    (the same products and sums, so the same bits)."""
    rope = weight[:, -rope_dim:]
    return torch.cat([weight[:, :-rope_dim], rope[:, 0::2], rope[:, 1::2]], dim=1)


class LatentAttentionLayer:
    """One layer's MLA weights (HF names under `prefix`.self_attn), prepared for the absorbed form."""

    def __init__(self, cfg: ModelConfig, names: dict[str, torch.Tensor], prefix: str, kernels: KernelSet) -> None:
        mla = cfg.mla
        assert mla is not None
        self.mla = mla
        self.kernels = kernels
        self.num_heads = H = cfg.num_heads
        a = f"{prefix}.self_attn"
        n, r, C = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank

        def rope_ordered(t: torch.Tensor, blocks: int) -> torch.Tensor:
            if not mla.rope_interleave:
                return t
            return _deinterleave_rope(t.reshape(blocks, -1, *t.shape[1:]), r).reshape(t.shape)

        self.q = self.q_a = self.q_b = None
        self.q_a_norm = None
        if mla.q_lora_rank is None:
            self.q = kernels.linear(rope_ordered(names[f"{a}.q_proj.weight"], H))  # [H*(n+r), D]
        else:
            self.q_a = kernels.linear(names[f"{a}.q_a_proj.weight"], names.get(f"{a}.q_a_proj.bias"))  # [q_lora, D]
            self.q_a_norm = names[f"{a}.q_a_layernorm.weight"]
            self.q_b = kernels.linear(rope_ordered(names[f"{a}.q_b_proj.weight"], H))  # [H*(n+r), q_lora]
        kv_a_bias = names.get(f"{a}.kv_a_proj_with_mqa.bias")
        self.kv_a = kernels.linear(  # [C + r, D]
            rope_ordered(names[f"{a}.kv_a_proj_with_mqa.weight"], 1),
            None if kv_a_bias is None else rope_ordered(kv_a_bias, 1),
        )
        self.kv_a_norm = names[f"{a}.kv_a_layernorm.weight"]
        kv_b = names[f"{a}.kv_b_proj.weight"].view(H, n + mla.v_head_dim, C)
        self.absorb_k = ops.HeadwiseLinear(kv_b[:, :n].transpose(1, 2), kernels.linear)  # per head [C, n]: q_nope -> latent space
        self.absorb_v = ops.HeadwiseLinear(kv_b[:, n:], kernels.linear)  # per head [v, C]: latent -> value space
        self.o = kernels.linear(names[f"{a}.o_proj.weight"], names.get(f"{a}.o_proj.bias"))  # [D, H*v]

    def project(self, a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed hidden a [T, D] -> (queries [T, H, C + r] in latent space, cache rows [T, C + r])."""
        mla, T = self.mla, a.shape[0]
        n, C = mla.qk_nope_head_dim, mla.kv_lora_rank
        if self.q is not None:
            q = self.q(a)  # [T, H*(n+r)]
        else:
            q = self.q_b(self.kernels.rms_norm(self.q_a(a), self.q_a_norm, LATENT_NORM_EPS))
        q = q.view(T, self.num_heads, mla.qk_head_dim)  # [T, H, n+r]
        kv = self.kv_a(a)  # [T, C + r]
        latent = self.kernels.rms_norm(kv[:, :C], self.kv_a_norm, LATENT_NORM_EPS)  # [T, C]
        k_rope = ops.apply_rotary(kv[:, None, C:], cos, sin)[:, 0]  # [T, r]
        q_rope = ops.apply_rotary(q[..., n:], cos, sin)  # [T, H, r]
        q_latent = self.absorb_k(q[..., :n])  # [T, H, C]
        return torch.cat([q_latent, q_rope], dim=-1), torch.cat([latent, k_rope], dim=-1)

    def output(self, o_latent: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space [T, H, C] -> o_proj output [T, D]."""
        return self.o(self.absorb_v(o_latent).reshape(o_latent.shape[0], -1))  # [T, H, v] -> [T, D]

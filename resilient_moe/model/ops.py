"""Batch-invariant tensor primitives shared by the attention side and the expert side.

Why this file exists: every resilience guarantee is checked as "token-identical to a failure-free
run". After a failover the same token is computed in a different batch (another micro-batch split,
another expert worker's grouping, a prefill-style recompute instead of decode steps). If a row's
result depended on its batch, a near-tie could flip a greedy token. So each primitive here gives a
row the same bits whatever else shares its batch:

* GEMMs: measured on MKL (one thread), a row of ``x @ w.T`` is identical for any batch of >= 4 rows
  but differs for 1-3 rows (another kernel). `linear` and the attention matmuls pad to 4 rows.
* ``q @ k.T``: identical across key lengths that are multiples of 16 (>= 16), not otherwise; keys
  are padded to a multiple of `KEY_PAD`, the padding masked to -inf.
* softmax over -inf padding and ``p @ v`` over zero padding are identical for any padded length.

`tests/test_batch_invariance.py` re-checks these facts on the machine it runs on.

Shape letters: T tokens, D hidden, H query heads, G kv heads, R = H // G, d head dim, L keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_GEMM_ROWS = 4
KEY_PAD = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose rows do not depend on how many rows share the call."""
    rows = x.shape[0]
    if rows >= MIN_GEMM_ROWS:
        return F.linear(x, weight, bias)
    padded = x.new_zeros((MIN_GEMM_ROWS, *x.shape[1:]))
    padded[:rows] = x
    return F.linear(padded, weight, bias)[:rows]


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm`` with the row dimension of `a` padded to MIN_GEMM_ROWS."""
    rows = a.shape[1]
    if rows >= MIN_GEMM_ROWS:
        return torch.bmm(a, b)
    padded = a.new_zeros((a.shape[0], MIN_GEMM_ROWS, a.shape[2]))
    padded[:, :rows] = a
    return torch.bmm(padded, b)[:, :rows]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Hugging Face computes it: statistics in float32, scale in the input dtype."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; cos, sin [T, d]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SiLU-gated MLP with the gate and up projections fused: gate_up [2F, D], down [D, F]."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)  # [T, F] each
    return linear(F.silu(gate) * up, down)  # [T, D]


def padded_key_length(num_keys: int) -> int:
    """Smallest multiple of KEY_PAD that holds `num_keys` keys."""
    return max(KEY_PAD, -(-num_keys // KEY_PAD) * KEY_PAD)


def attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    masked: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Scaled dot-product attention over gathered, padded keys.

    q [B, G, M, d] (the M query rows of each kv group: heads x tokens), keys and values [B, L, G, d]
    with L a multiple of KEY_PAD, masked [B, M, L] (True = not visible). Returns [B, G, M, d].
    """
    batch, groups, rows, dim = q.shape
    length = keys.shape[1]
    k = keys.permute(0, 2, 3, 1).reshape(batch * groups, dim, length)  # [B*G, d, L]
    v = values.permute(0, 2, 1, 3).reshape(batch * groups, length, dim)  # [B*G, L, d]
    scores = bmm(q.reshape(batch * groups, rows, dim), k) * scale  # [B*G, M, L]
    scores = scores.view(batch, groups, rows, length).masked_fill(masked.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = bmm(probs.view(batch * groups, rows, length), v)  # [B*G, M, d]
    return out.view(batch, groups, rows, dim)

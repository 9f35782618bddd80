"""Batch-invariant paged attention over the KV cache's slots, for decode and prefill rows alike.

The cache layout is the engine's (engine/kv_cache.py): per layer, keys [G, slots, d] and values
[G, slots, dv], kv-head-major; slot = block * block_size + offset, and a sequence's key j lives in
slot `slot_table[seq, j]` (the model runner builds these tables from the block tables). Latent
attention (DeepSeek MLA) passes its latent rows [1, slots, C + r] as keys and a view of their first C
columns as values.

Why a row's bits cannot depend on its batch here:

* **A fixed split SIZE, not a fixed split count.** A row's keys are cut at fixed absolute positions
  (0, SPLIT, 2*SPLIT, ...), so how many splits a row has follows from its own length alone. A fixed
  split COUNT would cut a row at points that move with the longest row in the batch.
* Inside a split, one program walks the keys in fixed BLOCK_N tiles from the split's start, with
  an online softmax in float32; all R query heads of a kv head share the program (GQA), one row each
  of one dot.
* A second program per (row, kv head) folds the partials of that row's own splits in split order.
  An attention sink (GPT-OSS) starts that fold as one more logit with no value.
* Prefill rows run the same two kernels as decode rows (each row sees keys 0..its position), so a
  token computed in a prefill, a chunk of one, or a decode step after a failover gets the same bits.
* Every size that shapes the reduction (SPLIT, BLOCK_N, padded head counts and dims) is fixed by the
  model's shapes; rows and splits beyond a row's length only change the grid.

Shape letters: T query rows, H query heads, G kv heads, R = H // G, d key dim, dv value dim,
S sequences, L key positions per sequence, NS splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resilient_moe.kernels.matmul import dot_precision

KEY_SPLIT = 256  # keys per split: the fixed split size


@triton.jit(do_not_specialize=["window"])
def _split_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, row_seq_ptr, pos_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    D, DV, window, scale,
    stride_qt, stride_qh, stride_kg, stride_ks, stride_vg, stride_vs, stride_seq,
    stride_pt, stride_ph, stride_ps, stride_at, stride_ah, stride_as,
    R: tl.constexpr, R_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    pos = tl.load(pos_ptr + t)
    seq = tl.load(row_seq_ptr + t)
    hi = pos + 1  # keys [lo, hi) are visible
    lo = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
    split_lo = s * SPLIT
    split_hi = tl.minimum(split_lo + SPLIT, hi)
    start = tl.maximum(split_lo, lo)
    if start >= split_hi:
        return  # no visible key in this split: the fold never reads it
    r = tl.arange(0, R_PAD)
    heads = g * R + r
    dd = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + dd[None, :],
                mask=(r[:, None] < R) & (dd[None, :] < D), other=0.0)  # [R_PAD, D_PAD]
    m = tl.full((R_PAD,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((R_PAD,), dtype=tl.float32)
    acc = tl.zeros((R_PAD, DV_PAD), dtype=tl.float32)
    # Tiles sit at fixed offsets from the split's start; the first one holds key `start`, so every tile
    # has a visible key and the running maximum is finite after it.
    first = split_lo + ((start - split_lo) // BLOCK_N) * BLOCK_N
    for n0 in range(first, split_hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        visible = (j >= lo) & (j < split_hi)
        slot = tl.load(slots_ptr + seq * stride_seq + j, mask=visible, other=0)
        k = tl.load(k_ptr + g * stride_kg + slot[:, None] * stride_ks + dd[None, :],
                    mask=visible[:, None] & (dd[None, :] < D), other=0.0)  # [BLOCK_N, D_PAD]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [R_PAD, BLOCK_N]
        scores = tl.where(visible[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + g * stride_vg + slot[:, None] * stride_vs + dv[None, :],
                    mask=visible[:, None] & (dv[None, :] < DV), other=0.0)  # [BLOCK_N, DV_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    part = t * stride_pt + heads * stride_ph + s * stride_ps
    tl.store(part_m_ptr + part, m, mask=r < R)
    tl.store(part_l_ptr + part, l, mask=r < R)
    tl.store(part_acc_ptr + t * stride_at + heads[:, None] * stride_ah + s * stride_as + dv[None, :], acc,
             mask=(r[:, None] < R) & (dv[None, :] < DV))


@triton.jit(do_not_specialize=["window"])
def _fold_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, pos_ptr, sinks_ptr, o_ptr,
    DV, window, stride_pt, stride_ph, stride_ps, stride_at, stride_ah, stride_as, stride_ot, stride_oh,
    R: tl.constexpr, R_PAD: tl.constexpr, DV_PAD: tl.constexpr, SPLIT: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    lo = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
    r = tl.arange(0, R_PAD)
    heads = g * R + r
    dv = tl.arange(0, DV_PAD)
    if HAS_SINKS:  # one more logit in the softmax, with no value: exp(sink - m) joins the sum
        m = tl.load(sinks_ptr + heads, mask=r < R, other=0.0).to(tl.float32)
        l = tl.full((R_PAD,), 1.0, dtype=tl.float32)
    else:
        m = tl.full((R_PAD,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((R_PAD,), dtype=tl.float32)
    acc = tl.zeros((R_PAD, DV_PAD), dtype=tl.float32)
    for s in range(lo // SPLIT, (pos + SPLIT) // SPLIT):  # this row's own splits, in order
        part = t * stride_pt + heads * stride_ph + s * stride_ps
        m_s = tl.load(part_m_ptr + part, mask=r < R, other=0.0)
        l_s = tl.load(part_l_ptr + part, mask=r < R, other=0.0)
        acc_s = tl.load(part_acc_ptr + t * stride_at + heads[:, None] * stride_ah + s * stride_as + dv[None, :],
                        mask=(r[:, None] < R) & (dv[None, :] < DV), other=0.0)
        m_new = tl.maximum(m, m_s)
        a = tl.exp(m - m_new)
        b = tl.exp(m_s - m_new)
        l = l * a + l_s * b
        acc = acc * a[:, None] + acc_s * b[:, None]
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # l is 0 only on padding heads, which are not stored
    tl.store(o_ptr + t * stride_ot + heads[:, None] * stride_oh + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(r[:, None] < R) & (dv[None, :] < DV))


def key_block(head_dim: int) -> int:
    """Keys per tile: a function of the head width only (wide latent rows take narrower tiles)."""
    return 32 if head_dim <= 128 else 16


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_table: torch.Tensor,
    row_seq: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    split: int = KEY_SPLIT,
) -> torch.Tensor:
    """Causal attention of each query row over its sequence's cached keys.

    q [T, H, d]; k_cache [G, slots, d] and v_cache [G, slots, dv] (strided views are fine, last dim
    contiguous); slot_table [S, L] cache slot of key j of sequence s; row_seq [T] the sequence of
    each row; positions [T] each row's position: it sees keys max(0, position - window + 1) ..
    position. sinks [H] (optional): a per-head logit with no value. `split` keys per split (a
    multiple of the key tile). Returns [T, H, dv] in q's dtype.
    """
    T, H, D = q.shape
    G, DV = k_cache.shape[0], v_cache.shape[2]
    R = H // G
    out = torch.empty((T, H, DV), dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    block_n = key_block(D)
    if split % block_n:
        raise ValueError(f"split ({split}) must be a multiple of the key tile ({block_n})")
    num_splits = triton.cdiv(slot_table.shape[1], split)  # enough for the longest row; shorter rows skip the rest
    part_m = torch.empty((T, H, num_splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((T, H, num_splits, DV), dtype=torch.float32, device=q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    r_pad = max(16, triton.next_power_of_2(R))
    dv_pad = max(16, triton.next_power_of_2(DV))
    window = window or 0
    precision = dot_precision(q.dtype)
    _split_kernel[(T, G, num_splits)](
        q, k_cache, v_cache, slot_table, row_seq, positions, part_m, part_l, part_acc,
        D, DV, window, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        slot_table.stride(0), part_m.stride(0), part_m.stride(1), part_m.stride(2),
        part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
        R=R, R_PAD=r_pad, D_PAD=max(16, triton.next_power_of_2(D)), DV_PAD=dv_pad,
        SPLIT=split, BLOCK_N=block_n, PRECISION=precision,
    )
    _fold_kernel[(T, G)](
        part_m, part_l, part_acc, positions, part_m if sinks is None else sinks, out,
        DV, window, part_m.stride(0), part_m.stride(1), part_m.stride(2),
        part_acc.stride(0), part_acc.stride(1), part_acc.stride(2), out.stride(0), out.stride(1),
        R=R, R_PAD=r_pad, DV_PAD=dv_pad, SPLIT=split, HAS_SINKS=sinks is not None,
    )
    return out

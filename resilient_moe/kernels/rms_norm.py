"""Batch-invariant RMSNorm: one program per row.

A row's sum of squares is reduced by the one program that owns the row, over fixed chunks of
BLOCK columns in order, then across the chunk's lanes by one fixed tree (tl.sum). BLOCK depends on
the row width only. So no other row, and no number of rows, changes how a row is reduced; torch's
reductions on a GPU instead choose how to split a row across blocks from the tensor's whole shape.

The result is rounded as transformers rounds it: statistics in float32, ``x * rsqrt(mean(x^2) + eps)``
rounded to the input dtype, then multiplied by the weight in float32 and rounded once to the promoted
dtype of input and weight (as torch computes a product of two 16-bit tensors).

Shape letters: R rows, D row width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096  # widest chunk of a row one step loads


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, stride_x, stride_y, eps,
                     BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * stride_y
    if ONE_CHUNK:
        x = tl.load(x_row + offs, mask=offs < D, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_ptr + offs, mask=offs < D, other=0.0)
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_row + offs, (normed * w.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=offs < D)
    else:
        squares = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, D, BLOCK):
            cols = start + offs
            x = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
            squares += x * x
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / D + eps)
        for start in range(0, D, BLOCK):
            cols = start + offs
            x = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=cols < D, other=0.0)
            normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
            tl.store(y_row + cols, (normed * w.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=cols < D)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D] in x's dtype (the weight's dtype when they differ, as torch promotes)."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0]:
        block = min(triton.next_power_of_2(D), MAX_BLOCK)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, y, D, rows.stride(0), y.stride(0), eps,
                                           BLOCK=block, ONE_CHUNK=block >= D)
    return y.view(x.shape)

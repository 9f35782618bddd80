"""Batch-invariant log-softmax over the vocabulary, for sampling and logprobs: one program per row.

A row's maximum and sum of exponentials are kept per lane of a BLOCK-wide vector while the program
walks its row in fixed chunks, then folded across lanes by one fixed tree; BLOCK depends on the row
width only. No other row, and no number of rows, takes part in a row's reduction. Masked logits
(-inf, as top-k and top-p leave them) give probability 0; a lane that has seen only -inf keeps a
zero sum, so it adds nothing.

Shape letters: S rows, V vocabulary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # vocabulary entries per step (fewer for a narrower row)


@triton.jit
def _log_softmax_kernel(x_ptr, y_ptr, V, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    # Step 1: per-lane running maximum and sum of exp(x - maximum), chunk after chunk.
    lane_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    lane_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, x)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # a lane with only -inf so far stays at 0
        lane_sum = lane_sum * tl.exp(lane_max - safe) + tl.exp(x - safe)
        lane_max = new_max
    # Step 2: fold the lanes.
    row_max = tl.max(lane_max, axis=0)
    total = tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0)
    log_total = row_max + tl.log(total)
    # Step 3: write x - log(sum(exp(x))).
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, x - log_total, mask=cols < V)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> float32 log-probabilities [..., V] (every row needs one finite logit)."""
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape, dtype=torch.float32, device=logits.device)
    if rows.shape[0]:
        block = min(triton.next_power_of_2(V), BLOCK)
        _log_softmax_kernel[(rows.shape[0],)](rows, y, V, rows.stride(0), y.stride(0), BLOCK=block)
    return y.view(logits.shape)

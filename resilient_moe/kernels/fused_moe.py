"""Batch-invariant fused MoE: a grouped GEMM over rows sorted by expert, with one pinned config.

An expert worker (or the colocated engine) gets rows x [N, D] and the expert of each row; every
row goes through its expert's gated MLP. Rows are sorted by expert and each expert's rows padded to
whole BLOCK_M blocks (`align_rows`), so one launch computes every expert: each program owns one
block (rows of one expert) and a BLOCK_N slice of the outputs.

Why a row's bits cannot depend on what else is in the batch:

* One pinned configuration (`moe_config`, per dtype) for every number of rows and experts: the
  same kernel, the same tiles. The row count is not specialised on, so no batch compiles another.
* Each output element is reduced by one program, over K in fixed BLOCK_K steps from 0: no split-K,
  no atomics. The rows sharing a block only add rows to the same dot.
* Padding rows are loaded as zeros and never stored; a block's row count changes nothing for the
  rows in it.
* The intermediate activation is stored in the model dtype between the two GEMMs, exactly as the
  unfused expert computes it, so it is the same whatever the block.

The sort itself runs on the device with no host synchronisation (the grid is sized for the worst
case and idle blocks exit at once).

Shape letters: N rows, D hidden, F expert width, E experts held, P padded rows, NB blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
import triton
import triton.language as tl

from resilient_moe.kernels.matmul import TileConfig, dot_precision

SILU, CLAMPED_SWIGLU = 0, 1
ACTIVATIONS = {"silu": SILU, "clamped_swiglu": CLAMPED_SWIGLU}


def moe_config(dtype: torch.dtype) -> TileConfig:
    """The pinned configuration: one per dtype, never per number of rows. BLOCK_M is small because a
    decode step gives each expert few rows (batch x top-k / experts)."""
    if dtype == torch.float32:
        return TileConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
    return TileConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3)


class ExpertTensors(Protocol):
    """One expert's weights: gate_up [2F, D] (the F gate rows, then the F up rows), down [D, F], and
    optional biases gate_up_bias [2F], down_bias [D]."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None


@triton.jit(do_not_specialize=["N"])
def _gate_up_kernel(
    x_ptr, w_ptr, b_ptr, rows_ptr, block_slot_ptr, h_ptr,
    N, D, F, stride_x, stride_we, stride_wn, stride_be, stride_h, alpha, limit,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    slot = tl.load(block_slot_ptr + block)
    if slot < 0:
        return  # a block past the last expert's rows
    padded = block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] positions in the sorted, padded order
    rows = tl.load(rows_ptr + padded)  # [BM] source rows; N marks padding
    valid = rows < N
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] in [0, F)
    offs_k = tl.arange(0, BLOCK_K)
    w = w_ptr + slot * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=valid[:, None] & (ks[None, :] < D), other=0.0)
        w_mask = (cols[None, :] < F) & (ks[:, None] < D)
        w_gate = tl.load(w + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)  # [BK, BN]
        w_up = tl.load(w + (F + cols[None, :]) * stride_wn + ks[:, None], mask=w_mask, other=0.0)
        acc_gate = tl.dot(a, w_gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
    if HAS_BIAS:
        acc_gate += tl.load(b_ptr + slot * stride_be + cols, mask=cols < F, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(b_ptr + slot * stride_be + F + cols, mask=cols < F, other=0.0).to(tl.float32)[None, :]
    # The projections are rounded to the model dtype, as the unfused gate_up projection returns them.
    gate = acc_gate.to(h_ptr.dtype.element_ty).to(tl.float32)
    up = acc_up.to(h_ptr.dtype.element_ty).to(tl.float32)
    if ACTIVATION == 0:  # SILU: silu(gate) * up
        h = gate * tl.sigmoid(gate) * up
    else:  # GPT-OSS: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        h = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    tl.store(h_ptr + padded[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < F))


@triton.jit(do_not_specialize=["N"])
def _down_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, block_slot_ptr, y_ptr,
    N, D, F, stride_h, stride_we, stride_wn, stride_be, stride_y,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    slot = tl.load(block_slot_ptr + block)
    if slot < 0:
        return
    padded = block * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(rows_ptr + padded)
    valid = rows < N
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] in [0, D)
    offs_k = tl.arange(0, BLOCK_K)
    w = w_ptr + slot * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(h_ptr + padded[:, None] * stride_h + ks[None, :], mask=valid[:, None] & (ks[None, :] < F), other=0.0)
        b = tl.load(w + cols[None, :] * stride_wn + ks[:, None], mask=(cols[None, :] < D) & (ks[:, None] < F), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + slot * stride_be + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < D))


def align_rows(slots: torch.Tensor, num_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort rows by expert slot and pad each expert's run to whole blocks, on the device, without a sync.

    slots [N] (each row's expert slot in [0, num_slots)) -> (rows [P]: the source row at each padded
    position, N for padding; block_slot [NB]: the slot whose rows fill each block, -1 past the last).
    NB = ceil(N / block_m) + min(num_slots, N) is enough for any distribution of rows.
    """
    N = slots.shape[0]
    device = slots.device
    num_blocks = triton.cdiv(N, block_m) + min(num_slots, N)
    counts = torch.zeros(num_slots, dtype=torch.long, device=device).scatter_add_(0, slots, torch.ones_like(slots))  # [E]
    blocks = (counts + block_m - 1) // block_m  # [E]
    block_end = torch.cumsum(blocks, 0)  # [E]
    order = torch.argsort(slots, stable=True)  # [N] rows grouped by slot, in their original order within one
    sorted_slots = slots[order]
    run_start = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each slot's rows
    rank = torch.arange(N, device=device) - run_start[sorted_slots]  # [N] position within its slot's run
    dest = (block_end - blocks)[sorted_slots] * block_m + rank  # [N] padded position of each sorted row
    rows = torch.full((num_blocks * block_m,), N, dtype=torch.long, device=device)
    rows[dest] = order
    block_slot = torch.searchsorted(block_end, torch.arange(num_blocks, device=device), right=True)  # [NB]
    block_slot = torch.where(block_slot < num_slots, block_slot, -1)
    return rows, block_slot


def fused_moe(
    x: torch.Tensor,
    slots: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    activation: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Row i of x [N, D] through expert slots[i]: gate_up [E, 2F, D], down [E, D, F], biases [E, 2F]
    and [E, D] (optional). Returns [N, D] in x's dtype."""
    N, D = x.shape
    E, F = gate_up.shape[0], down.shape[2]
    config = config or moe_config(gate_up.dtype)
    if x.dtype != gate_up.dtype or x.stride(-1) != 1:
        x = x.to(gate_up.dtype).contiguous()
    y = torch.empty((N, D), dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    rows, block_slot = align_rows(slots, E, config.block_m)
    num_blocks = block_slot.shape[0]
    h = torch.empty((rows.shape[0], F), dtype=x.dtype, device=x.device)  # [P, F]
    precision = dot_precision(x.dtype)
    tiles = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                 num_warps=config.num_warps, num_stages=config.num_stages)
    _gate_up_kernel[(num_blocks, triton.cdiv(F, config.block_n))](
        x, gate_up, gate_up if gate_up_bias is None else gate_up_bias, rows, block_slot, h,
        N, D, F, x.stride(0), gate_up.stride(0), gate_up.stride(1),
        0 if gate_up_bias is None else gate_up_bias.stride(0), h.stride(0), alpha, limit,
        HAS_BIAS=gate_up_bias is not None, ACTIVATION=ACTIVATIONS[activation], PRECISION=precision, **tiles,
    )
    _down_kernel[(num_blocks, triton.cdiv(D, config.block_n))](
        h, down, down if down_bias is None else down_bias, rows, block_slot, y,
        N, D, F, h.stride(0), down.stride(0), down.stride(1),
        0 if down_bias is None else down_bias.stride(0), y.stride(0),
        HAS_BIAS=down_bias is not None, PRECISION=precision, **tiles,
    )
    return y


class ExpertBank:
    """The routed experts of one layer held on one device, stacked for `fused_moe`.

    Experts are added and removed in groups (loading restacks the layer once per call, so load a
    layer's experts together). `slot_of` maps a model expert id to its stack slot, on the device.
    """

    def __init__(self, num_experts: int, activation: str, alpha: float, limit: float, device: torch.device) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown expert activation {activation!r}")
        self.activation, self.alpha, self.limit = activation, alpha, limit
        self.device = device
        self.experts: list[int] = []  # stack slot -> expert id
        self.gate_up: torch.Tensor | None = None  # [E, 2F, D]
        self.down: torch.Tensor | None = None  # [E, D, F]
        self.gate_up_bias: torch.Tensor | None = None  # [E, 2F]
        self.down_bias: torch.Tensor | None = None  # [E, D]
        self.slot_of = torch.full((num_experts,), -1, dtype=torch.long, device=device)  # [experts in the model]

    def add(self, weights: dict[int, ExpertTensors]) -> None:
        """Stack these experts' weights after the ones held."""
        new = [e for e in weights if e not in self.experts]
        if not new:
            return
        parts = [weights[e] for e in new]
        self.gate_up = _stack(self.gate_up, [w.gate_up for w in parts])
        self.down = _stack(self.down, [w.down for w in parts])
        if parts[0].gate_up_bias is not None:
            self.gate_up_bias = _stack(self.gate_up_bias, [w.gate_up_bias for w in parts])
            self.down_bias = _stack(self.down_bias, [w.down_bias for w in parts])
        self.experts.extend(new)
        self._index()

    def remove(self, experts: Iterable[int]) -> None:
        gone = set(experts)
        keep = [slot for slot, e in enumerate(self.experts) if e not in gone]
        if len(keep) == len(self.experts):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.gate_up, self.down = self.gate_up[index], self.down[index]
        if self.gate_up_bias is not None:
            self.gate_up_bias, self.down_bias = self.gate_up_bias[index], self.down_bias[index]
        self.experts = [self.experts[slot] for slot in keep]
        self._index()

    def _index(self) -> None:
        self.slot_of.fill_(-1)
        if self.experts:
            ids = torch.tensor(self.experts, dtype=torch.long, device=self.device)
            self.slot_of[ids] = torch.arange(len(self.experts), device=self.device)

    @property
    def nbytes(self) -> int:
        held = (self.gate_up, self.down, self.gate_up_bias, self.down_bias)
        return sum(t.nbytes for t in held if t is not None)

    def __call__(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [N, D] through the experts at stack `slots` [N] (from `slot_of`, all held) -> [N, D]."""
        return fused_moe(x, slots, self.gate_up, self.down, self.gate_up_bias, self.down_bias,
                         self.activation, self.alpha, self.limit)


def _stack(held: torch.Tensor | None, new: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(new)
    return stacked if held is None else torch.cat([held, stacked])

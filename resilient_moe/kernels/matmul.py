"""Batch-invariant ``x @ weight.T + bias``: a persistent Triton matmul with a fixed K order.

Why a row's bits cannot depend on its batch here:

* One configuration per weight shape and dtype (`matmul_config(N, K, dtype)`), never per number of
  rows: the same compiled kernel, the same tiles and the same instructions run for 1 row or 4096.
* Each output tile is computed by one program that walks K from 0 upward in fixed BLOCK_K steps,
  accumulating in float32; no split-K (which would add partial sums in an order that depends on
  how many programs share a tile) and no atomics (whose order is a race).
* Rows never interact: a row's tile neighbours only add more rows to the same dot, whose
  per-element reduction over a BLOCK_K slice is fixed by the tile shape.
* Persistence (a program loops over tiles, as many programs as the GPU has SMs) changes which
  program computes a tile, never how. The row count is a runtime argument that Triton does not
  specialise on, so M = 1 compiles to the same kernel as any other M.

Shape letters: M rows, N output features, K input features.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch options of a GEMM kernel (one per weight shape; never per number of rows)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def matmul_config(n: int, k: int, dtype: torch.dtype) -> TileConfig:
    """The one configuration for a weight [n, k] of `dtype`: a pure function of the weight, so every
    process (colocated engine, attention worker, expert worker) runs the same reduction order.

    Decode multiplies a few rows by a large weight, so the tiles are narrow in N (many programs, so the
    weight streams from every SM) and long in K (few loop trips per tile). float32 runs without tensor
    cores (IEEE products, as transformers computes in float32), in smaller tiles.
    """
    if dtype == torch.float32:
        return TileConfig(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=2)
    block_n = 64 if n >= 16384 else 32
    return TileConfig(block_m=64, block_n=block_n, block_k=128 if k >= 128 else 64, num_warps=4, num_stages=3)


@triton.jit(do_not_specialize=["M", "num_programs"])
def _matmul_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym, num_programs,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    for tile in range(pid, num_tiles, num_programs):
        rows = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # the fixed K order: 0, BLOCK_K, 2*BLOCK_K, ...
            ks = k0 + offs_k
            a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                        mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)  # [BM, BK]
            b = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None],
                        mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)  # [BK, BN]
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 products stay IEEE float32 (Triton would otherwise round them to TF32 on the GPU)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def program_count(tiles: int, device: torch.device) -> int:
    """Persistent programs: one per SM on a GPU (at most one per tile); every tile its own under the interpreter."""
    if device.type != "cuda":
        return max(tiles, 1)
    return max(1, min(tiles, _sm_count(device.index)))


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).multi_processor_count


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: TileConfig) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in x's dtype, accumulated in float32."""
    M, K = x.shape
    N = weight.shape[0]
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    tiles = triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)
    programs = program_count(tiles, x.device)
    _matmul_kernel[(programs,)](
        x, weight, weight if bias is None else bias, y,
        M, N, K, x.stride(0), weight.stride(0), y.stride(0), programs,
        HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


class TritonLinear:
    """A weight [N, K] (and bias [N]) for batch-invariant ``x @ weight.T + bias`` through `matmul`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight.contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self.out_features, self.in_features = weight.shape
        self.config = matmul_config(self.out_features, self.in_features, weight.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, N]."""
        return matmul(x, self.weight, self.bias, self.config)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)

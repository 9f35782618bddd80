"""The tensor primitives a model side runs, for one `kernels` choice (EngineConfig.kernels).

The attention side and the expert side take a `KernelSet` in their constructors and build every
linear layer, norm and attention call through it, so one setting decides the numerics of a whole
process (colocated engine, attention worker, expert worker) and nothing is read from globals.

* `native`: model/ops.py as it always was: the C GEMM on CPU in float32, torch with rows padded to
  MIN_GEMM_ROWS elsewhere; batch-invariant on CPU (tests/test_batch_invariance.py checks it).
* `torch`: plain torch ops, no padding. NOT batch-invariant: on a GPU cuBLAS and torch's reductions
  choose kernels and split strategies by batch size, so a request's tokens can change with its
  batch, and token-identical failover is not guaranteed. A baseline for benchmarks.
* `triton`: resilient_moe/kernels/, batch-invariant by construction on the GPU (and under Triton's
  CPU interpreter, for tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from resilient_moe.kernels import resolve_kernels
from resilient_moe.model import ops

if TYPE_CHECKING:
    from resilient_moe.model.attention_side import AttentionBatch

KERNEL_SETS = ("native", "torch", "triton")


class TorchLinear:
    """``F.linear`` as is (no row padding): the `torch` kernels' linear layer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, N]."""
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)


class KernelSet:
    """Linear layers, RMSNorm, attention, log-softmax and routed experts of one resolved kernels choice."""

    def __init__(self, name: str = "native") -> None:
        if name not in KERNEL_SETS:
            raise ValueError(f"kernel set must be one of {', '.join(KERNEL_SETS)}, got {name!r}")
        self.name = name

    @classmethod
    def for_device(cls, choice: str, device: torch.device, dtype: torch.dtype) -> "KernelSet":
        """The kernels `choice` ("auto", "native", "torch", "triton") means for a model in `dtype` on
        `device`; ConfigError when it cannot run there."""
        return cls(resolve_kernels(choice, device.type, str(dtype).removeprefix("torch.")))

    def __repr__(self) -> str:
        return f"KernelSet({self.name!r})"

    def paged_for(self, q: torch.Tensor) -> bool:
        """Attention reads the paged cache inside the kernel (`paged_attention`) for queries like `q`,
        instead of gathering keys padded to the batch's longest sequence: always with the triton
        kernels, and with the native ones in float32 on the CPU (csrc/kernels.c). Other native cases
        (bfloat16) gather, batch-invariant through padding (model/ops.py)."""
        if self.name == "triton":
            return True
        return self.name == "native" and ops.native_attention(q)

    @property
    def grouped_experts(self) -> bool:
        """Routed experts run as one grouped GEMM per layer (`expert_bank`) instead of one expert at a time."""
        return self.name == "triton"

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """A prepared ``x @ weight.T + bias``: weight [N, K], bias [N]."""
        if self.name == "triton":
            from resilient_moe.kernels.matmul import TritonLinear

            return TritonLinear(weight, bias)
        if self.name == "torch":
            return TorchLinear(weight, bias)
        return ops.Linear(weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., D], weight [D] -> [..., D]."""
        if self.name == "triton":
            from resilient_moe.kernels.rms_norm import rms_norm

            return rms_norm(x, weight, eps)
        return ops.rms_norm(x, weight, eps)

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, masked: torch.Tensor,
                  scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over gathered keys, as `ops.attention` (native and torch kernels)."""
        matmul = torch.bmm if self.name == "torch" else ops.bmm
        return ops.attention(q, keys, values, masked, scale, sinks, batched_matmul=matmul)

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: "AttentionBatch",
                        scale: float, window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
        """Attention of every row of `batch` straight over the cache: q [T, H, d], k_cache [G, slots, d],
        v_cache [G, slots, dv] -> [T, H, dv] (see `paged_for`; kernels/paged_attention.py on triton,
        ops.paged_attention natively)."""
        if self.name == "triton":
            from resilient_moe.kernels.paged_attention import paged_attention

            return paged_attention(q, k_cache, v_cache, batch.slot_table(), batch.row_seq, batch.positions, scale,
                                   window, sinks)
        return ops.paged_attention(q, k_cache, v_cache, batch.blocks, batch.block_start, batch.row_seq,
                                   batch.positions, batch.block_size, scale, window, sinks)

    @property
    def sampling_log_softmax(self):
        """The log-softmax the sampler uses on logits rows [S, V], or None for torch's own (native, torch)."""
        if self.name != "triton":
            return None
        from resilient_moe.kernels.log_softmax import log_softmax

        return log_softmax

    def expert_bank(self, num_experts: int, activation: str, alpha: float, limit: float, device: torch.device):
        """An empty bank of one layer's routed experts for the grouped GEMM (triton kernels)."""
        from resilient_moe.kernels.fused_moe import ExpertBank

        return ExpertBank(num_experts, activation, alpha, limit, device)

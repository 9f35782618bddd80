"""The expert side of an MoE model: any subset of the routed experts, for any layers.

An expert worker holds one of these. It keeps no state across calls (DESIGN.md: EW work is
idempotent), so the same rows sent to any holder of an expert give the same bits back. Everything an
expert computes lives here (biases, GPT-OSS's clamped SwiGLU), so a disaggregated expert worker and
the colocated engine run the same code; the router's weights are applied on the attention side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from resilient_moe.errors import ExpertUnavailableError
from resilient_moe.model import ops
from resilient_moe.model.checkpoint import Checkpoint

ExpertKey = tuple[int, int]  # (layer, expert)


class ExpertSide:
    """Routed experts held in memory, keyed by (layer, expert); computes grouped expert MLPs."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        experts: Iterable[ExpertKey] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.device = torch.device(device)
        self._weights: dict[ExpertKey, tuple[ops.Linear, ops.Linear]] = {}  # gate_up [2F, D], down [D, F]
        self.experts = checkpoint.cfg.experts
        self.load(checkpoint.names.expert_shapes if experts is None else experts)

    def load(self, experts: Iterable[ExpertKey]) -> None:
        """Read the given experts' tensors from the checkpoint (only those; skips ones already held)."""
        wanted = [key for key in experts if key not in self._weights]
        for key in wanted:
            if key not in self.checkpoint.names.expert_shapes:
                raise ExpertUnavailableError(f"expert {key[1]} of layer {key[0]} does not exist in this model")
        for layer, expert in wanted:
            w = self.checkpoint.load_expert(self.checkpoint.names.expert(layer, expert), self.dtype, self.device)
            self._weights[(layer, expert)] = (ops.Linear(w.gate_up, w.gate_up_bias), ops.Linear(w.down, w.down_bias))

    def drop(self, experts: Iterable[ExpertKey]) -> None:
        for key in experts:
            self._weights.pop(key, None)

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._weights

    @property
    def held(self) -> list[ExpertKey]:
        return sorted(self._weights)

    @property
    def nbytes(self) -> int:
        return sum(gate_up.nbytes + down.nbytes for gate_up, down in self._weights.values())

    @property
    def held_set(self) -> set[ExpertKey]:
        """The (layer, expert) pairs held, for membership checks (not a copy: do not modify)."""
        return self._weights.keys()  # type: ignore[return-value]

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                between: Callable[[], None] | None = None) -> torch.Tensor:
        """x [N, D], expert_ids [N] -> y [N, D], row i computed by expert expert_ids[i] of `layer`.
        `between` is called after each expert's rows (an expert worker answers probes there)."""
        order = torch.argsort(expert_ids, stable=True)  # [N]
        grouped_ids, counts = torch.unique_consecutive(expert_ids[order], return_counts=True)
        xs = x[order]  # [N, D] grouped by expert
        ys = torch.empty_like(xs)
        start = 0
        for expert, count in zip(grouped_ids.tolist(), counts.tolist()):
            weights = self._weights.get((layer, expert))
            if weights is None:
                raise ExpertUnavailableError(f"expert {expert} of layer {layer} is not held here")
            ys[start : start + count] = self._mlp(xs[start : start + count], *weights)
            start += count
            if between is not None:
                between()
        y = torch.empty_like(x)
        y[order] = ys
        return y

    def _mlp(self, x: torch.Tensor, gate_up: ops.Linear, down: ops.Linear) -> torch.Tensor:
        """One expert on its rows x [n, D] -> [n, D]."""
        if self.experts.activation == "clamped_swiglu":
            return ops.clamped_swiglu(x, gate_up, down, self.experts.swiglu_alpha, self.experts.swiglu_limit)
        return ops.swiglu(x, gate_up, down)

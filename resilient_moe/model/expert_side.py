"""The expert side of an MoE model: any subset of the routed experts, for any layers.

An expert worker holds one of these. It keeps no state across calls (DESIGN.md: EW work is
idempotent), so the same rows sent to any holder of an expert give the same bits back. Everything an
expert computes lives here (biases, GPT-OSS's clamped SwiGLU), so a disaggregated expert worker and
the colocated engine run the same code; the router's weights are applied on the attention side.

With the native and torch kernels each expert is its own pair of linear layers, run one expert at a
time; with the triton kernels a layer's experts are stacked in one `ExpertBank` and run as one
grouped GEMM (kernels/fused_moe.py). Experts may live on a GPU while the rows come from the host
(frames are host memory): `forward` then stages them through pinned memory both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from resilient_moe import staging
from resilient_moe.errors import ExpertUnavailableError
from resilient_moe.model import ops
from resilient_moe.model.weights import Checkpoint, ExpertWeights
from resilient_moe.model.kernel_choice import KernelSet

if TYPE_CHECKING:
    from resilient_moe.kernels.fused_moe import ExpertBank

ExpertKey = tuple[int, int]  # (layer, expert)
# An expert read for `install`: packed linear layers (gate_up, down) for per-expert kernels, the raw
# weights for grouped kernels (stacked into the layer's bank when installed).
Prepared = tuple[ops.Linear, ops.Linear] | ExpertWeights
BETWEEN_FLOPS = 1 << 27  # work between two `between` calls of an expert worker: a few ms, well inside a probe interval


class ExpertSide:
    """Routed experts held in memory, keyed by (layer, expert); computes grouped expert MLPs."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        experts: Iterable[ExpertKey] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kernels: KernelSet | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.device = torch.device(device)
        self.kernels = kernels or KernelSet()
        # Per-expert kernels: (gate_up [2F, D], down [D, F]) linear layers. Grouped kernels: the layer's bank.
        self._weights: dict[ExpertKey, tuple[ops.Linear, ops.Linear] | ExpertBank] = {}
        self._banks: dict[int, ExpertBank] = {}  # layer -> its experts stacked (grouped kernels)
        self.experts = checkpoint.cfg.experts
        # Every expert is a native float32 linear pair: a layer runs as two native group calls.
        self.native = not self.kernels.grouped_experts and self.kernels.name == "native" and ops.native_linear(dtype, self.device)
        self.load(checkpoint.names.expert_shapes if experts is None else experts)

    def load(self, experts: Iterable[ExpertKey]) -> None:
        """Read the given experts' tensors from the checkpoint and hold them (skips ones already held)."""
        self.install(self.read(experts))

    def read(self, experts: Iterable[ExpertKey]) -> dict[ExpertKey, Prepared]:
        """The given experts not held yet, read from the checkpoint and prepared for the kernels (per-
        expert kernels: packed linear layers). Changes nothing here, so an expert worker reads new
        experts on another thread while this side computes."""
        wanted = [key for key in dict.fromkeys(experts) if key not in self._weights]
        for key in wanted:
            if key not in self.checkpoint.names.expert_shapes:
                raise ExpertUnavailableError(f"expert {key[1]} of layer {key[0]} does not exist in this model")
        out: dict[ExpertKey, Prepared] = {}
        for layer, expert in wanted:
            w = self._read(layer, expert)
            linear = self.kernels.linear
            out[(layer, expert)] = w if self.kernels.grouped_experts else \
                (linear(w.gate_up, w.gate_up_bias), linear(w.down, w.down_bias))
        return out

    def install(self, prepared: dict[ExpertKey, Prepared]) -> None:
        """Hold experts that `read` returned (on the thread that computes: grouped kernels restack)."""
        fresh = {key: p for key, p in prepared.items() if key not in self._weights}
        if self.kernels.grouped_experts:
            self._add_to_banks(fresh)  # type: ignore[arg-type]
        else:
            self._weights.update(fresh)  # type: ignore[arg-type]

    def _read(self, layer: int, expert: int) -> ExpertWeights:
        return self.checkpoint.load_expert(self.checkpoint.names.expert(layer, expert), self.dtype, self.device)

    def _add_to_banks(self, weights: dict[ExpertKey, ExpertWeights]) -> None:
        """Stack the experts into their layers' banks, a layer at a time (one restack per layer)."""
        by_layer: dict[int, dict[int, ExpertWeights]] = {}
        for (layer, expert), w in weights.items():
            by_layer.setdefault(layer, {})[expert] = w
        cfg = self.checkpoint.cfg
        for layer, experts in by_layer.items():
            bank = self._banks.get(layer)
            if bank is None:
                bank = self._banks[layer] = self.kernels.expert_bank(
                    cfg.num_experts, self.experts.activation, self.experts.swiglu_alpha, self.experts.swiglu_limit,
                    self.device)
            bank.add(experts)
            for expert in experts:
                self._weights[(layer, expert)] = bank

    def drop(self, experts: Iterable[ExpertKey]) -> None:
        for key in experts:
            held = self._weights.pop(key, None)
            if held is not None and self.kernels.grouped_experts:
                held.remove([key[1]])

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._weights

    @property
    def held(self) -> list[ExpertKey]:
        return sorted(self._weights)

    @property
    def nbytes(self) -> int:
        if self.kernels.grouped_experts:
            return sum(bank.nbytes for bank in self._banks.values())
        return sum(gate_up.nbytes + down.nbytes for gate_up, down in self._weights.values())

    @property
    def held_set(self) -> set[ExpertKey]:
        """The (layer, expert) pairs held, for membership checks (not a copy: do not modify)."""
        return self._weights.keys()  # type: ignore[return-value]

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                between: Callable[[], None] | None = None) -> torch.Tensor:
        """x [N, D], expert_ids [N] -> y [N, D], row i computed by expert expert_ids[i] of `layer`.
        `between` is called after each expert's rows (an expert worker answers probes there), or after
        the grouped kernels. y is on x's device: rows from the host come back to the host."""
        if x.device.type != self.device.type:
            y = self.forward(layer, staging.to_device(x, self.device), expert_ids.to(self.device), between)
            return staging.to_host(y)
        if self.kernels.grouped_experts:
            return self._forward_grouped(layer, x, expert_ids, between)
        if self.native and x.dtype == torch.float32 and x.device.type == "cpu":
            return self._forward_native(layer, x, expert_ids, between)
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

    def _forward_native(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                        between: Callable[[], None] | None) -> torch.Tensor:
        """The layer's experts as two native calls (every gate_up product, then every down product), so
        threads share the whole layer instead of one few-row product at a time; each row's bits are those
        of its expert alone. With `between` (an expert worker answering probes), experts go in groups of
        about BETWEEN_FLOPS of work, `between` called after each."""
        order = torch.argsort(expert_ids, stable=True)  # [N]
        grouped_ids, counts = torch.unique_consecutive(expert_ids[order], return_counts=True)
        xs = x[order]  # [N, D] grouped by expert
        ys = torch.empty_like(xs)
        experts = []  # (weights, first row, rows)
        start = 0
        for expert, count in zip(grouped_ids.tolist(), counts.tolist()):
            weights = self._weights.get((layer, expert))
            if weights is None:
                raise ExpertUnavailableError(f"expert {expert} of layer {layer} is not held here")
            experts.append((weights, start, count))
            start += count
        groups = [experts]
        if between is not None:
            groups, work = [[]], 0
            for item in experts:
                gate_up, down = item[0]
                if groups[-1] and work >= BETWEEN_FLOPS:
                    groups.append([])
                    work = 0
                groups[-1].append(item)
                work += 2 * item[2] * (gate_up.out_features * gate_up.in_features + down.out_features * down.in_features)
        for group in groups:
            lo = group[0][1]
            hi = group[-1][1] + group[-1][2]
            h = xs.new_empty((hi - lo, group[0][0][0].out_features))  # [n, 2F]
            ops.linear_group([(gate_up, xs[a : a + n], h[a - lo : a - lo + n]) for (gate_up, _), a, n in group])
            act = self._activation(h)  # [n, F]
            ops.linear_group([(down, act[a - lo : a - lo + n], ys[a : a + n]) for (_, down), a, n in group])
            if between is not None:
                between()
        y = torch.empty_like(x)
        y[order] = ys
        return y

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        """The experts' activation of fused gate/up outputs h [n, 2F] -> [n, F]."""
        if self.experts.activation == "clamped_swiglu":
            return ops.clamped_gate(h, self.experts.swiglu_alpha, self.experts.swiglu_limit)
        return ops.silu_gate(h)

    def _forward_grouped(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                         between: Callable[[], None] | None) -> torch.Tensor:
        bank = self._banks.get(layer)
        if bank is None:
            raise ExpertUnavailableError(f"expert {int(expert_ids[0])} of layer {layer} is not held here")
        slots = bank.slot_of[expert_ids]  # [N]
        if len(bank.experts) < self.checkpoint.cfg.num_experts:  # some live elsewhere: name one a row wants
            missing = expert_ids[slots < 0]  # (a host sync; a layer held whole, as colocated, needs none)
            if missing.numel():
                raise ExpertUnavailableError(f"expert {int(missing[0])} of layer {layer} is not held here")
        y = bank(x, slots)  # [N, D]
        if between is not None:
            between()
        return y

    def _mlp(self, x: torch.Tensor, gate_up: ops.Linear, down: ops.Linear) -> torch.Tensor:
        """One expert on its rows x [n, D] -> [n, D]."""
        return down(self._activation(gate_up(x)))

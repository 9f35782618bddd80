"""T_a, T_e and T_c of one micro-batch: fitted to a profile of this host, or from a roofline. Pure.

Letters: b tokens of one micro-batch on one attention worker (AW), ctx the context length, n the
tokens one expert worker (EW) receives in one round (from every AW), x the experts an EW serves, K
top-k, E experts, D hidden, tp the accelerators one worker spans.

- attention(b, ctx, tp): one micro-batch through the attention side of one sparse layer (norms,
  attention, router, and the dense parts, LM head and sampler spread over the sparse layers).
- step_overhead(): an AW's per-step time outside the layers (scheduling, publishing, checkpoint copies).
- expert(n, x, tp): one EW's round over the rows of n tokens for its x experts: n·K·x/E rows, and
  x·(1 - (1 - K/E)^n) experts with at least one row (each token picks K of E at random).
- link(rows): T_c, the transfer part of one micro-batch's round trip to one EW (rows [rows, D] out
  and back), whatever the EW computes meanwhile.

Uniform routing is assumed: a model whose router prefers some experts loads their workers more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from resilient_moe.planner.hardware import Accelerator
from resilient_moe.planner.shape import ModelShape

# Roofline efficiencies: share of peak a decode kernel reaches (assumptions, not measured here).
MEMORY_EFFICIENCY = 0.7
COMPUTE_EFFICIENCY = 0.6
KERNEL_OVERHEAD_S = 20e-6  # per micro-batch per layer and side: launches, routing, (de)quantize
STEP_OVERHEAD_S = 50e-6  # per step on the attention side: scheduler, sampler, output
LINK_LATENCY_S = 10e-6  # one-way, RDMA point-to-point (MegaScale-Infer's M2N)
ALL_REDUCE_LATENCY_S = 8e-6


def active_experts(n: float, x: float, top_k: int, num_experts: int) -> float:
    """Expected experts among x with at least one of n tokens' rows (uniform top-k routing)."""
    return x * (1.0 - (1.0 - top_k / num_experts) ** n)


def precision_bytes(precision: str) -> int:
    """Bytes per weight element: fp8 1, bf16 2, float32 4."""
    return {"fp8": 1, "bf16": 2, "bfloat16": 2, "float32": 4}[precision]


@dataclass(frozen=True)
class Roofline:
    """Times from an accelerator's datasheet and the model's shapes: the slower of reading the bytes at
    MEMORY_EFFICIENCY of peak bandwidth and computing the FLOPs at COMPUTE_EFFICIENCY of peak, plus a
    kernel overhead. Tensor parallelism over tp accelerators splits weights and FLOPs, splits the KV
    of GQA over at most its kv heads (latent attention's one latent is read whole by every rank), and
    adds two all-reduces of the activations per layer over the node's GPU links. KV and activations
    are bf16; weights are `precision`."""

    acc: Accelerator
    shape: ModelShape
    precision: str = "bf16"

    @property
    def weight_bytes(self) -> int:
        return precision_bytes(self.precision)

    def _time(self, nbytes: float, flops: float) -> float:
        return max(nbytes / (self.acc.memory_bw * MEMORY_EFFICIENCY),
                   flops / (self.acc.peak_flops(self.precision) * COMPUTE_EFFICIENCY)) + KERNEL_OVERHEAD_S

    def _all_reduce(self, rows: float, tp: int) -> float:
        if tp <= 1:
            return 0.0
        return ALL_REDUCE_LATENCY_S + 2 * (tp - 1) / tp * rows * self.shape.hidden * 2 / self.acc.intra_node_bw

    def attention(self, b: float, ctx: float, tp: int = 1) -> float:
        s = self.shape
        per_layer = 1.0 / s.sparse_layers
        kv_split = min(tp, s.kv_heads)
        weights = s.read_params * self.weight_bytes * per_layer / tp
        kv = b * s.attended(ctx) * s.kv_row * 2 * per_layer / kv_split
        flops = b * (2 * s.read_params + 2 * s.heads * s.score_width * s.attended(ctx)) * per_layer / tp
        dense_layers = s.num_layers / s.sparse_layers  # all-reduces per sparse layer: 2 per layer of the model
        return self._time(weights + kv, flops) + 2 * dense_layers * self._all_reduce(b, tp)

    def step_overhead(self) -> float:
        return STEP_OVERHEAD_S

    def expert(self, n: float, x: float, tp: int = 1) -> float:
        s = self.shape
        if n <= 0 or x <= 0:
            return 0.0
        rows = n * s.top_k * x / s.num_experts
        active = active_experts(n, x, s.top_k, s.num_experts)
        nbytes = active * s.expert_params * self.weight_bytes / tp + 2 * rows * s.hidden * 2
        flops = 2 * s.expert_params * rows / tp
        return self._time(nbytes, flops) + self._all_reduce(rows, tp)

    def nic(self, tp: int) -> float:
        return self.acc.nic_bw * tp


@dataclass(frozen=True)
class LinkFit:
    """T_c of one frame's round trip over one transport: latency + bytes (one way) x seconds per byte."""

    latency_s: float
    s_per_byte: float

    def time(self, nbytes: float) -> float:
        return self.latency_s + self.s_per_byte * nbytes


@dataclass(frozen=True)
class FittedHost:
    """Times fitted to a profile of this host (profile.py), per worker on `cores` cores (the profile's
    own worker size; more cores are assumed to speed a worker up in proportion, fewer to slow it down).

    attention(b, ctx) = a0 + a1·b + a2·b·ctx; step_overhead() = s0;
    expert(n, x) = f0 + c0·(experts with rows) + c1·rows; link(rows) = the fitted transport's time.
    How these compose into a step on this host (cores shared, frames merged) is simulate.py's part;
    `pipeline_lag_s` and `sharing_slowdown` are its two measured parameters."""

    shape: ModelShape
    a0: float
    a1: float
    a2: float
    s0: float
    f0: float
    c0: float
    c1: float
    links: dict[str, LinkFit] = field(default_factory=dict)
    cores: int = 1
    dtype: str = "float32"
    pipeline_lag_s: float = 0.0
    sharing_slowdown: float = 1.0

    @property
    def weight_bytes(self) -> int:
        return precision_bytes(self.dtype)

    def attention(self, b: float, ctx: float, tp: int = 1, cores: float | None = None) -> float:
        scale = self.cores / (cores or self.cores)
        return (self.a0 + self.a1 * b + self.a2 * b * ctx) * scale

    def step_overhead(self) -> float:
        return self.s0

    def expert(self, n: float, x: float, tp: int = 1, cores: float | None = None) -> float:
        s = self.shape
        if n <= 0 or x <= 0:
            return 0.0
        scale = self.cores / (cores or self.cores)
        rows = n * s.top_k * x / s.num_experts
        return (self.f0 + self.c0 * active_experts(n, x, s.top_k, s.num_experts) + self.c1 * rows) * scale

    def link_time(self, rows: float, transport: str) -> float:
        fit = self.links.get(transport) or next(iter(self.links.values()))
        return fit.time(rows * self.shape.hidden * self.weight_bytes)


def roofline_link(aw: Roofline, ew: Roofline, aw_rows: float, ew_rows: float, tp_a: int, tp_e: int) -> float:
    """T_c across nodes: each way, the slower of the AW's NICs sending a micro-batch's rows to every EW
    and one EW's NICs taking its rows from every AW, plus a latency."""
    row_bytes = aw.shape.hidden * 2
    one_way = max(aw_rows * row_bytes / aw.nic(tp_a), ew_rows * row_bytes / ew.nic(tp_e))
    return 2 * (LINK_LATENCY_S + one_way)


def micro_batch_overlap(t_a: float, t_e: float, t_c: float) -> float:
    """Micro-batches needed to hide the round trip: (T_a + T_e + T_c) / max(T_a, T_e). With T_a = T_e = T_f
    and T_c the round trip this is MegaScale-Infer's 2 (1 + T_c'/T_f), T_c' one way."""
    longest = max(t_a, t_e)
    return (t_a + t_e + t_c) / longest if longest > 0 else math.inf

"""The plan search, after MegaScale-Infer's Algorithm 1, with failures counted. Pure: values in, values out.

A layout fixes the hardware of each side, each side's tensor parallelism (accelerators per worker),
the worker counts n_a and n_e, and the micro-batch count m. For one layout and a batch of B
sequences per attention worker (micro-batches of b = B / m):

    T_a = attention(b, ctx)       T_e = expert(n_a·b, experts of the busiest EW)       T_c = link(rows)

On accelerators (MegaScale-Infer's ping-pong assumed to keep the busier side busy, L sparse layers):

    step = max( s0 + L·m·T_a,  L·m·T_e,  s0 + L·(T_a + T_c + T_e) )

the busier side's work, or one micro-batch's round trip when m is too small to hide it
(m < (T_a + T_e + T_c) / max(T_a, T_e)). On this host the step is simulated (simulate.py): workers share
cores, expert workers merge frames of one layer, with the lag and slowdown the profile measured.
TPOT = step; decode throughput = n_a·B / step.

Every constraint grows with B (memory, SLO, failure, checkpoint bandwidth), and throughput per cost
does too, so the best B of a layout is the largest feasible one: found by bisection. A layout whose
throughput at the largest batch searched cannot beat the current top is skipped. (On this host both
hold only roughly: see HOST_BOUND_SLACK.) Layouts are
enumerated as in Algorithm 1 (hardware pair, parallelism of each side, worker counts, m).

Failure domains are worker processes on one host and nodes on a cluster (each side packed densely
into nodes of `per_node` accelerators). `survive` N keeps only plans that, after losing any N domains,
still have a copy of every expert (shadows placed by the controller's own policy,
controller/placement.py), an attention worker left to take the lost requests (restored from KV
checkpoints, so every AW has room for its share of them), and meet the SLO.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field, replace

from resilient_moe.planner.hardware import HOST, Accelerator
from resilient_moe.planner.shape import ModelShape
from resilient_moe.planner.timing import FittedHost, Roofline, roofline_link

MEMORY_SHARE = 0.9  # of an accelerator's (or the host's) memory a plan may fill; the rest: activations, runtime
HOST_STORE_SHARE = 0.5  # of a cluster's host memory the KV stores may take
CHECKPOINT_SHARE = 0.1  # of the host-memory, PCIe and NIC bandwidth KV checkpoints may take
PROCESS_BYTES = 300 << 20  # one worker process of this host beyond its tensors (interpreter, torch, buffers)
BASE_BYTES = 600 << 20  # controller, frontend, KV store process, Redis on this host
BLOCK = 16  # KV cache block (engine default)
MAX_LOSS_SCENARIOS = 256  # combinations of lost domains examined per layout (the first, in order, beyond)
COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# This host's simulated step is not strictly monotone in the batch (frames of one layer merge at an
# expert worker or not, by timing): its bound keeps a margin, and its bisection finds a feasible batch
# at the edge of the feasible ones, not always the largest.
HOST_BOUND_SLACK = 0.1


@dataclass(frozen=True)
class Side:
    """One kind of hardware a side may run on: its specs and its time model. `cores`: this host's
    cores (0 for accelerators)."""

    name: str
    acc: Accelerator
    times: Roofline | FittedHost
    cores: int = 0

    @property
    def is_host(self) -> bool:
        return self.name == HOST


@dataclass(frozen=True)
class PlanRequest:
    """What the user asks for. `batch_size`: concurrent sequences of the whole deployment (None: the
    search picks the largest per attention worker, up to `max_batch_per_worker`). `context`: tokens a
    sequence reaches (KV is sized for it); decode is timed at the mean context (prompt_len + context) / 2."""

    context: int = 2048
    prompt_len: int = 512
    batch_size: int | None = None
    max_batch_per_worker: int = 1024
    slo_tpot_s: float | None = None
    slo_ttft_s: float | None = None
    survive: int = 1
    objective: str = "cost"  # "cost": tokens/s per USD-hour; "accelerator": tokens/s per accelerator
    max_accelerators: int = 128
    micro_batches: tuple[int, ...] = tuple(range(1, 9))
    tensor_parallel: tuple[int, ...] = (1, 2, 4, 8)
    worker_counts: tuple[int, ...] = COUNTS
    host_worker_counts: tuple[int, ...] = (1, 2, 3, 4)
    transport: str = "shm"  # this host's datapath
    prefill_chunk: int = 512
    pairs: tuple[tuple[str, str], ...] = ()  # (attention, expert) hardware; (): every pair of the sides given

    def __post_init__(self) -> None:
        from resilient_moe.planner import PlanError

        if self.objective not in ("cost", "accelerator"):
            raise PlanError(f"objective must be cost or accelerator, got {self.objective!r}")
        for name in ("context", "prompt_len", "max_batch_per_worker", "max_accelerators"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PlanError(f"{name} must be a positive integer, got {value!r}")
        if self.prompt_len > self.context:
            raise PlanError(f"the prompt length ({self.prompt_len}) exceeds the context ({self.context})")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise PlanError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.survive, int) or self.survive < 0:
            raise PlanError(f"survive must be an integer >= 0, got {self.survive!r}")
        for name in ("slo_tpot_s", "slo_ttft_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise PlanError(f"{name} must be positive, got {value!r}")

    @property
    def mean_context(self) -> float:
        return (self.prompt_len + self.context) / 2


@dataclass(frozen=True)
class Layout:
    """Hardware, parallelism, worker counts and micro-batches of one plan."""

    attention: str
    expert: str
    tp_a: int
    tp_e: int
    n_a: int
    n_e: int
    m: int

    def describe(self) -> str:
        def side(n: int, role: str, hw: str, tp: int) -> str:
            return f"{n} {role}" + ("" if hw == HOST else f" {hw}" + (f"×{tp}" if tp > 1 else ""))
        return f"{side(self.n_a, 'AW', self.attention, self.tp_a)} + {side(self.n_e, 'EW', self.expert, self.tp_e)}, m={self.m}"


@dataclass(frozen=True)
class Timing:
    """One operating point: per-token latency, decode throughput and the stage times behind them."""

    tpot_s: float
    tokens_per_s: float
    t_a: float
    t_e: float
    t_c: float
    bottleneck: str  # "attention", "experts", "round trip" (m too small to hide it), "shared cores"


@dataclass(frozen=True)
class AfterLoss:
    """The worst loss of `survive` failure domains: what the plan keeps."""

    lost: tuple[str, ...]  # domains: worker names on one host, node names on a cluster
    tokens_per_s: float
    tpot_s: float
    attention_workers: int  # left; they take every request of the lost ones
    expert_workers: int
    experts_covered: bool  # every expert still has a live copy

    def to_json(self) -> dict:
        return {"lost": list(self.lost), "predicted_tokens_per_s": self.tokens_per_s, "tpot_ms": 1000 * self.tpot_s,
                "attention_workers": self.attention_workers, "expert_workers": self.expert_workers,
                "experts_covered": self.experts_covered}


@dataclass(frozen=True)
class Violation:
    """A constraint a plan breaks: `value` over `limit` (same unit)."""

    constraint: str
    value: float
    limit: float
    detail: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.limit if self.limit > 0 else math.inf


@dataclass(frozen=True)
class Candidate:
    """A layout at one batch, everything the plan predicts for it, and what it breaks (nothing when
    feasible). `binding`: what stops a larger batch (for the winner, the binding constraint)."""

    layout: Layout
    batch: int  # concurrent sequences of the whole deployment
    batch_per_worker: float
    max_num_seqs: int  # per attention worker: its share after the worst loss
    timing: Timing
    ttft_s: float
    cost_per_hour: float
    accelerators: int
    score: float  # the objective: tokens/s per USD-hour, or per accelerator
    memory: dict[str, float]  # bytes per attention worker, per expert worker (per accelerator), host
    shadow_slots: int  # shadow copies per expert worker per sparse layer
    shadow_budget_bytes: int
    kv_store_bytes: int
    kv_replicas: int
    nodes: tuple[int, int]  # attention nodes, expert nodes (1, 1 on this host: one node)
    after_loss: AfterLoss | None
    violations: tuple[Violation, ...] = ()
    binding: str = ""

    @property
    def feasible(self) -> bool:
        return not self.violations

    @property
    def imbalance(self) -> float:
        """|T_a - T_e| / max(T_a, T_e): 0 when the two sides are balanced."""
        t = self.timing
        return abs(t.t_a - t.t_e) / max(t.t_a, t.t_e, 1e-12)


def rank_key(c: Candidate) -> tuple:
    """Best first: higher score (equal to 9 digits counts as equal), then balanced T_a ≈ T_e, then fewer
    accelerators, fewer micro-batches, fewer workers."""
    return (-float(f"{c.score:.9g}"), round(c.imbalance, 9), c.accelerators, c.layout.m, c.layout.n_a + c.layout.n_e,
            c.layout.describe())


@dataclass(frozen=True)
class SearchResult:
    """Feasible candidates best first (one per layout, at its best batch); the closest infeasible one
    (the least violation) when there are none; how many layouts were examined and skipped."""

    candidates: tuple[Candidate, ...]
    closest: Candidate | None
    examined: int
    pruned: int
    request: PlanRequest = field(repr=False, default=PlanRequest())


# ---- failure domains and expert copies -------------------------------------------------------------------


def _domains(names: list[str], per_domain: int, prefix: str) -> list[tuple[str, tuple[str, ...]]]:
    """Workers packed densely into domains of `per_domain` workers: [(domain name, workers)]."""
    return [(f"{prefix}{i // per_domain}", tuple(names[i:i + per_domain])) for i in range(0, len(names), per_domain)]


@functools.lru_cache(maxsize=4096)
def expert_copies(num_experts: int, n_e: int, survive: int, per_node: int) -> tuple[int, tuple[tuple[str, ...], ...]] | None:
    """(shadow slots per worker per layer, copies per expert) of the controller's spread placement that
    puts every expert on `survive` + 1 failure domains (a node of `per_node` workers, or each worker
    when per_node is 1); None when no slot count does."""
    from resilient_moe.controller.placement import spread_placement

    workers = [f"ew-{j}" for j in range(n_e)]
    node_of = {w: f"e{j // per_node}" for j, w in enumerate(workers)} if per_node > 1 else None
    domains = len(workers) if per_node <= 1 else -(-n_e // per_node)
    if survive == 0:
        placement = spread_placement(num_experts, workers, [0], 0)
        return 0, tuple(placement.copies[(0, e)] for e in range(num_experts))
    if domains < survive + 1 or num_experts < n_e:
        return None
    for slots in range(math.ceil(survive * num_experts / n_e), num_experts + 1):
        placement = spread_placement(num_experts, workers, [0], slots, node_of=node_of)
        copies = tuple(placement.copies[(0, e)] for e in range(num_experts))
        where = (lambda w: node_of[w]) if node_of else (lambda w: w)
        if all(len({where(w) for w in holders}) >= survive + 1 for holders in copies):
            return slots, copies
    return None


def _serving(copies: tuple[tuple[str, ...], ...], dead: frozenset[str]) -> dict[str, int] | None:
    """Experts each live worker takes the tokens of (the first live copy takes all under spread);
    None when some expert has no live copy."""
    load: dict[str, int] = {}
    for holders in copies:
        live = [w for w in holders if w not in dead]
        if not live:
            return None
        load[live[0]] = load.get(live[0], 0) + 1
    return load


# ---- one operating point ---------------------------------------------------------------------------------


def _step(shape: ModelShape, req: PlanRequest, aw: Side, ew: Side, layout: Layout, batch_per_aw: float,
          attention: list[str], experts: dict[str, int], cpus: dict[str, tuple[int, ...]] | None) -> Timing:
    """Step time with these live attention workers (each with batch_per_aw sequences) and expert
    workers (each taking the tokens of `experts[name]` experts); `cpus`: this host's core plan."""
    m, L = layout.m, shape.sparse_layers
    b = batch_per_aw / m  # tokens of one micro-batch
    n_round = len(attention) * b  # tokens an expert worker takes per round, from every AW
    ctx = req.mean_context
    s0 = aw.times.step_overhead()
    x_max = max(experts.values())
    if cpus is None:
        # Accelerators: every AW alike, EWs differ only by the experts they serve; MegaScale-Infer's
        # ping-pong assumed to keep the busier side busy.
        t_a = aw.times.attention(b, ctx, layout.tp_a)
        t_e = ew.times.expert(n_round, x_max, layout.tp_e)
        rows_ew = n_round * shape.top_k * x_max / shape.num_experts
        t_c = roofline_link(aw.times, ew.times, b * shape.top_k, rows_ew, layout.tp_a, layout.tp_e)
        busy_a, busy_e = s0 + L * m * t_a, L * m * t_e
        round_trip = s0 + L * (t_a + t_c + t_e)
        step = max(busy_a, busy_e, round_trip)
        if round_trip >= max(busy_a, busy_e):
            bottleneck = "round trip"
        else:
            bottleneck = "experts" if busy_e > busy_a else "attention"
        return Timing(step, len(attention) * batch_per_aw / step, t_a, t_e, t_c, bottleneck)
    # This host: the runtime's step simulated over the fitted stage times (simulate.py).
    from resilient_moe.planner.simulate import simulate_step

    times = aw.times
    memo: dict[tuple, float] = {}

    def cores(name: str) -> int:
        return len(cpus.get(name, ())) or 1

    def t_attention(name: str, tokens: float) -> float:
        key = ("a", cores(name), tokens)
        if key not in memo:
            memo[key] = times.attention(tokens, ctx, cores=key[1])
        return memo[key]

    def t_expert(name: str, tokens: float) -> float:
        key = ("e", cores(name), experts[name], tokens)
        if key not in memo:
            memo[key] = times.expert(tokens, experts[name], cores=key[1])
        return memo[key]

    t_a = max(t_attention(a, b) for a in attention)
    t_e = max(t_expert(e, n_round) for e in experts)
    t_c = times.link_time(b * shape.top_k * x_max / shape.num_experts, req.transport)
    core_of = {name: cpus.get(name, (name,)) for name in (*attention, *experts)}
    sim = simulate_step(L, m, batch_per_aw, attention, list(experts), core_of, t_attention, t_expert, s0,
                        t_c / 2, times.pipeline_lag_s, times.sharing_slowdown)
    top = max(sim.core_busy, key=sim.core_busy.get)
    if sim.core_busy[top] < 0.9:
        bottleneck = "round trip"
    elif len(sim.workers_on[top]) > 1:
        bottleneck = "shared cores"
    else:
        bottleneck = "experts" if sim.workers_on[top][0] in experts else "attention"
    return Timing(sim.step_s, len(attention) * batch_per_aw / sim.step_s, t_a, t_e, t_c, bottleneck)


def _ttft(shape: ModelShape, req: PlanRequest, aw: Side, ew: Side, layout: Layout, x_max: int, decode_step: float) -> float:
    """Time to first token, estimated: the step under way, then the prompt in chunks, each chunk one
    pass of every layer (no pipelining) over its tokens."""
    chunks = math.ceil(req.prompt_len / req.prefill_chunk)
    tokens = min(req.prompt_len, req.prefill_chunk)
    ctx = req.prompt_len / 2
    if aw.is_host:
        t_a = aw.times.attention(tokens, ctx)
        t_e = ew.times.expert(tokens, x_max)
        t_c = aw.times.link_time(tokens * shape.top_k * x_max / shape.num_experts, req.transport)
    else:
        t_a = aw.times.attention(tokens, ctx, layout.tp_a)
        t_e = ew.times.expert(tokens, x_max, layout.tp_e)
        t_c = roofline_link(aw.times, ew.times, tokens * shape.top_k, tokens * shape.top_k * x_max / shape.num_experts,
                            layout.tp_a, layout.tp_e)
    return decode_step + chunks * (aw.times.step_overhead() + shape.sparse_layers * (t_a + t_c + t_e))


# ---- evaluation of one layout at one batch ---------------------------------------------------------------


@dataclass(frozen=True)
class _Fixed:
    """What a layout fixes whatever the batch: domains, expert copies, cores, weight memory."""

    attention: list[str]
    expert_names: list[str]
    attention_domains: list[tuple[str, tuple[str, ...]]]
    expert_domains: list[tuple[str, tuple[str, ...]]]
    copies: tuple[tuple[str, ...], ...] | None
    slots: int
    cpus: dict[str, tuple[int, ...]] | None
    nodes: tuple[int, int]
    problems: tuple[Violation, ...]


def _fixed(shape: ModelShape, req: PlanRequest, aw: Side, ew: Side, layout: Layout) -> _Fixed:
    problems: list[Violation] = []
    attention = [f"aw-{i}" for i in range(layout.n_a)]
    experts = [f"ew-{j}" for j in range(layout.n_e)]
    if aw.is_host:
        from resilient_moe.launch.cpus import cpu_plan

        cpus = cpu_plan(list(range(aw.cores)), attention + experts)
        per_a = per_e = 1
        nodes = (1, 1)
    else:
        cpus = None
        per_a, per_e = max(1, aw.acc.per_node // layout.tp_a), max(1, ew.acc.per_node // layout.tp_e)
        nodes = (-(-layout.n_a // per_a), -(-layout.n_e // per_e))
    a_domains = _domains(attention, per_a, "aw-" if aw.is_host else "a")
    e_domains = _domains(experts, per_e, "ew-" if ew.is_host else "e")
    if aw.is_host:
        a_domains = [(names[0], names) for _, names in a_domains]
        e_domains = [(names[0], names) for _, names in e_domains]
    placed = expert_copies(shape.num_experts, layout.n_e, req.survive, per_e)
    if layout.n_e > shape.num_experts:
        problems.append(Violation("experts: more expert workers than experts", layout.n_e, shape.num_experts))
        placed = None
    if placed is None:
        copies, slots = None, 0
        if layout.n_e <= shape.num_experts:
            problems.append(Violation("failure: expert copies", req.survive + 1, len(e_domains),
                                      f"every expert needs copies in {req.survive + 1} failure domains; "
                                      f"{len(e_domains)} expert domain(s)"))
    else:
        slots, copies = placed
    lost_a = sum(len(ws) for _, ws in sorted(a_domains, key=lambda d: -len(d[1]))[:req.survive])
    if req.survive and lost_a >= layout.n_a:
        problems.append(Violation("failure: attention workers", req.survive + 1, len(a_domains),
                                  f"losing {req.survive} domain(s) would leave no attention worker"))
    return _Fixed(attention, experts, a_domains, e_domains, copies, slots, cpus, nodes, tuple(problems))


def evaluate(shape: ModelShape, sides: dict[str, Side], req: PlanRequest, layout: Layout,
             batch_per_worker: float, fixed: _Fixed | None = None) -> Candidate:
    """Every prediction and constraint of `layout` with `batch_per_worker` sequences per attention worker
    (with a fixed --batch-size: batch_size / n_a, not necessarily whole)."""
    aw, ew = sides[layout.attention], sides[layout.expert]
    fx = fixed or _fixed(shape, req, aw, ew, layout)
    violations = list(fx.problems)
    batch = round(batch_per_worker * layout.n_a)
    wb = aw.times.weight_bytes
    kv_bytes = wb if aw.is_host else 2  # the engine's dtype on this host; bf16 KV on accelerators
    kv_per_token = shape.kv_elements_per_token() * kv_bytes
    context = -(-req.context // BLOCK) * BLOCK

    # Step 1: who is left after the worst loss decides each AW's room (max_num_seqs).
    lost_a = sum(len(ws) for _, ws in sorted(fx.attention_domains, key=lambda d: -len(d[1]))[:req.survive])
    left_a = max(1, layout.n_a - lost_a)
    max_num_seqs = max(1, math.ceil(batch / left_a - 1e-9))

    # Step 2: memory.
    x_primary = -(-shape.num_experts // layout.n_e)
    expert_bytes_layer = shape.expert_params * ew.times.weight_bytes
    ew_bytes = (x_primary + fx.slots) * shape.sparse_layers * expert_bytes_layer
    aw_weights = shape.attention_params * wb
    aw_kv = max_num_seqs * context * kv_per_token
    kv_replicas = 0 if aw.is_host else req.survive
    kv_store = layout.n_a * aw_kv + (1 << 20)
    memory: dict[str, float] = {}
    if aw.is_host:
        total = (layout.n_a * (aw_weights + aw_kv) + layout.n_e * ew_bytes + kv_store
                 + (layout.n_a + layout.n_e) * PROCESS_BYTES + BASE_BYTES)
        memory = {"attention_worker": aw_weights + aw_kv, "expert_worker": ew_bytes, "kv_store": kv_store, "host": total}
        if total > MEMORY_SHARE * aw.acc.memory_bytes:
            violations.append(Violation("memory: host", total, MEMORY_SHARE * aw.acc.memory_bytes,
                                        "weights, KV caches, shadows and the KV store of every process"))
    else:
        per_aw = aw_weights / layout.tp_a + aw_kv / min(layout.tp_a, shape.kv_heads)
        per_ew = ew_bytes / layout.tp_e
        memory = {"attention_worker": per_aw, "expert_worker": per_ew, "kv_store": kv_store * (1 + kv_replicas)}
        if per_aw > MEMORY_SHARE * aw.acc.memory_bytes:
            violations.append(Violation("memory: attention worker", per_aw, MEMORY_SHARE * aw.acc.memory_bytes,
                                        "attention weights and the KV cache, per accelerator"))
        if per_ew > MEMORY_SHARE * ew.acc.memory_bytes:
            violations.append(Violation("memory: expert worker", per_ew, MEMORY_SHARE * ew.acc.memory_bytes,
                                        "experts and their shadow copies, per accelerator"))
        host_memory = (fx.nodes[0] * aw.acc.host_memory_bytes + fx.nodes[1] * ew.acc.host_memory_bytes)
        if memory["kv_store"] > HOST_STORE_SHARE * host_memory:
            violations.append(Violation("memory: KV store", memory["kv_store"], HOST_STORE_SHARE * host_memory,
                                        "KV checkpoints and their replicas in the nodes' host memory"))
        accelerators = layout.n_a * layout.tp_a + layout.n_e * layout.tp_e
        if accelerators > req.max_accelerators:
            violations.append(Violation("accelerators", accelerators, req.max_accelerators, "--max-accelerators"))
    if batch_per_worker < layout.m:
        violations.append(Violation("micro-batches", layout.m, batch_per_worker, "more micro-batches than sequences per AW"))

    # Step 3: time with every worker alive.
    if fx.copies is not None:
        serving = _serving(fx.copies, frozenset()) or {}
    else:
        serving = {name: x_primary for name in fx.expert_names}
    experts = {name: serving.get(name, 0) for name in fx.expert_names}
    timing = _step(shape, req, aw, ew, layout, batch_per_worker, fx.attention, experts, fx.cpus)
    ttft = _ttft(shape, req, aw, ew, layout, max(experts.values()), timing.tpot_s)
    if req.slo_tpot_s is not None and timing.tpot_s > req.slo_tpot_s:
        violations.append(Violation("SLO: TPOT", timing.tpot_s, req.slo_tpot_s, f"bound by {timing.bottleneck}"))
    if req.slo_ttft_s is not None and ttft > req.slo_ttft_s:
        violations.append(Violation("SLO: TTFT", ttft, req.slo_ttft_s))

    # Step 4: KV checkpoint bandwidth.
    rate = timing.tokens_per_s * kv_per_token
    if aw.is_host:
        if rate > CHECKPOINT_SHARE * aw.acc.memory_bw:
            violations.append(Violation("bandwidth: KV checkpoints", rate, CHECKPOINT_SHARE * aw.acc.memory_bw,
                                        "bytes/s written to the KV store"))
    else:
        gpus_per_node = min(aw.acc.per_node, layout.n_a * layout.tp_a)
        node_rate = rate * gpus_per_node / (layout.n_a * layout.tp_a)
        for what, need, limit in (("PCIe", node_rate, aw.acc.pcie_bw), ("NIC", node_rate * kv_replicas, aw.acc.nic_bw)):
            if need > CHECKPOINT_SHARE * limit * gpus_per_node:
                violations.append(Violation("bandwidth: KV checkpoints", need, CHECKPOINT_SHARE * limit * gpus_per_node,
                                            f"bytes/s of one attention node's checkpoints over {what}"))

    # Step 5: the worst loss of `survive` domains.
    after = None
    if req.survive and fx.copies is not None and not any(v.constraint.startswith("failure") for v in violations):
        after = _worst_loss(shape, req, aw, ew, layout, batch, fx)
        if not after.experts_covered:
            violations.append(Violation("failure: expert copies", 1, 0, f"losing {', '.join(after.lost)} leaves "
                                        "an expert with no copy"))
        elif req.slo_tpot_s is not None and after.tpot_s > req.slo_tpot_s:
            violations.append(Violation("failure: TPOT after loss", after.tpot_s, req.slo_tpot_s,
                                        f"after losing {', '.join(after.lost)}"))

    aw_price = aw.acc.price_per_hour
    if aw.is_host:
        cost, accelerators = aw_price, 1
    else:
        cost = layout.n_a * layout.tp_a * aw_price + layout.n_e * layout.tp_e * ew.acc.price_per_hour
        accelerators = layout.n_a * layout.tp_a + layout.n_e * layout.tp_e
    score = timing.tokens_per_s / (cost if req.objective == "cost" else accelerators)
    return Candidate(
        layout=layout, batch=batch, batch_per_worker=batch_per_worker, max_num_seqs=max_num_seqs, timing=timing,
        ttft_s=ttft, cost_per_hour=cost, accelerators=accelerators, score=score, memory=memory,
        shadow_slots=fx.slots, shadow_budget_bytes=fx.slots * shape.sparse_layers * expert_bytes_layer,
        kv_store_bytes=int(kv_store), kv_replicas=kv_replicas, nodes=fx.nodes, after_loss=after,
        violations=tuple(violations))


def _worst_loss(shape: ModelShape, req: PlanRequest, aw: Side, ew: Side, layout: Layout, batch: int,
                fx: _Fixed) -> AfterLoss:
    """Lose every combination of `survive` domains (k attention domains and the rest expert domains,
    at most MAX_LOSS_SCENARIOS of each, in order) and keep the worst: the least throughput left."""
    worst: AfterLoss | None = None
    for k in range(0, min(req.survive, len(fx.attention_domains)) + 1):
        for lost_a in itertools.islice(itertools.combinations(fx.attention_domains, k), MAX_LOSS_SCENARIOS):
            left = [a for a in fx.attention if all(a not in ws for _, ws in lost_a)]
            if not left:
                continue
            combos = itertools.islice(itertools.combinations(fx.expert_domains, req.survive - k), MAX_LOSS_SCENARIOS)
            for lost_e in combos:
                dead = frozenset(w for _, ws in lost_e for w in ws)
                names = tuple(d for d, _ in (*lost_a, *lost_e))
                serving = _serving(fx.copies, dead) if fx.copies is not None else None
                if serving is None:
                    return AfterLoss(names, 0.0, math.inf, len(left), layout.n_e - len(dead), False)
                experts = {n: serving.get(n, 0) for n in fx.expert_names if n not in dead}
                cpus = {n: c for n, c in fx.cpus.items() if n in left or n in experts} if fx.cpus else None
                timing = _step(shape, req, aw, ew, layout, batch / len(left), left, experts, cpus)
                after = AfterLoss(names, timing.tokens_per_s, timing.tpot_s, len(left), len(experts), True)
                if worst is None or (after.tokens_per_s, -after.tpot_s) < (worst.tokens_per_s, -worst.tpot_s):
                    worst = after
    return worst or AfterLoss((), 0.0, math.inf, 0, 0, False)


# ---- the search ------------------------------------------------------------------------------------------


def layouts(shape: ModelShape, sides: dict[str, Side], req: PlanRequest) -> list[Layout]:
    """Every layout the search examines, in Algorithm 1's order: hardware pair, then each side's
    parallelism, worker counts and micro-batches. This host pairs only with itself, with no tensor
    parallelism (a worker's parallelism there is its cores, fixed by the core plan)."""
    pairs = req.pairs or tuple((a, e) for a in sides for e in sides if (a == HOST) == (e == HOST))
    out = []
    for a, e in pairs:
        host = a == HOST
        tps_a = (1,) if host else tuple(t for t in req.tensor_parallel if t <= sides[a].acc.per_node)
        tps_e = (1,) if host else tuple(t for t in req.tensor_parallel if t <= sides[e].acc.per_node)
        counts = req.host_worker_counts if host else req.worker_counts
        for tp_a, tp_e in itertools.product(tps_a, tps_e):
            for n_a, n_e in itertools.product(counts, counts):
                if n_e > shape.num_experts:
                    continue
                if not host and n_a * tp_a + n_e * tp_e > req.max_accelerators:
                    continue
                for m in req.micro_batches:
                    out.append(Layout(a, e, tp_a, tp_e, n_a, n_e, m))
    return out


def _first_failure(c: Candidate) -> str:
    return c.violations[0].constraint if c.violations else ""


def best_batch(shape: ModelShape, sides: dict[str, Side], req: PlanRequest, layout: Layout,
               fixed: _Fixed | None = None) -> Candidate:
    """The layout at its best batch: the fixed --batch-size, else the largest feasible batch per
    attention worker (bisection: every constraint only tightens as the batch grows). Infeasible at its
    smallest batch: that candidate, with its violations."""
    aw, ew = sides[layout.attention], sides[layout.expert]
    fx = fixed or _fixed(shape, req, aw, ew, layout)
    if req.batch_size is not None:
        c = evaluate(shape, sides, req, layout, req.batch_size / layout.n_a, fx)
        return replace(c, binding="batch size fixed (--batch-size)") if c.feasible else c
    lo, hi = layout.m, req.max_batch_per_worker
    if lo > hi:
        return evaluate(shape, sides, req, layout, lo, fx)
    first = evaluate(shape, sides, req, layout, lo, fx)
    if not first.feasible:
        return first
    top = evaluate(shape, sides, req, layout, hi, fx)
    if top.feasible:
        return replace(top, binding="largest batch searched (--max-batch-per-worker)")
    best, failing = first, top
    while hi - lo > 1:  # invariant: lo feasible, hi not
        mid = (lo + hi) // 2
        c = evaluate(shape, sides, req, layout, mid, fx)
        if c.feasible:
            lo, best = mid, c
        else:
            hi, failing = mid, c
    return replace(best, binding=_first_failure(failing))


def search(shape: ModelShape, sides: dict[str, Side], req: PlanRequest, top: int = 10) -> SearchResult:
    """The `top` best feasible candidates (one per layout), best first, and the closest infeasible one."""
    kept: list[Candidate] = []
    closest: Candidate | None = None
    examined = pruned = 0
    for layout in layouts(shape, sides, req):
        examined += 1
        aw, ew = sides[layout.attention], sides[layout.expert]
        fx = _fixed(shape, req, aw, ew, layout)
        if len(kept) >= top and req.batch_size is None:
            # Bound: the score at the largest batch searched, ignoring every constraint, is the most
            # this layout can reach (the score grows with the batch).
            bound = evaluate(shape, sides, req, layout, req.max_batch_per_worker, fx)
            slack = HOST_BOUND_SLACK if aw.is_host else 1e-9
            if bound.score * (1 + slack) < kept[-1].score:
                pruned += 1
                continue
        c = best_batch(shape, sides, req, layout, fx)
        if c.feasible:
            kept.append(c)
            kept.sort(key=rank_key)
            del kept[top:]
        elif closest is None or _distance(c) < _distance(closest):
            closest = c
    return SearchResult(tuple(kept), None if kept else closest, examined, pruned, req)


STRUCTURAL = ("failure: attention workers", "failure: expert copies", "experts: more expert workers than experts",
              "accelerators")


def _distance(c: Candidate) -> tuple[int, float]:
    """How far an infeasible candidate is from feasible: first how many of its violations no batch can
    mend (the layout's failure domains, its size), then its worst violation ratio."""
    structural = sum(1 for v in c.violations if v.constraint in STRUCTURAL)
    worst = max(v.ratio for v in c.violations)
    return structural, worst if math.isfinite(worst) else 1e18


# ---- the colocated baseline ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Colocated:
    """The colocated baseline on one kind of accelerator: g accelerators each run attention for B
    sequences (data parallel) and E/g of the experts (expert parallel), one after the other, with an
    all-to-all each way over the node's links (the NIC beyond one node). No failure constraints."""

    hardware: str
    accelerators: int
    batch_per_accelerator: int
    tpot_s: float
    tokens_per_s: float
    cost_per_hour: float

    @property
    def per_accelerator(self) -> float:
        return self.tokens_per_s / self.accelerators

    @property
    def per_cost(self) -> float:
        return self.tokens_per_s / self.cost_per_hour


def colocated(shape: ModelShape, side: Side, req: PlanRequest) -> Colocated | None:
    """The best colocated deployment on `side` by the request's objective, under its TPOT SLO and
    memory; None when none fits."""
    t = side.times
    assert isinstance(t, Roofline), "the colocated baseline on this host is measured, not modelled"
    best = None
    for g in req.worker_counts:
        if g > req.max_accelerators:
            continue
        x = -(-shape.num_experts // g)
        weights = shape.attention_params * t.weight_bytes + x * shape.sparse_layers * shape.expert_params * t.weight_bytes
        room = MEMORY_SHARE * side.acc.memory_bytes - weights
        per_seq = -(-req.context // BLOCK) * BLOCK * shape.kv_elements_per_token() * 2
        b_mem = int(room // per_seq) if room > 0 else 0
        b_max = min(b_mem, req.max_batch_per_worker)
        if b_max < 1:
            continue
        link = side.acc.intra_node_bw if g <= side.acc.per_node else side.acc.nic_bw

        def step(b: int) -> float:
            t_a = t.attention(b, req.mean_context)
            t_e = t.expert(g * b, x)
            t_c = 0.0 if g == 1 else 2 * (2e-6 + b * shape.top_k * shape.hidden * 2 * (g - 1) / g / link)
            return t.step_overhead() + shape.sparse_layers * (t_a + t_c + t_e)

        lo, hi = 1, b_max
        if req.slo_tpot_s is not None and step(1) > req.slo_tpot_s:
            continue
        if req.slo_tpot_s is None or step(hi) <= req.slo_tpot_s:
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if step(mid) <= req.slo_tpot_s:
                lo = mid
            else:
                hi = mid
        s = step(lo)
        c = Colocated(side.name, g, lo, s, g * lo / s, g * side.acc.price_per_hour)
        key = c.per_cost if req.objective == "cost" else c.per_accelerator
        if best is None or key > (best.per_cost if req.objective == "cost" else best.per_accelerator):
            best = c
    return best

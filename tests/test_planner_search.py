"""The plan search as pure functions, on synthetic profiles and hardware (no processes).

- it finds what brute force over every layout and batch finds, on this host's kind of plan and on
  heterogeneous accelerators;
- every plan it returns meets every constraint (a hypothesis property), re-checked independently:
  SLO, memory, micro-batches, expert copies through the controller's own placement and routing table;
- it prefers balanced T_a ≈ T_e when costs are equal;
- --survive 1 never returns a plan with an expert in one failure domain only (workers on a host,
  nodes on a cluster), nor one whose SLO fails with any one domain fewer.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_moe.controller.placement import routing_table, spread_placement
from resilient_moe.launch.cpus import cpu_plan
from resilient_moe.planner import PlanError
from resilient_moe.planner.hardware import HOST, Accelerator, host_accelerator, resolve
from resilient_moe.planner.search import (MEMORY_SHARE, Layout, PlanRequest, Side, _step, evaluate, layouts, rank_key,
                                          search)
from resilient_moe.planner.shape import ModelShape
from resilient_moe.planner.timing import FittedHost, LinkFit, Roofline

SHAPE = ModelShape(name="synthetic", family="mixtral", num_layers=4, sparse_layers=4, hidden=64, num_experts=8,
                   top_k=2, vocab=512, attention_params=200_000, read_params=170_000, expert_params=3 * 64 * 128,
                   kv_row=64, kv_heads=2, heads=4, score_width=32, windows=(None,) * 4, max_context=4096)


def host_side(cores: int = 2, memory: float = 8e9, **coefficients) -> dict[str, Side]:
    c = dict(a0=1e-3, a1=5e-5, a2=1e-7, s0=1e-3, f0=1e-4, c0=2e-4, c1=1.5e-5, pipeline_lag_s=1e-3, sharing_slowdown=1.2)
    c.update(coefficients)
    times = FittedHost(SHAPE, **c, links={"shm": LinkFit(2e-4, 5e-10)}, cores=1)
    acc = host_accelerator({"cores": cores, "memory_bytes": memory, "fma_flops": 1e11, "stream_bw": 2e10, "cpu": "test"})
    return {HOST: Side(HOST, acc, times, cores=cores)}


def gpu_sides(per_node: int = 2) -> dict[str, Side]:
    """Two synthetic accelerators: 'fast' has bandwidth, 'cheap' has compute per dollar; small memories
    so that memory binds, and nodes of `per_node`."""
    fast = Accelerator("fast", "fast", 2e8, 2e12, 2e14, None, 1e11, 1e10, 1e10, per_node, 1e12, 4.0)
    cheap = Accelerator("cheap", "cheap", 1e8, 5e11, 4e14, None, 3e10, 5e9, 5e9, per_node, 1e12, 1.0)
    return {a.name: Side(a.name, a, Roofline(a, SHAPE)) for a in (fast, cheap)}


def brute_force(sides: dict[str, Side], req: PlanRequest) -> list:
    """Every layout at every batch; per layout its best feasible candidate; all ranked."""
    best = []
    for layout in layouts(SHAPE, sides, req):
        if req.batch_size is not None:
            options = [evaluate(SHAPE, sides, req, layout, req.batch_size / layout.n_a)]
        else:
            options = [evaluate(SHAPE, sides, req, layout, b) for b in range(1, req.max_batch_per_worker + 1)]
        feasible = [c for c in options if c.feasible]
        if feasible:
            best.append(max(feasible, key=lambda c: (c.score, c.batch)))
    return sorted(best, key=rank_key)


def same(a, b) -> bool:
    return a.layout == b.layout and a.batch == b.batch and math.isclose(a.score, b.score, rel_tol=1e-12)


@pytest.mark.parametrize("survive,slo_ms", [(0, None), (0, 40.0), (1, 40.0), (1, None), (2, 60.0)])
def test_search_agrees_with_brute_force_on_this_host(survive, slo_ms):
    """At a fixed batch the search is exact; with the batch searched, this host's simulated step is
    not strictly monotone in the batch, so the bisection's batch may fall short of the best one."""
    sides = host_side(cores=2)
    req = PlanRequest(context=256, prompt_len=32, max_batch_per_worker=24, slo_tpot_s=slo_ms and slo_ms / 1e3,
                      survive=survive, host_worker_counts=(1, 2, 3), micro_batches=(1, 2, 3))
    fixed = dataclasses.replace(req, batch_size=24)
    expected = brute_force(sides, fixed)
    got = search(SHAPE, sides, fixed, top=5)
    assert expected, "the grid must have feasible plans"
    assert len(got.candidates) == min(5, len(expected))
    for a, b in zip(got.candidates, expected):
        assert same(a, b), (a.layout, a.batch, a.score, b.layout, b.batch, b.score)
    expected = brute_force(sides, req)
    got = search(SHAPE, sides, req, top=5)
    assert got.candidates and got.candidates[0].score >= 0.9 * expected[0].score
    best_of = {c.layout: c for c in expected}
    for c in got.candidates:
        assert c.feasible and c.score >= 0.9 * best_of[c.layout].score


@pytest.mark.parametrize("survive,batch", [(0, None), (1, None), (1, 24)])
def test_search_agrees_with_brute_force_on_heterogeneous_accelerators(survive, batch):
    sides = gpu_sides()
    req = PlanRequest(context=512, prompt_len=64, max_batch_per_worker=48, batch_size=batch, slo_tpot_s=2e-3,
                      survive=survive, worker_counts=(1, 2, 4), tensor_parallel=(1, 2), micro_batches=(1, 2),
                      max_accelerators=16)
    expected = brute_force(sides, req)
    got = search(SHAPE, sides, req, top=8)
    assert expected
    assert any(c.layout.attention != c.layout.expert for c in expected)  # heterogeneous plans compete
    for a, b in zip(got.candidates, expected):
        assert same(a, b), (a.layout, a.batch, a.score, b.layout, b.batch, b.score)
    if batch is None:
        assert got.pruned > 0  # the bound skipped work and still found the optimum


def test_score_grows_with_batch_so_bisection_is_sound():
    """What the bisection relies on: for one layout on accelerators, score and TPOT only grow with the batch."""
    sides = gpu_sides()
    req = PlanRequest(context=256, prompt_len=32, survive=0)
    for layout in [Layout("fast", "cheap", 1, 1, 1, 1, 1), Layout("cheap", "fast", 2, 1, 2, 3, 2)]:
        points = [evaluate(SHAPE, sides, req, layout, b) for b in range(layout.m, 64)]
        assert all(p.score <= q.score * (1 + 1e-12) for p, q in zip(points, points[1:]))
        assert all(p.timing.tpot_s <= q.timing.tpot_s * (1 + 1e-12) for p, q in zip(points, points[1:]))


def expert_domains_ok(c, survive: int, per_domain: int) -> bool:
    """Independently of the search: the controller's spread placement with the plan's shadow slots
    leaves every expert a live copy after losing any `survive` domains of `per_domain` workers."""
    workers = [f"ew-{j}" for j in range(c.layout.n_e)]
    node_of = {w: f"n{j // per_domain}" for j, w in enumerate(workers)} if per_domain > 1 else None
    placement = spread_placement(SHAPE.num_experts, workers, [0], c.shadow_slots, node_of=node_of)
    domains = sorted({(node_of or {}).get(w, w) for w in workers})
    for lost in itertools.combinations(domains, min(survive, len(domains))):
        dead = {w for w in workers if (node_of or {}).get(w, w) in lost}
        table = routing_table(1, [0], 1, SHAPE.num_experts, placement, dead=dead)
        if any(not table.candidates[e] for e in range(SHAPE.num_experts)):
            return False
    return True


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a0=st.floats(1e-4, 3e-3), a1=st.floats(0, 2e-4), c0=st.floats(1e-5, 1e-3), c1=st.floats(0, 1e-4),
       cores=st.integers(1, 4), memory_gb=st.floats(1.0, 6.0), survive=st.integers(0, 2),
       slo_ms=st.one_of(st.none(), st.floats(10.0, 200.0)), fixed=st.one_of(st.none(), st.integers(1, 40)),
       context=st.integers(64, 4096))
def test_every_plan_meets_every_constraint(a0, a1, c0, c1, cores, memory_gb, survive, slo_ms, fixed, context):
    sides = host_side(cores=cores, memory=memory_gb * 1e9, a0=a0, a1=a1, c0=c0, c1=c1)
    req = PlanRequest(context=context, prompt_len=min(32, context), max_batch_per_worker=32, batch_size=fixed,
                      slo_tpot_s=slo_ms and slo_ms / 1e3, survive=survive, host_worker_counts=(1, 2, 3),
                      micro_batches=(1, 2, 3))
    result = search(SHAPE, sides, req, top=6)
    host = sides[HOST]
    for c in result.candidates:
        again = evaluate(SHAPE, sides, req, c.layout, c.batch_per_worker)
        assert again.feasible and math.isclose(again.score, c.score)
        if req.slo_tpot_s is not None:
            assert c.timing.tpot_s <= req.slo_tpot_s
            if survive:
                assert c.after_loss.tpot_s <= req.slo_tpot_s
        assert c.memory["host"] <= MEMORY_SHARE * host.acc.memory_bytes
        assert c.layout.m <= c.batch_per_worker
        if fixed is not None:
            assert c.batch == fixed
        assert c.max_num_seqs * max(1, c.layout.n_a - survive) >= c.batch
        if survive:
            assert c.layout.n_a > survive and c.layout.n_e > survive
            assert expert_domains_ok(c, survive, 1)
    if not result.candidates:
        assert result.closest is not None and result.closest.violations


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(survive=st.integers(0, 1), slo_ms=st.one_of(st.none(), st.floats(0.5, 20.0)),
       fixed=st.one_of(st.none(), st.integers(1, 64)), per_node=st.integers(1, 4), context=st.integers(64, 2048))
def test_every_accelerator_plan_meets_every_constraint(survive, slo_ms, fixed, per_node, context):
    sides = gpu_sides(per_node=per_node)
    req = PlanRequest(context=context, prompt_len=min(64, context), max_batch_per_worker=64, batch_size=fixed,
                      slo_tpot_s=slo_ms and slo_ms / 1e3, survive=survive, worker_counts=(1, 2, 3, 4),
                      tensor_parallel=(1, 2), micro_batches=(1, 2, 3), max_accelerators=12)
    for c in search(SHAPE, sides, req, top=8).candidates:
        assert evaluate(SHAPE, sides, req, c.layout, c.batch_per_worker).feasible
        assert c.accelerators <= 12 and c.layout.m <= c.batch_per_worker
        assert c.memory["attention_worker"] <= MEMORY_SHARE * sides[c.layout.attention].acc.memory_bytes
        assert c.memory["expert_worker"] <= MEMORY_SHARE * sides[c.layout.expert].acc.memory_bytes
        if req.slo_tpot_s is not None:
            assert c.timing.tpot_s <= req.slo_tpot_s and (not survive or c.after_loss.tpot_s <= req.slo_tpot_s)
        if survive:
            assert c.nodes[0] >= 2 and c.nodes[1] >= 2
            assert expert_domains_ok(c, 1, max(1, per_node // c.layout.tp_e))


def test_balanced_sides_win_when_costs_are_equal():
    """One accelerator kind, equal prices: with four accelerators, T_a and T_e each fall with their
    side's worker count, so 2 AW + 2 EW (T_a = T_e) beats 1 + 3 and 3 + 1."""

    class Linear(Roofline):
        def attention(self, b, ctx, tp=1):
            return 1e-3 * b / tp

        def expert(self, n, x, tp=1):
            return 1e-3 * n * x / SHAPE.num_experts / tp

        def step_overhead(self):
            return 0.0

    acc = Accelerator("even", "even", 1e12, 1e12, 1e15, None, 1e12, 1e12, 1e12, 1, 1e15, 1.0)
    sides = {"even": Side("even", acc, Linear(acc, SHAPE))}
    req = PlanRequest(context=64, prompt_len=8, batch_size=48, survive=0, worker_counts=(1, 2, 3),
                      tensor_parallel=(1,), micro_batches=(4,), max_accelerators=4)
    result = search(SHAPE, sides, req, top=20)
    four = [c for c in result.candidates if c.accelerators == 4]  # equal cost
    best = four[0]
    assert (best.layout.n_a, best.layout.n_e) == (2, 2)
    assert math.isclose(best.timing.t_a, best.timing.t_e, rel_tol=1e-9)
    assert len(four) == 3 and all(c.score < best.score and c.imbalance > best.imbalance for c in four[1:])


def test_equal_scores_rank_the_balanced_plan_first():
    sides = host_side()
    req = PlanRequest(context=128, prompt_len=16, survive=0)
    c = evaluate(SHAPE, sides, req, Layout(HOST, HOST, 1, 1, 1, 1, 1), 8)
    tilted = dataclasses.replace(c, layout=dataclasses.replace(c.layout, n_e=2),
                                 timing=dataclasses.replace(c.timing, t_a=2e-3, t_e=1e-3))
    level = dataclasses.replace(c, layout=dataclasses.replace(c.layout, n_a=2),
                                timing=dataclasses.replace(c.timing, t_a=1.5e-3, t_e=1.5e-3))
    assert sorted([tilted, level], key=rank_key)[0] is level
    assert sorted([level, tilted], key=rank_key)[0] is level


def test_survive_one_on_this_host_keeps_experts_on_two_workers_and_the_slo_with_one_worker_fewer():
    sides = host_side(cores=2)
    unbounded = PlanRequest(context=256, prompt_len=32, batch_size=32, survive=1)
    probe = search(SHAPE, sides, unbounded, top=200).candidates
    # The tightest SLO some plan still meets after its worst loss; plans that meet it only with every
    # worker alive are what survive 1 must drop and survive 0 keeps.
    slo = min(c.after_loss.tpot_s for c in probe) * 1.001
    dropped = next(c for c in probe if c.timing.tpot_s < slo < c.after_loss.tpot_s)
    req = dataclasses.replace(unbounded, slo_tpot_s=slo)
    result = search(SHAPE, sides, req, top=200)
    assert result.candidates
    assert dropped.layout not in {c.layout for c in result.candidates}
    assert dropped.layout in {c.layout for c in search(SHAPE, sides, dataclasses.replace(req, survive=0), top=200).candidates}
    for c in result.candidates:
        assert c.layout.n_a >= 2 and c.layout.n_e >= 2
        assert expert_domains_ok(c, 1, 1)
        workers = [f"ew-{j}" for j in range(c.layout.n_e)]
        placement = spread_placement(SHAPE.num_experts, workers, [0], c.shadow_slots)
        attention = [f"aw-{i}" for i in range(c.layout.n_a)]
        cpus = cpu_plan(list(range(2)), attention + workers)
        for lost in attention + workers:  # every single worker lost, in turn
            dead = {lost}
            table = routing_table(1, [0], 1, SHAPE.num_experts, placement, dead=dead)
            first = [table.candidates[e][0] for e in range(SHAPE.num_experts)]
            serving = {w: first.count(w) for w in workers if w not in dead}
            left = [a for a in attention if a not in dead]
            timing = _step(SHAPE, req, sides[HOST], sides[HOST], c.layout, c.batch / len(left), left, serving,
                           {n: cpus[n] for n in (*left, *serving)})
            assert timing.tpot_s <= slo, (c.layout, lost, timing.tpot_s, slo)
            assert c.after_loss.tokens_per_s <= timing.tokens_per_s * (1 + 1e-9)  # it reports the worst loss


def test_survive_one_on_a_cluster_spreads_every_expert_over_two_nodes():
    sides = gpu_sides(per_node=2)
    req = PlanRequest(context=512, prompt_len=64, max_batch_per_worker=32, survive=1, worker_counts=(1, 2, 3, 4),
                      tensor_parallel=(1,), micro_batches=(1, 2), max_accelerators=16)
    result = search(SHAPE, sides, req, top=10)
    assert result.candidates
    for c in result.candidates:
        assert c.nodes[0] >= 2 and c.nodes[1] >= 2  # a node's loss leaves attention and every expert
        assert expert_domains_ok(c, 1, 2)
        assert c.kv_replicas == 1 and c.after_loss is not None and c.after_loss.experts_covered
    # one node of two EWs is not enough: 2 EWs per node would sit on one node
    assert all(c.layout.n_e >= 3 for c in result.candidates)


def test_survive_excludes_plans_that_lose_their_only_copy():
    """A single expert worker (or attention worker) cannot survive its own loss: survive 1 rules out
    the plan survive 0 picks."""
    sides = host_side(cores=2)
    zero = search(SHAPE, sides, PlanRequest(context=128, prompt_len=16, survive=0, host_worker_counts=(1,)), top=3)
    assert zero.candidates and zero.candidates[0].layout.n_e == 1
    one = search(SHAPE, sides, PlanRequest(context=128, prompt_len=16, survive=1, host_worker_counts=(1,)), top=3)
    assert not one.candidates
    assert one.closest.violations[0].constraint.startswith("failure")


def test_unknown_hardware_and_bad_requests_are_plan_errors():
    with pytest.raises(PlanError, match="unknown hardware 'h300'"):
        resolve(["h300"])
    with pytest.raises(PlanError, match="prompt length"):
        PlanRequest(context=100, prompt_len=200)
    with pytest.raises(PlanError, match="survive"):
        PlanRequest(survive=-1)

"""Controller decisions without processes: placement (pure functions) and the reconcile model
(desired and observed state, orders, rebalancing, scaling), driven with a fake clock and no cluster."""

from __future__ import annotations

import json
from math import ceil

import pytest
import torch

from resilient_moe import procs
from resilient_moe.controller.placement import (
    Placement,
    experts_of,
    imbalance,
    load_aware_placement,
    plan_placement,
    primary_placement,
    routing_table,
    served_after_loss,
    shadow_placement,
    spread_placement,
)
from resilient_moe.controller.records import ControllerSettings, ModelShape, WorkerState
from resilient_moe.controller.state import BUSY_GRACE, ClusterModel
from resilient_moe.controller.view import ClusterView

READY, SUSPECT, FENCED, DRAINING, GONE, STARTING, LOADING = (
    WorkerState.READY, WorkerState.SUSPECT, WorkerState.FENCED, WorkerState.DRAINING, WorkerState.GONE,
    WorkerState.STARTING, WorkerState.LOADING)


def test_contiguous_split_is_uneven_only_by_one():
    placement = primary_placement(8, ["ew-0", "ew-1", "ew-2"])
    assert [experts_of(placement, w) for w in ("ew-0", "ew-1", "ew-2")] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_round_robin_split():
    placement = primary_placement(5, ["a", "b"], "round_robin")
    assert experts_of(placement, "a") == [0, 2, 4] and experts_of(placement, "b") == [1, 3]


def test_placement_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="3 expert workers for 2 experts"):
        primary_placement(2, ["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown placement policy"):
        primary_placement(4, ["a"], "random")
    with pytest.raises(ValueError, match="unknown shadow policy"):
        plan_placement("hot", 4, ["a"], [0], 0)
    with pytest.raises(ValueError, match="cannot hold 8 experts"):
        load_aware_placement({}, 8, ["a", "b"], [0], capacity=3)


def test_routing_table_lists_primary_then_shadows_and_skips_dense_layers():
    copies = {(layer, 0): ("a", "b", "c") for layer in (0, 2)} | {(layer, 1): ("b", "a") for layer in (0, 2)}
    shares = {k: (1.0,) + (0.0,) * (len(v) - 1) for k, v in copies.items()}
    placed = Placement(("a", "b", "c"), copies, shares)
    ert = routing_table(3, [0, 2], 3, 2, placed)
    assert ert.of(0, 0) == ("a", "b", "c") and ert.of(2, 1) == ("b", "a")
    assert ert.of(1, 0) == ()
    assert ert.unserved({"a"}) == []
    assert ert.unserved({"a", "b", "c"}) == [(0, 0), (0, 1), (2, 0), (2, 1)]
    first = ert.routes(["a", "b", "c"], dead={"a"}).first()
    assert first[0].tolist() == [1, 1] and first[1].tolist() == [-1, -1]
    promoted = routing_table(4, [0, 2], 3, 2, placed, dead={"a"})
    assert promoted.of(0, 0) == ("b", "c") and promoted.of(0, 1) == ("b",)
    spared = routing_table(5, [0, 2], 3, 2, placed, draining={"b"})
    assert spared.of(0, 0) == ("a", "c") and spared.of(0, 1) == ("a",), "a draining copy is left out"
    only = Placement(("a", "b"), {(0, 0): ("b",), (0, 1): ("b",)}, {(0, 0): (1.0,), (0, 1): (1.0,)})
    assert routing_table(1, [0], 1, 2, only, draining={"b"}).of(0, 0) == ("b",), "unless it is the last copy"


def test_routes_split_an_experts_rows_by_the_shares_of_its_live_copies():
    placed = Placement(("a", "b", "c"), {(0, 0): ("a", "b", "c"), (0, 1): ("b", "c")},
                       {(0, 0): (0.5, 0.25, 0.25), (0, 1): (1.0, 0.0)})
    ert = routing_table(1, [0], 1, 2, placed)
    experts = torch.tensor([0] * 8 + [1] * 4)
    routes = ert.routes(["a", "b", "c"], dead=set())
    where = routes.destinations(0, experts).tolist()
    assert where[:8] == [0] * 4 + [1] * 2 + [2] * 2, "expert 0: half to a, a quarter each to b and c"
    assert where[8:] == [1] * 4, "expert 1: its standby copy takes nothing while the primary lives"
    without_a = ert.routes(["a", "b", "c"], dead={"a"}).destinations(0, experts).tolist()
    assert without_a[:8] == [1] * 4 + [2] * 4, "the live copies split the shares among themselves"
    without_b = ert.routes(["a", "b", "c"], dead={"b"}).destinations(0, experts).tolist()
    assert without_b[8:] == [2] * 4, "copies with no share take everything once those with one are gone"
    none = ert.routes(["a", "b", "c"], dead={"a", "b", "c"}).destinations(0, experts)
    assert (none == -1).all()
    back = RoutingTableRoundTrip.check(ert)
    assert back.shares_of(0, 0) == (0.5, 0.25, 0.25)


class RoutingTableRoundTrip:
    @staticmethod
    def check(ert):
        from resilient_moe.datapath.routing_table import RoutingTable
        from resilient_moe.proto import controller_pb2 as pb

        back = RoutingTable.from_proto(ert.to_proto(pb))
        assert back == ert
        return back


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_model(clock=None, experts=2, attention=0, num_experts=4, layers=(0, 1), **options):
    options.setdefault("tick_interval_s", 1.0)  # these tests tick rarely, as a 1 s reconcile loop would
    options.setdefault("heartbeat_timeout_s", 1.0)
    liveness = options.pop("liveness", lambda r: procs.UNKNOWN)
    settings = ControllerSettings(attention_workers=attention, expert_workers=experts, **options)
    shape = ModelShape(max(layers) + 1, num_experts, tuple(layers))
    return ClusterModel(shape, settings, clock=clock or FakeClock(), liveness=liveness)


def start(model, name, pid, role=None):
    """Register and ready a worker as a process would, with the experts it is asked for."""
    role = role or {"ew": "expert", "aw": "attention"}.get(name.split("-")[0], "kv_store")
    record = model.register(name, role, int(name.split("-")[-1]) if name[-1].isdigit() else 0, pid=pid, host="h")
    model.ready(name, record.incarnation, model.experts_for(name) if role == "expert" else [], f"addr-{name}")
    model.reconcile()
    return record


def test_the_initial_roster_is_starting_until_it_registers():
    model = make_model(experts=2, attention=1)
    assert {n: r.state for n, r in model.workers.items()} == {"ew-0": STARTING, "ew-1": STARTING, "aw-0": STARTING}
    model.reconcile()
    assert model.orders == {}, "the launcher starts the initial roster; no order for it"
    record = model.register("ew-0", "expert", 0, pid=10, host="h")
    assert model.workers["ew-0"].state == LOADING and record.incarnation == 1
    model.ready("ew-0", 1, model.experts_for("ew-0"), "a")
    assert model.workers["ew-0"].state == READY


def test_registration_gives_fresh_incarnations_and_expert_assignments():
    model = make_model()
    a = model.register("ew-0", "expert", 0, pid=10, host="127.0.0.1")
    b = model.register("ew-1", "expert", 1, pid=11, host="127.0.0.1")
    assert (a.incarnation, b.incarnation) == (1, 2)
    # Primaries 0-1, plus shadows of ew-1's experts 2-3 (two workers: each shadows the other).
    assert model.experts_for("ew-0") == [(layer, e) for layer in (0, 1) for e in range(4)]
    assert model.ert.of(0, 2) == (), "nothing routes to workers that are not serving yet"
    model.ready("ew-0", 1, model.experts_for("ew-0"), "a")
    assert model.ert.of(0, 2) == ("ew-0",), "ew-0's shadow serves until the primary is up"
    model.ready("ew-1", 2, model.experts_for("ew-1"), "b")
    assert model.ert.of(0, 2) == ("ew-1", "ew-0")
    bare = make_model(resilience=False)
    assert bare.experts_for("ew-0") == [(0, 0), (0, 1), (1, 0), (1, 1)] and bare.active.copies[(0, 2)] == ("ew-1",)
    assert model.ready("ew-0", 1, model.experts_for("ew-0"), "shm:@x")
    assert not model.ready("ew-0", 99, [], "")  # an incarnation the controller never issued


def test_missed_heartbeats_fence_the_worker_and_order_a_replacement():
    clock = FakeClock()
    model = make_model(clock)
    start(model, "ew-0", 10)
    epoch = model.epoch
    clock.now += 0.5
    assert model.heartbeat("ew-0", 1, {}).alive
    clock.now += 0.9
    assert model.tick() == []
    clock.now += 0.2
    assert model.tick() == ["ew-0"]
    assert model.workers["ew-0"].state == FENCED and ("ew-0", 1) in model.fenced
    assert model.epoch == epoch + 1
    assert [(o.action, o.worker, o.pid) for o in model.orders.values()] == [("start", "ew-0", 10)]
    assert not model.heartbeat("ew-0", 1, {}).alive, "a fenced incarnation is told so when it wakes up"
    model.tick()
    assert len(model.orders) == 1, "an outstanding order is not issued twice"
    again = model.register("ew-0", "expert", 0, pid=12, host="h")
    assert again.incarnation == 2 and model.heartbeat("ew-0", 2, {}).alive
    model.reconcile()
    assert model.orders == {} and model.counters["orders_completed"] == 1, "a new registration completes it"


def test_a_silent_worker_whose_process_runs_gets_a_grace_and_a_stopped_one_none():
    """Silence on a busy host is lateness: a runnable or sleeping local process gets BUSY_GRACE
    timeouts, a stopped or exited one is dead after one (the second path of detection)."""
    clock = FakeClock()
    states = {"ew-0": procs.RUNNABLE, "ew-1": procs.STOPPED}
    model = make_model(clock, liveness=lambda r: states[r.name])
    for i in range(2):
        start(model, f"ew-{i}", 10 + i)
    clock.now += 1.5
    assert model.tick() == ["ew-1"], "stopped: dead after one timeout"
    clock.now += 0.9 * BUSY_GRACE - 1.5
    assert model.tick() == [], "runnable: late, not dead"
    states["ew-0"] = procs.GONE
    assert model.tick() == ["ew-0"], "gone: dead at once"


def test_the_controllers_own_pause_is_nobodys_silence():
    clock = FakeClock()
    model = make_model(clock, tick_interval_s=0.05)
    start(model, "ew-0", 10)
    assert model.tick() == []
    clock.now += 5.0  # the controller was not scheduled for 5 s (a starved host)
    assert model.tick() == [], "heartbeats that could not be processed meanwhile are not missing"
    for _ in range(25):  # then it ticks on time and the worker stays silent
        clock.now += 0.05
        dead = model.tick()
    assert dead == ["ew-0"] or model.workers["ew-0"].state == FENCED


def test_failure_reports_suspect_or_declare_dead():
    model = make_model()
    start(model, "ew-0", 10)
    model.report_failure("aw-0", "ew-0", 1, "probe-timeout", process_gone=False)
    assert model.workers["ew-0"].state == SUSPECT
    assert model.heartbeat("ew-0", 1, {}).alive and model.workers["ew-0"].state == READY
    model.report_failure("aw-0", "ew-0", 7, "link-closed", process_gone=True)  # stale incarnation: ignored
    assert model.workers["ew-0"].state == READY
    model.report_failure("aw-0", "ew-0", 1, "link-closed", process_gone=True)
    assert model.workers["ew-0"].state == FENCED


def test_reregistering_a_live_name_fences_the_old_incarnation():
    model = make_model(attention=1)
    model.register("aw-0", "attention", 0, pid=10, host="h")
    model.register("aw-0", "attention", 0, pid=11, host="h")
    assert ("aw-0", 1) in model.fenced and model.workers["aw-0"].incarnation == 2
    kinds = [e.kind for e in model.events]
    assert kinds.count("registered") == 2 and "fenced" in kinds


WORKERS = ["ew-0", "ew-1", "ew-2", "ew-3"]


@pytest.mark.parametrize("num_workers,num_experts", [(2, 4), (3, 8), (4, 8), (4, 16)])
def test_spread_covers_every_single_worker_loss_when_budget_allows(num_workers, num_experts):
    workers = WORKERS[:num_workers]
    primaries = primary_placement(num_experts, workers)
    slots = ceil(num_experts / (num_workers - 1))
    plan = shadow_placement(primaries, workers, [0, 1, 3], slots)
    assert plan.unprotected == []
    for key, holders in plan.shadows.items():
        assert primaries[key[1]] not in holders, f"{key}: a shadow on its own primary protects nothing"
    for lost in workers:
        assert served_after_loss(primaries, plan, {lost}) == [], f"losing {lost} would lose experts"
    for w in workers:  # shadows of one worker's experts are spread over several survivors
        holders = {plan.shadows[(0, e)][0] for e in experts_of(primaries, w)}
        assert len(holders) == min(num_workers - 1, len(experts_of(primaries, w)))


@pytest.mark.parametrize("num_workers,num_experts,policy", [(3, 6, "contiguous"), (4, 8, "contiguous"),
                                                            (4, 12, "contiguous"), (5, 16, "round_robin"),
                                                            (4, 64, "contiguous")])
def test_spread_with_room_for_two_copies_survives_any_two_losses(num_workers, num_experts, policy):
    from itertools import combinations

    workers = [f"ew-{i}" for i in range(num_workers)]
    primaries = primary_placement(num_experts, workers, policy)
    plan = shadow_placement(primaries, workers, [0, 2], ceil(2 * num_experts / num_workers))
    assert all(len(set(holders)) == len(holders) >= 2 for holders in plan.shadows.values())
    for lost in combinations(workers, 2):
        assert served_after_loss(primaries, plan, set(lost)) == [], f"losing {lost} would lose experts"


def test_budget_exhaustion_is_reported_as_unprotected_experts():
    primaries = primary_placement(8, WORKERS[:3])
    plan = shadow_placement(primaries, WORKERS[:3], [0, 1], slots_per_layer=1)
    assert len(plan.unprotected) == 2 * (8 - 3)  # 3 slots per layer for 8 experts
    lost = served_after_loss(primaries, plan, {"ew-0"})
    assert lost and all(key in plan.unprotected for key in lost)
    none = shadow_placement(primaries, WORKERS[:3], [0], slots_per_layer=0)
    assert none.unprotected == [(0, e) for e in range(8)]


def test_load_aware_replicates_hot_experts_and_balances_the_workers():
    """EPLB: the hot expert gets a copy on every worker; the expected load per worker is even, where
    spread leaves the hot expert's primary with most of the tokens."""
    workers = WORKERS[:3]
    load = {(0, e): 1.0 for e in range(8)} | {(0, 0): 60.0}
    spread = spread_placement(8, workers, [0], shadow_slots=4)
    plan = load_aware_placement(load, 8, workers, [0], capacity=3 + 4)
    assert len(plan.copies[(0, 0)]) == 3, "the hottest expert gets a copy on every worker"
    assert all(s > 0 for s in plan.shares[(0, 0)]), "and every one takes a share of its tokens"
    assert all(sum(s > 0 for s in plan.shares[(0, e)]) == 1 for e in range(1, 8)), \
        "a cold expert's rows are not cut up: one copy takes them, the others stand by for failures"
    assert all(len(set(ws)) == len(ws) >= 2 for ws in plan.copies.values()), "two copies, on distinct workers"
    assert all(abs(sum(s) - 1.0) < 1e-9 for s in plan.shares.values())
    assert imbalance(spread, load) > 2.0 and imbalance(plan, load) < 1.1
    for w in workers:
        assert len(plan.held_by(w)) <= 7, "no worker holds more than its capacity"
    tight = load_aware_placement(load, 8, workers, [0], capacity=3, min_copies=2)
    assert sum(len(ws) for ws in tight.copies.values()) == 9 and tight.unprotected, "room for one extra copy only"
    again = load_aware_placement(load, 8, workers, [0], capacity=7, current=plan)
    assert again == plan, "a placement that already fits its load is kept as it is"
    assert plan_placement("load_aware", 8, workers, [0], 4, load=None) == spread, "nothing observed yet: spread"


def test_placement_round_trips_through_json():
    plan = load_aware_placement({(0, 1): 9.0}, 4, WORKERS[:2], [0, 2], capacity=4)
    assert Placement.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_expert_worker_death_promotes_shadows_and_replacement_restores_them():
    model = make_model(experts=3, num_experts=6, layers=(0,))
    for i in range(3):
        start(model, f"ew-{i}", 10 + i)
    original = model.ert
    assert model.unprotected() == []
    model.declare_dead("ew-0", "test")
    model.reconcile()
    assert ("start", "ew-0", 10) in [(o.action, o.worker, o.pid) for o in model.orders.values()], \
        "a replacement for the process with pid 10"
    assert model.ert.epoch > original.epoch
    for expert in (0, 1):  # ew-0's experts: their shadows now lead
        assert model.ert.of(0, expert)[0] != "ew-0" and "ew-0" not in model.ert.of(0, expert)
        assert len(model.ert.of(0, expert)) == len(original.of(0, expert)) - 1, "ew-0's copy is gone"
    assert model.unprotected(), "some expert is down to its last copy"
    start(model, "ew-0", 99)
    assert model.ert.candidates == original.candidates and model.unprotected() == []
    assert model.orders == {}


def test_without_resilience_a_death_is_a_restart_generation():
    """The restart-everything baseline is one more desired-state change: a death bumps the restart
    generation and orders one restart-all; deaths while it runs order none; once every worker is
    back (a new incarnation, ready), the next death orders the next generation."""
    model = make_model(experts=2, attention=1, num_experts=4, layers=(0,), resilience=False)
    records = [start(model, name, 5 + i) for i, name in enumerate(["ew-0", "ew-1", "aw-0"])]
    model.declare_dead("ew-1", "test")
    model.reconcile()
    orders = [(o.action, o.generation) for o in model.orders.values()]
    assert orders == [("restart-all", 1)] and model.restart_generation == 1
    assert model.live() == [], "the survivors go down with it"
    assert {(r.name, r.incarnation) for r in records} <= model.fenced
    fresh = [model.register(r.name, r.role, r.index, pid=50 + i, host="h") for i, r in enumerate(records)]
    model.ready(fresh[0].name, fresh[0].incarnation, model.experts_for(fresh[0].name), "a")
    model.declare_dead(fresh[1].name, "killed while starting")
    model.reconcile()
    assert [(o.action, o.generation) for o in model.orders.values()] == [("restart-all", 1)]
    for i, r in enumerate(records):
        start(model, r.name, 70 + i)
    assert model.orders == {}, "every worker restarted: the order is done"
    model.declare_dead("aw-0", "a new failure")
    model.reconcile()
    assert [(o.action, o.generation) for o in model.orders.values()] == [("restart-all", 2)]


def test_snapshot_restore_carries_everything_and_resumes_outstanding_orders():
    clock = FakeClock()
    model = make_model(clock, experts=3, num_experts=6, layers=(0,), attention=1)
    for i in range(3):
        start(model, f"ew-{i}", 10 + i)
    start(model, "aw-0", 20)
    model.declare_dead("ew-1", "test")
    model.reconcile()
    order = next(iter(model.orders.values()))
    snapshot = json.loads(json.dumps(model.to_snapshot()))  # through JSON, as in Redis
    clock.now += 100.0  # long after the last heartbeat: a restored worker gets a fresh deadline
    restored = make_model(clock, experts=3, num_experts=6, layers=(0,), attention=1)
    restored.restore(snapshot)
    assert restored.epoch == model.epoch and restored.fenced == model.fenced
    assert restored.ert.candidates == model.ert.candidates
    assert {n: (r.incarnation, r.state) for n, r in restored.workers.items()} == {
        n: (r.incarnation, r.state) for n, r in model.workers.items()}
    assert restored.tick() == [], "no worker is declared dead for the controller's own downtime"
    assert list(restored.orders) == [order.id] and restored.orders[order.id].resumed
    assert restored.counters["orders_resumed"] == 1 and restored.counters["orders_issued"] == 1
    assert restored.register("ew-1", "expert", 1, pid=99, host="h").incarnation == model.next_incarnation
    restored.reconcile()
    assert restored.orders == {}


def test_a_lost_order_is_issued_again_by_a_controller_that_never_saw_it():
    """Even without the predecessor's orders (its last write to Redis lost), the reconcile pass sees
    a roster worker fenced with no replacement, and orders one."""
    model = make_model(experts=2)
    for i in range(2):
        start(model, f"ew-{i}", 10 + i)
    model.declare_dead("ew-1", "test")
    snapshot = json.loads(json.dumps(model.to_snapshot()))
    snapshot["orders"] = []
    restored = make_model(experts=2)
    restored.restore(snapshot)
    restored.reconcile()
    assert [(o.action, o.worker, o.pid) for o in restored.orders.values()] == [("start", "ew-1", 11)]


def test_scaling_adds_and_drains_workers_through_orders():
    model = make_model(experts=2, attention=2, num_experts=6, layers=(0,), max_attention_workers=3)
    for name, pid in (("ew-0", 10), ("ew-1", 11), ("aw-0", 20), ("aw-1", 21)):
        start(model, name, pid)
    with pytest.raises(ValueError, match=r"at most max_attention_workers \(3, the deployment's cap\), got 4"):
        model.scale(attention_workers=4)
    with pytest.raises(ValueError, match="between 1 and the model's 6 experts"):
        model.scale(expert_workers=7)
    model.scale(attention_workers=3, expert_workers=3)
    model.reconcile()
    starts = sorted((o.worker, o.pid) for o in model.orders.values() if o.action == "start")
    assert starts == [("aw-2", 0), ("ew-2", 0)]
    assert model.workers["ew-2"].state == STARTING and model.rebalancing
    assert set(model.experts_for("ew-2")) == set(model.target.held_by("ew-2")) != set()
    start(model, "aw-2", 22)
    record = model.register("ew-2", "expert", 2, pid=12, host="h")
    model.ready("ew-2", record.incarnation, model.experts_for("ew-2"), "addr")
    for name in ("ew-0", "ew-1"):  # the others load their part of the new placement, told by heartbeats
        answer = model.heartbeat(name, model.workers[name].incarnation, {})
        assert set(answer.load_experts) == set(model.target.held_by(name)) - set(model.workers[name].experts)
        assert answer.drop_experts == [], "nothing is dropped before the switch"
        model.heartbeat(name, model.workers[name].incarnation, {},
                        experts=sorted(set(model.workers[name].experts) | set(answer.load_experts)))
    epoch = model.epoch
    model.reconcile()
    assert not model.rebalancing and model.epoch == epoch + 1, "every copy is loaded: the table switches"
    assert "ew-2" in model.ert.workers
    # Old copies are dropped only once every attention worker routes by the new table.
    answer = model.heartbeat("ew-0", model.workers["ew-0"].incarnation, {})
    assert answer.drop_experts == []
    for name in ("aw-0", "aw-1", "aw-2"):
        model.heartbeat(name, model.workers[name].incarnation, {"ert_epoch": float(model.epoch)})
    answer = model.heartbeat("ew-0", model.workers["ew-0"].incarnation, {})
    assert set(answer.drop_experts) == set(model.workers["ew-0"].experts) - set(model.active.held_by("ew-0"))
    # Scale down: the removed attention worker drains at once; the removed expert worker once no table names it.
    model.scale(attention_workers=1, expert_workers=2)
    model.reconcile()
    assert model.workers["aw-1"].state == DRAINING and model.workers["aw-2"].state == DRAINING
    assert model.workers["ew-2"].state == DRAINING
    stops = sorted(o.worker for o in model.orders.values() if o.action == "stop")
    assert stops == ["aw-1", "aw-2"], "ew-2 still holds experts of the active placement"
    for name in ("ew-0", "ew-1"):
        answer = model.heartbeat(name, model.workers[name].incarnation, {})
        model.heartbeat(name, model.workers[name].incarnation, {},
                        experts=sorted(set(model.workers[name].experts) | set(answer.load_experts)))
    model.reconcile()
    assert "ew-2" not in model.ert.workers
    model.heartbeat("aw-0", model.workers["aw-0"].incarnation, {"ert_epoch": float(model.epoch)})
    for name in ("aw-1", "aw-2"):
        model.deregister(name, model.workers[name].incarnation)
    model.reconcile()
    assert [o.worker for o in model.orders.values() if o.action == "stop"] == ["ew-2"]
    model.deregister("ew-2", model.workers["ew-2"].incarnation)
    model.reconcile()
    assert model.orders == {} and {n: r.state for n, r in model.workers.items() if r.state == GONE} == {
        "aw-1": GONE, "aw-2": GONE, "ew-2": GONE}
    assert model.counters["scale_events"] == 2 and model.counters["rebalances"] == 2


def test_rebalance_follows_reported_load_and_needs_load_aware():
    spread = make_model(experts=3, num_experts=6, layers=(0,))
    assert spread.rebalance("test") == (False, "shadow_policy is spread: placement does not depend on load "
                                               "(set load_aware)")
    model = make_model(experts=3, num_experts=6, layers=(0,), shadow_policy="load_aware", load_half_life_s=10.0)
    for i in range(3):
        start(model, f"ew-{i}", 10 + i)
    assert model.active == spread.active, "load_aware plans with spread until load is observed"
    assert model.rebalance("test")[0] is False
    model.heartbeat("ew-0", 1, {}, expert_tokens=[(0, 0, 500.0), (0, 1, 10.0), (0, 5, 10.0), (3, 0, 99.0)])
    assert (3, 0) not in model.load, "counts for layers that are not sparse are ignored"
    started, detail = model.rebalance("test")
    assert started and "expected imbalance" in detail
    assert len(model.target.copies[(0, 0)]) == 3
    model.clock.now += 10.0
    model.reconcile()
    assert model.load[(0, 0)] == pytest.approx(250.0), "the estimate halves every half-life"


def test_drain_takes_a_worker_out_of_routing_and_its_exit_is_not_a_death():
    model = make_model(experts=3, num_experts=6, layers=(0,), attention=1)
    for i in range(3):
        start(model, f"ew-{i}", 10 + i)
    start(model, "aw-0", 20)
    model.drain("ew-1", model.workers["ew-1"].incarnation)
    assert model.workers["ew-1"].state == DRAINING and model.counters["drains"] == 1
    assert all(c[0] != "ew-1" for c in model.ert.candidates if len(c) > 1), "no new work where a copy is left"
    model.report_failure("aw-0", "ew-1", 0, "link-closed", process_gone=True)
    assert model.workers["ew-1"].state == GONE and "dead" not in [e.kind for e in model.events]
    model.reconcile()
    assert [(o.action, o.worker) for o in model.orders.values()] == [("start", "ew-1")], "still on the roster"


def test_cluster_view_answers_every_role_from_one_snapshot():
    from resilient_moe.controller.server import ControllerService

    model = make_model(experts=2, attention=2)
    for name, pid in (("ew-0", 10), ("ew-1", 11), ("aw-0", 20), ("aw-1", 21)):
        start(model, name, pid)
    model.declare_dead("ew-1", "test")
    model.drain("aw-1", model.workers["aw-1"].incarnation)
    view = ClusterView.from_proto(ControllerService(model, "c", 0.05).snapshot())
    assert view.ended("ew-1", 2) and view.is_fenced("ew-1", 2) and not view.ended("ew-0", 1)
    assert [w.name for w in view.of_role("attention") if w.takes_requests] == ["aw-0"]
    assert view.draining("aw-1") and view.reachable(view.workers["aw-1"])
    assert view.routing is not None and view.routing.epoch == model.epoch


@pytest.mark.parametrize("settings,message", [
    ({"rebalance_interval_s": 30.0}, "rebalance_interval_s (30.0) needs shadow_policy: load_aware"),
    ({"rebalance_interval_s": -1}, "rebalance_interval_s must be a number of seconds >= 0"),
    ({"expert_wait_s": 0}, "expert_wait_s must be a positive number of seconds"),
    ({"drain_timeout_s": "soon"}, "drain_timeout_s must be a positive number of seconds"),
    ({"load_half_life_s": -2.0}, "load_half_life_s must be a positive number of seconds"),
    ({"attention_workers": 3, "max_attention_workers": 2},
     "max_attention_workers must be empty (no cap) or an integer between attention_workers (3) and 1024, got 2"),
    ({"max_attention_workers": 5000}, "max_attention_workers must be empty (no cap) or an integer between"),
    ({"attention_workers": 2000}, "attention_workers must be at most 1024"),
])
def test_deployment_settings_of_the_reconcile_loop_are_checked(settings, message):
    from resilient_moe.deployment import DeploymentConfig
    from resilient_moe.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DeploymentConfig.from_dict(settings, source="test.yaml")
    ok = DeploymentConfig(shadow_policy="load_aware", rebalance_interval_s=30.0, attention_workers=2,
                          max_attention_workers=4)
    assert ok.max_attention_workers == 4 and DeploymentConfig(attention_workers=2).max_attention_workers is None


def test_attention_workers_scale_past_the_start_count_without_a_cap():
    """No cap (the default): scaling above the start count is accepted (the KV store grows a region
    for each worker added); only a cap, when set, or the absolute bound refuses."""
    model = make_model(experts=2, attention=2, num_experts=6, layers=(0,))
    for name, pid in (("ew-0", 10), ("ew-1", 11), ("aw-0", 20), ("aw-1", 21)):
        start(model, name, pid)
    model.scale(attention_workers=5)
    model.reconcile()
    assert sorted(o.worker for o in model.orders.values() if o.action == "start") == ["aw-2", "aw-3", "aw-4"]
    with pytest.raises(ValueError, match="between 1 and 1024, got 1025"):
        model.scale(attention_workers=1025)


def test_periodic_rebalance_moves_experts_only_when_it_pays():
    model = make_model(experts=3, num_experts=6, layers=(0,), shadow_policy="load_aware", rebalance_interval_s=5.0)
    for i in range(3):
        start(model, f"ew-{i}", 10 + i)
    model.clock.now += 6.0
    model.reconcile()
    assert not model.rebalancing, "no load observed yet"
    model.heartbeat("ew-0", 1, {}, expert_tokens=[(0, e, 10.0) for e in range(6)])
    model.clock.now += 6.0
    model.reconcile()
    assert not model.rebalancing, "even load: spread is already balanced enough"
    model.heartbeat("ew-0", 1, {}, expert_tokens=[(0, 0, 5000.0)])
    model.clock.now += 6.0
    model.reconcile()
    assert model.rebalancing and len(model.target.copies[(0, 0)]) == 3
    assert [e.kind for e in model.events][-1] == "rebalance"


def test_one_failing_reconcile_step_never_stops_the_others(monkeypatch):
    model = make_model(experts=2)
    for i in range(2):
        start(model, f"ew-{i}", 10 + i)

    def broken(now):
        raise RuntimeError("a bug in placement")
    monkeypatch.setattr(model, "_reconcile_placement", broken)
    model.declare_dead("ew-1", "test")
    model.reconcile()
    assert [(o.action, o.worker) for o in model.orders.values()] == [("start", "ew-1")]


def test_requests_go_to_the_least_loaded_attention_worker_and_moved_ones_spread():
    from resilient_moe.controller.placement import AttentionLoad, choose_attention_worker

    assert choose_attention_worker({}) is None
    loads = {"aw-0": AttentionLoad(4, 0.9), "aw-1": AttentionLoad(2, 0.1), "aw-2": AttentionLoad(2, 0.6)}
    assert choose_attention_worker(loads) == "aw-2", "fewest tokens, then the most free KV cache"
    placed = []
    for _ in range(6):  # a dead worker's requests, moved one by one, each counted where it went
        name = choose_attention_worker(loads)
        placed.append(name)
        loads[name] = AttentionLoad(loads[name].tokens + 1, loads[name].kv_free)
    assert placed.count("aw-0") == 1 and placed.count("aw-1") == 2 and placed.count("aw-2") == 3


def test_a_full_attention_worker_gets_no_request_while_another_has_a_free_seat():
    from resilient_moe.controller.placement import AttentionLoad, choose_attention_worker

    # aw-0 holds few tokens but every seat is taken: a request sent there would wait.
    loads = {"aw-0": AttentionLoad(40, 0.9, requests=8, seats=8), "aw-1": AttentionLoad(3000, 0.5, requests=3, seats=8)}
    assert choose_attention_worker(loads) == "aw-1"
    loads["aw-1"] = AttentionLoad(3000, 0.5, requests=8, seats=8)  # both full: fewest tokens again
    assert choose_attention_worker(loads) == "aw-0"


# ---- fault records (controller/fault_records.py) -------------------------------------------------


def test_every_declared_death_is_a_fault_record_with_its_observed_cause_and_replacement():
    clock = FakeClock()
    states = {"ew-0": procs.STOPPED, "ew-1": procs.RUNNABLE}
    model = make_model(clock, liveness=lambda r: states[r.name])
    for i in range(2):
        start(model, f"ew-{i}", 10 + i)
    clock.now += 1.5
    assert model.tick() == ["ew-0"]
    [stopped] = model.fault_records.records
    assert (stopped.component, stopped.role, stopped.incarnation, stopped.pid, stopped.cause) == \
        ("ew-0", "expert", 1, 10, "stopped")
    assert stopped.detected_at - stopped.last_seen == pytest.approx(1.5) and stopped.replaced_at == 0
    # a peer reports ew-1 first (its link closed), then the launcher's exit status makes the cause exact
    model.report_failure("aw-0", "ew-1", 2, "link-closed", process_gone=True)
    model.report_failure("launcher", "ew-1", 0, "process 11 killed by signal 9 (SIGKILL)", process_gone=True)
    killed = model.fault_records.records[-1]
    assert killed.component == "ew-1" and killed.cause == "killed by signal 9 (SIGKILL)"
    assert "link-closed" in killed.detail and "signal 9" in killed.detail
    model.report_failure("aw-0", "ew-1", 2, "3 probes unanswered", process_gone=True)  # vaguer: changes nothing
    assert killed.cause == "killed by signal 9 (SIGKILL)"
    replacement = start(model, "ew-0", 30)
    assert stopped.replaced_at > 0 and killed.replaced_at == 0, "only ew-0 has a replacement"
    assert replacement.incarnation > stopped.incarnation
    snapshot = json.loads(json.dumps(model.to_snapshot()))  # a new controller keeps the records
    restored = make_model(clock)
    restored.restore(snapshot)
    assert [(r.component, r.cause, r.replaced_at) for r in restored.fault_records.records] == \
        [(r.component, r.cause, r.replaced_at) for r in model.fault_records.records]


def test_a_fault_of_an_untracked_component_is_recorded_and_updated_once_replaced():
    from resilient_moe.controller.fault_records import FaultRecord, fault_record_problem
    from resilient_moe.proto import controller_pb2 as pb

    model = make_model()
    gone = FaultRecord("redis", "redis", 0, 900, "killed by signal 9 (SIGKILL)", "killed by signal 9 (SIGKILL)",
                       last_seen=1000.0, detected_at=1000.0)
    model.record_fault(gone)
    back = FaultRecord(**{**gone.__dict__, "replaced_at": 1000.4})
    model.record_fault(back)  # the same fault, now replaced: one record
    [kept] = model.fault_records.records
    assert kept.replaced_at == 1000.4
    events = [(e.kind, e.worker) for e in model.events]
    assert events[-2:] == [("dead", "redis"), ("replaced", "redis")]
    for bad, problem in [(dict(component=""), "component"), (dict(role="db"), "role must be one of"),
                         (dict(detected_at=0.0), "detected_at"), (dict(replaced_at=10.0), "before detected_at"),
                         (dict(cause=""), "cause")]:
        message = pb.FaultRecord(**{**back.__dict__, **bad})
        assert problem in fault_record_problem(message), bad
    assert fault_record_problem(back.to_pb()) is None


def test_the_launchers_exit_status_of_a_replaced_worker_makes_its_record_exact():
    """The replacement was started (the controller's order) before the launcher saw the old process exit:
    the exit status arrives as a record of a tracked worker, and refines the existing one by its pid."""
    from resilient_moe.controller.fault_records import FaultRecord

    model = make_model()
    start(model, "ew-0", 10)
    start(model, "ew-1", 11)
    model.report_failure("aw-0", "ew-1", 2, "link closed", process_gone=True)
    start(model, "ew-1", 12)  # its replacement registers first
    late = FaultRecord("ew-1", "expert", 0, 11, "killed by signal 9 (SIGKILL)", "process 11 killed by signal 9",
                       last_seen=0.0, detected_at=2000.0, replaced_at=2000.0)
    model.record_fault(late)
    [record] = model.fault_records.records
    assert record.cause == "killed by signal 9 (SIGKILL)" and record.pid == 11 and record.replaced_at > 0
    assert model.workers["ew-1"].state == READY, "the replacement is untouched"
    model.record_fault(FaultRecord("ew-0", "expert", 0, 10, "exited with code 0", "", 0.0, 2001.0, 2001.0))
    assert len(model.fault_records.records) == 1, "an exit the controller never declared is no fault of a worker"


def test_a_worker_scaled_away_retires_from_the_live_views_and_a_dead_one_stays():
    from resilient_moe.controller.server import ControllerService
    from resilient_moe.controller.view import desired_roster, retired, retiring
    from resilient_moe.server.cluster_monitor import cluster_json
    from resilient_moe.server.metrics import ClusterCollector
    from resilient_moe.server.status import Snapshot, render
    from rich.console import Console

    model = make_model(experts=3, num_experts=6, layers=(0,), attention=1)
    for name, pid in (("ew-0", 10), ("ew-1", 11), ("ew-2", 12), ("aw-0", 20)):
        start(model, name, pid)
    model.scale(expert_workers=2)
    model.reconcile()

    def views():
        state = ControllerService(model, "c", 0.05).snapshot()
        return state, cluster_json(state, {}, alive=lambda pid: True)

    state, doc = views()
    leaving = {w["id"]: w for w in doc["workers"]}["ew-2"]
    assert leaving["state"] == "draining" and leaving["retiring"], "listed while it drains, not counted as wanted"
    model.deregister("ew-2", model.workers["ew-2"].incarnation)
    model.declare_dead("ew-1", "test")  # on the roster: visible, fenced, until it is replaced
    state, doc = views()
    desired = desired_roster(state)
    by_name = {w.name: w for w in state.workers}
    assert retired(by_name["ew-2"], desired) and not retired(by_name["ew-1"], desired)
    assert retiring(by_name["ew-2"], desired) and not any(retiring(by_name[n], desired) for n in ("ew-0", "aw-0"))
    assert not retired(by_name["ew-2"], None), "a snapshot naming no roster retires nobody"
    assert [(w["id"], w["state"]) for w in doc["workers"]] == [("aw-0", "ready"), ("ew-0", "ready"),
                                                               ("ew-1", "fenced")]
    assert ("stopped", "ew-2") in [(e["kind"], e["worker"]) for e in doc["events"]], "the history keeps it"
    collector = ClusterCollector()
    collector.update(state, doc["workers"], 0)
    labelled = {s.labels.get("worker") for m in collector.collect() if m.name.startswith("resilient_moe_worker_")
                for s in m.samples}
    assert "ew-2" not in labelled and "ew-1" in labelled
    console = Console(width=200, record=True)
    console.print(render(Snapshot("http://x", doc, [], 1e9)))
    assert "2/3 ready" in console.export_text(), "ready out of the roster: ew-1 is missing, ew-2 is not wanted"
    start(model, "ew-1", 13)
    console.print(render(Snapshot("http://x", views()[1], [], 1e9)))
    assert "3/3 ready" in console.export_text()

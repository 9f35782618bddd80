"""Controller decisions without processes: placement (pure functions) and the membership model."""

from __future__ import annotations

import pytest

from resilient_moe import procs
from resilient_moe.controller.placement import experts_of, primary_placement, routing_table
from resilient_moe.controller.state import BUSY_GRACE, DEAD, READY, SUSPECT, ClusterModel, ModelShape


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


def test_routing_table_lists_primary_then_shadows_and_skips_dense_layers():
    shadows = {(layer, 0): ["b", "c"] for layer in (0, 2)} | {(layer, 1): ["b", "a"] for layer in (0, 2)}
    ert = routing_table(3, [0, 2], 3, 2, {0: "a", 1: "b"}, shadows)
    assert ert.of(0, 0) == ("a", "b", "c")
    assert ert.of(2, 1) == ("b", "a")  # a shadow equal to the primary is not listed twice
    assert ert.of(1, 0) == ()
    assert ert.unserved({"a"}) == []
    assert ert.unserved({"a", "b", "c"}) == [(0, 0), (0, 1), (2, 0), (2, 1)]
    lookup = ert.route_lookup(["a", "b", "c"], dead={"a"})
    assert lookup[0].tolist() == [1, 1] and lookup[1].tolist() == [-1, -1]
    promoted = routing_table(4, [0, 2], 3, 2, {0: "a", 1: "b"}, shadows, dead={"a"})
    assert promoted.of(0, 0) == ("b", "c") and promoted.of(0, 1) == ("b",)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_model(clock, **options):
    options.setdefault("tick_interval_s", 1.0)  # these tests tick rarely, as a 1 s reconcile loop would
    return ClusterModel(ModelShape(2, 4, (0, 1)), ["ew-0", "ew-1"], heartbeat_timeout_s=1.0, clock=clock, **options)


def test_registration_gives_fresh_incarnations_and_expert_assignments():
    model = make_model(FakeClock())
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
    bare = ClusterModel(ModelShape(2, 4, (0, 1)), ["ew-0", "ew-1"], resilience=False)
    assert bare.experts_for("ew-0") == [(0, 0), (0, 1), (1, 0), (1, 1)] and bare.plan.shadows[(0, 2)] == []
    assert model.ready("ew-0", 1, model.experts_for("ew-0"), "shm:@x")
    assert not model.ready("ew-0", 99, [], "")  # an incarnation the controller never issued


def test_missed_heartbeats_fence_the_worker_and_bump_the_epoch():
    clock = FakeClock()
    model = make_model(clock)
    model.register("ew-0", "expert", 0, pid=10, host="h")
    model.ready("ew-0", 1, [], "")
    epoch = model.epoch
    clock.now += 0.5
    assert model.heartbeat("ew-0", 1, {})
    clock.now += 0.9
    assert model.tick() == []
    clock.now += 0.2
    assert model.tick() == ["ew-0"]
    assert model.workers["ew-0"].state == DEAD and ("ew-0", 1) in model.fenced
    assert model.epoch == epoch + 1
    assert not model.heartbeat("ew-0", 1, {}), "a fenced incarnation is told so when it wakes up"
    again = model.register("ew-0", "expert", 0, pid=12, host="h")
    assert again.incarnation == 2 and model.heartbeat("ew-0", 2, {})


def test_a_silent_worker_whose_process_runs_gets_a_grace_and_a_stopped_one_none():
    """Silence on a busy host is lateness: a runnable or sleeping local process gets BUSY_GRACE
    timeouts, a stopped or exited one is dead after one (the second path of detection)."""
    clock = FakeClock()
    states = {"ew-0": procs.RUNNABLE, "ew-1": procs.STOPPED}
    model = make_model(clock, liveness=lambda r: states[r.name])
    for i in range(2):
        record = model.register(f"ew-{i}", "expert", i, pid=10 + i, host="127.0.0.1")
        model.ready(record.name, record.incarnation, [], "")
    clock.now += 1.5
    assert model.tick() == ["ew-1"], "stopped: dead after one timeout"
    clock.now += 0.9 * BUSY_GRACE - 1.5
    assert model.tick() == [], "runnable: late, not dead"
    states["ew-0"] = procs.GONE
    assert model.tick() == ["ew-0"], "gone: dead at once"


def test_the_controllers_own_pause_is_nobodys_silence():
    clock = FakeClock()
    model = make_model(clock, tick_interval_s=0.05, liveness=lambda r: procs.UNKNOWN)
    model.register("ew-0", "expert", 0, pid=10, host="h")
    model.ready("ew-0", 1, [], "")
    assert model.tick() == []
    clock.now += 5.0  # the controller was not scheduled for 5 s (a starved host)
    assert model.tick() == [], "heartbeats that could not be processed meanwhile are not missing"
    for _ in range(25):  # then it ticks on time and the worker stays silent
        clock.now += 0.05
        dead = model.tick()
    assert dead == ["ew-0"] or model.workers["ew-0"].state == DEAD


def test_failure_reports_suspect_or_declare_dead():
    model = make_model(FakeClock())
    model.register("ew-0", "expert", 0, pid=10, host="h")
    model.ready("ew-0", 1, [], "")
    model.report_failure("aw-0", "ew-0", 1, "probe-timeout", process_gone=False)
    assert model.workers["ew-0"].state == SUSPECT
    assert model.heartbeat("ew-0", 1, {}) and model.workers["ew-0"].state == READY
    model.report_failure("aw-0", "ew-0", 7, "link-closed", process_gone=True)  # stale incarnation: ignored
    assert model.workers["ew-0"].state == READY
    model.report_failure("aw-0", "ew-0", 1, "link-closed", process_gone=True)
    assert model.workers["ew-0"].state == DEAD


def test_reregistering_a_live_name_fences_the_old_incarnation():
    model = make_model(FakeClock())
    model.register("aw-0", "attention", 0, pid=10, host="h")
    model.register("aw-0", "attention", 0, pid=11, host="h")
    assert ("aw-0", 1) in model.fenced and model.workers["aw-0"].incarnation == 2
    kinds = [e.kind for e in model.events]
    assert kinds.count("registered") == 2 and "fenced" in kinds


WORKERS = ["ew-0", "ew-1", "ew-2", "ew-3"]


@pytest.mark.parametrize("num_workers,num_experts", [(2, 4), (3, 8), (4, 8), (4, 16)])
def test_spread_covers_every_single_worker_loss_when_budget_allows(num_workers, num_experts):
    from math import ceil

    from resilient_moe.controller.placement import served_after_loss, shadow_placement

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
    from math import ceil

    from resilient_moe.controller.placement import served_after_loss, shadow_placement

    workers = [f"ew-{i}" for i in range(num_workers)]
    primaries = primary_placement(num_experts, workers, policy)
    plan = shadow_placement(primaries, workers, [0, 2], ceil(2 * num_experts / num_workers))
    assert all(len(set(holders)) == len(holders) >= 2 for holders in plan.shadows.values())
    for lost in combinations(workers, 2):
        assert served_after_loss(primaries, plan, set(lost)) == [], f"losing {lost} would lose experts"


def test_budget_exhaustion_is_reported_as_unprotected_experts():
    from resilient_moe.controller.placement import served_after_loss, shadow_placement

    primaries = primary_placement(8, WORKERS[:3])
    plan = shadow_placement(primaries, WORKERS[:3], [0, 1], slots_per_layer=1)
    assert len(plan.unprotected) == 2 * (8 - 3)  # 3 slots per layer for 8 experts
    lost = served_after_loss(primaries, plan, {"ew-0"})
    assert lost and all(key in plan.unprotected for key in lost)
    none = shadow_placement(primaries, WORKERS[:3], [0], slots_per_layer=0)
    assert none.unprotected == [(0, e) for e in range(8)]


def test_load_aware_gives_hot_experts_more_copies():
    from resilient_moe.controller.placement import shadow_placement

    primaries = primary_placement(4, WORKERS)
    load = {(0, 0): 100.0, (0, 1): 10.0, (0, 2): 5.0, (0, 3): 1.0}
    plan = shadow_placement(primaries, WORKERS, [0], slots_per_layer=2, policy="load_aware", load=load)
    copies = {e: len(plan.shadows[(0, e)]) for e in range(4)}
    assert copies[0] == 3, "the hottest expert gets a copy on every other worker"
    assert copies[0] >= copies[1] >= copies[3] >= 1
    assert all(primaries[e] not in plan.shadows[(0, e)] for e in range(4))
    with pytest.raises(ValueError, match="needs the per-expert load"):
        shadow_placement(primaries, WORKERS, [0], 2, policy="load_aware")


def test_expert_worker_death_promotes_shadows_and_replacement_restores_them():
    clock = FakeClock()
    model = ClusterModel(ModelShape(1, 6, (0,)), ["ew-0", "ew-1", "ew-2"], clock=clock)
    for i in range(3):
        record = model.register(f"ew-{i}", "expert", i, pid=10 + i, host="h")
        model.ready(f"ew-{i}", record.incarnation, model.experts_for(f"ew-{i}"), f"addr-{i}")
    original = model.ert
    assert model.unprotected() == []
    model.declare_dead("ew-0", "test")
    assert ("start", "ew-0", 10) in model.launcher_commands, "a replacement for the process with pid 10"
    assert model.ert.epoch > original.epoch
    for expert in (0, 1):  # ew-0's experts: their shadows now lead
        assert model.ert.of(0, expert)[0] != "ew-0" and "ew-0" not in model.ert.of(0, expert)
        assert len(model.ert.of(0, expert)) == len(original.of(0, expert)) - 1, "ew-0's copy is gone"
    assert model.unprotected(), "some expert is down to its last copy"
    replacement = model.register("ew-0", "expert", 0, pid=99, host="h")
    model.ready("ew-0", replacement.incarnation, model.experts_for("ew-0"), "addr-0b")
    assert model.ert.candidates == original.candidates and model.unprotected() == []


def test_without_resilience_any_death_restarts_everything():
    model = ClusterModel(ModelShape(1, 4, (0,)), ["ew-0", "ew-1"], resilience=False)
    records = [model.register(name, role, i, pid=5 + i, host="h")
               for i, (name, role) in enumerate([("ew-0", "expert"), ("ew-1", "expert"), ("aw-0", "attention")])]
    for r in records:
        model.ready(r.name, r.incarnation, [], "a")
    model.declare_dead("ew-1", "test")
    assert model.launcher_commands == [("restart-all", "ew-1", 6)]
    assert model.live() == [], "the survivors go down with it"
    assert {(r.name, r.incarnation) for r in records} <= model.fenced
    # While the restart runs, more deaths ask for no second restart; once all are back, one does.
    fresh = [model.register(r.name, r.role, r.index, pid=50 + i, host="h") for i, r in enumerate(records)]
    model.ready(fresh[0].name, fresh[0].incarnation, [], "a")
    model.declare_dead(fresh[1].name, "killed while starting")
    assert model.launcher_commands == [("restart-all", "ew-1", 6)]
    again = [model.register(r.name, r.role, r.index, pid=70 + i, host="h") for i, r in enumerate(records)]
    for r in again:
        model.ready(r.name, r.incarnation, [], "a")
    assert not model.restart_pending
    model.declare_dead("aw-0", "a new failure")
    assert model.launcher_commands[-1] == ("restart-all", "aw-0", 72) and len(model.launcher_commands) == 2


def test_snapshot_restore_carries_membership_fences_and_epoch():
    clock = FakeClock()
    model = ClusterModel(ModelShape(1, 6, (0,)), ["ew-0", "ew-1", "ew-2"], clock=clock)
    for i in range(3):
        record = model.register(f"ew-{i}", "expert", i, pid=10 + i, host="h")
        model.ready(f"ew-{i}", record.incarnation, model.experts_for(f"ew-{i}"), f"addr-{i}")
    model.declare_dead("ew-1", "test")
    import json

    snapshot = json.loads(json.dumps(model.to_snapshot()))  # through JSON, as in Redis
    clock.now += 100.0  # long after the last heartbeat: a restored worker gets a fresh deadline
    restored = ClusterModel(ModelShape(1, 6, (0,)), ["ew-0", "ew-1", "ew-2"], clock=clock)
    restored.restore(snapshot)
    assert restored.epoch == model.epoch and restored.fenced == model.fenced
    assert restored.ert.candidates == model.ert.candidates
    assert {n: (r.incarnation, r.state) for n, r in restored.workers.items()} == {
        n: (r.incarnation, r.state) for n, r in model.workers.items()}
    assert restored.tick() == [], "no worker is declared dead for the controller's own downtime"
    assert restored.register("ew-1", "expert", 1, pid=99, host="h").incarnation == model.next_incarnation

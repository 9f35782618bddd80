"""Nodes as failure domains, as pure functions: node-aware shadow placement, what each node's loss
would leave unprotected, and where the Ray launcher puts workers and their replacements."""

from __future__ import annotations

import pytest

from resilient_moe.controller.placement import (primary_placement, shadow_placement, spread_placement,
                                                 unprotected_by_node)
from resilient_moe.launch.nodes import replacement_node, spread_workers, worker_nodes

WORKERS = ["ew-0", "ew-1", "ew-2", "ew-3"]
# Two nodes, two expert workers each, placed so that the plain spread would pair workers of one node.
NODES = {"ew-0": "a", "ew-1": "a", "ew-2": "b", "ew-3": "b"}


def test_shadows_go_to_another_node_when_one_is_free():
    primaries = primary_placement(8, WORKERS)
    plain = shadow_placement(primaries, WORKERS, [0, 1], 2)
    aware = shadow_placement(primaries, WORKERS, [0, 1], 2, node_of=NODES)
    same_node = [k for k, ws in plain.shadows.items() if NODES[ws[0]] == NODES[primaries[k[1]]]]
    assert same_node, "without nodes, the spread puts some shadows next to their primary"
    for key, ws in aware.shadows.items():
        assert len(ws) == 1 and NODES[ws[0]] != NODES[primaries[key[1]]], key
    assert aware.unprotected == []
    # The same budget used: every worker still holds 2 shadows per layer.
    for w in WORKERS:
        assert len(aware.held_by(w)) == 2 * 2


def test_unprotected_by_node_names_what_each_nodes_loss_leaves_without_a_copy():
    placement = spread_placement(8, WORKERS, [0], 2, node_of=NODES)
    assert unprotected_by_node(placement.copies, NODES) == {"a": [], "b": []}
    plain = spread_placement(8, WORKERS, [0], 2)
    exposed = unprotected_by_node(plain.copies, NODES)
    assert set(exposed) == {"a", "b"} and sum(len(v) for v in exposed.values()) > 0
    for node, keys in exposed.items():
        assert all({NODES[w] for w in plain.copies[k]} == {node} for k in keys)
    # With no shadows at all, a node's loss takes exactly the experts its workers hold.
    bare = spread_placement(8, WORKERS, [0], 0, node_of=NODES)
    assert unprotected_by_node(bare.copies, NODES) == {"a": [(0, e) for e in range(4)], "b": [(0, e) for e in range(4, 8)]}
    # A worker with no node is a node of its own.
    assert unprotected_by_node({(0, 0): ("ew-9",)}, {}) == {"ew-9": [(0, 0)]}


def test_one_node_per_worker_is_the_plain_spread():
    primaries = primary_placement(6, WORKERS[:3])
    own = {w: w for w in WORKERS[:3]}
    assert shadow_placement(primaries, WORKERS[:3], [0], 2, node_of=own).shadows == \
        shadow_placement(primaries, WORKERS[:3], [0], 2).shadows


def test_workers_spread_over_nodes_and_stay_off_the_head():
    assert worker_nodes("head", ["head", "n1", "n2", "n3"]) == ["n1", "n2", "n3"]
    assert worker_nodes("head", ["head"]) == ["head"]
    plan = spread_workers(["ew-0", "ew-1", "ew-2", "aw-0", "aw-1"], ["n1", "n2", "n3"])
    assert plan == {"ew-0": "n1", "ew-1": "n2", "ew-2": "n3", "aw-0": "n1", "aw-1": "n2"}
    aws = [n for w, n in plan.items() if w.startswith("aw-")]
    assert len(set(aws)) == 2, "no node holds every attention worker"
    with pytest.raises(ValueError, match="no node"):
        spread_workers(["aw-0"], [])


def test_a_replacement_goes_to_a_surviving_node_with_the_fewest_of_its_role():
    placed = {"ew-0": "n1", "ew-1": "n2", "ew-2": "n3", "aw-0": "n1", "aw-1": "n2"}
    # The process died, its node lives: same node.
    assert replacement_node("aw-0", placed, ["n1", "n2", "n3"]) == "n1"
    # Its node is lost: the survivor without an attention worker.
    assert replacement_node("aw-0", placed, ["n2", "n3"], lost={"n1"}) == "n3"
    assert replacement_node("ew-0", placed, ["n1", "n2", "n3"], lost={"n1"}) == "n3"  # fewest workers overall
    with pytest.raises(ValueError, match="no surviving node"):
        replacement_node("aw-0", placed, ["n1"], lost={"n1"})


@pytest.mark.parametrize("settings,message", [
    ({"launcher": "k8s"}, "launcher must be one of local, ray, got 'k8s'"),
    ({"ray_address": "auto"}, "ray_address ('auto') needs launcher: ray"),
])
def test_launcher_settings_are_checked(settings, message):
    from resilient_moe.deployment import DeploymentConfig
    from resilient_moe.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DeploymentConfig.from_dict(settings, source="test.yaml")
    assert DeploymentConfig(launcher="ray", ray_address="auto").ray_address == "auto"


def test_the_local_launcher_never_imports_ray():
    import subprocess
    import sys

    code = ("import sys; import resilient_moe.cli, resilient_moe.supervisor, resilient_moe.launch; "
            "from resilient_moe.launch import make_cluster; from resilient_moe.deployment import DeploymentConfig; "
            "c = make_cluster(DeploymentConfig()); assert type(c.backend).__name__ == 'LocalBackend'; "
            "print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"

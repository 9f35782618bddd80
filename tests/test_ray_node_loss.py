"""A whole node lost under load, on a Ray test cluster (head + 3 worker nodes on loopback): the node that
hosts an attention worker and an expert worker is removed at once (every process on it killed in the
same instant), its KV store with them. Every stream finishes token-identical to a failure-free run, the
requests of the lost attention worker are restored from the replica of their KV checkpoint on another
node (not recomputed), and the replacements start on surviving nodes."""

from __future__ import annotations

import random

import pytest

from conftest import wait_until, worker_load
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch import make_cluster
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend import Frontend

pytest.importorskip("ray")


def workload(n: int = 16, max_tokens: int = 40):
    rng = random.Random(11)
    # At least one whole KV block (16 positions) each: every stream has a checkpoint to restore.
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(20, 40))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def load_of(cluster, key: str, role: int = pb.ATTENTION) -> float:
    return sum(w.load.get(key, 0.0) for w in cluster.state().workers if w.role == role and w.state == pb.READY)


@pytest.mark.parametrize("how", ["remove-node", "node-kill"])
def test_node_loss_loses_no_token_and_replaces_on_surviving_nodes(ray_cluster, tiny_model, tmp_path, how):
    """`remove-node`: the test cluster takes the node away; `node-kill`: the launcher's chaos path
    (POST /admin/node-kill), which kills the node's raylet through Ray, as it would on a real host."""
    prompts, params = workload()
    reference = [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=3, launcher="ray")
    try:
        with make_cluster(dep, log_dir=tmp_path) as cluster:
            frontend = Frontend(cluster.controller_address).start()
            try:
                handles = [frontend.submit(p, params) for p in prompts]
                wait_until(lambda: all(len(h.tokens) >= 4 for h in handles), 120, "every stream to be under way")
                victim = cluster.nodes["aw-0"]
                on_node = sorted(n for n, node in cluster.nodes.items() if node == victim)
                assert "aw-0" in on_node and any(n.startswith("ew-") for n in on_node), on_node
                moved = [h for h in handles if h.worker == "aw-0" and not h.done]
                assert moved, "some streams run on the attention worker that is lost"
                wait_until(lambda: worker_load(cluster, "aw-0", "ckpt_replica_acks") > 0
                           and worker_load(cluster, "aw-0", "ckpt_replicas") == 1, 30, "aw-0's replica to hold blocks")
                if how == "node-kill":
                    cluster.kill_node(victim)
                    wait_until(lambda: victim in cluster.lost_nodes, 30, "the launcher to see the node lost")
                    ray_cluster.remove_node(victim)  # its remains (object store) go too
                else:
                    ray_cluster.remove_node(victim)
                outputs = [h.wait(180).token_ids for h in handles]
                assert outputs == reference, "a stream differs from the failure-free run"
                assert all(h.moves >= 1 for h in moved)
                # Replacements for every worker of the lost node, on surviving nodes, serving again.
                wait_until(lambda: all(n in cluster.nodes and cluster.nodes[n] != victim for n in on_node), 60,
                           "replacements on surviving nodes")
                alive = set(ray_cluster.worker_nodes)
                assert all(cluster.nodes[n] in alive for n in on_node)
                assert {(w, dead) for w, dead, _ in cluster.replaced} >= {(n, victim) for n in on_node}
                wait_until(lambda: all(w.state == pb.READY and w.node != victim for w in cluster.state().workers
                                       if w.name in on_node), 90, "the replacements to be ready")
                # Restored from the replica of the KV checkpoint on another node (the primary store died with
                # the node), not recomputed from the prompt.
                counters = {w.name: {k: v for k, v in w.load.items() if k.startswith(("ckpt_restore", "requests_re"))}
                            for w in cluster.state().workers if w.role == pb.ATTENTION}
                assert load_of(cluster, "ckpt_restored_replica") == len(moved), counters
                assert load_of(cluster, "ckpt_restored_local") == 0
                assert load_of(cluster, "requests_recomputed") == 0
                later = [frontend.submit(p, params) for p in prompts[:4]]
                assert [h.wait(120).token_ids for h in later] == reference[:4]
            finally:
                frontend.close()
    finally:
        ray_cluster.refill()  # the session's cluster keeps 3 worker nodes

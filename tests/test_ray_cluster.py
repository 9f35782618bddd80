"""The Ray launcher on a Ray test cluster (head + 3 worker nodes on loopback): every role runs as an
actor on its node, workers spread so that no node holds every attention worker or every copy of an
expert, links are shm within a node and TCP across, and the output is token-identical to one process."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from resilient_moe.config import DeploymentConfig, EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch import make_cluster
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend import Frontend

pytest.importorskip("ray")


def workload(n: int = 6, max_tokens: int = 12):
    rng = random.Random(3)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(4, 20))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def test_ray_cluster_spreads_workers_over_nodes_and_serves(ray_cluster, tiny_model, tmp_path):
    prompts, params = workload()
    reference = [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=3, launcher="ray")
    with make_cluster(dep, log_dir=tmp_path) as cluster:
        state = cluster.state()
        node_of = {w.name: w.node for w in state.workers}
        workers = set(ray_cluster.worker_nodes)
        # Every worker reports the Ray node id of the node its actor runs on; none on the head.
        for name in ("aw-0", "aw-1", "ew-0", "ew-1", "ew-2"):
            assert node_of[name] == cluster.nodes[name] and node_of[name] in workers, name
        assert node_of["controller" if "controller" in node_of else "kv-store"] not in workers
        assert len({node_of["aw-0"], node_of["aw-1"]}) == 2, "no node holds every attention worker"
        copies = defaultdict(set)
        num_experts = state.ert.num_experts
        for i, entry in enumerate(state.ert.entries):
            for w in entry.workers:
                copies[divmod(i, num_experts)].add(node_of[w])
        assert copies and all(len(nodes) >= 2 for nodes in copies.values()), "an expert's copies on one node"
        # Expert workers offer shm and TCP; the controller is reached over TCP.
        for w in state.workers:
            if w.role == pb.EXPERT:
                assert {a.partition(":")[0] for a in w.data_address.split()} == {"shm", "tcp"}
        assert cluster.controller_address.startswith("127.0.0.1:")
        frontend = Frontend(cluster.controller_address).start()
        try:
            outputs = frontend.generate(prompts, params, timeout_s=120)
        finally:
            frontend.close()
        assert [o.token_ids for o in outputs] == reference
        # Each attention worker linked over shm to the expert worker on its node and over TCP to the others.
        for aw in ("aw-0", "aw-1"):
            load = next(w.load for w in cluster.state().workers if w.name == aw)
            local = [ew for ew in ("ew-0", "ew-1", "ew-2") if node_of[ew] == node_of[aw]]
            assert load.get("links_shm", 0) == len(local) and load.get("links_tcp", 0) == 3 - len(local), (aw, dict(load))

"""The Ray launcher on a Ray test cluster (head + 3 worker nodes on loopback): every role runs as an
actor's child process on its node, workers spread so that no node holds every attention worker or every
copy of an expert, links are shm within a node and TCP across, the output is token-identical to one
process, and the cluster secret reaches every worker without a command line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import defaultdict

import pytest

from resilient_moe import auth
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch import make_cluster
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend import Frontend

pytest.importorskip("ray")

def workload(n: int = 6, max_tokens: int = 12):
    rng = random.Random(3)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(4, 20))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_model, tmp_path_factory):
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=3, launcher="ray")
    with make_cluster(dep, log_dir=tmp_path_factory.mktemp("ray-logs")) as started:
        yield started


def test_ray_cluster_spreads_workers_over_nodes_and_serves(cluster, ray_cluster, tiny_model):
    prompts, params = workload()
    reference = [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]
    state = cluster.state()
    node_of = {w.name: w.node for w in state.workers}
    workers = set(ray_cluster.worker_nodes)
    # Every worker reports the Ray node id of the node its actor runs on; the control plane stays on the head.
    for name in ("aw-0", "aw-1", "ew-0", "ew-1", "ew-2"):
        assert node_of[name] == cluster.nodes[name] and node_of[name] in workers, name
    assert cluster.nodes["controller"] == cluster.head not in workers
    stores = {node_of[w.name] for w in state.workers if w.role == pb.KV_STORE}
    assert stores == workers, "a KV store on every worker node (replicas go to another node's)"
    assert len({node_of["aw-0"], node_of["aw-1"]}) == 2, "no node holds every attention worker"
    copies = defaultdict(set)
    num_experts = state.ert.num_experts
    for i, entry in enumerate(state.ert.entries):
        for w in entry.workers:
            copies[divmod(i, num_experts)].add(node_of[w])
    assert copies and all(len(nodes) >= 2 for nodes in copies.values()), "an expert's copies on one node"
    # Expert workers offer shm and TCP; the controller is reached over TCP, on loopback only.
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
    state = cluster.state()
    for aw in ("aw-0", "aw-1"):
        load = next(w.load for w in state.workers if w.name == aw)
        local = [ew for ew in ("ew-0", "ew-1", "ew-2") if node_of[ew] == node_of[aw]]
        assert load.get("links_shm") == len(local) and load.get("links_tcp") == 3 - len(local), (aw, dict(load))


def test_the_secret_is_in_no_environment_and_no_command_line(cluster):
    """Every worker proves the secret (the cluster serves: test above) yet none has it in its environment
    (it gets it from its fork server's spawn request: auth.py) nor on its command line."""
    secret = auth.secret().hex().encode()
    for name, pid in cluster.pids.items():
        with open(f"/proc/{pid}/environ", "rb") as f:
            block = f.read()
        assert secret not in block and (auth.SECRET_ENV + "=").encode() not in block, name
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert secret not in f.read(), f"{name}'s command line holds the secret"


ROGUE = r"""
import json, os, sys
import grpc
from resilient_moe import auth
from resilient_moe.controller.client import worker_info
from resilient_moe.datapath.dial import connect
from resilient_moe.datapath.link import PeerInfo
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.proto import controller_pb2_grpc as pb_grpc
auth.install(auth.new_secret())  # a secret, but not the cluster's
controller, link_address = sys.argv[1], sys.argv[2]
out = {}
def attempt(what, call):
    try:
        call()
        out[what] = "accepted"
    except Exception as e:
        out[what] = "refused: " + type(e).__name__
stub = pb_grpc.ControllerStub(grpc.insecure_channel(controller))
attempt("register", lambda: stub.Register(pb.RegisterRequest(worker=worker_info("ew-0", pb.EXPERT, 0)), timeout=3))
attempt("admin", lambda: stub.SetFaults(pb.FaultUpdate(clear=True), timeout=3))
attempt("link", lambda: connect(link_address, PeerInfo("aw-9", 9, 1, os.getpid()), timeout=3).close())
print(json.dumps(out))
"""


def test_a_process_without_the_secret_cannot_register_call_the_controller_or_link(cluster):
    # Runs last in this module: were it accepted, it would fence ew-0.
    ew = next(w for w in cluster.state().workers if w.name == "ew-1")
    tcp = next(a for a in ew.data_address.split() if a.startswith("tcp:"))
    env = {k: v for k, v in os.environ.items() if k != auth.SECRET_ENV}  # it installs a wrong one
    done = subprocess.run([sys.executable, "-c", ROGUE, cluster.controller_address, tcp], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(v.startswith("refused") for v in answers.values()), answers

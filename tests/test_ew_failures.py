"""Expert-worker failures under load, with real signals: every request completes token-identically.

Each test runs a live cluster (controller, attention worker, expert workers as processes), sends a
signal to an expert worker in the middle of generation, and compares every request's tokens with the
colocated engine's.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from conftest import hf_config, pid_alive, wait_until, worker_load
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.model.config import ModelConfig
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch import make_cluster
from resilient_moe.launch.launcher import Launcher
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend import Frontend, RequestFailed

NUM_REQUESTS = 16


def workload(seed: int = 3):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(2, 30))] for _ in range(NUM_REQUESTS)]
    params = [SamplingParams(max_tokens=48, ignore_eos=True) for _ in range(NUM_REQUESTS - 2)]
    params += [SamplingParams(max_tokens=48, temperature=0.9, top_p=0.9, seed=s, ignore_eos=True) for s in (5, 6)]
    return prompts, params


@pytest.fixture(scope="module")
def reference(tiny_model):
    prompts, params = workload()
    return [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]


def worker(state: pb.ClusterState, name: str) -> pb.WorkerInfo:
    return next(w for w in state.workers if w.name == name)


def start(cluster: Launcher) -> Frontend:
    return Frontend(cluster.controller_address).start()


def submit_and_wait_for_tokens(frontend: Frontend, prompts, params, tokens: int = 6):
    handles = [frontend.submit(p, s) for p, s in zip(prompts, params)]
    wait_until(lambda: all(len(h.tokens) >= tokens for h in handles), 60, "every request to be mid-generation")
    return handles


def replacement_ready(cluster: Launcher, name: str, old_pid: int):
    def check():
        w = worker(cluster.state(), name)
        return w.state == pb.READY and w.pid != old_pid and w
    return check


def test_sigkill_of_an_expert_worker_mid_generation(tiny_model, reference, fork_server, tmp_path):
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=3, micro_batches=2)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = start(cluster)
        try:
            handles = submit_and_wait_for_tokens(frontend, prompts, params)
            victim = cluster.pids["ew-1"]
            old = worker(cluster.state(), "ew-1")
            cluster.kill("ew-1", signal.SIGKILL)
            tokens = [h.wait(120).token_ids for h in handles]
            assert tokens == reference
            assert all(len(h.tokens) == 48 for h in handles)

            new = wait_until(replacement_ready(cluster, "ew-1", victim), 60, "a replacement ew-1")
            assert new.incarnation > old.incarnation
            kinds = [(e.kind, e.worker) for e in cluster.state().events]
            assert ("dead", "ew-1") in kinds and ("fenced", "ew-1") in kinds
            state = cluster.state()
            assert list(state.unprotected) == [], "redundancy is restored once the replacement is ready"
            # The replacement is primary again for its experts, and later requests reach it.
            assert any(list(c.workers)[:1] == ["ew-1"] for c in state.ert.entries)
            rows_before = new.load.get("rows", 0.0)
            later = [frontend.submit(p, s) for p, s in zip(prompts[:4], params[:4])]
            assert [h.wait(60).token_ids for h in later] == reference[:4]
            wait_until(lambda: worker(cluster.state(), "ew-1").load.get("rows", 0.0) > rows_before, 10,
                       "the replacement to serve rows of later requests")
        finally:
            frontend.close()
    assert not pid_alive(victim)


def test_sigstop_hang_then_sigcont_drops_the_stale_replies(tiny_model, reference, fork_server, tmp_path):
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=3, micro_batches=2,
                           transport="tcp")
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = start(cluster)
        try:
            handles = submit_and_wait_for_tokens(frontend, prompts, params)
            victim = cluster.pids["ew-1"]
            cluster.kill("ew-1", signal.SIGSTOP)
            try:
                tokens = [h.wait(120).token_ids for h in handles]
                # Hung for longer than the probe threshold and the heartbeat timeout: declared dead,
                # fenced, replaced; only then does it wake up.
                wait_until(replacement_ready(cluster, "ew-1", victim), 60, "a replacement ew-1")
            finally:
                os.kill(victim, signal.SIGCONT)
            assert tokens == reference
            assert worker_load(cluster, "aw-0", "suspicions") >= 1, "the silent worker was suspected through probes"
            # The woken incarnation answers the frames it held; those answers are dropped and counted,
            # and it stops instead of serving again under its old incarnation.
            wait_until(lambda: worker_load(cluster, "aw-0", "stale_replies") >= 1, 10, "the woken worker's replies to be counted")
            wait_until(lambda: not pid_alive(victim), 10, "the fenced incarnation to exit")
            later = [frontend.submit(p, s) for p, s in zip(prompts[:4], params[:4])]
            assert [h.wait(60).token_ids for h in later] == reference[:4]
        finally:
            frontend.close()


def test_two_expert_workers_killed_one_after_another(tiny_model, reference, fork_server, tmp_path):
    prompts, params = workload()
    cfg = ModelConfig.from_pretrained(tiny_model)
    two_shadows_each = 2 * cfg.num_experts // 4  # per worker per layer: every expert gets two shadows
    budget = two_shadows_each * cfg.expert_bytes(4) * len(cfg.sparse_layer_ids)
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=4, micro_batches=2,
                           shadow_budget_bytes=budget)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = start(cluster)
        try:
            assert all(len(c.workers) == 3 for c in cluster.state().ert.entries if c.workers)
            handles = submit_and_wait_for_tokens(frontend, prompts, params, tokens=4)
            cluster.kill("ew-1", signal.SIGKILL)
            first = min(len(h.tokens) for h in handles)
            wait_until(lambda: min(len(h.tokens) for h in handles) >= first + 3, 60, "progress after the first loss")
            cluster.kill("ew-2", signal.SIGKILL)
            tokens = [h.wait(120).token_ids for h in handles]
        finally:
            frontend.close()
    assert tokens == reference


# ---- an expert with no replica left ----------------------------------------------------------

NUM_EXPERTS = 8


def save_routing_model(path):
    """A Mixtral checkpoint whose routing is known: token t always goes to expert t % 8 in every layer,
    and generates 16 + (t % 8), so a request whose prompt tokens share a residue uses one expert only."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = hf_config("mixtral", num_local_experts=NUM_EXPERTS, num_experts_per_tok=1, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    hidden, vocab = config.hidden_size, config.vocab_size
    with torch.no_grad():
        embed = torch.zeros(vocab, hidden)
        embed[torch.arange(vocab), torch.arange(vocab) % NUM_EXPERTS] = 1.0
        model.model.embed_tokens.weight.copy_(embed)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()  # attention adds nothing to the residual stream
            gate = torch.zeros(NUM_EXPERTS, hidden)
            gate[torch.arange(NUM_EXPERTS), torch.arange(NUM_EXPERTS)] = 10.0
            layer.mlp.gate.weight.copy_(gate)
            layer.mlp.experts.down_proj.mul_(1e-3)  # experts barely move the residual: routing stays put
        head = torch.zeros(vocab, hidden)
        head[16 + torch.arange(NUM_EXPERTS), torch.arange(NUM_EXPERTS)] = 10.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(path)
    return path


def test_an_expert_with_no_replica_left_fails_only_its_requests(fork_server, tmp_path):
    """Past expert_wait_s (short here, so it passes before the replacement can load), only the requests
    whose tokens need the lost experts fail, naming them; the rest complete."""
    model_dir = save_routing_model(tmp_path / "routing")
    prompts = [[r + 8 * k for k in range(1, 2 + i)] for r in range(NUM_EXPERTS) for i in range(2)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    reference = [r.token_ids for r in LLMEngine(model_dir, EngineConfig()).generate(prompts, params)]
    assert all(set(t) == {16 + p[0] % NUM_EXPERTS} for p, t in zip(prompts, reference)), "routing is as designed"

    dep = DeploymentConfig(model=str(model_dir), attention_workers=1, expert_workers=3, micro_batches=2,
                           shadow_budget_bytes=0, expert_wait_s=0.02)
    with make_cluster(dep, log_dir=tmp_path / "logs", fork_server=fork_server) as cluster:
        frontend = start(cluster)
        try:
            state = cluster.state()
            assert len(state.unprotected) == NUM_EXPERTS * 2, "a zero budget leaves every expert unprotected"
            assert any(e.kind == "unprotected" for e in state.events)
            lost = {i for i, c in enumerate(state.ert.entries[:NUM_EXPERTS]) if list(c.workers) == ["ew-0"]}
            assert lost, "ew-0 is the only holder of some experts"
            handles = submit_and_wait_for_tokens(frontend, prompts, [params] * len(prompts), tokens=3)
            cluster.kill("ew-0", signal.SIGKILL)
            deadline = time.monotonic() + 120
            for prompt, handle, expected in zip(prompts, handles, reference):
                if prompt[0] % NUM_EXPERTS in lost:
                    with pytest.raises(RequestFailed, match="expert") as failure:
                        handle.wait(max(1.0, deadline - time.monotonic()))
                    assert failure.value.kind == "expert_unavailable"
                else:
                    assert handle.wait(max(1.0, deadline - time.monotonic())).token_ids == expected
        finally:
            frontend.close()

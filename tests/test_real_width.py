"""At real widths (hidden 2048, 64 experts, top-8, head_dim 128) a 3000-token prompt gives HF's tokens
colocated and through every datapath, and frames never meet a size limit: each micro-batch's rows for
an expert worker are cut into parts that fit the link (here 2000 rows of 8 KiB per layer and worker).
Small rings do the same to the tiny demo-family model, with a thousand-token prompt."""

from __future__ import annotations

import random

import pytest

from conftest import REAL_NEW_TOKENS, pid_alive, wait_until, worker_load
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch import make_cluster
from resilient_moe.model.tiny import TinySize, make_tiny_model
from resilient_moe.server.frontend import Frontend

GREEDY = SamplingParams(max_tokens=REAL_NEW_TOKENS, ignore_eos=True)


def run_cluster(dep: DeploymentConfig, fork_server, log_dir, prompts, params, timeout_s: float = 300.0):
    """Tokens of each prompt through a local cluster, and the cluster's parts counter; every process is
    gone afterwards."""
    with make_cluster(dep, log_dir=log_dir, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, s) for p, s in zip(prompts, params)]
            tokens = [h.wait(timeout_s).token_ids for h in handles]
        finally:
            frontend.close()
        wait_until(lambda: worker_load(cluster, "aw-0", "frames_sent") > 0, 10, "aw-0 to report its counters")
        split = sum(worker_load(cluster, f"aw-{i}", "split_parts") for i in range(dep.attention_workers))
        pids = list(cluster.pids.values())
    wait_until(lambda: not any(pid_alive(p) for p in pids), 15, "every worker to exit after stop")
    return tokens, split


def test_colocated_long_prompt_matches_hf(real_width):
    model, prompt, hf_tokens = real_width
    engine = LLMEngine(model, EngineConfig(max_model_len=4096))
    assert engine.generate([prompt], GREEDY)[0].token_ids == hf_tokens


@pytest.mark.parametrize("A,E,m,transport", [(1, 2, 1, "shm"), (2, 3, 2, "tcp")], ids=["1a2e-shm", "2a3e-m2-tcp"])
def test_disaggregated_long_prompt_matches_hf(real_width, fork_server, tmp_path, A, E, m, transport):
    model, prompt, hf_tokens = real_width
    dep = DeploymentConfig(model=str(model), attention_workers=A, expert_workers=E, micro_batches=m,
                           transport=transport, engine=EngineConfig(max_model_len=4096), kv_checkpoint=False)
    # Two requests, so with two attention workers both serve one.
    tokens, split = run_cluster(dep, fork_server, tmp_path, [prompt, prompt[:2500]], [GREEDY, GREEDY])
    assert tokens[0] == hf_tokens
    assert split > 0, "the prompt's rows travelled in several parts"


def test_small_rings_split_frames_of_a_thousand_token_prompt(fork_server, tmp_path):
    """The demo family with 64 KiB rings (32 KiB frames): a 1000-token prompt's 2000 (token, expert)
    rows per layer need many parts each way; the tokens are the colocated engine's."""
    model = make_tiny_model(tmp_path / "model", "mixtral", seed=7, size=TinySize(max_position_embeddings=2048))
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(1000)], [rng.randrange(3, 500) for _ in range(40)]]
    params = [SamplingParams(max_tokens=16, ignore_eos=True)] * 2
    expected = [r.token_ids for r in LLMEngine(model, EngineConfig()).generate(prompts, params)]
    dep = DeploymentConfig(model=str(model), attention_workers=2, expert_workers=2, ring_bytes=65536)
    tokens, split = run_cluster(dep, fork_server, tmp_path / "logs", prompts, params)
    assert tokens == expected
    assert split > 0


def test_long_prompt_survives_an_attention_and_an_expert_worker_kill(real_width, fork_server, tmp_path):
    """At real width, once the 3000-token prompt has its first token, its attention worker and an
    expert worker are SIGKILLed at once: the request moves, restores its KV (checkpointed from the
    prompt's chunks) on the other attention worker, replays on shadows, and still gives HF's tokens."""
    import os
    import signal

    model, prompt, hf_tokens = real_width
    dep = DeploymentConfig(model=str(model), attention_workers=2, expert_workers=3,
                           engine=EngineConfig(max_model_len=4096))
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            handle = frontend.submit(prompt, GREEDY)
            wait_until(lambda: len(handle.tokens) >= 1, 300, "the prompt's first token")
            victim = handle.worker
            survivor = "aw-1" if victim == "aw-0" else "aw-0"
            for name in (victim, "ew-1"):
                os.kill(cluster.pids[name], signal.SIGKILL)
            assert handle.wait(300).token_ids == hf_tokens
            assert handle.moves >= 1
            wait_until(lambda: worker_load(cluster, survivor, "ckpt_restored") >= 1, 20, "the restore to be reported")
            assert worker_load(cluster, survivor, "ckpt_restored_tokens") > 0, "KV restored, not all recomputed"
            # Top-8 of 64 experts over 3 expert workers: a token's row goes once to each worker it needs.
            assert 0 < worker_load(cluster, survivor, "rows_sent") < worker_load(cluster, survivor, "pairs_sent")
        finally:
            frontend.close()

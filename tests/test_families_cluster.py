"""DeepSeek-V3 and GPT-OSS as a cluster: disaggregated, and through worker failures.

Checkpoints are written by transformers' `save_pretrained` (test_parity_families.py builds them): a
DeepSeek-V3 with latent attention, YaRN, grouped routing, shared experts and a dense first layer, and a
GPT-OSS with sinks, biases, and a sliding window (6) shorter than every request, so its restores
carry only the window of its sliding layers.
"""

from __future__ import annotations

import random

import pytest

from conftest import pid_alive, wait_until, worker_load
from test_parity_families import NEW_FAMILIES, save_family_model
from test_parity_hf import hf_reference
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.model.config import ModelConfig
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.engine.kv_cache import LayerWindows
from resilient_moe.launch import make_cluster
from resilient_moe.server.frontend import Frontend

VOCAB = 320
NUM_STREAMS = 16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-clusters")
    return {family: save_family_model(root / family, family, seed=31 + i) for i, family in enumerate(NEW_FAMILIES)}


def workload(n: int, max_tokens: int, seed: int):
    """n prompts of 2-40 tokens, greedy except the last two (seeded sampling)."""
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 40))] for _ in range(n)]
    params = [SamplingParams(max_tokens=max_tokens, ignore_eos=True) for _ in range(n - 2)]
    params += [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=20, seed=s, ignore_eos=True)
               for s in (3, 4)]
    return prompts, params


def colocated(model_dir, prompts, params):
    return [r.token_ids for r in LLMEngine(model_dir, EngineConfig()).generate(prompts, params)]


def cluster_config(model_dir, **overrides) -> DeploymentConfig:
    return DeploymentConfig(model=str(model_dir), attention_workers=2, expert_workers=3, micro_batches=2, **overrides)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_disaggregated_matches_colocated_and_transformers(checkpoints, fork_server, tmp_path, family):
    model_dir = checkpoints[family]
    prompts, params = workload(10, 24, seed=1)
    expected = colocated(model_dir, prompts, params)
    hf = hf_reference(model_dir, prompts[:8], 24)
    assert expected[:8] == [tokens for tokens, _ in hf], "the colocated engine gives transformers' greedy tokens"
    with make_cluster(cluster_config(model_dir, kv_checkpoint=False), log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            # Three waves, each joining requests that are already decoding (continuous batching).
            handles = [frontend.submit(p, s) for p, s in zip(prompts[:4], params[:4])]
            wait_until(lambda: len(handles[0].tokens) >= 3, 60, "the first wave to produce tokens")
            handles += [frontend.submit(p, s) for p, s in zip(prompts[4:7], params[4:7])]
            wait_until(lambda: len(handles[4].tokens) >= 2, 60, "the second wave to produce tokens")
            handles += [frontend.submit(p, s) for p, s in zip(prompts[7:], params[7:])]
            tokens = [h.wait(120).token_ids for h in handles]
        finally:
            frontend.close()
        assert {h.worker for h in handles} == {"aw-0", "aw-1"}, "both attention workers served"
        pids = list(cluster.pids.values())
    assert tokens == expected
    wait_until(lambda: not any(pid_alive(p) for p in pids), 15, "every worker to exit after stop")


def expected_restore_bytes(cfg: ModelConfig, restored: float, tokens: float, itemsize: int = 4) -> float:
    """What restoring `restored` requests of `tokens` committed positions in all reads from the store:
    every position's row for full-attention layers; for sliding layers only the window before the
    next position (window - 1 rows: every restored request here has more positions than that)."""
    windows = LayerWindows.of(cfg)
    per_row = cfg.kv_row_width * itemsize
    window_rows = 0 if windows.window is None else restored * (windows.window - 1)
    return (tokens * len(windows.full) + window_rows * len(windows.windowed)) * per_row


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_attention_and_expert_worker_kills_during_16_streams(checkpoints, fork_server, tmp_path, family):
    model_dir = checkpoints[family]
    cfg = ModelConfig.from_pretrained(model_dir)
    prompts, params = workload(NUM_STREAMS, 64, seed=2)
    expected = colocated(model_dir, prompts, params)
    with make_cluster(cluster_config(model_dir), log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, s) for p, s in zip(prompts, params)]
            wait_until(lambda: all(len(h.tokens) >= 16 for h in handles), 60, "every stream to be mid-generation")
            moved = [h for h in handles if h.worker == "aw-0"]
            assert moved, "the frontend spread the streams over both attention workers"
            cluster.kill("aw-0")
            progress = min(len(h.tokens) for h in handles)
            wait_until(lambda: min(len(h.tokens) for h in handles) >= progress + 4, 60, "progress after the first kill")
            cluster.kill("ew-1")
            tokens = [h.wait(120).token_ids for h in handles]
            assert tokens == expected
            assert all(h.moves >= 1 for h in moved) and all(h.duplicates == 0 for h in handles)
            # The adopter restored KV from the store (latent rows for DeepSeek, the window for GPT-OSS's
            # sliding layers), and read exactly that many bytes: for DeepSeek L * (C + r) * 4 per token.
            answered = ("ckpt_restored", "ckpt_restore_misses")
            wait_until(lambda: sum(worker_load(cluster, "aw-1", k) for k in answered) >= len(moved), 10,
                       "aw-1 to report every restore")
            restored = worker_load(cluster, "aw-1", "ckpt_restored")
            restored_tokens = worker_load(cluster, "aw-1", "ckpt_restored_tokens")
            restored_bytes = worker_load(cluster, "aw-1", "ckpt_restored_bytes")
            assert restored_tokens > 0
            assert restored_bytes == expected_restore_bytes(cfg, restored, restored_tokens)
            if family == "deepseek_v3":
                mla = cfg.mla
                latent = mla.kv_lora_rank + mla.qk_rope_head_dim
                assert restored_bytes == restored_tokens * cfg.num_layers * latent * 4
                full_kv = cfg.num_heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim)
                assert restored_bytes < restored_tokens * cfg.num_layers * full_kv * 4 / 3, "latent, not K and V"
            else:
                assert restored_bytes < restored_tokens * cfg.num_layers * cfg.kv_row_width * 4, "only the window"
        finally:
            frontend.close()

"""DeepSeek-V3 and GPT-OSS served over HTTP (tiny checkpoints from `make-tiny-model`, tokenizer included):
streams survive a worker kill token-identically, and the chaos CLI runs a scenario against the same
server (a second kill, of the other role) with no request lost and no token changed."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from conftest import wait_until
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.model.config import ModelConfig
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.model.tiny import make_tiny_model
from serving import ADMIN_TOKEN, admin_headers, serving_stack, stream_completion, streams_through_kill

PROMPTS = [[1, 45, 393, 84, 461], [1, 17, 230, 99, 12, 300, 41], [1, 500, 3], [1, 88, 77, 66], [1, 9, 8, 7, 6, 5]]
MAX_TOKENS = 128  # on a loaded machine the first stream must not finish before the last has 24 tokens


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-families")
    return {family: make_tiny_model(root / family, family, seed=5) for family in ("deepseek_v3", "gpt_oss")}


def chaos_scenario(path, target: str) -> None:
    path.write_text(json.dumps({
        "name": f"kill {target}",
        "workload": {"concurrency": 4, "duration_s": 6, "prompt_tokens": [4, 24], "output_tokens": [24, 48],
                     "temperature": 0.8, "seed": 5},
        "faults": [{"at_s": 2, "fault": "kill", "target": target}],
        "assertions": {"zero_lost_requests": True, "zero_token_mismatches": True},
        "settle_timeout_s": 30,
    }))  # YAML is a superset of JSON


def aw1_load(stack, key: str) -> float:
    cluster = httpx.get(f"{stack.url}/admin/cluster", headers=admin_headers(), timeout=10).json()
    return next(w for w in cluster["workers"] if w["id"] == "aw-1")["load"].get(key, 0.0)


@pytest.mark.parametrize("family,victim,chaos_target", [("deepseek_v3", "aw-0", "ew-1"), ("gpt_oss", "ew-1", "aw-0")])
def test_serves_through_a_kill_and_a_chaos_run(family_models, fork_server, tmp_path, family, victim, chaos_target):
    model = family_models[family]
    engine = LLMEngine(model, EngineConfig(max_model_len=256))
    expected = [r.token_ids for r in engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]
    with serving_stack(model, fork_server, tmp_path / "logs", attention_workers=2, expert_workers=3,
                       max_model_len=256) as stack:
        text = stream_completion(stack.url, "The experts", 8, ignore_eos=True)
        assert len(text.token_ids) == 8 and text.text, "a text prompt through the checkpoint's tokenizer"
        # After 24 tokens every request has a full KV block (16 positions) committed to restore.
        results = streams_through_kill(stack, victim, PROMPTS, max_tokens=MAX_TOKENS, kill_after_tokens=24)
        for result, want in zip(results, expected):
            assert result.error is None and result.done and result.finish_reason == "length"
            assert result.token_ids == want
        if victim == "aw-0":  # the adopter read latent rows back: L * (C + r) floats per position
            wait_until(lambda: aw1_load(stack, "ckpt_restored") >= 1, 10, "aw-1 to report its restores")
            cfg = ModelConfig.from_pretrained(model)
            per_position = cfg.num_layers * (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * 4
            assert aw1_load(stack, "ckpt_restored_bytes") == aw1_load(stack, "ckpt_restored_tokens") * per_position
        wait_until(lambda: httpx.get(f"{stack.url}/ready").status_code == 200, 60, "/ready after the replacement")

        scenario = tmp_path / "scenario.yaml"
        chaos_scenario(scenario, chaos_target)
        out = tmp_path / "chaos"
        done = subprocess.run([sys.executable, "-m", "chaos.cli", "run", str(scenario), "--url", stack.url, "--token",
                               ADMIN_TOKEN, "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads((out / "report.json").read_text())
        totals = report["totals"]
        assert totals["requests"] >= 8 and totals["completed"] == totals["requests"]
        assert totals["lost"] == 0 and totals["token_mismatches"] == 0 and totals["unverified"] == 0
        assert report["faults"][0]["started"] and report["passed"]

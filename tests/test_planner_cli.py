"""`resilient-moe plan` end to end in subprocesses: JSON, table, --explain, plot and YAML; the YAML it
writes starts with `serve --config` and `generate --config` unchanged and serves tokens identical to the
colocated engine; bad input exits 2 with a message naming the problem; --profile runs real workers.

Most tests plan from a synthetic profile of the tiny model (the profile format is a file users may
give with --profile-path); one runs the real profiler briefly.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.planner.profile import PROFILE_VERSION, model_identity
from serving import serve_command

PROMPTS = [[5, 9, 13, 2, 7], [11, 3, 8], [21, 22, 23, 24, 25, 26, 27]]
NEW_TOKENS = 8


def plan(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resilient_moe.cli", "plan", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def write_profile(model_dir: Path, path: Path, cores: int | None = None) -> Path:
    """A profile as the profiler writes one, with coefficients of the order this host measures."""
    data = {
        "version": PROFILE_VERSION, "model": model_identity(model_dir),
        "host": {"hostname": socket.gethostname(), "cpu": "test", "cores": cores or len(os.sched_getaffinity(0)),
                 "memory_bytes": 8e9, "fma_flops": 1e11, "stream_bw": 2e10},
        "settings": {"dtype": "float32", "cores_per_worker": 1, "kv_checkpoint": True},
        "points": [],
        "fit": {"a0": 4e-4, "a1": 2e-5, "a2": 2e-8, "s0": 5e-4, "f0": 5e-5, "c0": 6e-5, "c1": 2e-6, "pipeline_lag_s": 1e-3,
                "sharing_slowdown": 1.2,
                "links": {"shm": {"latency_s": 2e-4, "s_per_byte": 5e-10}}},
    }
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def profiled(tiny_model, tmp_path_factory) -> Path:
    return write_profile(Path(tiny_model), tmp_path_factory.mktemp("plan") / "profile.json")


def test_plan_json_lists_candidates_best_first(tiny_model, profiled):
    result = plan("--model", str(tiny_model), "--profile-path", str(profiled), "--batch-size", "8", "--context", "256",
                  "--json")
    assert result.returncode == 0, result.stderr
    candidates = json.loads(result.stdout)
    assert len(candidates) >= 3
    assert [c["rank"] for c in candidates] == list(range(1, len(candidates) + 1))
    scores = [c["score"] for c in candidates]
    assert scores == sorted(scores, reverse=True)
    for c in candidates:
        assert c["predicted_tokens_per_s"] > 0 and c["tpot_ms"] > 0 and c["batch"] == 8
        loss = c["after_worst_loss"]  # --survive 1 is the default
        assert loss["experts_covered"] and len(loss["lost"]) == 1 and loss["predicted_tokens_per_s"] > 0
        dep = DeploymentConfig.from_dict(c["deployment"])
        assert dep.attention_workers >= 2 and dep.expert_workers >= 2 and dep.engine.max_model_len == 256
        assert dep.engine.max_num_seqs * (dep.attention_workers - 1) >= 8  # room for a lost worker's requests


def test_plan_writes_yaml_plot_and_explains(tiny_model, profiled, tmp_path):
    out, png = tmp_path / "plan.yaml", tmp_path / "plan.png"
    result = plan("--model", str(tiny_model), "--profile-path", str(profiled), "--batch-size", "8", "--context", "256",
                  "--out", str(out), "--plot", str(png), "--explain")
    assert result.returncode == 0, result.stderr
    assert "layout" in result.stdout and "after worst loss" in result.stdout  # the table
    explained = result.stdout[result.stdout.index("Why "):]
    for words in ("T_a", "T_e", "T_c", "m >=", "bottleneck", "binding constraint", "after losing", "runner-up"):
        assert words in explained, explained
    dep = DeploymentConfig.from_yaml(out)
    assert Path(dep.model) == Path(tiny_model).resolve()
    winner = json.loads(plan("--model", str(tiny_model), "--profile-path", str(profiled), "--batch-size", "8",
                             "--context", "256", "--json").stdout)[0]
    assert DeploymentConfig.from_dict(winner["deployment"]) == dep
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def _reference(model_dir) -> list[list[int]]:
    engine = LLMEngine(model_dir, EngineConfig(max_model_len=256))
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    return [r.token_ids for r in engine.generate(PROMPTS, params)]


def test_the_written_yaml_serves_token_identical_output(tiny_model, profiled, tmp_path):
    out = tmp_path / "plan.yaml"
    result = plan("--model", str(tiny_model), "--profile-path", str(profiled), "--batch-size", "8", "--context", "256",
                  "--out", str(out))
    assert result.returncode == 0, result.stderr
    dep = DeploymentConfig.from_yaml(out)
    expected = _reference(tiny_model)

    # generate --config runs it unchanged (no --model: the YAML names it)
    gen = subprocess.run([sys.executable, "-m", "resilient_moe.cli", "generate", "--config", str(out),
                          *[a for p in PROMPTS for a in ("--prompt-ids", ",".join(map(str, p)))],
                          "--max-tokens", str(NEW_TOKENS), "--ignore-eos", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert [r["token_ids"] for r in json.loads(gen.stdout)] == expected

    # serve --config runs it unchanged, over HTTP
    with serve_command(["--config", str(out), "--port", "0", "--log-dir", str(tmp_path / "logs")]) as served:
        text = "".join(served.output)
        for i in range(dep.attention_workers):
            assert re.search(rf"^\s+[\d.]+s\s+aw-{i}\s+ready", text, re.M), text
        for j in range(dep.expert_workers):
            assert re.search(rf"^\s+[\d.]+s\s+ew-{j}\s+ready", text, re.M), text
        got = []
        for prompt in PROMPTS:
            answer = httpx.post(f"{served.url}/v1/completions", timeout=120, json={
                "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True})
            assert answer.status_code == 200, answer.text
            got.append(answer.json()["choices"][0]["token_ids"])
        assert got == expected


@pytest.fixture(scope="module")
def big_config(tmp_path_factory) -> Path:
    """A Mixtral-8x22B-sized model: its config.json alone (enough to plan for other hardware)."""
    d = tmp_path_factory.mktemp("mixtral-8x22b")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32768, "hidden_size": 6144,
        "intermediate_size": 16384, "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 65536, "rope_theta": 1e6}))
    return d


def _refused(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def test_an_slo_no_plan_meets_names_the_binding_constraint(tiny_model, profiled):
    _refused(plan("--model", str(tiny_model), "--profile-path", str(profiled), "--slo-tpot-ms", "0.01"),
             "no plan meets TPOT <= 0.01 ms", "binding constraint SLO: TPOT", "the closest plan")


def test_unknown_hardware_is_refused(tiny_model, big_config):
    _refused(plan("--model", str(big_config), "--hardware", "h100,h300"), "unknown hardware 'h300'", "known: a100")


def test_a_model_that_does_not_fit_is_refused(big_config):
    _refused(plan("--model", str(big_config), "--hardware", "l40s", "--max-accelerators", "4", "--survive", "0"),
             "the model does not fit", "memory: expert worker")


def test_other_bad_input_is_refused(tiny_model, big_config, profiled, tmp_path):
    _refused(plan("--model", str(tiny_model), "--profile-path", str(tmp_path / "none.json")), "no profile at")
    prices = tmp_path / "prices.yaml"
    prices.write_text("h100: 2.5\nb300: 9\n")
    _refused(plan("--model", str(big_config), "--hardware", "h100", "--prices", str(prices)), "unknown hardware 'b300'")
    prices.write_text("h100: free\n")
    _refused(plan("--model", str(big_config), "--hardware", "h100", "--prices", str(prices)),
             "the price of h100 must be a positive number")
    _refused(plan("--model", str(tiny_model), "--profile-path", str(profiled), "--context", "100000"),
             "exceeds the model's max_position_embeddings")
    _refused(plan("--model", str(tmp_path / "nowhere")), "does not exist")
    (tmp_path / "broken.json").write_text("{\"version\": 1}")
    _refused(plan("--model", str(tiny_model), "--profile-path", str(tmp_path / "broken.json")), "lacks its fit")
    _refused(plan("--model", str(big_config), "--hardware", "h100", "--profile"), "--profile measures this host")


def test_simulated_plans_say_what_the_runtime_does_not_honour(big_config, tmp_path):
    out = tmp_path / "h100.yaml"
    result = plan("--model", str(big_config), "--hardware", "h100", "--slo-tpot-ms", "100", "--out", str(out),
                  "--json", "--max-accelerators", "48")
    assert result.returncode == 0, result.stderr
    best = json.loads(result.stdout)[0]
    dep = DeploymentConfig.from_yaml(out)
    assert dep.launcher == "ray" and dep.kv_replicas == 1 and dep.engine.dtype == "bfloat16"
    assert best["nodes"]["attention"] >= 2 and best["nodes"]["expert"] >= 2  # a node's loss is survived
    if best["tensor_parallel"]["attention"] > 1 or best["tensor_parallel"]["expert"] > 1:
        assert any("hardware-description dimension" in n for n in best["notes"])
        assert "hardware-description dimension" in out.read_text()


def test_profile_runs_real_workers_and_plans_from_what_it_measured(tiny_model, tmp_path):
    path = tmp_path / "measured.json"
    result = plan("--model", str(tiny_model), "--profile", "--profile-batches", "1,4", "--profile-path", str(path),
                  "--batch-size", "4", "--context", "128", "--survive", "0", "--json", timeout=400)
    assert result.returncode == 0, result.stderr
    profile = json.loads(path.read_text())
    assert profile["model"] == model_identity(tiny_model)
    assert profile["host"]["cores"] == len(os.sched_getaffinity(0)) and profile["host"]["stream_bw"] > 0
    kinds = {(p["transport"], p["micro_batches"], p["batch"]) for p in profile["points"]}
    assert {("shm", 1, 1), ("shm", 1, 4), ("shm", 2, 4), ("tcp", 1, 1), ("tcp", 1, 4)} <= kinds
    for p in profile["points"]:  # every point decoded: the counters moved
        assert p["steps"] > 0 and p["T_a"] > 0 and p["T_e"] > 0 and p["step_s"] > 0
    fit = profile["fit"]
    assert set(fit["links"]) == {"shm", "tcp"}
    assert all(fit[k] >= 0 for k in ("a0", "a1", "a2", "s0", "f0", "c0", "c1")) and fit["a0"] + fit["a1"] > 0
    assert fit["pipeline_lag_s"] >= 0 and fit["sharing_slowdown"] >= 1 and fit["mean_relative_error"]["step"] >= 0
    assert json.loads(result.stdout)[0]["predicted_tokens_per_s"] > 0

"""The `kernels` setting and the batch-invariant Triton kernels, on a machine without a GPU.

Triton reads TRITON_INTERPRET once, when it is imported, and this pytest process may have imported
it already in the compiled mode (transformers does, for GPT-OSS). So the interpreted cases run in
child processes started with TRITON_INTERPRET=1 (tests/interpreter/: every kernel against torch in
float32 and float16 and for batch invariance; whole models against transformers), and the CLI and a
disaggregated cluster run as processes with the variable set. Nothing here changes this process's
environment beyond a test's own scope.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import test_parity_hf as parity
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.errors import ConfigError
from resilient_moe.kernels import resolve_kernels
from resilient_moe.model import ops
from resilient_moe.model.kernel_choice import TorchLinear

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 4


def interpreted_env() -> dict[str, str]:
    # The interpreter computes each tl.dot tile with numpy, whose OpenBLAS picks a GEMM kernel for the
    # CPU it runs on; some (Zen, Haswell) give a tile's rows different bits for different tile heights,
    # which would be the emulator's variance, not the kernel's. One fixed OpenBLAS kernel (plain AVX, on
    # any x86-64 CPU) makes the interpreted runs compare like for like on every machine.
    return dict(os.environ, TRITON_INTERPRET="1", OPENBLAS_CORETYPE="Sandybridge")


def run_cases(name: str) -> None:
    """Run tests/interpreter/`name` in a child pytest with the interpreter on; its report shows on failure."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", f"tests/interpreter/{name}", "-q", "-p", "no:cacheprovider", "-rf"],
        cwd=ROOT, env=interpreted_env(), capture_output=True, text=True, timeout=540,
    )
    assert result.returncode == 0, f"{name} under TRITON_INTERPRET=1:\n{result.stdout[-20000:]}\n{result.stderr[-5000:]}"


def test_kernels_under_the_interpreter():
    """matmul, fused MoE, RMSNorm, paged attention, log-softmax: against torch, and batch-invariant."""
    run_cases("kernel_cases.py")


def test_models_under_the_interpreter():
    """`kernels: triton` through the engine: transformers' tokens for the families' distinct paths;
    bit-identical logits, sampled tokens and logprobs alone and in a crowd."""
    run_cases("model_cases.py")


# ---- the setting -----------------------------------------------------------------------------


def test_kernel_choice_resolution(hf_checkpoints):
    assert resolve_kernels("auto", "cpu") == "native"
    assert resolve_kernels("native", "cpu") == "native"
    assert resolve_kernels("torch", "cuda") == "torch"
    with pytest.raises(ConfigError, match="set TRITON_INTERPRET=1 before the process starts"):
        resolve_kernels("triton", "cpu")  # this process's Triton is not the interpreter
    with pytest.raises(ConfigError, match="set TRITON_INTERPRET=1"):
        LLMEngine(hf_checkpoints["mixtral"], EngineConfig(kernels="triton", device="cpu"))
    with pytest.raises(ConfigError, match="kernels must be one of auto, native, torch, triton, got 'cuda'"):
        EngineConfig(kernels="cuda")
    with pytest.raises(ConfigError, match="kernels must be one of"):
        resolve_kernels("fast", "cuda")
    assert DeploymentConfig.from_dict({"engine": {"kernels": "torch"}}).engine.kernels == "torch"
    with pytest.raises(ConfigError, match=r"kernels must be one of .*, got \[.triton.\]"):
        DeploymentConfig.from_dict({"engine": {"kernels": ["triton"]}})


def test_default_and_torch_kernels(hf_checkpoints):
    """auto on a CPU is the native kernels, exactly as before the setting existed; torch is plain torch."""
    model_dir = hf_checkpoints["qwen2_moe"]
    default = LLMEngine(model_dir, EngineConfig(device="cpu"))
    assert default.kernels.name == "native" and isinstance(default.attention.layers[0].qkv, ops.Linear)
    assert default.scheduler.log_softmax is None
    plain = LLMEngine(model_dir, EngineConfig(device="cpu", kernels="torch"))
    assert isinstance(plain.attention.layers[0].qkv, TorchLinear)
    assert isinstance(plain.runner.executor.experts._weights[(0, 0)][0], TorchLinear)
    prompts = parity.ragged_prompts(2, 320, seed=4)
    reference = parity.hf_reference(model_dir, prompts, 6)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for engine in (default, plain):
        assert [r.token_ids for r in engine.generate(prompts, params)] == [tokens for tokens, _ in reference]


# ---- processes -------------------------------------------------------------------------------


def short_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in (9, 4)]


def cli(*args, interpret: bool, timeout: float = 300):
    env = interpreted_env() if interpret else {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "resilient_moe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_generate_with_triton_kernels_matches_transformers(hf_checkpoints):
    model_dir = hf_checkpoints["mixtral"]
    prompts = short_prompts(seed=1)
    reference = parity.hf_reference(model_dir, prompts, NEW_TOKENS)
    flags = ["generate", "--model", str(model_dir), "--max-tokens", str(NEW_TOKENS), "--ignore-eos", "--json",
             "--device", "cpu", "--kernels", "triton"]
    for prompt in prompts:
        flags += ["--prompt-ids", ",".join(map(str, prompt))]
    result = cli(*flags, interpret=True)
    assert result.returncode == 0, result.stderr
    assert [r["token_ids"] for r in json.loads(result.stdout)] == [tokens for tokens, _ in reference]


def test_cli_rejects_kernels_that_cannot_run(hf_checkpoints, tmp_path):
    model = str(hf_checkpoints["mixtral"])
    base = ["generate", "--model", model, "--prompt-ids", "1,2", "--device", "cpu", "--kernels", "triton"]
    result = cli(*base, interpret=False)
    assert result.returncode == 2 and "set TRITON_INTERPRET=1" in result.stderr and "Traceback" not in result.stderr
    config = tmp_path / "dep.yaml"
    config.write_text("engine:\n  kernels: triton\n  device: cpu\n")  # a cluster: refused before any worker starts
    result = cli("generate", "--model", model, "--prompt-ids", "1,2", "--config", str(config), interpret=False)
    assert result.returncode == 2 and "set TRITON_INTERPRET=1" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_kernels_flag(command, capsys, tmp_path):
    from resilient_moe.cli import build_parser, deployment_from_args

    parser = build_parser()
    config = tmp_path / "dep.yaml"
    config.write_text("engine:\n  kernels: triton\n")
    for flags, want in [(["--kernels", "torch"], "torch"), (["--kernels", "torch", "--config", str(config)], "torch"),
                        (["--config", str(config)], "triton"), ([], "auto")]:
        args = parser.parse_args([command, *flags])
        engine = EngineConfig(kernels=args.kernels or "auto")
        assert deployment_from_args(args, Path("m"), engine).engine.kernels == want, flags
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--kernels", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_disaggregated_cluster_with_triton_kernels(hf_checkpoints, tmp_path, monkeypatch):
    """Attention and expert workers (separate processes, each under the interpreter) give transformers'
    tokens; every worker reports the triton kernels."""
    from resilient_moe.launch import make_cluster
    from resilient_moe.server.frontend import Frontend

    model_dir = hf_checkpoints["mixtral"]
    prompts = short_prompts(seed=2)
    reference = parity.hf_reference(model_dir, prompts, NEW_TOKENS)
    dep = DeploymentConfig(model=str(model_dir), attention_workers=1, expert_workers=2, micro_batches=2,
                           kv_checkpoint=False, engine=EngineConfig(kernels="triton", device="cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # for the cluster's own fork server, started below
    with make_cluster(dep, log_dir=tmp_path) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)) for p in prompts]
            tokens = [h.wait(240).token_ids for h in handles]
        finally:
            frontend.close()
    assert tokens == [t for t, _ in reference]
    for name in ("aw-0", "ew-0", "ew-1"):
        assert "(triton kernels)" in (tmp_path / f"{name}.log").read_text()

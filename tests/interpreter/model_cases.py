"""Whole models with `kernels: triton` under Triton's CPU interpreter: tokens identical to transformers
(GQA with head-wise q/k norms, shared experts and dense layers, latent attention, sinks and sliding
windows with biased clamped experts; Mixtral runs through the CLI and a cluster in
tests/test_triton_kernels.py), and a request's logits, sampled tokens and logprobs bit-identical alone
and in a crowd.

Run by tests/test_triton_kernels.py in a child process with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import random

import pytest
import torch

import test_parity_hf as parity
from kernel_cases import triton_interpreter  # noqa: F401 (an autouse fixture: fails outside the interpreter)
from test_parity_families import save_family_model
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.errors import ConfigError
from resilient_moe.kernels.matmul import TritonLinear
from resilient_moe.model.weights import Checkpoint
from resilient_moe.workers.expert_worker import load_experts

NEW_TOKENS = 4


def short_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in (9, 4)]  # 9 > GPT-OSS's window of 6


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory, hf_checkpoints):
    root = tmp_path_factory.mktemp("families")
    return dict(hf_checkpoints, **{f: save_family_model(root / f, f, seed=1) for f in ("deepseek_v3", "gpt_oss")})


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_triton_engine_matches_transformers(family_checkpoints, family):
    """Tokens identical to transformers' greedy ones, a request joining mid-flight (continuous batching)."""
    model_dir = family_checkpoints[family]
    prompts = short_prompts(seed=len(family))
    reference = parity.hf_reference(model_dir, prompts, NEW_TOKENS)
    tokens, logits = parity.run_continuous(model_dir, prompts, NEW_TOKENS, [0, 2], kernels="triton", device="cpu")
    for i, (ref_tokens, ref_logits) in enumerate(reference):
        assert tokens[i] == ref_tokens, f"prompt {i}: tokens differ from transformers"
        assert (logits[i] - ref_logits).abs().max().item() < 1e-3
    engine = LLMEngine(model_dir, EngineConfig(kernels="triton", device="cpu", kv_cache_tokens=256))
    assert isinstance(engine.attention.lm_head, TritonLinear)


def run_x(engine: LLMEngine, params: SamplingParams, others: list[list[int]]):
    """(logits, token, logprob) of each output of request "x", which joins once `others` have taken a step."""
    engine.keep_logits = True
    for i, other in enumerate(others):
        engine.add_request(f"o{i}", other, SamplingParams(max_tokens=3, ignore_eos=True))
    if others:
        engine.step()
    engine.add_request("x", [5, 9, 13, 77, 101, 4, 8], params)
    outputs = []
    for _ in range(100):
        if not engine.has_unfinished():
            break
        for event in engine.step():
            if event.request_id == "x":
                outputs.append((engine.last_logits["x"].clone(), event.token_id, event.logprob))
    return outputs


def test_triton_engine_alone_and_in_a_crowd(hf_checkpoints):
    """A seeded sampled request alone, and in a crowd split into micro-batches with its prompt chunked
    (chunked prefill) while the others decode: bit-identical logits, the same tokens and logprobs; the
    logprobs come from the log-softmax kernel."""
    model_dir = hf_checkpoints["mixtral"]
    params = SamplingParams(max_tokens=3, temperature=0.9, top_p=0.9, seed=11, logprobs=0, ignore_eos=True)
    engine = LLMEngine(model_dir, EngineConfig(kernels="triton", device="cpu"))
    assert engine.scheduler.log_softmax is not None
    alone = run_x(engine, params, [])
    rng = random.Random(3)
    others = [[rng.randrange(3, 300) for _ in range(rng.randint(2, 4))] for _ in range(3)]
    crowd = LLMEngine(model_dir, EngineConfig(kernels="triton", device="cpu", micro_batches=2,
                                              max_prefill_tokens_per_step=3))
    in_crowd = run_x(crowd, params, others)
    assert len(alone) == len(in_crowd) == 3
    for (logits, token, logprob), (crowd_logits, crowd_token, crowd_logprob) in zip(alone, in_crowd):
        assert torch.equal(logits, crowd_logits), "logits changed with the batch"
        assert (token, logprob) == (crowd_token, crowd_logprob)
        assert abs(logprob - torch.log_softmax(logits, dim=-1)[token].item()) < 1e-5


def test_triton_on_the_interpreter_refuses_bfloat16(hf_checkpoints):
    with pytest.raises(ConfigError, match="bfloat16 wrongly"):
        LLMEngine(hf_checkpoints["mixtral"], EngineConfig(kernels="triton", device="cpu", dtype="bfloat16"))


def test_expert_worker_loads_with_the_deployments_kernels(hf_checkpoints):
    dep = DeploymentConfig(model=str(hf_checkpoints["mixtral"]), engine=EngineConfig(kernels="triton", device="cpu"))
    side = load_experts(dep, Checkpoint(dep.model), [(0, 1), (0, 3), (2, 0)])
    assert side.kernels.name == "triton" and side.held == [(0, 1), (0, 3), (2, 0)]
    assert sorted(side._banks) == [0, 2] and side._banks[0].experts == [1, 3]
    native = load_experts(DeploymentConfig(model=dep.model), Checkpoint(dep.model), [(0, 1)])
    assert native.kernels.name == "native" and native.device == torch.device("cpu")

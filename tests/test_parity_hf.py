"""Parity with Hugging Face transformers (eager attention, float32) on checkpoints it saved itself."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import FAMILIES, save_hf_model
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine

DECODE_STEPS = 32
TOLERANCE = 1e-4


def hf_reference(model_dir, prompts, new_tokens):
    """Per prompt: (greedy tokens, logits [new_tokens, V]) from transformers' generate()."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            g = model.generate(
                torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
            )
            out.append((g.sequences[0, len(prompt):].tolist(), torch.cat(g.logits).float()))
    return out


def run_continuous(model_dir, prompts, new_tokens, join_at, **engine_kwargs):
    """Run prompts through one engine; prompt i joins before step join_at[i]. Returns tokens, logits."""
    engine = LLMEngine(model_dir, EngineConfig(**engine_kwargs))
    engine.keep_logits = True
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    tokens = {i: [] for i in range(len(prompts))}
    logits = {i: [] for i in range(len(prompts))}
    step = 0
    while step < 10_000:
        for i, at in enumerate(join_at):
            if at == step:
                engine.add_request(str(i), prompts[i], params)
        if not engine.has_unfinished() and step > max(join_at):
            break
        for event in engine.step():
            i = int(event.request_id)
            tokens[i].append(event.token_id)
            logits[i].append(engine.last_logits[event.request_id].clone())
        step += 1
    return [tokens[i] for i in range(len(prompts))], [torch.stack(logits[i]) for i in range(len(prompts))]


def ragged_prompts(n, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))] for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_continuous_batching_matches_transformers(hf_checkpoints, family):
    prompts = ragged_prompts(9, 320, seed=hash(family) % 1000)
    join_at = [0, 0, 0, 0, 3, 3, 7, 12, 20]  # requests join while others are mid-decode
    new_tokens = DECODE_STEPS + 1  # the prefill's token, then 32 decode steps
    reference = hf_reference(hf_checkpoints[family], prompts, new_tokens)
    tokens, logits = run_continuous(hf_checkpoints[family], prompts, new_tokens, join_at, micro_batches=2)
    for i, (ref_tokens, ref_logits) in enumerate(reference):
        assert tokens[i] == ref_tokens, f"prompt {i}: greedy tokens differ from transformers"
        diff = (logits[i] - ref_logits).abs().max().item()
        assert diff < TOLERANCE, f"prompt {i}: max |logit diff| {diff:.2e} (prefill and {DECODE_STEPS} decode steps)"


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("mixtral", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
        ("mixtral", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                         "rope_theta": 500000.0}}),
        ("qwen3_moe", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                           "rope_theta": 10000.0}}),
        ("mixtral", {"sliding_window": 8}),
        ("qwen3_moe", {"tie_word_embeddings": True}),
        ("olmoe", {"clip_qkv": 0.5}),
        ("qwen2_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [], "norm_topk_prob": True}),
    ],
    ids=["rope-linear", "rope-llama3", "rope-yarn", "sliding-window", "tied-embeddings", "clip-qkv", "sparse-step"],
)
def test_config_variants_match_transformers(tmp_path, family, overrides):
    model_dir = save_hf_model(tmp_path / "m", family, seed=3, **overrides)
    prompts = ragged_prompts(3, 320, seed=5)
    reference = hf_reference(model_dir, prompts, 12)
    tokens, logits = run_continuous(model_dir, prompts, 12, [0, 0, 2])
    for i, (ref_tokens, ref_logits) in enumerate(reference):
        assert tokens[i] == ref_tokens
        assert (logits[i] - ref_logits).abs().max().item() < TOLERANCE


def test_bfloat16_runs_close_to_float32(hf_checkpoints):
    prompts = ragged_prompts(4, 320, seed=9)
    _, f32 = run_continuous(hf_checkpoints["mixtral"], prompts, 4, [0, 0, 0, 0])
    _, bf16 = run_continuous(hf_checkpoints["mixtral"], prompts, 4, [0, 0, 0, 0], dtype="bfloat16")
    # bfloat16 keeps ~3 significant digits; the first token's logits must agree to that precision.
    for a, b in zip(f32, bf16):
        assert (a[0] - b[0]).abs().max().item() < 0.1

"""Sampling: filters, and a request's random stream depending only on (seed, position)."""

from __future__ import annotations

import random

import torch

from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.engine.sampler import filter_logits, sample_row, stream_seed


def test_top_k_keeps_only_k_tokens():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isfinite(kept).nonzero().flatten().tolist() == [1, 3]


def test_top_p_keeps_smallest_set_covering_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.isfinite(kept).nonzero().flatten().tolist() == [0, 1]
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.1))
    assert torch.isfinite(kept).nonzero().flatten().tolist() == [0]


def test_stream_depends_on_seed_and_position_only():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0)
    draws = [sample_row(logits, params, seed=42, position=p) for p in range(40)]
    assert draws == [sample_row(logits, params, seed=42, position=p) for p in range(40)]
    assert len(set(draws)) > 5, "sampling at temperature 1 should vary across positions"
    assert stream_seed(1, 0) != stream_seed(0, 1)


def test_sampling_follows_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    params = SamplingParams(temperature=1.0)
    counts = [0, 0, 0]
    for position in range(3000):
        counts[sample_row(probs.log(), params, seed=7, position=position)] += 1
    assert abs(counts[0] / 3000 - 0.6) < 0.05 and abs(counts[2] / 3000 - 0.1) < 0.04


def test_seeded_request_same_tokens_alone_and_in_different_batches(tiny_model):
    prompt = [1, 45, 93, 84, 61, 7]
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = LLMEngine(tiny_model, EngineConfig()).generate([prompt], params)[0].token_ids
    rng = random.Random(5)
    for batch_size, micro_batches in ((4, 1), (9, 2)):
        others = [[rng.randrange(3, 300) for _ in range(rng.randint(2, 25))] for _ in range(batch_size)]
        other_params = [SamplingParams(max_tokens=rng.randint(3, 30), temperature=1.0, seed=i) for i in range(batch_size)]
        engine = LLMEngine(tiny_model, EngineConfig(micro_batches=micro_batches))
        results = engine.generate(others[:2] + [prompt] + others[2:], other_params[:2] + [params] + other_params[2:])
        assert results[2].token_ids == alone
    other_seed = LLMEngine(tiny_model, EngineConfig()).generate([prompt], SamplingParams(
        max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=999, ignore_eos=True))[0].token_ids
    assert other_seed != alone

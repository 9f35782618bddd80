"""Prefill chunks sized to a step-latency target (engine/chunk_policy.py): the pure policy, the online
cost model on synthetic step times, the scheduler's use of both, and the setting's validation."""

from __future__ import annotations

import pytest

from resilient_moe.engine.chunk_policy import (
    MIN_CHUNK_TOKENS, PrefillCost, StepCostModel, prefill_chunk_tokens, step_target_ms,
)
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.errors import ConfigError


def test_chunk_shrinks_when_the_per_token_cost_rises():
    cheap, dear = PrefillCost(0.05, 0.01), PrefillCost(0.10, 0.01)
    small, large = prefill_chunk_tokens(60.0, dear, 0, 4000, 4096), prefill_chunk_tokens(60.0, cheap, 0, 4000, 4096)
    assert MIN_CHUNK_TOKENS < small < large
    assert dear.ms(small, 0) <= 60.0 < dear.ms(small + 1, 0)  # the largest chunk that fits
    assert cheap.ms(large, 0) <= 60.0 < cheap.ms(large + 1, 0)


def test_chunk_shrinks_with_context_when_attention_costs():
    cost = PrefillCost(0.05, 0.02)
    sizes = [prefill_chunk_tokens(50.0, cost, context, 10_000, 10_000) for context in (0, 1000, 4000, 16000)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    for size, context in zip(sizes, (0, 1000, 4000, 16000)):
        assert cost.ms(size, context) <= 50.0 < cost.ms(size + 1, context)


def test_chunk_bounds():
    cost = PrefillCost(0.01, 0.0)
    assert prefill_chunk_tokens(1e9, cost, 0, 300, 512) == 300  # the whole prompt when it fits
    assert prefill_chunk_tokens(1e9, cost, 0, 3000, 512) == 512  # never past the hard cap
    assert prefill_chunk_tokens(0.0, cost, 0, 3000, 512) == MIN_CHUNK_TOKENS  # a prompt always advances
    assert prefill_chunk_tokens(-5.0, cost, 0, 3000, 512, floor=0) == 0  # a second prompt may wait
    assert prefill_chunk_tokens(0.0, cost, 0, 5, 512) == 5
    assert prefill_chunk_tokens(10.0, cost, 0, 3000, 0) == 0


def test_step_target_defaults_to_four_decode_steps_and_never_below_one():
    assert step_target_ms(None, 30.0) == 120.0
    assert step_target_ms(200.0, 30.0) == 200.0
    assert step_target_ms(10.0, 30.0) == 30.0


def test_cost_model_learns_the_cost_from_step_times():
    """Steps timed by a known cost (decode 20 ms; prefill 0.08 ms a token plus 0.03 ms a token per
    thousand keys): the fitted model predicts chunks within 2% of their real cost."""
    truth = PrefillCost(0.08, 0.03)
    model = StepCostModel()
    assert not model.ready
    for _ in range(5):
        model.observe(20.0, decodes=8, chunks=[])
    for n, context in ((512, 0), (300, 512), (128, 812), (64, 940), (256, 1004), (400, 1260), (200, 1660)):
        model.observe(20.0 + truth.ms(n, context), decodes=8, chunks=[(n, context)])
    assert model.ready and model.decode_ms == pytest.approx(20.0)
    for n, context in ((100, 0), (500, 2000), (50, 3000)):
        assert model.cost.ms(n, context) == pytest.approx(truth.ms(n, context), rel=0.02)


def test_cost_model_follows_a_slower_machine():
    """The per-token cost doubles (another tenant takes the core): the model's chunk for the same budget
    shrinks within a few steps (forgetting), and settles on the slower machine's chunk."""
    model = StepCostModel()
    model.observe(20.0, decodes=4, chunks=[])
    slow = PrefillCost(0.10, 0.02)
    chunks = {}
    for step, scale in enumerate([1.0] * 8 + [2.0] * 24):
        n, context = 100 + 37 * (step % 5), 250 * (step % 6)  # prompts of 1500 tokens, one after another
        model.observe(20.0 + scale * PrefillCost(0.05, 0.01).ms(n, context), decodes=4, chunks=[(n, context)])
        chunks[step] = prefill_chunk_tokens(60.0, model.cost, 1000, 4000, 4096)
    assert chunks[11] < 0.8 * chunks[7]
    assert chunks[31] == pytest.approx(prefill_chunk_tokens(60.0, slow, 1000, 4000, 4096), rel=0.05)


def _scheduled_chunk(engine):
    batch = engine.scheduler.schedule()
    return next(s.num_scheduled for s in batch.seqs if s.request_id == "long")


def test_scheduler_sizes_chunks_by_the_measured_cost(tiny_model):
    """With streams decoding, the scheduler gives a prompt the chunk the policy computes from the model's
    measurements, and a smaller one once prompt tokens are measured dearer."""
    def chunk_after(per_token_ms):
        engine = LLMEngine(tiny_model, EngineConfig(max_prefill_tokens_per_step=4096, max_step_ms=100.0))
        engine.add_request("short", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
        engine.step()  # the short prompt's prefill: it now decodes
        cost = engine.scheduler.cost
        for _ in range(3):
            cost.observe(10.0, decodes=1, chunks=[])
        for n, context in ((200, 0), (90, 200), (300, 290), (150, 590)):
            cost.observe(10.0 + PrefillCost(per_token_ms, 0.01).ms(n, context), decodes=1, chunks=[(n, context)])
        engine.add_request("long", list(range(3, 403)) * 5, SamplingParams(max_tokens=1))
        got = _scheduled_chunk(engine)
        assert got == prefill_chunk_tokens(100.0 - 10.0, cost.cost, 0, 2000, 4096)
        return got

    cheap, dear = chunk_after(0.1), chunk_after(0.3)
    assert MIN_CHUNK_TOKENS < dear < cheap < 2000


def test_without_decoding_streams_a_prompt_takes_the_cap(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(max_prefill_tokens_per_step=700, max_step_ms=1.0))
    engine.scheduler.cost.observe(10.0, decodes=1, chunks=[])
    engine.scheduler.cost.observe(500.0, decodes=0, chunks=[(100, 0)])
    engine.add_request("long", list(range(3, 503)) * 2, SamplingParams(max_tokens=1))
    assert _scheduled_chunk(engine) == 700  # nobody is waiting on this step


@pytest.mark.parametrize("value", [0, -3.5, float("inf"), "100", True])
def test_max_step_ms_is_validated(value):
    with pytest.raises(ConfigError, match="max_step_ms must be a positive number"):
        EngineConfig(max_step_ms=value)

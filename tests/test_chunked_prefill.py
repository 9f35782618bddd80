"""Chunked prefill: a prompt is computed `max_prefill_tokens_per_step` tokens a step, mixed with the
running decodes. Tokens are identical to the unchunked path whatever the chunk (batch invariance), and a
3000-token prompt arriving at real widths does not stall eight decoding streams for its whole prefill."""

from __future__ import annotations

import math
import random

import pytest
import torch

from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.chunk_policy import MIN_CHUNK_TOKENS
from resilient_moe.engine.engine import LLMEngine


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_chunked_prefill_gives_the_unchunked_tokens(tiny_models, family):
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 300))] for _ in range(8)]
    params = [SamplingParams(max_tokens=10, ignore_eos=True)] * 7
    params.append(SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True))
    whole = LLMEngine(tiny_models[family], EngineConfig(max_prefill_tokens_per_step=4096))
    expected = [r.token_ids for r in whole.generate(prompts, params)]
    for chunk, micro_batches in ((1, 1), (7, 2), (64, 3)):
        engine = LLMEngine(tiny_models[family], EngineConfig(max_prefill_tokens_per_step=chunk,
                                                             micro_batches=micro_batches))
        assert [r.token_ids for r in engine.generate(prompts, params)] == expected, chunk


def test_prompt_chunks_are_bounded_per_step(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(max_prefill_tokens_per_step=50))
    engine.add_request("long", list(range(3, 243)), SamplingParams(max_tokens=2))
    engine.add_request("short", [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
    computed = []
    for _ in range(20):
        batch = engine.scheduler.schedule()
        if batch is None:
            break
        prompt_tokens = sum(s.num_scheduled for s in batch.seqs if s.num_new_tokens > 1)
        computed.append(prompt_tokens)
        assert prompt_tokens <= 50
        output = engine.runner.run(batch.seqs, 1)
        engine.scheduler.postprocess(batch, output.all_logits())
    assert sum(computed) == 240 + 3, "every prompt token computed exactly once"


def test_a_long_prompt_does_not_stall_decoding_streams(real_width):
    """8 streams decode; a 3000-token prompt arrives. With prompts cut into chunks of at most 64 tokens,
    every step gives every stream its token and computes at most 64 of the prompt's tokens, so no stream
    waits for more than one chunk (exact: counted in tokens, not timed; chunks are sized by measured
    step times under the cap, so a loaded machine cuts smaller ones; benchmarks/bench_long_prompt.py
    reports the inter-token gaps)."""
    model, prompt, _ = real_width
    engine = LLMEngine(model, EngineConfig(max_model_len=4096, max_prefill_tokens_per_step=64))
    rng = random.Random(9)
    for i in range(8):
        engine.add_request(f"s{i}", [rng.randrange(3, 1000) for _ in range(16)],
                           SamplingParams(max_tokens=400, ignore_eos=True))
    for _ in range(3):  # the streams' own prefill, then decode
        engine.step()
    engine.add_request("long", prompt, SamplingParams(max_tokens=1))

    def cached() -> int:
        return next((s.num_cached for s in engine.scheduler.running if s.request_id == "long"), 0)

    chunks = []
    while any(s.request_id == "long" for s in engine.scheduler.running + list(engine.scheduler.waiting)):
        before = cached()
        events = engine.step()
        assert {e.request_id for e in events} >= {f"s{i}" for i in range(8)}, "every stream gets a token each step"
        if any(s.request_id == "long" for s in engine.scheduler.running):
            chunks.append(cached() - before)
        assert len(chunks) <= math.ceil(len(prompt) / MIN_CHUNK_TOKENS) + 2, "the prompt advances every step"
    assert chunks and max(chunks) <= 64, chunks
    assert len(chunks) >= len(prompt) // 64 - 1, "the prompt was cut in chunks of at most 64 tokens"


def test_time_sized_chunks_give_the_unchunked_tokens_at_real_width(real_width):
    """Real widths, a 3000-token prompt beside two decoding streams: with chunks sized by time (the
    default max_step_ms, no token cap in the way) the prompt is cut in several chunks of whatever size
    the measured costs give, and its logits are bit-identical to the unchunked run's, its tokens
    transformers'."""
    model, prompt, hf_tokens = real_width
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    config = EngineConfig(max_model_len=4096, max_prefill_tokens_per_step=4096, max_num_batched_tokens=4096)

    def long_prompt(engine):
        """The long request's (tokens, logits, cached positions after each step until its first token)."""
        engine.keep_logits = True
        engine.add_request("long", prompt, params)
        tokens, logits, progress = [], [], []
        for _ in range(1000):
            for event in engine.step():
                if event.request_id == "long":
                    tokens.append(event.token_id)
                    logits.append(engine.last_logits["long"])
            if not tokens:
                progress.append(next(s.num_cached for s in engine.scheduler.running if s.request_id == "long"))
            if len(tokens) == len(hf_tokens):
                return tokens, logits, progress
        raise AssertionError("the long request did not finish")

    whole_tokens, whole_logits, _ = long_prompt(LLMEngine(model, config))
    engine = LLMEngine(model, config)
    rng = random.Random(10)
    for i in range(2):
        engine.add_request(f"s{i}", [rng.randrange(3, 1000) for _ in range(16)],
                           SamplingParams(max_tokens=1000, ignore_eos=True))
    for _ in range(6):  # the streams' prefill, then steady decode steps the cost model measures
        engine.step()
    tokens, logits, progress = long_prompt(engine)
    assert whole_tokens == hf_tokens and tokens == hf_tokens
    assert len(progress) >= 2, f"the prompt went in one step: time-sized chunks should cut it ({progress})"
    assert len(logits) == len(whole_logits) and all(torch.equal(a, b) for a, b in zip(logits, whole_logits))

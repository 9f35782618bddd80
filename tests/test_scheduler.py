"""Continuous batching: joins, stops, a full KV cache, limits."""

from __future__ import annotations

import pytest

from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.errors import RequestError


def test_full_cache_makes_requests_wait_and_none_is_dropped(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(kv_cache_tokens=128, block_size=16))
    prompts = [[1, 5 + i, 9, 33] for i in range(10)]
    results = engine.generate(prompts, SamplingParams(max_tokens=30, ignore_eos=True))
    assert all(len(r.token_ids) == 30 and r.finish_reason == "length" for r in results)
    assert engine.allocator.num_free == engine.allocator.num_blocks, "finished requests must free their blocks"


def test_stop_token_and_eos(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig())
    free_run = engine.generate([[1, 50, 60]], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids
    stop_at = free_run[5]
    first = free_run.index(stop_at)
    result = engine.generate([[1, 50, 60]], SamplingParams(max_tokens=20, stop_token_ids=(stop_at,), ignore_eos=True))[0]
    assert result.token_ids == free_run[: first + 1] and result.finish_reason == "stop"
    eos = engine.model_config.eos_token_ids[0]
    engine.scheduler.eos_token_ids = frozenset({stop_at})  # make the stop token this model's EOS
    result = engine.generate([[1, 50, 60]], SamplingParams(max_tokens=20))[0]
    assert result.token_ids == free_run[: first + 1] and result.finish_reason == "stop"
    assert eos in engine.model_config.eos_token_ids


def test_prompt_longer_than_context_is_a_clear_error(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(max_model_len=64))
    with pytest.raises(RequestError, match="prompt has 64 tokens; the context limit is 64"):
        engine.add_request("r", [3] * 64, SamplingParams())
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request("r", [3, 10**6], SamplingParams())
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request("r", [], SamplingParams())


def test_request_that_can_never_fit_the_cache_is_rejected(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(kv_cache_tokens=64, block_size=16))
    with pytest.raises(RequestError, match="needs 7 KV blocks but the cache has 4"):
        engine.add_request("r", [3] * 10, SamplingParams(max_tokens=100))


def test_abort_frees_blocks(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig())
    engine.add_request("a", [1, 2, 3, 4], SamplingParams(max_tokens=50))
    engine.add_request("b", [1, 2, 3], SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert engine.abort("a")
    assert not engine.abort("missing")
    while engine.has_unfinished():
        engine.step()
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_max_tokens_and_context_limit_end_requests(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(max_model_len=20))
    result = engine.generate([[1] * 15], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(result.token_ids) == 5 and result.finish_reason == "length"

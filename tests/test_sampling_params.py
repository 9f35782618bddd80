"""Every sampling parameter honoured or refused: the logit adjustments against a hand computation,
their effect on a colocated engine, and over HTTP (the official client and raw httpx) each one's effect
or its 400 naming it."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch

from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.engine.sampler import adjust_logits, choice_seed
from resilient_moe.errors import ConfigError
from resilient_moe.server.logprobs import completion_logprobs
from resilient_moe.server.textstream import TextStream
from serving import serving_stack, streams_through_kill, wait_for_restores

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


# ---- logprobs keyed by text ------------------------------------------------------------------


class _ByteTokenizer:
    """Tokens 1..3 all decode to U+FFFD, as byte tokens of one multi-byte character do."""

    def decode(self, ids, skip_special_tokens=False):
        return "\ufffd" if ids[0] in (1, 2, 3) else f"t{ids[0]}"


def test_completion_logprobs_keep_every_token_whose_text_collides():
    top = ((1, -0.5), (4, -1.0), (2, -1.5), (3, -2.0), (5, -3.0))
    got = completion_logprobs(_ByteTokenizer(), [3, 6], [-2.0, -4.0], [top, top], 0, 5)["top_logprobs"]
    assert got[0] == {"\ufffd": -0.5, "t4": -1.0, "token_id:2": -1.5, "token_id:3": -2.0, "t5": -3.0}
    assert got[1] == {**got[0], "t6": -4.0}  # the sampled token, not among the 5, is listed too


class _Letters:
    def decode(self, ids, skip_special_tokens=True):
        return "".join("abcdefgh"[i] for i in ids)


def test_stop_strings_count_only_after_min_tokens():
    tokens = [0, 1, 2, 1, 3]  # "abcbd": "b" at the second token, again at the fourth
    for min_tokens, sent in ((0, "a"), (3, "abc")):
        text = TextStream(_Letters(), ["b"], min_tokens=min_tokens)
        out = "".join(text.add(t) for t in tokens if not text.stopped)
        assert text.stopped and out == sent, min_tokens


# ---- over HTTP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_model, fork_server, tmp_path_factory):
    with serving_stack(tiny_model, fork_server, tmp_path_factory.mktemp("sampling-logs"), max_model_len=64) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60)


def complete(stack, client, prompt=PROMPT, max_tokens=12, **extra):
    """Greedy completion token ids (ignore_eos on unless given)."""
    extra = {"return_token_ids": True, "ignore_eos": True, **extra}
    known = {k: extra.pop(k) for k in ("logit_bias", "presence_penalty", "frequency_penalty", "seed", "n",
                                       "temperature", "echo", "best_of", "logprobs") if k in extra}
    known.setdefault("temperature", 0)
    return client.completions.create(model=stack.model_name, prompt=prompt, max_tokens=max_tokens, extra_body=extra,
                                     **known)


def test_http_logit_bias_bans_and_forces(stack, client, engine):
    base = complete(stack, client).choices[0].token_ids
    assert base == greedy(engine)
    banned = complete(stack, client, logit_bias={str(base[0]): -100}).choices[0].token_ids
    assert banned != base and base[0] not in banned
    assert banned == greedy(engine, logit_bias=((base[0], -100.0),))
    assert complete(stack, client, logit_bias={"77": 100}).choices[0].token_ids == [77] * 12


@pytest.mark.parametrize("name,value", [("presence_penalty", 2.0), ("frequency_penalty", 2.0),
                                        ("repetition_penalty", 3.0)])
def test_http_penalties_match_the_engine(stack, client, engine, name, value):
    got = complete(stack, client, max_tokens=24, **{name: value}).choices[0].token_ids
    assert got == greedy(engine, max_tokens=24, **{name: value})  # applied on the attention worker
    assert got != greedy(engine, max_tokens=24)


def test_http_min_tokens_keeps_going_past_eos(stack, client, engine):
    eos = engine.model_config.eos_token_ids[0]
    forced = {str(eos): 100}
    assert complete(stack, client, ignore_eos=False, logit_bias=forced).choices[0].token_ids == [eos]
    choice = complete(stack, client, ignore_eos=False, logit_bias=forced, min_tokens=4).choices[0]
    assert len(choice.token_ids) == 5 and eos not in choice.token_ids[:4] and choice.finish_reason == "stop"
    stop_id = greedy(engine)[0]
    choice = complete(stack, client, stop_token_ids=[stop_id], min_tokens=3).choices[0]
    assert len(choice.token_ids) >= 3 and stop_id not in choice.token_ids[:3]  # masked too, until 3 tokens
    assert choice.token_ids != greedy(engine)[:len(choice.token_ids)]


def test_http_n_choices_are_seeded_and_reproducible(stack, client, engine):
    kwargs = dict(n=3, temperature=1.0, seed=99, max_tokens=10)
    a, b = complete(stack, client, **kwargs), complete(stack, client, **kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    ids = [c.token_ids for c in a.choices]
    assert ids == [c.token_ids for c in b.choices] and len({tuple(t) for t in ids}) == 3
    for j, tokens in enumerate(ids):  # choice j is a request seeded with choice_seed(99, j)
        assert tokens == greedy(engine, max_tokens=10, temperature=1.0, seed=choice_seed(99, j))
    assert complete(stack, client, n=1, temperature=1.0, seed=99, max_tokens=10).choices[0].token_ids == ids[0]
    assert a.usage.prompt_tokens == len(PROMPT) and a.usage.completion_tokens == 30
    chunks = list(client.completions.create(model=stack.model_name, prompt=PROMPT, stream=True,
                                            extra_body={"return_token_ids": True, "ignore_eos": True}, **kwargs))
    streamed = {j: sum((c.choices[0].token_ids for c in chunks if c.choices and c.choices[0].index == j), [])
                for j in range(3)}
    assert [streamed[j] for j in range(3)] == ids
    assert complete(stack, client, best_of=3, **kwargs).choices[2].token_ids == ids[2]  # best_of == n


def test_http_best_of_returns_the_likeliest_choices(stack, client):
    kwargs = dict(temperature=1.0, seed=7, max_tokens=8)
    every = complete(stack, client, n=4, logprobs=0, **kwargs).choices  # the same 4 seeded choices
    ranked = sorted(range(4), key=lambda j: (-sum(every[j].logprobs.token_logprobs), j))
    best = complete(stack, client, n=2, best_of=4, **kwargs)
    assert [c.token_ids for c in best.choices] == [every[j].token_ids for j in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)
    assert best.usage.completion_tokens == 32  # all 4 were generated


def test_http_list_of_prompts(stack, client, engine):
    prompts = [PROMPT, [1, 17, 230, 99]]
    out = complete(stack, client, prompt=prompts, n=2, max_tokens=6)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for index, choice in enumerate(out.choices):
        prompt = prompts[index // 2]
        assert choice.prompt_token_ids == prompt and choice.token_ids == greedy(engine, prompt, 6)
    assert out.usage.prompt_tokens == len(prompts[0]) + len(prompts[1]) and out.usage.completion_tokens == 24
    texts = ["The cache", "Experts"]
    out = complete(stack, client, prompt=texts, max_tokens=4)
    assert [c.prompt_token_ids for c in out.choices] == [engine.tokenizer.encode(t) for t in texts]


def test_http_echo_prepends_the_prompt(stack, client, engine):
    text = "The attention workers"
    out = complete(stack, client, prompt=text, echo=True, max_tokens=5).choices[0]
    assert out.text == text + engine.tokenizer.decode(greedy(engine, engine.tokenizer.encode(text), 5))
    ids_out = complete(stack, client, prompt=PROMPT, echo=True, max_tokens=5).choices[0]
    assert ids_out.text.startswith(engine.tokenizer.decode(PROMPT))
    chunks = list(client.completions.create(model=stack.model_name, prompt=text, max_tokens=5, temperature=0,
                                            echo=True, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].text == text and "".join(c.choices[0].text for c in chunks) == out.text


def test_http_include_usage_only_when_asked(stack, client):
    messages = [{"role": "user", "content": "Hello"}]
    common = dict(model=stack.model_name, messages=messages, max_tokens=4, temperature=0, stream=True,
                  extra_body={"ignore_eos": True})
    plain = list(client.chat.completions.create(**common))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"
    asked = list(client.chat.completions.create(stream_options={"include_usage": True}, **common))
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in asked[:-1])
    raw = httpx.post(f"{stack.url}/v1/chat/completions", timeout=30, json={
        "messages": messages, "max_tokens": 2, "stream": True, "ignore_eos": True})
    assert '"usage"' not in raw.text
    two = client.chat.completions.create(model=stack.model_name, messages=messages, max_tokens=3, n=2, seed=5,
                                         temperature=1.0, max_completion_tokens=4)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens <= 8
    alias = client.chat.completions.create(model=stack.model_name, messages=messages, max_completion_tokens=5,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert alias.usage.completion_tokens == 5 and alias.choices[0].finish_reason == "length"


def test_http_logprobs_have_every_entry(stack, client):
    out = complete(stack, client, logprobs=5, max_tokens=8).choices[0].logprobs
    assert all(len(entry) in (5, 6) for entry in out.top_logprobs)


REFUSED = [
    # path, extra body, param
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format"),
    ("chat", {"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),  # no tools
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}],
              "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"guided_json": {"type": "foo"}}, "guided_json"),
    ("chat", {"guided_choice": []}, "guided_choice"),
    ("chat", {"frobnicate": True}, "frobnicate"),
    ("chat", {"messages": [{"role": "user", "content": "hi", "audio": {}}]}, "messages"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ("cmpl", {"guided_regex": "(["}, "guided_regex"),
    ("cmpl", {"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),  # one at a time
    ("cmpl", {"guided_grammar": "start: ???"}, "guided_grammar"),
    ("cmpl", {"response_format": {"type": "json_object", "strict": 1}}, "response_format"),
    ("cmpl", {"suffix": "the end"}, "suffix"),
    ("cmpl", {"best_of": 1, "n": 2}, "best_of"),
    ("cmpl", {"best_of": 3, "stream": True}, "best_of"),
    ("cmpl", {"n": 2, "prompt": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}, "n"),
    ("cmpl", {"echo": True, "logprobs": 2}, "echo"),
    ("cmpl", {"logit_bias": {"abc": 3}}, "logit_bias"),
    ("cmpl", {"logit_bias": {"5": 300}}, "logit_bias"),
    ("cmpl", {"unknown_knob": 1}, "unknown_knob"),
]


@pytest.mark.parametrize("path,extra,param", REFUSED, ids=[f"{p}-{param}" for p, _, param in REFUSED])
def test_refused_with_a_400_naming_the_parameter(stack, client, path, extra, param):
    extra = dict(extra)
    body = {"messages": extra.pop("messages", [{"role": "user", "content": "hi"}])} if path == "chat" else \
        {"prompt": extra.pop("prompt", "hi")}
    url = f"{stack.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}"
    raw = httpx.post(url, json={**body, "max_tokens": 2, **extra}, timeout=30)
    assert raw.status_code == 400, raw.text
    error = raw.json()["error"]
    assert error["param"] == param and param in error["message"], error
    create = client.chat.completions.create if path == "chat" else client.completions.create
    with pytest.raises(openai.BadRequestError, match=param):
        create(model=stack.model_name, max_tokens=2, **body, extra_body=extra)


def test_harmless_forms_are_accepted(stack, client):
    messages = [{"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model=stack.model_name, messages=messages, max_tokens=2,
                                         response_format={"type": "text"}, tool_choice="none", tools=[])
    assert out.choices[0].finish_reason in ("length", "stop")


def test_penalized_seeded_streams_survive_an_attention_worker_kill(tiny_model, fork_server, engine, tmp_path):
    """An adopting attention worker gets the new parameters with the request, and derives the
    penalties from the prompt and the delivered tokens: the same tokens as a run without failure."""
    prompts = [PROMPT, [1, 17, 230, 99, 12, 300, 41], [1, 88, 77, 66]]
    extra = dict(temperature=0.8, seed=4321, presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3,
                 logit_bias={"5": -100, "9": 2.5})
    params = dict(extra, logit_bias=((5, -100.0), (9, 2.5)))
    expected = [greedy(engine, p, 96, **params) for p in prompts]
    with serving_stack(tiny_model, fork_server, tmp_path, attention_workers=2, expert_workers=2) as stack:
        results = streams_through_kill(stack, "aw-0", prompts, max_tokens=96, kill_after_tokens=24, **extra)
        for result, want in zip(results, expected):
            assert result.error is None and result.done and result.finish_reason == "length"
            assert result.token_ids == want

        wait_for_restores(stack, "aw-1")

"""Structured outputs and tool calls (engine/guided.py, server/tool_calls.py).

On the random-weight tiny model only the grammar can make the output valid, so valid output shows the
mask works: JSON against its schema, a choice, a regex; a guided request survives an attention-worker
kill token for token; forced tool calls come back as OpenAI tool_calls through the official client.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
import torch

from conftest import wait_until
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.engine.guided import GuideError, GuideState, guide_from, unpack_bitmask
from resilient_moe.server.tool_calls import CallStream, parse_call
from serving import serving_stack, streams_through_kill

PROMPT = [1, 45, 393, 84]

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5,
                                                                         "maximum": 5}},
     "required": ["ok", "n"], "additionalProperties": False},
]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return LLMEngine(tiny_model, EngineConfig(max_model_len=128))


@pytest.fixture(scope="module")
def stack(tiny_model, fork_server, tmp_path_factory):
    with serving_stack(tiny_model, fork_server, tmp_path_factory.mktemp("guided-logs"), max_model_len=128) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)


def generate(engine: LLMEngine, guide: str, max_tokens: int = 80, prompt=PROMPT, **params) -> tuple[str, str]:
    out = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, guide=guide, **params))[0]
    return engine.tokenizer.decode(out.token_ids), out.finish_reason


# ---- the grammar engine, without a server ---------------------------------------------------------


def test_bad_grammars_are_refused():
    for kind, spec in (("json_schema", {"type": "foo"}), ("json_schema", [1]), ("regex", "(["),
                       ("choice", []), ("choice", ["a", 3]), ("lark", "start: ???")):
        with pytest.raises(GuideError):
            guide_from(kind, spec)


def test_bitmask_unpacks_bit_i_of_word_w_as_token_32w_plus_i():
    words = torch.tensor([0b1011, -(2**31), 1], dtype=torch.int32)  # word 1: only bit 31
    allowed = unpack_bitmask(words, 70)
    assert allowed.nonzero().flatten().tolist() == [0, 1, 3, 63, 64]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["name-age", "enum-array", "bool-int"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(engine, schema, temperature):
    text, reason = generate(engine, guide_from("json_schema", schema), temperature=temperature, seed=11)
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_choice_and_regex(engine):
    choices = ["expert", "attention worker", "controller"]
    for seed in range(3):
        text, reason = generate(engine, guide_from("choice", choices), temperature=1.0, seed=seed)
        assert text in choices and reason == "stop"
    pattern = r"[a-z]{2,4}-[0-9]{3}"
    text, reason = generate(engine, guide_from("regex", pattern), temperature=1.0, seed=5)
    assert re.fullmatch(pattern, text) and reason == "stop", text


def test_lark_grammar(engine):
    grammar = 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/'
    text, reason = generate(engine, guide_from("lark", grammar), max_tokens=40, temperature=1.0, seed=2)
    assert re.fullmatch(r"\(\d{1,3}(,\d{1,3})*\)", text) or reason == "length", text


def test_max_tokens_before_the_grammar_completes_is_length(engine):
    schema = {"type": "object", "properties": {"t": {"type": "string", "minLength": 50}}, "required": ["t"]}
    text, reason = generate(engine, guide_from("json_schema", schema), max_tokens=6)
    assert reason == "length" and text.startswith('{"t":"')


def test_an_adopter_resumes_the_grammar_from_the_delivered_tokens(engine):
    """What an adopting attention worker does: the same request with the first k tokens as its output
    continues exactly as the uninterrupted run (its matcher is rebuilt from them)."""
    guide = guide_from("json_schema", SCHEMAS[1])
    params = SamplingParams(max_tokens=80, guide=guide, temperature=0.9, seed=77)
    whole = engine.generate([PROMPT], params)[0].token_ids
    for k in (1, len(whole) // 2):
        engine.add_request(f"adopted-{k}", PROMPT, params, output_ids=whole[:k], seed=77)
        rest = []
        while engine.has_unfinished():
            rest += [e.token_id for e in engine.step() if e.request_id == f"adopted-{k}"]
        assert whole[:k] + rest == whole


def test_grammar_state_from_scratch_equals_incremental(engine):
    guide = guide_from("json_schema", SCHEMAS[0])
    ids = engine.tokenizer.encode('{"name":"ab', add_special_tokens=False)
    one = GuideState(engine.scheduler.guides.matcher(guide))
    for i in range(len(ids)):
        one.catch_up(ids[:i + 1])
    other = GuideState(engine.scheduler.guides.matcher(guide))
    other.catch_up(ids)
    vocab = engine.model_config.vocab_size
    assert one.failed is None and torch.equal(one.allowed(vocab), other.allowed(vocab))


def test_tool_call_parsing_and_streaming_split():
    tools = [{"name": "get_weather", "parameters": {}}]
    text = '{"name":"get_weather","arguments":{"city":"Oslo","unit":"c"}}'
    call = parse_call(text, tools)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo", "unit": "c"}
    assert parse_call('{"name":"other","arguments":{}}', tools) is None
    assert parse_call("It is sunny", tools) is None
    for size in (1, 3, 7):
        stream = CallStream(tools, "call_x")
        deltas = [stream.feed(text[i:i + size], None) for i in range(0, len(text), size)]
        deltas.append(stream.feed("", "stop"))
        calls = [c for d, _ in deltas for c in d.get("tool_calls", [])]
        assert calls[0]["id"] == "call_x" and calls[0]["function"]["name"] == "get_weather"
        assert "".join(c["function"]["arguments"] for c in calls) == call.arguments
        assert deltas[-1][1] == "tool_calls" and not any("content" in d for d, _ in deltas)
    plain = CallStream(tools, "call_y")
    assert plain.feed("Sunny", None) == ({"content": "Sunny"}, None)


def test_tools_reach_the_chat_template(tiny_model):
    from resilient_moe.engine.tokenizer import TextTokenizer

    base = TextTokenizer.from_dir(tiny_model)
    tok = TextTokenizer(base._tok, "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
                                   "{{ messages[0].content }}", base.special)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], [WEATHER]) == "[get_weather]hi"


# ---- over HTTP ------------------------------------------------------------------------------------


def chat(client, stack, **kwargs):
    return client.chat.completions.create(model=stack.model_name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=kwargs.pop("max_tokens", 80), **kwargs)


def stream_chat(client, stack, **kwargs) -> tuple[str, str | None, list]:
    text, reason, calls = "", None, []
    for chunk in chat(client, stack, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            reason = choice.finish_reason or reason
    return text, reason, calls


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema(stack, client, stream):
    for schema in SCHEMAS[:2]:
        fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
        if stream:
            text, reason, _ = stream_chat(client, stack, response_format=fmt, temperature=1.0, seed=3)
        else:
            out = chat(client, stack, response_format=fmt, temperature=1.0, seed=3).choices[0]
            text, reason = out.message.content, out.finish_reason
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_json_object_and_vllm_extras(stack, client):
    text = client.completions.create(model=stack.model_name, prompt="hi", max_tokens=60,
                                     extra_body={"response_format": {"type": "json_object"},
                                                 "guided_json": None}).choices[0].text
    try:
        assert isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        assert len(text) > 0  # an object not closed within max_tokens: still a JSON object's prefix
        assert text.startswith("{")
    out = client.completions.create(model=stack.model_name, prompt="hi", max_tokens=20,
                                    extra_body={"guided_choice": ["yes", "no"]}).choices[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"
    out = client.completions.create(model=stack.model_name, prompt="hi", max_tokens=20, temperature=1.0, seed=1,
                                    extra_body={"guided_regex": "[0-9]{4}-[a-c]+!"}).choices[0]
    assert re.fullmatch("[0-9]{4}-[a-c]+!", out.text) or out.finish_reason == "length", out.text
    out = chat(client, stack, extra_body={"guided_json": json.dumps(SCHEMAS[2])}).choices[0]
    jsonschema.validate(json.loads(out.message.content), SCHEMAS[2])


def test_invalid_schema_is_a_400_naming_the_parameter(stack, client):
    for extra, param in (({"guided_json": {"type": "object", "properties": {"a": {"type": "nope"}}}}, "guided_json"),
                         ({"response_format": {"type": "json_schema", "json_schema": {
                             "name": "x", "schema": {"type": "integer", "minimum": "many"}}}}, "response_format"),
                         ({"guided_regex": "a{2,1}"}, "guided_regex")):
        raw = httpx.post(f"{stack.url}/v1/chat/completions", timeout=30,
                         json={"messages": [{"role": "user", "content": "hi"}], **extra})
        assert raw.status_code == 400 and raw.json()["error"]["param"] == param, raw.text


def check_call(call, tools=TOOLS, name=None) -> None:
    assert call.id.startswith("call_") and call.type == "function"
    spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_calls(stack, client, tool_choice):
    name = None if tool_choice == "required" else "get_time"
    for seed in (1, 2):
        out = chat(client, stack, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=seed).choices[0]
        assert out.finish_reason == "tool_calls" and out.message.content is None
        assert len(out.message.tool_calls) == 1
        check_call(out.message.tool_calls[0], name=name)
        # streamed: the same call, its arguments in pieces
        text, reason, deltas = stream_chat(client, stack, tools=TOOLS, tool_choice=tool_choice, temperature=1.0,
                                           seed=seed)
        assert reason == "tool_calls" and text == ""
        assert deltas[0].id.startswith("call_") and deltas[0].function.name == \
            out.message.tool_calls[0].function.name  # the same seed: the same call (ids are per request)
        assert all(d.index == 0 for d in deltas)
        assert "".join(d.function.arguments or "" for d in deltas) == out.message.tool_calls[0].function.arguments
    # every token id is streamed (return_token_ids), held-back text's too
    raw = httpx.post(f"{stack.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": tool_choice,
        "max_tokens": 80, "seed": 1, "temperature": 1.0, "stream": True, "return_token_ids": True})
    ids = [t for line in raw.text.splitlines() if line.startswith("data: {")
           for c in json.loads(line[6:])["choices"] for t in c.get("token_ids") or []]
    whole = httpx.post(f"{stack.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": tool_choice,
        "max_tokens": 80, "seed": 1, "temperature": 1.0, "return_token_ids": True}).json()
    assert ids == whole["choices"][0]["token_ids"] and ids


def test_tool_choice_none_and_auto_answer_content(stack, client):
    for choice in ("none", "auto"):
        out = chat(client, stack, tools=TOOLS, tool_choice=choice, max_tokens=8).choices[0]
        # the random model writes no call: its text is content
        assert out.message.tool_calls is None and out.finish_reason in ("stop", "length")


def test_auto_answers_text_that_is_a_call_as_a_call(stack, client):
    """The "auto" heuristic end to end: a response_format that makes the text a call of get_weather (the
    random model would not write one) comes back as tool_calls, streamed or not, for each of n=2 choices."""
    call = {"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
            "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER["function"]["parameters"]}}
    fmt = {"type": "json_schema", "json_schema": {"name": "call", "schema": call}}
    out = chat(client, stack, tools=TOOLS, response_format=fmt, n=2, temperature=1.0, seed=5)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_call(choice.message.tool_calls[0], name="get_weather")
    calls: dict[int, list] = {0: [], 1: []}
    reasons = {}
    for chunk in chat(client, stack, tools=TOOLS, response_format=fmt, n=2, temperature=1.0, seed=5, stream=True):
        for choice in chunk.choices:
            assert not choice.delta.content
            calls[choice.index] += choice.delta.tool_calls or []
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert reasons == {0: "tool_calls", 1: "tool_calls"}
    for index, deltas in calls.items():
        assert deltas[0].function.name == "get_weather"
        assert "".join(d.function.arguments or "" for d in deltas) == \
            out.choices[index].message.tool_calls[0].function.arguments


# ---- failover: last, it kills one of the stack's attention workers ------------------------------


def test_guided_stream_survives_an_attention_worker_kill(stack, engine):
    """A JSON object interrupted mid-way by an attention-worker kill: the adopter rebuilds the grammar
    state from the delivered tokens and the stream is the failure-free run's, token for token."""
    schema = {"type": "object", "properties": {"note": {"type": "string", "minLength": 300}},
              "required": ["note"]}
    guide = guide_from("json_schema", schema)
    prompts = [PROMPT, [1, 17, 230, 99, 12], [1, 88, 77, 66], [1, 9, 8, 7, 6, 5]]
    extra = {"temperature": 0.9, "seed": 99}
    expected = [engine.generate([p], SamplingParams(max_tokens=90, guide=guide, ignore_eos=True, **extra))[0]
                for p in prompts]
    results = streams_through_kill(stack, "aw-0", prompts, max_tokens=90, kill_after_tokens=24,
                                   guided_json=schema, **extra)
    for result, want in zip(results, expected):
        assert result.error is None and result.done
        assert result.token_ids == want.token_ids and result.finish_reason == want.finish_reason
    wait_until(lambda: httpx.get(f"{stack.url}/ready").status_code == 200, 60, "/ready after the replacement")


"""Chat templates render exactly as transformers' apply_chat_template renders them (same helpers and
extensions), are compiled once per model, and a template's own refusal is a clear request error."""

from __future__ import annotations

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from resilient_moe.engine.tokenizer import TextTokenizer
from resilient_moe.errors import CheckpointError, RequestError

# A system prompt folded into the first turn, roles checked with raise_exception (as Llama-2-style templates do).
SYSTEM_AND_RAISE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system is defined %}[INST] <<SYS>>\n{{ system }}\n<</SYS>>\n\n"
    "{{ message['content'] | trim }}"
    " [/INST]{%- else %}[INST] {{ message['content'] | trim }} [/INST]{%- endif %}"
    "{%- else %} {{ message['content'] | trim }}{{ eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# Loop controls, a namespace, tojson with options, strftime_now, the generation block, trim/lstrip blocks.
HELPERS = """{%- set ns = namespace(turns=0, names=[]) -%}
{% for m in messages %}
  {% if m['role'] == 'tool' %}{% continue %}{% endif %}
  {% set ns.turns = ns.turns + 1 %}
<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}
{%- else %}{{ m['content'] }}{% endif %}{{ eos_token }}
  {% if ns.turns >= 4 %}{% break %}{% endif %}
{% endfor %}
{{ {'turns': ns.turns, 'quote': 'é <b>&</b>'} | tojson(indent=2, sort_keys=true) }}
{{ dict(a=1) | tojson }} year {{ strftime_now('%Y') }}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Hello there!  "},
    {"role": "assistant", "content": "Hi. ünïcödé"},
    {"role": "tool", "content": "skipped"},
    {"role": "user", "content": "What is an expert?"},
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def ours(tiny_model, template: str) -> TextTokenizer:
    base = TextTokenizer.from_dir(tiny_model)
    return TextTokenizer(base._tok, template, base.special)


def hf_render(hf_tokenizer, template: str, messages) -> str:
    return hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                            add_generation_prompt=True)


@pytest.mark.parametrize("messages", [CONVERSATION[1:3] + CONVERSATION[4:], [CONVERSATION[0], CONVERSATION[1]],
                                      [CONVERSATION[0]] + CONVERSATION[1:3] + CONVERSATION[4:]],
                         ids=["no-system", "system-first-turn", "system-three-turns"])
def test_system_message_template_matches_transformers(tiny_model, hf_tokenizer, messages):
    want = hf_render(hf_tokenizer, SYSTEM_AND_RAISE, messages)
    assert ours(tiny_model, SYSTEM_AND_RAISE).apply_chat_template(messages) == want
    if messages[0]["role"] == "system":
        assert "<<SYS>>\nYou are terse.\n<</SYS>>" in want


def test_raise_exception_refuses_like_transformers(tiny_model, hf_tokenizer):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        hf_render(hf_tokenizer, SYSTEM_AND_RAISE, bad)
    with pytest.raises(RequestError, match="roles must alternate user/assistant"):
        ours(tiny_model, SYSTEM_AND_RAISE).apply_chat_template(bad)


def test_helpers_and_extensions_match_transformers(tiny_model, hf_tokenizer):
    want = hf_render(hf_tokenizer, HELPERS, CONVERSATION)
    got = ours(tiny_model, HELPERS).apply_chat_template(CONVERSATION)
    assert got == want
    assert '"quote": "é <b>&</b>"' in got and "<|tool|>" not in got and "year 20" in got


def test_checkpoint_template_matches_transformers(tiny_model, hf_tokenizer):
    tokenizer = TextTokenizer.from_dir(tiny_model)
    assert tokenizer.apply_chat_template(CONVERSATION) == hf_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True)


def test_template_compiled_once_per_model(tiny_model, monkeypatch):
    compiled = []
    original = ImmutableSandboxedEnvironment.from_string

    def counting(self, source, *args, **kwargs):
        compiled.append(source)
        return original(self, source, *args, **kwargs)

    monkeypatch.setattr(ImmutableSandboxedEnvironment, "from_string", counting)
    tokenizer = TextTokenizer.from_dir(tiny_model)
    for _ in range(3):
        tokenizer.apply_chat_template(CONVERSATION)
    assert compiled == [tokenizer.chat_template]


def test_namespace_refuses_private_names_and_bad_templates_fail_at_load(tiny_model):
    sneaky = "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}"
    with pytest.raises(RequestError, match="may not set the attribute '_x'"):
        ours(tiny_model, sneaky).apply_chat_template(CONVERSATION)
    with pytest.raises(CheckpointError, match="chat template does not compile"):
        ours(tiny_model, "{% for m in messages %}")

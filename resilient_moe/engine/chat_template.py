"""Chat templates, rendered the way Hugging Face's `apply_chat_template` renders them.

Checkpoints ship Jinja templates written against HF's renderer, so ours offers what that renderer
offers: a sandbox with `trim_blocks` and `lstrip_blocks`, loop controls (`{% break %}`,
`{% continue %}`), the `{% generation %}` block (rendered as its body), a `tojson` filter that keeps
non-ASCII text and takes `indent`, `separators` and `sort_keys`, and the globals `raise_exception`,
`strftime_now`, `dict` and `namespace` (which refuses underscore-prefixed names). The template's
variables are the messages, `add_generation_prompt`, `tools` and `documents` (None unless given),
and the tokenizer's special tokens (`bos_token`, `eos_token`, ...).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from resilient_moe.errors import CheckpointError, RequestError


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's part of a conversation (HF uses it
    for training masks); rendering a prompt needs only its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, minus attribute names that start with an underscore (a sandbox escape route)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick: `self` may be a key
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r} on a namespace")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt wants the JSON as written.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


class ChatTemplate:
    """One checkpoint's template, compiled once; `render` is safe to call from several threads."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_dict,
                           namespace=_Namespace)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise CheckpointError(f"the checkpoint's chat template does not compile: {e}") from None
        self.special_tokens = dict(special_tokens)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None) -> str:
        """The prompt text; RequestError (naming the template's complaint) when the template refuses."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, documents=documents, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise RequestError(f"the checkpoint's chat template refused the messages: {e}") from None

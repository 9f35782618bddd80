"""The checkpoint's tokenizer (tokenizer.json through the `tokenizers` library), plus chat templates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from resilient_moe.errors import CheckpointError, RequestError


class TextTokenizer:
    """Encodes prompts and decodes outputs; renders chat messages with the checkpoint's template."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None, special: dict[str, str]) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special = special  # e.g. {"bos_token": "<s>", "eos_token": "</s>"}

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "TextTokenizer | None":
        """The tokenizer of a checkpoint, or None when it has no tokenizer.json (token ids only)."""
        path = Path(model_dir)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            return None
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise CheckpointError(f"{tokenizer_file}: cannot load tokenizer ({e})") from None
        chat_template = None
        special: dict[str, str] = {}
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
            template = config.get("chat_template")
            chat_template = template if isinstance(template, str) else None
            for key in ("bos_token", "eos_token"):
                value = config.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    special[key] = value
        return cls(tokenizer, chat_template, special)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render messages to a prompt: the checkpoint's Jinja template if it has one, else a plain format."""
        if self.chat_template is None:
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + "\nassistant:"
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:  # pragma: no cover - jinja2 is a dependency
            raise RequestError("chat templates need the jinja2 package") from e
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=True, **self.special)
        except jinja2.TemplateError as e:
            raise RequestError(f"the checkpoint's chat template failed to render: {e}") from None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters."""

    def __init__(self, tokenizer: TextTokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.extend(token_ids)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        delta = full[len(self.text) :] if full.startswith(self.text) else full
        self.text = full
        return delta

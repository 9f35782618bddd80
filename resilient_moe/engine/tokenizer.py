"""The checkpoint's tokenizer (tokenizer.json through the `tokenizers` library), plus its chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from resilient_moe.engine.chat_template import ChatTemplate
from resilient_moe.errors import CheckpointError


# The special tokens a chat template sees by name, as in HF's tokenizers.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TextTokenizer:
    """Encodes prompts and decodes outputs; renders chat messages with the checkpoint's template."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None, special: dict[str, str]) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special = special  # e.g. {"bos_token": "<s>", "eos_token": "</s>"}
        self._template = ChatTemplate(chat_template, special) if chat_template is not None else None

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
            if isinstance(template, list):  # named templates, as HF stores several: the "default" one
                template = next((t.get("template") for t in template
                                 if isinstance(t, dict) and t.get("name") == "default"), None)
            chat_template = template if isinstance(template, str) else None
            for key in SPECIAL_TOKEN_KEYS:
                value = config.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    special[key] = value
        return cls(tokenizer, chat_template, special)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what the grammar engine builds its token table from)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """Render messages (and the tools the model may call, OpenAI's shape) to a prompt: the checkpoint's
        template (compiled once, rendered as HF renders it, `tools` passed as apply_chat_template passes
        them; see chat_template.py) if it has one, else a plain "role: content" format (the tools as a
        first "tools: [...]" line of JSON)."""
        if self._template is None:
            lines = [f"tools: {json.dumps(tools, ensure_ascii=False)}"] if tools else []
            lines += [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + "\nassistant:"
        return self._template.render(messages, add_generation_prompt=True, tools=tools)

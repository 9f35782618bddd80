"""Prompts to token ids, without starving the process: bounded, and off the event loop.

The frontend's link I/O shares this process (and its cores) with the API, so text work is bounded
before it starts: a prompt longer than `max_chars` characters is refused before it is tokenized (no
tokenizer produces fewer tokens than a context's worth from it), and at most `concurrency` prompts
are tokenized at once, on worker threads (the tokenizer releases the GIL while it works).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.concurrency import run_in_threadpool

from resilient_moe.engine.tokenizer import TextTokenizer
from resilient_moe.errors import RequestError
from resilient_moe.server.protocol import MAX_CHOICES, ApiError, ChatCompletionRequest, CompletionRequest
from resilient_moe.server.validation import check_ids


class PromptEncoder:
    """Turns the prompt of a completion or the messages of a chat into checked token ids."""

    def __init__(self, tokenizer: TextTokenizer | None, vocab_size: int, max_chars: int, concurrency: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_chars = max_chars
        self.concurrency = concurrency
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the server's loop

    async def _offload(self, fn, *args) -> list[int]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        async with self._slots:
            return await run_in_threadpool(fn, *args)

    def _bound(self, chars: int, param: str, what: str | None = None) -> None:
        if chars > self.max_chars:
            raise ApiError(400, f"{what or param} has {chars} characters; this server takes at most "
                                f"{self.max_chars} (far more than its context length in tokens)", param=param,
                           code="context_length_exceeded")

    async def completion(self, body: CompletionRequest) -> list[list[int]]:
        """The token ids of each prompt (a list of texts or of token-id lists is several prompts)."""
        prompt = body.prompt
        several = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        prompts = list(prompt) if several else [prompt]
        if len(prompts) > MAX_CHOICES:
            raise ApiError(400, f"prompt: at most {MAX_CHOICES} prompts per request, got {len(prompts)}",
                           param="prompt")
        return [await self._one(p) for p in prompts]

    async def _one(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: send the prompt as a list of token ids",
                               param="prompt")
            self._bound(len(prompt), "prompt")
            ids = await self._offload(self.tokenizer.encode, prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt")
        check_ids(ids, self.vocab_size, "prompt")
        return ids

    async def chat(self, body: ChatCompletionRequest, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt of a chat, rendered with the tools the model may call (OpenAI's shape)."""
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so chat messages cannot be encoded; use "
                                "/v1/completions with token ids", param="messages")
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            message = {"role": m.role, "content": content}
            if m.name is not None:
                message["name"] = m.name
            if m.tool_calls is not None:
                message["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            messages.append(message)
        self._bound(sum(len(m["content"]) for m in messages), "messages")
        ids = await self._offload(self._render, messages, tools)
        if not ids:
            raise ApiError(400, "messages render to an empty prompt", param="messages")
        check_ids(ids, self.vocab_size, "messages")
        return ids

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tools)
        except RequestError as e:
            raise ApiError(400, str(e), param="messages") from None
        self._bound(len(text), "messages", "the prompt rendered from messages")
        bos = self.tokenizer.special.get("bos_token")
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

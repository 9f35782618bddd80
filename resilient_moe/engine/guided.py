"""Structured outputs: grammars (JSON schema, regex, choice, Lark) compiled by llguidance, and the token
masks they put on a request's logits.

A request carries its grammar in `SamplingParams.guide`: llguidance's grammar text (JSON), built by the
frontend from the request (`guide_from`) and checked there, so a bad schema or regex is a 400 naming the
parameter. The attention worker compiles it once per distinct grammar (`GuideCompiler`, a bounded LRU of
compiled matchers, each request getting a copy) and keeps a matcher per sequence. The matcher's state is
derived from the output tokens alone: it is built lazily, by feeding it the sequence's output so far, so
an attention worker that adopts a request after a failover (with the delivered tokens as its output)
rebuilds the same state and masks the same tokens; a guided request is as deterministic as any other.

The mask is llguidance's bitmask (int32 words [ceil(V / 32)], bit i of word w allows token 32 w + i),
unpacked with tensor ops over the vocabulary. End-of-sequence is allowed only where the grammar accepts.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import llguidance
import torch

# The request parameters that carry a grammar, and the llguidance format of each.
GUIDE_KINDS = ("json_schema", "regex", "choice", "lark")


class GuideError(ValueError):
    """A grammar that does not compile: the message says why."""


def guide_from(kind: str, spec: Any) -> str:
    """llguidance's grammar text for a grammar of `kind` (GUIDE_KINDS): a JSON schema (a dict), a regex, a
    list of strings, a Lark grammar. Raises GuideError when it is not valid."""
    if kind == "json_schema":
        if not isinstance(spec, dict):
            raise GuideError(f"a JSON schema must be an object, got {type(spec).__name__}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(spec), defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as e:
            raise GuideError(str(e)) from None
    elif kind == "regex":
        if not isinstance(spec, str):
            raise GuideError(f"a regex must be a string, got {type(spec).__name__}")
        grammar = llguidance.LLMatcher.grammar_from_regex(spec)
    elif kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(s, str) and s for s in spec):
            raise GuideError("choices must be a non-empty list of non-empty strings")
        grammar = llguidance.grammar_from("choice", spec)
    elif kind == "lark":
        if not isinstance(spec, str):
            raise GuideError(f"a grammar must be a string (Lark syntax), got {type(spec).__name__}")
        try:  # Lark syntax, or llama.cpp's GBNF (converted to Lark)
            grammar = llguidance.grammar_from("grammar", spec)
        except ValueError as e:
            raise GuideError(str(e)) from None
    else:
        raise GuideError(f"unknown grammar kind {kind!r}")
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GuideError(messages[0] if messages else "invalid grammar")
    return grammar


def tokenizer_info(tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of the checkpoint's tokenizer (tokenizer.json text), padded to the model's
    vocabulary (the LM head's rows); expensive (about a second for a large vocabulary): build it once."""
    eos = list(eos_token_ids) or None
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)


class GuideCompiler:
    """Compiled grammars of one attention worker: `matcher(guide)` is a fresh matcher for a request,
    copied from the one compiled for that grammar (the `capacity` most recently used are kept)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, capacity: int = 64) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.compiles = 0  # grammars compiled so far (tests: the cache works)

    def matcher(self, guide: str) -> llguidance.LLMatcher:
        compiled = self._compiled.get(guide)
        if compiled is None:
            compiled = llguidance.LLMatcher(self.tokenizer, guide, log_level=0)
            self.compiles += 1
            self._compiled[guide] = compiled
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(guide)
        return compiled.deep_copy()


class GuideState:
    """A sequence's matcher, fed its output tokens so far (`catch_up`), and the mask of its next token."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher
        self.fed = 0  # output tokens consumed

    def catch_up(self, output_ids: list[int]) -> None:
        """Feed the output tokens not consumed yet (all of them on an adopting worker)."""
        if self.fed < len(output_ids):
            self.matcher.consume_tokens(output_ids[self.fed:])
            self.fed = len(output_ids)

    @property
    def stopped(self) -> bool:
        """The grammar is complete and takes no further token."""
        return self.matcher.is_stopped()

    @property
    def failed(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None

    def allowed(self, vocab: int) -> torch.Tensor:
        """bool [V]: the tokens the grammar allows next (EOS only where it accepts)."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)  # [ceil(V/32)]
        return unpack_bitmask(words, vocab)


def unpack_bitmask(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 words [W] -> bool [V] (V <= 32 W): bit i of word w is token 32 w + i."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [W, 32]
    return bits.reshape(-1)[:vocab].bool()


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """One row of logits [V] with the tokens not `allowed` (bool [V']) at -inf; tokens past V' too."""
    vocab = logits.shape[-1]
    if allowed.shape[-1] < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(vocab - allowed.shape[-1])])
    return logits.masked_fill(~allowed[:vocab].to(logits.device), float("-inf"))

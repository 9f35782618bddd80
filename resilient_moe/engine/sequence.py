"""A request's life inside an engine: its tokens, its KV blocks and how far its KV is computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from resilient_moe.engine.config import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request. `num_cached` tokens have their K/V in the cache; the scheduler picks how many of
    the rest (`num_scheduled`: all of a decode's one, a chunk of a long prompt) the next step computes."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # resolved seed: the request's own, or one drawn at admission and kept for failover
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of its first full blocks (prefix cache)
    num_cached: int = 0
    num_scheduled: int = 0  # tokens the current step computes, from position num_cached on
    suspect: bool = False  # a worker died in its first step there (a poison request?): admitted alone
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # A guided request's grammar state (engine/guided.py's GuideState), built from output_ids on first use
    guide_state: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_new_tokens(self) -> int:
        """Tokens whose K/V are not computed yet (1 in steady decode)."""
        return self.num_tokens - self.num_cached

    @property
    def completes_prompt(self) -> bool:
        """The current step computes up to the last token, so it samples the next one."""
        return self.num_cached + self.num_scheduled >= self.num_tokens

    def token_at(self, position: int) -> int:
        prompt_len = len(self.prompt_ids)
        return self.prompt_ids[position] if position < prompt_len else self.output_ids[position - prompt_len]

    def tokens(self, start: int, stop: int) -> list[int]:
        prompt_len = len(self.prompt_ids)
        if stop <= prompt_len:
            return self.prompt_ids[start:stop]
        if start >= prompt_len:
            return self.output_ids[start - prompt_len : stop - prompt_len]
        return self.prompt_ids[start:] + self.output_ids[: stop - prompt_len]


@dataclass(frozen=True)
class TokenEvent:
    """A token produced for a request, numbered by its position in the request's output."""

    request_id: str
    position: int
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: str | None = None  # "stop" or "length" on the request's last token

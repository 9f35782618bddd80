"""Continuous batching: which sequences run in the next step, and what their results mean.

Each step every running sequence computes its new tokens (one in steady decode, several after a
restore), and waiting sequences are admitted while KV blocks, the sequence limit and the token
budget allow. When the cache is full a running sequence is preempted: its blocks are freed and it
waits to be recomputed, keeping its generated tokens. No request is ever dropped for lack of space.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from resilient_moe.config import EngineConfig
from resilient_moe.engine.kv_cache import BlockAllocator
from resilient_moe.engine.sampler import logprobs_of, sample
from resilient_moe.engine.sequence import Sequence, SequenceStatus, TokenEvent


@dataclass
class ScheduledBatch:
    """The sequences of one step, each computing `seq.num_new_tokens` tokens."""

    seqs: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


class Scheduler:
    """Waiting queue, running set and KV block accounting of one engine."""

    def __init__(self, engine: EngineConfig, allocator: BlockAllocator, block_size: int, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.config = engine
        self.allocator = allocator
        self.block_size = block_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue management -----------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str, reason: str = "abort") -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, reason)
                    return seq
        return None

    def fail(self, request_id: str) -> Sequence | None:
        return self.abort(request_id, "error")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- schedule ---------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        scheduled: list[Sequence] = []
        # Step 1: running sequences, oldest first; preempt the newest when blocks run out.
        index = 0
        while index < len(self.running):
            seq = self.running[index]
            missing = self.blocks_for(seq.num_tokens) - len(seq.block_table)
            while missing > self.allocator.num_free and self.running[-1] is not seq:
                self._preempt(self.running.pop())
            if missing > self.allocator.num_free:
                self.running.pop()
                self._preempt(seq)
                break
            seq.block_table.extend(self.allocator.allocate(missing))
            scheduled.append(seq)
            index += 1
        # Step 2: admit waiting sequences in arrival order.
        budget = self.config.max_num_batched_tokens - sum(s.num_new_tokens for s in scheduled)
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            new_tokens = seq.num_new_tokens
            # A prompt larger than the whole budget still runs, alone with the decodes, so it never starves.
            if new_tokens > budget and any(s.num_new_tokens > 1 for s in scheduled):
                break
            missing = self.blocks_for(seq.num_tokens) - len(seq.block_table)
            if missing > self.allocator.num_free:
                break
            self.waiting.popleft()
            seq.block_table.extend(self.allocator.allocate(missing))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(seq)
            budget -= new_tokens
        return ScheduledBatch(scheduled) if scheduled else None

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- postprocess ------------------------------------------------------------------------

    def postprocess(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[TokenEvent]:
        """Sample one token per sequence from its logits row [S, V], record it, retire finished ones."""
        seqs = batch.seqs
        tokens = sample(logits, [s.params for s in seqs], [s.seed for s in seqs], [len(s.output_ids) for s in seqs])
        events = []
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            seq.num_cached = seq.num_tokens
            position = len(seq.output_ids)
            seq.output_ids.append(token)
            logprob = top = None
            if seq.params.logprobs is not None:
                logprob, top = logprobs_of(logits[row], token, seq.params.logprobs)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
            events.append(TokenEvent(seq.request_id, position, token, logprob, top, reason))
        return events

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if not seq.params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in seq.params.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

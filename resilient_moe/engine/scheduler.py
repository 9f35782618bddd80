"""Continuous batching: which sequences run in the next step, and what their results mean.

Each step every running sequence computes its new tokens (one in steady decode, several after a
restore), and waiting sequences are admitted while KV blocks, the sequence limit and the token
budget allow. When the cache is full a running sequence is preempted: its blocks are freed and it
waits to be recomputed, keeping its generated tokens. No request is ever dropped for lack of space.

With prefix caching (the allocator's `caching`), a sequence admitted with no blocks first takes the
cached blocks of its longest prefix of full blocks (never its last token's) and computes only the rest;
each block that a step completes is registered for later requests (`register_computed`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from resilient_moe.engine.chunk_policy import MIN_CHUNK_TOKENS, StepCostModel, prefill_chunk_tokens, step_target_ms
from resilient_moe.engine.config import EngineConfig
from resilient_moe.engine.kv_cache import BlockAllocator, block_hashes
from resilient_moe.engine.guided import GuideCompiler, GuideState, apply_mask
from resilient_moe.engine.sampler import LogSoftmax, adjust_logits, logprobs_of, sample
from resilient_moe.engine.sequence import Sequence, SequenceStatus, TokenEvent
from resilient_moe.errors import RequestError


@dataclass
class ScheduledBatch:
    """The sequences of one step, each computing `seq.num_scheduled` tokens."""

    seqs: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_scheduled for s in self.seqs)


class Scheduler:
    """Waiting queue, running set and KV block accounting of one engine."""

    def __init__(self, engine: EngineConfig, allocator: BlockAllocator, block_size: int, eos_token_ids: tuple[int, ...], max_model_len: int,
                 log_softmax: LogSoftmax | None = None, guides: GuideCompiler | None = None,
                 prefix_root: bytes = b"") -> None:
        self.config = engine
        self.prefix_root = prefix_root  # what block hashes chain from (kv_cache.prefix_root)
        self.prefix_query_tokens = 0  # tokens of admitted requests looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of those, tokens whose KV was found there (not computed)
        self.guides = guides  # grammars of guided requests (None: the checkpoint has no tokenizer)
        self.log_softmax = log_softmax  # the kernels' (triton), or None for torch's
        self.allocator = allocator
        self.block_size = block_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.cost = StepCostModel()  # measured step costs: prompt chunks sized to max_step_ms
        self._plan: tuple[int, list[tuple[int, int]]] = (0, [])  # the last step's (decodes, chunks)

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

    @property
    def tokens_in_flight(self) -> int:
        """Tokens (prompt + generated) of every running and waiting sequence: what placement balances."""
        return sum(seq.num_tokens for seq in self.running) + sum(seq.num_tokens for seq in self.waiting)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- schedule ---------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        """The next step's sequences, each with `num_scheduled` set.

        Every running decode computes its token. Prompts (and recomputes after a restore or a
        preemption) are computed in chunks, oldest first: while others decode, as many tokens as fit
        the step's latency target (`max_step_ms`, engine/chunk_policy.py), at most
        `max_prefill_tokens_per_step`, so a long prompt delays the running decodes by one bounded chunk
        per step, never by its whole prefill. Batch invariance makes a chunked prompt's tokens identical."""
        scheduled: list[Sequence] = []
        prefill_left = self.config.max_prefill_tokens_per_step
        tokens_left = self.config.max_num_batched_tokens
        decodes = sum(1 for seq in self.running if seq.num_new_tokens == 1)
        chunks: list[tuple[int, int]] = []  # (tokens, context) of each prompt chunk
        # With streams decoding, prompt chunks get the time a step has left under its target; with none,
        # nobody waits on the step and chunks take the cap.
        timed = decodes > 0 and self.cost.ready
        budget_ms = step_target_ms(self.config.max_step_ms, self.cost.decode_ms) - self.cost.decode_ms if timed else 0.0

        def chunk(seq: Sequence) -> int:
            nonlocal budget_ms
            cap = min(prefill_left, max(0, tokens_left))
            if not timed:
                return min(seq.num_new_tokens, cap)
            n = prefill_chunk_tokens(budget_ms, self.cost.cost, seq.num_cached, seq.num_new_tokens, cap,
                                     MIN_CHUNK_TOKENS if not chunks else 0)
            budget_ms -= self.cost.cost.ms(n, seq.num_cached)
            return n

        # Step 1: running sequences, oldest first; preempt the newest when blocks run out.
        index = 0
        while index < len(self.running):
            seq = self.running[index]
            want = seq.num_new_tokens
            if want > 1:
                want = chunk(seq)
                if want == 0:  # a prompt whose chunk must wait for the next step
                    seq.num_scheduled = 0
                    index += 1
                    continue
            missing = self.blocks_for(seq.num_cached + want) - len(seq.block_table)
            while missing > self.allocator.num_free and self.running[-1] is not seq:
                self._preempt(self.running.pop())
            if missing > self.allocator.num_free:
                self.running.pop()
                self._preempt(seq)
                break
            if missing > 0:
                seq.block_table.extend(self.allocator.allocate(missing))
            seq.num_scheduled = want
            if seq.num_new_tokens > 1:
                prefill_left -= want
                chunks.append((want, seq.num_cached))
            tokens_left -= want
            scheduled.append(seq)
            index += 1
        # Step 2: admit waiting sequences in arrival order, their first chunk within what is left. At most
        # one suspect a step: if it takes the worker down again, no other suspect was in that step with it.
        suspects = 0
        while self.waiting and len(self.running) < self.config.max_num_seqs and prefill_left > 0 and tokens_left > 0:
            seq = self.waiting[0]
            if seq.suspect and suspects:
                break
            hit = self._cached_prefix(seq)  # its first len(hit) blocks are cached: it computes the rest
            seq.num_cached += len(hit) * self.block_size
            want = chunk(seq) if seq.num_new_tokens > 1 else min(1, tokens_left)
            missing = self.blocks_for(seq.num_cached + want) - len(seq.block_table) - len(hit)
            if want == 0 or missing + self.allocator.num_reclaimed(hit) > self.allocator.num_free:
                seq.num_cached -= len(hit) * self.block_size  # no time or room left in this step
                break
            suspects += seq.suspect
            self.waiting.popleft()
            if self.allocator.caching and not seq.block_table:
                self.prefix_query_tokens += seq.num_tokens
                self.prefix_hit_tokens += len(hit) * self.block_size
            seq.block_table.extend(self.allocator.acquire(hit))
            if missing > 0:
                seq.block_table.extend(self.allocator.allocate(missing))
            seq.status = SequenceStatus.RUNNING
            seq.num_scheduled = want
            self.running.append(seq)
            scheduled.append(seq)
            prefill_left -= want
            tokens_left -= want
            if seq.num_new_tokens > 1:
                chunks.append((want, seq.num_cached))
        self._plan = (decodes, chunks)
        return ScheduledBatch(scheduled) if scheduled else None

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks of the longest prefix of full blocks of a sequence that holds none yet (new or
        preempted), never its last token's block: at least that token is computed, for its logits."""
        if not self.allocator.caching or seq.block_table:
            return []
        self._hash_blocks(seq, (seq.num_tokens - 1) // self.block_size)
        return self.allocator.match(seq.block_hashes[: (seq.num_tokens - 1) // self.block_size])

    def prefix_hashes(self, seq: Sequence, count: int | None = None) -> list[bytes]:
        """Chained hashes of `seq`'s first `count` full blocks (default: those a prefix may reuse, all but
        its last token's), computed once and kept on it."""
        if count is None:
            count = (seq.num_tokens - 1) // self.block_size
        self._hash_blocks(seq, count)
        return seq.block_hashes[:count]

    def _hash_blocks(self, seq: Sequence, count: int) -> None:
        """Extend `seq.block_hashes` to its first `count` blocks (all full)."""
        have = len(seq.block_hashes)
        if count > have:
            parent = seq.block_hashes[-1] if have else self.prefix_root
            bs = self.block_size
            seq.block_hashes.extend(block_hashes(parent, seq.tokens(have * bs, count * bs), bs))

    def register_computed(self, seq: Sequence, before: int) -> None:
        """`seq`'s positions [0, num_cached) are computed, [0, before) were already: cache the blocks
        that became full (restored rows count as computed: engine.resume)."""
        if not self.allocator.caching or seq.status == SequenceStatus.FINISHED:
            return  # aborted while its step ran (a client gone, a stop): its blocks are freed already
        first, last = before // self.block_size, min(seq.num_cached // self.block_size, len(seq.block_table))
        if last <= first:
            return
        self._hash_blocks(seq, last)
        for i in range(first, last):
            self.allocator.register(seq.block_table[i], seq.block_hashes[i])

    def observe(self, elapsed_s: float) -> None:
        """The last scheduled step took `elapsed_s` to run: feeds the step cost model."""
        decodes, chunks = self._plan
        self.cost.observe(1000 * elapsed_s, decodes, chunks)

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- postprocess ------------------------------------------------------------------------

    def postprocess(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[TokenEvent]:
        """Sample one token for each sequence whose prompt this step completed, from its logits row
        (logits [S, V], one row per sequence of the batch); record it, retire finished ones. A
        sequence that computed only a chunk of its prompt just advances."""
        done = [row for row, seq in enumerate(batch.seqs) if seq.completes_prompt]
        for seq in batch.seqs:
            seq.num_cached += seq.num_scheduled
            self.register_computed(seq, seq.num_cached - seq.num_scheduled)
            seq.num_scheduled = 0
        if len(done) < len(batch.seqs):
            logits = logits[done]
        seqs = [batch.seqs[row] for row in done]
        if not seqs:
            return []
        adjusted = logits
        if any(s.params.adjusts_logits for s in seqs):
            # logprobs stay those of the model's own distribution (vLLM's default), so only sampling sees these
            adjusted = torch.stack([
                self._guided(s, adjust_logits(row, s.params, s.prompt_ids, s.output_ids, self.eos_token_ids))
                if s.params.adjusts_logits else row for s, row in zip(seqs, logits)])
        tokens = sample(adjusted, [s.params for s in seqs], [s.seed for s in seqs],
                        [len(s.output_ids) for s in seqs], self.log_softmax)
        events = []
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            position = len(seq.output_ids)
            seq.output_ids.append(token)
            if seq.guide_state is not None:
                seq.guide_state.catch_up(seq.output_ids)
            logprob = top = None
            if seq.params.logprobs is not None:
                logprob, top = logprobs_of(logits[row], token, seq.params.logprobs, self.log_softmax)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
            events.append(TokenEvent(seq.request_id, position, token, logprob, top, reason))
        return events

    def _guided(self, seq: Sequence, row: torch.Tensor) -> torch.Tensor:
        """A guided request's row with the tokens its grammar forbids at -inf. Its grammar state is built
        from its output so far on first use, so a worker that adopted it masks as the first one did."""
        if seq.params.guide is None:
            return row
        if seq.guide_state is None:
            if self.guides is None:
                raise RequestError("structured outputs need the checkpoint's tokenizer, which this worker lacks")
            seq.guide_state = GuideState(self.guides.matcher(seq.params.guide))
            seq.guide_state.catch_up(seq.output_ids)
        return apply_mask(row, seq.guide_state.allowed(row.shape[-1]))

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if seq.guide_state is not None and (seq.guide_state.stopped or seq.guide_state.failed):
            # complete: nothing but end-of-sequence could follow; failed: no token is allowed (the grammar
            # wanted end-of-sequence where min_tokens masked it)
            return "stop"
        # the token at output position len - 1 was sampled with stop tokens masked (min_tokens): it cannot stop
        early = len(seq.output_ids) - 1 < seq.params.min_tokens
        if not early and not seq.params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if not early and token in seq.params.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

"""Turns a scheduled batch into micro-batch tensors and runs them through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resilient_moe.engine.pipeline import ExpertExecutor, forward_program, run_pipeline
from resilient_moe.engine.sequence import Sequence
from resilient_moe.model.attention_side import AttentionBatch, AttentionSide, KVCacheView, PrefillSpan
from resilient_moe.model.ops import padded_key_length


@dataclass
class StepOutput:
    """What a step produced: logits for `seqs` (concatenated in order), and requests that failed."""

    seqs: list[Sequence]
    logits: list[torch.Tensor]  # per completed micro-batch, [S_i, V]
    failed: dict[str, str]  # request id -> error message

    def all_logits(self) -> torch.Tensor:
        return torch.cat(self.logits) if self.logits else torch.empty(0)


def split_micro_batches(seqs: list[Sequence], count: int) -> list[list[Sequence]]:
    """Split into at most `count` contiguous groups with balanced scheduled-token counts (none empty)."""
    count = max(1, min(count, len(seqs)))
    total = sum(s.num_scheduled for s in seqs)
    groups: list[list[Sequence]] = [[] for _ in range(count)]
    done = 0
    group = 0
    for i, seq in enumerate(seqs):
        remaining_seqs = len(seqs) - i
        remaining_groups = count - group
        # Move on once this group holds its share, but keep one sequence for every later group.
        if groups[group] and (done >= total * (group + 1) / count or remaining_seqs < remaining_groups):
            group = min(group + 1, count - 1)
        groups[group].append(seq)
        done += seq.num_scheduled
    return [g for g in groups if g]


class ModelRunner:
    """Builds the token and position tensors of micro-batches and executes them. Each sequence
    computes positions [num_cached, num_cached + num_scheduled): a decode's one token, or a chunk of
    a prompt (the last rows' logits of a chunk that does not finish the prompt are not sampled)."""

    def __init__(self, side: AttentionSide, cache: KVCacheView, block_size: int, executor: ExpertExecutor) -> None:
        self.side = side
        self.cache = cache
        self.block_size = block_size
        self.executor = executor
        self.device = side.device

    def build(self, seqs: list[Sequence]) -> tuple[torch.Tensor, AttentionBatch]:
        """Token ids [T] and the attention layout of a micro-batch."""
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lengths: list[int] = []
        prefills: list[PrefillSpan] = []
        last_rows: list[int] = []
        for seq in seqs:
            start, stop = seq.num_cached, seq.num_cached + seq.num_scheduled
            row = len(token_ids)
            token_ids.extend(seq.tokens(start, stop))
            table = seq.block_table
            for pos in range(start, stop):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            if stop - start == 1:
                decode_rows.append(row)
                decode_tables.append(table)
                decode_lengths.append(stop)
            else:
                key_slots = self._key_slots([table], [stop], padded_key_length(stop))[0]
                span_pos = torch.arange(start, stop, dtype=torch.long, device=self.device)
                prefills.append(PrefillSpan(row, stop - start, key_slots, span_pos))
            last_rows.append(len(token_ids) - 1)
        if decode_rows:
            length = padded_key_length(max(decode_lengths))
            decode_key_slots = self._key_slots(decode_tables, decode_lengths, length)
        else:
            decode_key_slots = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        batch = AttentionBatch(
            positions=self._tensor(positions),
            slot_mapping=self._tensor(slots),
            decode_rows=self._tensor(decode_rows),
            decode_key_slots=decode_key_slots,
            prefills=prefills,
            last_rows=self._tensor(last_rows),
        )
        return self._tensor(token_ids), batch

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _key_slots(self, tables: list[list[int]], lengths: list[int], padded: int) -> torch.Tensor:
        """[B, padded] cache slot of key position j of each sequence; slot 0 past its length (masked)."""
        bs = self.block_size
        blocks = -(-padded // bs)
        table = torch.zeros((len(tables), blocks), dtype=torch.long)
        for i, t in enumerate(tables):
            used = -(-lengths[i] // bs)
            table[i, :used] = torch.tensor(t[:used], dtype=torch.long)
        j = torch.arange(padded, dtype=torch.long)
        slots = table[:, j // bs] * bs + j % bs  # [B, padded]
        slots[j.unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)] = 0
        return slots.to(self.device)

    def run(self, seqs: list[Sequence], micro_batches: int, step: int = 0) -> StepOutput:
        """Forward every sequence's new tokens through the micro-batch pipeline."""
        groups = split_micro_batches(seqs, micro_batches)
        programs = []
        for group in groups:
            token_ids, batch = self.build(group)
            programs.append(forward_program(self.side, self.cache, token_ids, batch))
        self.executor.begin_step(step)
        output = StepOutput([], [], {})
        for group, result in zip(groups, run_pipeline(programs, self.executor)):
            if isinstance(result, torch.Tensor):
                output.seqs.extend(group)
                output.logits.append(result)
                continue
            # A micro-batch stopped on an expert with no live replica: its sequences whose tokens needed
            # that expert fail; the others computed nothing this step and simply run again next step.
            row = 0
            for seq in group:
                rows = set(range(row, row + seq.num_scheduled))
                row += seq.num_scheduled
                if result.tokens is None or rows & result.tokens:
                    output.failed[seq.request_id] = str(result)
        return output

"""Turns a scheduled batch into micro-batch tensors and runs them through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resilient_moe.engine.pipeline import ExpertExecutor, forward_program, run_pipeline
from resilient_moe.engine.sequence import Sequence
from resilient_moe.model.attention_side import AttentionBatch, AttentionSide, KVCacheView, PrefillSpan


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
        """Token ids [T] and the attention layout of a micro-batch: per sequence its rows and its block
        table, so the layout costs the batch's tokens and blocks, never sequences x the longest."""
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        row_seq: list[int] = []
        blocks: list[int] = []
        block_start: list[int] = []
        seq_lengths: list[int] = []
        decode_rows: list[int] = []
        decode_seqs: list[int] = []
        spans: list[tuple[int, int, int]] = []  # (first row, rows, sequence)
        last_rows: list[int] = []
        for i, seq in enumerate(seqs):
            start, stop = seq.num_cached, seq.num_cached + seq.num_scheduled
            row = len(token_ids)
            token_ids.extend(seq.tokens(start, stop))
            positions.extend(range(start, stop))
            row_seq.extend([i] * (stop - start))
            block_start.append(len(blocks))
            blocks.extend(seq.block_table[: -(-stop // bs)])
            seq_lengths.append(stop)
            if stop - start == 1:
                decode_rows.append(row)
                decode_seqs.append(i)
            else:
                spans.append((row, stop - start, i))
            last_rows.append(len(token_ids) - 1)
        pos = self._tensor(positions)
        rows_seq = self._tensor(row_seq)
        flat = self._tensor(blocks)
        starts = self._tensor(block_start)
        slot_mapping = flat[starts[rows_seq] + pos // bs] * bs + pos % bs  # [T]
        batch = AttentionBatch(
            positions=pos,
            slot_mapping=slot_mapping,
            row_seq=rows_seq,
            seq_lengths=self._tensor(seq_lengths),
            blocks=flat,
            block_start=starts,
            block_size=bs,
            decode_rows=self._tensor(decode_rows),
            decode_seqs=self._tensor(decode_seqs),
            prefills=[PrefillSpan(row, n, i, pos[row : row + n]) for row, n, i in spans],
            last_rows=self._tensor(last_rows),
        )
        return self._tensor(token_ids), batch

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

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

"""Micro-batch programs and the ping-pong driver that interleaves them (after MegaScale-Infer).

A step's batch is split into m micro-batches. Each runs as a generator (`forward_program`) that
yields at the one point where it needs the routed experts: it first yields an `ExpertCall`
(dispatch; the driver resumes it at once so it can compute its shared expert meanwhile), then
yields `AWAIT` and is parked until the expert outputs arrive. While micro-batch i waits, the driver
runs attention for micro-batch i+1, so the two sides overlap.

The same programs run colocated (`LocalExperts`: the call is a function call) and disaggregated
(an executor that sends frames to expert workers), so the two modes share every line of model code.

Shape letters: T tokens, D hidden, K experts per token, V vocabulary.
"""

from __future__ import annotations

import abc
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass

import torch

from resilient_moe.errors import ExpertUnavailableError
from resilient_moe.model.attention_side import AttentionBatch, AttentionSide, KVCacheView
from resilient_moe.model.expert_side import ExpertSide


@dataclass
class ExpertCall:
    """Routed-expert work of one micro-batch at one layer: rows x [T, D] to experts ids [T, K]."""

    layer: int
    x: torch.Tensor
    expert_ids: torch.Tensor


AWAIT = object()  # yielded by a program to wait for its outstanding ExpertCall

Program = Generator[object, torch.Tensor | None, torch.Tensor]


def forward_program(side: AttentionSide, cache: KVCacheView, token_ids: torch.Tensor, batch: AttentionBatch) -> Program:
    """One micro-batch through every layer; returns float32 logits [S, V] of each sequence's last token."""
    side.prepare(batch)
    h = side.embed(token_ids)  # [T, D]
    for layer in range(side.cfg.num_layers):
        h, x = side.attention(layer, h, batch, cache)
        if side.is_sparse(layer):
            expert_ids, weights = side.route(layer, x)  # [T, K] each
            yield ExpertCall(layer, x, expert_ids)
            shared = side.shared_expert(layer, x)  # overlaps the routed experts
            expert_out = yield AWAIT  # [T, K, D]
            h = side.combine(h, expert_out, weights, shared)
        else:
            h = h + side.dense_mlp(layer, x)
    return side.logits(h[batch.last_rows])


class ExpertExecutor(abc.ABC):
    """Runs the routed experts of micro-batches, possibly elsewhere and concurrently."""

    @abc.abstractmethod
    def submit(self, micro_batch: int, call: ExpertCall) -> None:
        """Start the experts of `call`; returns without waiting for them."""

    @abc.abstractmethod
    def take(self, micro_batch: int) -> torch.Tensor | None:
        """The expert outputs [T, K, D] of the micro-batch's outstanding call if all have arrived, else None."""

    @abc.abstractmethod
    def wait(self) -> None:
        """Block until at least one outstanding call may have completed (or a failure needs handling)."""

    def begin_step(self, step: int) -> None:
        """Called before the micro-batches of a new step are started."""


class LocalExperts(ExpertExecutor):
    """Colocated experts: the call is computed on submit, in this process."""

    def __init__(self, experts: ExpertSide) -> None:
        self.experts = experts
        self._done: dict[int, torch.Tensor] = {}

    def submit(self, micro_batch: int, call: ExpertCall) -> None:
        T, K = call.expert_ids.shape
        rows = call.x.repeat_interleave(K, dim=0)  # [T*K, D], one row per (token, k)
        out = self.experts.forward(call.layer, rows, call.expert_ids.reshape(-1))
        self._done[micro_batch] = out.view(T, K, -1)

    def take(self, micro_batch: int) -> torch.Tensor | None:
        return self._done.pop(micro_batch, None)

    def wait(self) -> None:  # pragma: no cover - submit completes synchronously
        raise RuntimeError("local experts never leave a call outstanding")


def run_pipeline(programs: list[Program], executor: ExpertExecutor) -> list[torch.Tensor | ExpertUnavailableError]:
    """Drive micro-batch programs to completion, overlapping each one's expert wait with the others.

    Returns each micro-batch's logits, or the ExpertUnavailableError that stopped it (an expert with
    no live replica): the other micro-batches still complete.
    """
    results: list[torch.Tensor | ExpertUnavailableError | None] = [None] * len(programs)
    runnable: deque[tuple[int, torch.Tensor | None]] = deque((i, None) for i in range(len(programs)))
    parked: list[int] = []

    def fail(mb: int, error: ExpertUnavailableError) -> None:
        results[mb] = error
        programs[mb].close()

    while runnable or parked:
        if not runnable:
            executor.wait()
            for mb in list(parked):
                try:
                    out = executor.take(mb)
                except ExpertUnavailableError as e:
                    parked.remove(mb)
                    fail(mb, e)
                    continue
                if out is not None:
                    parked.remove(mb)
                    runnable.append((mb, out))
            continue
        mb, value = runnable.popleft()
        try:
            command = programs[mb].send(value)
        except StopIteration as done:
            results[mb] = done.value
            continue
        try:
            if isinstance(command, ExpertCall):
                executor.submit(mb, command)
                runnable.appendleft((mb, None))
                continue
            out = executor.take(mb)
        except ExpertUnavailableError as e:
            fail(mb, e)
            continue
        if out is None:
            parked.append(mb)
        else:
            runnable.append((mb, out))
    return results  # type: ignore[return-value]

"""The datapath's reliability rules, in one place: how rows are cut into parts that fit a link, when
a part is overdue, and which DISPATCH and RESULT frames are well-formed.

A micro-batch's rows for one expert worker travel as one or more *parts*, each one DISPATCH frame no
larger than the link takes in either direction: one hidden row per token and the list of that
token's experts on the worker (frames.py gives the layout); its RESULT carries one row per (token,
expert) pair back. Each part has a deadline from the measured expert time; an overdue part is
resent elsewhere. Both ends check every frame against what it must be before acting on it, so a
malformed frame is a peer failure or a rejected frame, never a crash, and native code only ever
sees shapes that were checked.

Shape letters: n rows (tokens) of one part, P (token, expert) pairs of it, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resilient_moe.datapath.frames import ALIGN, HEADER_SIZE, Frame, FrameFlags

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_PART_BYTES = 4 << 20  # parts bigger than this only add latency: the EW starts on a part once it is whole


def rows_per_part(max_send: int, max_recv: int, window: int, row_bytes: int, result_row_bytes: int) -> int:
    """How many rows with one expert each fit a part: its DISPATCH (the rows, a count and an expert id
    each) the send limit, its RESULT the receive limit, and at least two parts the window, so the
    expert worker computes one while the next arrives. An expert worker splits a RESULT its link
    cannot take by this, with `row_bytes` 0; `cut_parts` cuts rows with several experts."""
    dispatch_budget, result_budget = _budgets(max_send, max_recv, window)
    per_row = max(row_bytes + 8, result_row_bytes)
    rows = min(dispatch_budget, result_budget) // per_row
    if rows < 1:
        raise ValueError(f"a row of {per_row} bytes does not fit this link (send limit {max_send}, receive limit "
                         f"{max_recv}, window {window})")
    return rows


def _budgets(max_send: int, max_recv: int, window: int) -> tuple[int, int]:
    """Bytes of payload a part's DISPATCH and its RESULT may carry."""
    dispatch = min(max_send - HEADER_SIZE - 2 * ALIGN, window // 2, MAX_PART_BYTES)
    result = min(max_recv - HEADER_SIZE - ALIGN, window // 2, MAX_PART_BYTES)
    return dispatch, result


def cut_parts(counts: torch.Tensor, row_bytes: int, result_row_bytes: int, max_send: int, max_recv: int,
              window: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of the parts for rows with `counts` [n] experts each on one worker.

    A row costs its DISPATCH `row_bytes` + 4 bytes per count and expert id, and its RESULT
    `result_row_bytes` per expert; each part takes as many whole rows as fit both budgets (at least
    one: a RESULT bigger than the link takes back is split by the expert worker), cut greedily in
    order, so the parts of the same rows are always the same."""
    dispatch_budget, result_budget = _budgets(max_send, max_recv, window)
    counts = counts.long()
    n = counts.numel()
    widest = int(counts.max())
    if row_bytes + 4 + 4 * widest > dispatch_budget or result_row_bytes > result_budget:
        raise ValueError(f"a row of {row_bytes} bytes with {widest} experts (results of {result_row_bytes} bytes "
                         f"each) does not fit this link (send limit {max_send}, receive limit {max_recv}, "
                         f"window {window})")
    sent = torch.cumsum(row_bytes + 4 + 4 * counts, 0)  # [n] DISPATCH bytes up to each row
    back = torch.cumsum(result_row_bytes * counts, 0)  # [n] RESULT bytes up to each row
    if int(sent[-1]) <= dispatch_budget and int(back[-1]) <= result_budget:
        return [(0, n)]  # the common case: one part
    parts = []
    lo = 0
    for _ in range(n):  # each pass cuts one part of at least one row
        base_sent = int(sent[lo - 1]) if lo else 0
        base_back = int(back[lo - 1]) if lo else 0
        hi = min(int(torch.searchsorted(sent, base_sent + dispatch_budget, right=True)),
                 int(torch.searchsorted(back, base_back + result_budget, right=True)))
        hi = max(hi, lo + 1)
        parts.append((lo, hi))
        lo = hi
        if lo >= n:
            break
    return parts


@dataclass
class DeadlineModel:
    """Expected expert time of a part, learned from answered parts: `s_per_row` x (rows queued ahead
    of it on that worker + its own rows). A part is overdue after `slack` times that, never sooner
    than `floor_s` (a busy machine must not look like a lost frame)."""

    floor_s: float = 0.25
    slack: float = 4.0
    s_per_row: float = 1e-4  # a conservative start (0.1 ms per row) until answers are measured
    weight: float = 0.2  # of a new sample in the moving average

    def deadline(self, now: float, rows_ahead: int, rows: int) -> float:
        return now + max(self.floor_s, self.slack * self.s_per_row * (rows_ahead + rows))

    def observe(self, seconds: float, rows_ahead: int, rows: int) -> None:
        sample = seconds / max(1, rows_ahead + rows)
        self.s_per_row += self.weight * (sample - self.s_per_row)


def check_dispatch(frame: Frame, hidden: int, held: torch.Tensor | None, num_layers: int,
                   num_experts: int) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The (counts [n], expert ids [P]) of a DISPATCH an expert worker may compute, or why it must not.

    Checks everything native code relies on (frames.py gives the layout): a float tensor [n, hidden]
    with n >= 1, an int32 aux of n counts (each in [1, num_experts]) then exactly their sum of
    expert ids, a layer of the model, expert ids within the model and held here (`held`: a bool
    mask [L, E]; None: all). Tensor operations only: the cost does not grow with rows in Python."""
    h = frame.header
    tensor, aux = frame.tensor, frame.aux
    if tensor is None or tensor.dim() != 2:
        return f"rows must be a 2-d tensor, got {None if tensor is None else tuple(tensor.shape)}"
    if tensor.dtype not in FLOAT_DTYPES:
        return f"rows must be float32, bfloat16 or float16, got {tensor.dtype}"
    n, width = tensor.shape
    if width != hidden:
        return f"rows are {width} wide; this model's hidden size is {hidden}"
    if n < 1:
        return "a DISPATCH must carry at least one row"
    have = 0 if aux is None else aux.numel()
    if have < 2 * n:
        return f"{n} rows need {n} counts and at least {n} expert ids in aux, got {have} values"
    counts, experts = aux[:n], aux[n:]  # [n], [P]
    low, high = torch.aminmax(counts)
    if int(low) < 1 or int(high) > num_experts:
        return f"expert counts must be in [1, {num_experts}], got {int(low)}..{int(high)}"
    if int(counts.sum()) != experts.numel():
        return f"counts add up to {int(counts.sum())} experts, aux carries {experts.numel()} expert ids"
    if not 0 <= h.layer < num_layers:
        return f"layer {h.layer} is outside the model's {num_layers} layers"
    low, high = torch.aminmax(experts)
    if int(low) < 0 or int(high) >= num_experts:
        return f"expert id out of range [0, {num_experts}): {int(low)}..{int(high)}"
    experts = experts.long()
    if held is not None:
        here = held[h.layer].index_select(0, experts)  # [P]
        if not bool(here.all()):
            missing = sorted(set(experts[~here].tolist()))
            return f"expert(s) {missing} of layer {h.layer} are not held here"
    return counts.long(), experts


def check_result(frame: Frame, rows: int, received: int, width: int) -> tuple[int, int] | str:
    """Where the rows of a RESULT for a part of `rows` rows go: (offset, count), or why it is malformed.

    A RESULT normally carries all rows of its part; one split by the expert worker (its link takes
    less than the part) carries aux = [row offset] and arrives in pieces, in order."""
    tensor = frame.tensor
    if frame.header.flags & FrameFlags.ERROR:
        return "an error reply has no rows"
    if tensor is None or tensor.dim() != 2 or tensor.dtype not in FLOAT_DTYPES:
        return f"RESULT must carry a float [n, {width}] tensor, got " \
               f"{None if tensor is None else (tuple(tensor.shape), str(tensor.dtype))}"
    if tensor.shape[1] != width:
        return f"RESULT rows are {tensor.shape[1]} wide, the part's are {width}"
    offset = 0
    if frame.aux is not None:
        if frame.aux.numel() != 1:
            return f"RESULT aux must be one row offset, got {frame.aux.numel()} values"
        offset = int(frame.aux[0])
    count = tensor.shape[0]
    if offset != received or offset + count > rows or (frame.aux is None and count != rows):
        return f"RESULT carries rows [{offset}, {offset + count}) of a part of {rows} rows ({received} answered)"
    return offset, count

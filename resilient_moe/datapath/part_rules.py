"""The datapath's reliability rules, in one place: how rows are cut into parts that fit a link, when
a part is overdue, and which DISPATCH and RESULT frames are well-formed.

A micro-batch's rows for one expert worker travel as one or more *parts*, each one DISPATCH frame no
larger than the link takes in either direction (its RESULT carries the same rows back). Each part
has a deadline from the measured expert time; an overdue part is resent elsewhere. Both ends check
every frame against what it must be before acting on it, so a malformed frame is a peer failure or
a rejected frame, never a crash, and native code only ever sees shapes that were checked.

Shape letters: n rows of one part, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resilient_moe.datapath.frames import ALIGN, HEADER_SIZE, Frame, FrameFlags

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_PART_BYTES = 4 << 20  # parts bigger than this only add latency: the EW starts on a part once it is whole


def rows_per_part(max_send: int, max_recv: int, window: int, row_bytes: int, result_row_bytes: int) -> int:
    """How many rows one part may carry: its DISPATCH (rows + one int32 expert id each) must fit the
    send limit, its RESULT the receive limit, and at least two parts must fit the window so the
    expert worker computes one while the next arrives."""
    budget = min(max_send - HEADER_SIZE - 2 * ALIGN, max_recv - HEADER_SIZE - ALIGN, window // 2, MAX_PART_BYTES)
    per_row = max(row_bytes + 4, result_row_bytes)
    rows = budget // per_row
    if rows < 1:
        raise ValueError(f"a row of {per_row} bytes does not fit this link (send limit {max_send}, receive limit "
                         f"{max_recv}, window {window})")
    return rows


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


def check_dispatch(frame: Frame, hidden: int, held: set[tuple[int, int]] | None,
                   num_layers: int, num_experts: int) -> str | None:
    """Why an expert worker must not compute this DISPATCH (None: it is well-formed).

    Checks everything native code relies on: a float tensor [n, hidden], one int32 expert id per row
    in its aux section, a layer of the model, expert ids within the model and held here (`held`:
    (layer, expert) pairs; None: all)."""
    h = frame.header
    tensor, aux = frame.tensor, frame.aux
    if tensor is None or tensor.dim() != 2:
        return f"rows must be a 2-d tensor, got {None if tensor is None else tuple(tensor.shape)}"
    if tensor.dtype not in FLOAT_DTYPES:
        return f"rows must be float32, bfloat16 or float16, got {tensor.dtype}"
    n, width = tensor.shape
    if width != hidden:
        return f"rows are {width} wide; this model's hidden size is {hidden}"
    if aux is None or aux.numel() != n:
        return f"{n} rows need {n} expert ids in aux, got {0 if aux is None else aux.numel()}"
    if not 0 <= h.layer < num_layers:
        return f"layer {h.layer} is outside the model's {num_layers} layers"
    if n and (int(aux.min()) < 0 or int(aux.max()) >= num_experts):
        return f"expert id out of range [0, {num_experts}): {int(aux.min())}..{int(aux.max())}"
    if held is not None and n:
        missing = sorted({e for e in aux.tolist() if (h.layer, e) not in held})
        if missing:
            return f"expert(s) {missing} of layer {h.layer} are not held here"
    return None


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

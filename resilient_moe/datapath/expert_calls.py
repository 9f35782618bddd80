"""What an attention worker's forwarding engine keeps of a routed-expert call while expert workers
answer it: the call being assembled, its parts in flight (each one DISPATCH frame, kept until answered
so it can be resent), and rows held while their experts have no live copy.

Shape letters: T tokens, K experts per token, D hidden, n rows (tokens) of one part, P its (token, expert)
pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from resilient_moe.datapath.frames import dispatch_aux
from resilient_moe.errors import ExpertUnavailableError


@dataclass
class RoutedCall:
    """A micro-batch's routed-expert call being assembled."""

    micro_batch: int
    layer: int
    top_k: int
    out: torch.Tensor  # [T*K, D]
    remaining: int = 0  # parts not answered yet
    error: ExpertUnavailableError | None = None


@dataclass
class Part:
    """One DISPATCH frame's worth of a call for one expert worker: a hidden row per token and, per
    token, the pairs asked of that worker (frames.py gives the layout).

    Pairs are grouped by row in row order, each row's in gate order: the RESULT's rows come back in
    this order and land at `pair_index`."""

    call: RoutedCall  # identity matters: a reply for a call that was abandoned must not land in a newer one
    pair_index: torch.Tensor  # [P] positions among the call's T*K pairs
    rows: torch.Tensor  # [n, D] one hidden row per token (kept for resending)
    counts: torch.Tensor  # [n] int64 pairs of each row
    experts: torch.Tensor  # [P] int32 expert id of each pair
    excluded: frozenset[str] = frozenset()  # workers that answered that they do not hold its experts
    seq: int = 0  # set when sent: the link's sequence number, echoed by the RESULT
    epoch: int = 0
    sent_at: float = 0.0
    deadline: float = 0.0
    rows_ahead: int = 0  # pairs already outstanding on its worker when it was sent
    received: int = 0  # pairs answered so far (a RESULT the EW had to split arrives in pieces)
    aux: torch.Tensor = field(init=False)  # int32 [n + P]: the frame's aux section

    def __post_init__(self) -> None:
        self.aux = dispatch_aux(self.counts, self.experts)

    @property
    def n(self) -> int:
        """Rows (tokens) it carries."""
        return int(self.rows.shape[0])

    @property
    def pairs(self) -> int:
        """(token, expert) pairs it asks for: the rows of its RESULT."""
        return int(self.experts.shape[0])

    @property
    def row_of_pair(self) -> torch.Tensor:
        """[P] the row of `rows` each pair uses."""
        return torch.repeat_interleave(torch.arange(self.n), self.counts)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.aux.nbytes


@dataclass
class HeldRows:
    """Pairs of a call whose experts have no live copy, waiting for one (until `deadline`)."""

    call: RoutedCall
    pair_index: torch.Tensor  # [P]
    experts: torch.Tensor  # [P]
    rows: torch.Tensor  # [n, D] the hidden rows they use
    row_of_pair: torch.Tensor  # [P] into rows, non-decreasing
    excluded: frozenset[str]
    deadline: float
    error: ExpertUnavailableError  # what the call fails with past the deadline

"""What an attention worker's forwarding engine keeps of a routed-expert call while expert workers
answer it: the call being assembled, its parts in flight (each one DISPATCH frame, kept until answered
so it can be resent), and rows held while their experts have no live copy.

Shape letters: T tokens, K experts per token, D hidden, n rows of one part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    """Rows of one call for one expert worker, sent as one DISPATCH frame."""

    call: RoutedCall  # identity matters: a reply for a call that was abandoned must not land in a newer one
    pair_index: torch.Tensor  # [n] positions among the call's T*K pairs
    rows: torch.Tensor  # [n, D] the hidden rows (kept for resending)
    experts: torch.Tensor  # [n] int32 expert id of each row
    excluded: frozenset[str] = frozenset()  # workers that answered that they do not hold its experts
    seq: int = 0  # set when sent: the link's sequence number, echoed by the RESULT
    epoch: int = 0
    sent_at: float = 0.0
    deadline: float = 0.0
    rows_ahead: int = 0  # rows already outstanding on its worker when it was sent
    received: int = 0  # rows answered so far (a RESULT the EW had to split arrives in pieces)

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.experts.nbytes


@dataclass
class HeldRows:
    """Rows of a call whose experts have no live copy, waiting for one (until `deadline`)."""

    call: RoutedCall
    pair_index: torch.Tensor  # [n]
    experts: torch.Tensor  # [n]
    rows: torch.Tensor  # [n, D] one per pair
    excluded: frozenset[str]
    deadline: float
    error: ExpertUnavailableError  # what the call fails with past the deadline

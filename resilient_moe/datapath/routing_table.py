"""The Expert Routing Table: logical expert -> ordered candidate expert workers, with an epoch.

Each attention worker's forwarding engine routes by it. Each candidate of (layer, expert) carries the
share of that expert's tokens it takes: under the spread policy the first (the primary) takes them
all and the others stand by; under load_aware every copy takes an equal part (EPLB's replicas), so a
hot expert's tokens are spread over the workers that hold it. Candidates an attention worker
considers dead are skipped, and the live ones split the shares among themselves; when no live
candidate has a share left, the first live one takes everything. The controller publishes a new
table (a higher epoch) when membership or placement changes; a stale epoch on a frame shows which
table its sender used.

Shape letters: L layers, E experts, C most candidates of any expert, n rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingTable:
    epoch: int
    num_layers: int
    num_experts: int
    candidates: tuple[tuple[str, ...], ...]  # [layer * num_experts + expert] -> (primary, shadows...)
    # Per entry, each candidate's share of the tokens; () (or an entry left empty): all on the first.
    shares: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        if len(self.candidates) != self.num_layers * self.num_experts:
            raise ValueError(
                f"routing table has {len(self.candidates)} entries for {self.num_layers} layers x {self.num_experts} experts"
            )
        if self.shares and len(self.shares) != len(self.candidates):
            raise ValueError(f"routing table has {len(self.shares)} share entries for {len(self.candidates)} entries")
        for i, (entry, share) in enumerate(zip(self.candidates, self.shares)):
            if share and (len(share) != len(entry) or any(s < 0 for s in share)):
                raise ValueError(f"routing table entry {i}: shares {share} do not fit candidates {entry}")

    def of(self, layer: int, expert: int) -> tuple[str, ...]:
        return self.candidates[layer * self.num_experts + expert]

    def shares_of(self, layer: int, expert: int) -> tuple[float, ...]:
        """Each candidate's share of the expert's tokens (all on the first when the table has none)."""
        i = layer * self.num_experts + expert
        entry = self.candidates[i]
        share = self.shares[i] if self.shares else ()
        return share or tuple(1.0 if j == 0 else 0.0 for j in range(len(entry)))

    @property
    def workers(self) -> list[str]:
        """Every expert worker named in the table, sorted."""
        return sorted({w for entry in self.candidates for w in entry})

    def unserved(self, dead: set[str] = frozenset()) -> list[tuple[int, int]]:
        """(layer, expert) pairs of sparse layers with no candidate outside `dead`."""
        return [
            (i // self.num_experts, i % self.num_experts)
            for i, entry in enumerate(self.candidates)
            if entry and all(w in dead for w in entry)
        ]

    def routes(self, workers: list[str], dead: set[str]) -> "Routes":
        """Where each expert's tokens go, as indices into `workers`, leaving out `dead` candidates."""
        position = {w: i for i, w in enumerate(workers)}
        width = max(1, max((len(c) for c in self.candidates), default=1))
        index = torch.full((self.num_layers, self.num_experts, width), -1, dtype=torch.long)  # [L, E, C]
        bound = torch.full((self.num_layers, self.num_experts, width), float("inf"))  # [L, E, C]
        for i, entry in enumerate(self.candidates):
            layer, expert = divmod(i, self.num_experts)
            live = [(w, s) for w, s in zip(entry, self.shares_of(layer, expert)) if w not in dead and w in position]
            if not live:
                continue
            total = sum(s for _, s in live)
            if total <= 0:  # the copies with a share are gone: the first live one takes everything
                live, total = [(live[0][0], 1.0)], 1.0
            live = [(w, s) for w, s in live if s > 0]
            cumulative = 0.0
            for j, (w, s) in enumerate(live):
                cumulative += s / total
                index[layer, expert, j] = position[w]
                bound[layer, expert, j] = cumulative
            bound[layer, expert, len(live) - 1] = float("inf")  # rounding never leaves a row unplaced
        return Routes(index, bound)

    def to_proto(self, pb):
        """As a controller_pb2.RoutingTable (`pb` is the controller_pb2 module)."""
        shares = self.shares or ((),) * len(self.candidates)
        return pb.RoutingTable(
            epoch=self.epoch, num_layers=self.num_layers, num_experts=self.num_experts,
            entries=[pb.Candidates(workers=list(c), shares=list(s)) for c, s in zip(self.candidates, shares)],
        )

    @classmethod
    def from_proto(cls, msg) -> "RoutingTable":
        shares = tuple(tuple(c.shares) for c in msg.entries)
        return cls(msg.epoch, msg.num_layers, msg.num_experts, tuple(tuple(c.workers) for c in msg.entries),
                   shares if any(shares) else ())


@dataclass(frozen=True)
class Routes:
    """Live copies of every expert and the split of its tokens between them.

    index [L, E, C]: worker indices of the copies that take tokens (-1 past the last; all -1 where no
    live copy is left); bound [L, E, C]: cumulative share up to each copy (inf for the last)."""

    index: torch.Tensor
    bound: torch.Tensor

    def destinations(self, layer: int, experts: torch.Tensor) -> torch.Tensor:
        """[n] worker index of each row for expert ids `experts` [n] (-1: no live copy). Rows of one
        expert are split in order: the first share of them to its first copy, and so on."""
        experts = experts.long()
        counts = torch.bincount(experts, minlength=self.index.shape[1])  # [E]
        order = torch.argsort(experts, stable=True)  # [n]
        starts = torch.cumsum(counts, 0) - counts  # [E]
        rank = torch.empty_like(experts)
        rank[order] = torch.arange(experts.numel()) - starts[experts[order]]  # [n] place among its expert's rows
        fraction = (rank.double() + 0.5) / counts[experts].double()  # [n] in (0, 1)
        copy = (fraction.unsqueeze(1) > self.bound[layer][experts]).sum(1)  # [n] first copy whose bound covers it
        return self.index[layer][experts, copy.clamp(max=self.index.shape[2] - 1)]

    def merged(self, fallback: "Routes") -> "Routes":
        """These routes, with `fallback`'s for the experts that have no live copy here."""
        missing = (self.index[..., :1] < 0)  # [L, E, 1]
        return Routes(torch.where(missing, fallback.index, self.index), torch.where(missing, fallback.bound, self.bound))

    def first(self) -> torch.Tensor:
        """[L, E] the first live copy of each expert (-1 where none)."""
        return self.index[..., 0]

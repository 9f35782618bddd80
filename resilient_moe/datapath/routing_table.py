"""The Expert Routing Table: logical expert -> ordered candidate expert workers, with an epoch.

Each attention worker's forwarding engine routes by it. Each candidate of (layer, expert) carries the
share of that expert's tokens it takes: under the spread policy the first (the primary) takes them
all and the others stand by; under load_aware every copy takes an equal part (EPLB's replicas), so a
hot expert's tokens are spread over the workers that hold it. Candidates an attention worker
considers dead are skipped, and the live ones split the shares among themselves; when no live
candidate has a share left, the first live one takes everything. The controller publishes a new
table (a higher epoch) when membership or placement changes; a stale epoch on a frame shows which
table its sender used.

Routes are tensors ([L, E, C]: the copies that take an expert's rows and the split between them),
computed by tensor operations (`route_entries`) and kept current in place by `LiveRoutes`, which an
attention worker updates on every suspicion, trust regained, new link and fence: only the entries
naming a worker whose state changed are recomputed. A new table's tensors are built once
(`prepare`), off the step.

Shape letters: L layers, E experts, C most candidates of any expert, n rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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

    @cached_property
    def workers(self) -> list[str]:
        """Every expert worker named in the table, sorted."""
        return sorted({w for entry in self.candidates for w in entry})

    @cached_property
    def placement(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The table as tensors: (copies [L*E, C] long, indices into `workers`, -1 past an entry's
        last; shares [L*E, C] float64, each candidate's share as `shares_of` gives it). Built once
        per table, by `prepare` off the step where a worker can (a Python pass over every entry)."""
        position = {w: i for i, w in enumerate(self.workers)}
        width = max(1, max((len(c) for c in self.candidates), default=1))
        copies, shares = [], []
        pad = [-1] * width
        for i, entry in enumerate(self.candidates):
            share = self.shares[i] if self.shares else ()
            if not share:
                share = (1.0,) + (0.0,) * (len(entry) - 1) if entry else ()
            copies.append([position[w] for w in entry] + pad[len(entry):])
            shares.append(list(share) + [0.0] * (width - len(entry)))
        return torch.tensor(copies, dtype=torch.long), torch.tensor(shares, dtype=torch.float64)

    def prepare(self) -> "RoutingTable":
        """Build the cached lookups now (any thread), so adopting the table costs only tensor work."""
        _ = self.placement
        return self

    def unserved(self, dead: set[str] = frozenset()) -> list[tuple[int, int]]:
        """(layer, expert) pairs of sparse layers with no candidate outside `dead`."""
        return [
            (i // self.num_experts, i % self.num_experts)
            for i, entry in enumerate(self.candidates)
            if entry and all(w in dead for w in entry)
        ]

    def routes(self, workers: list[str], dead: set[str]) -> "Routes":
        """Where each expert's tokens go, as indices into `workers`, leaving out `dead` candidates
        (and candidates not in `workers`)."""
        position = {w: i for i, w in enumerate(workers)}
        where = torch.tensor([position.get(w, -1) for w in self.workers] + [-1], dtype=torch.long)  # [W+1]
        gone = torch.tensor([w in dead or w not in position for w in self.workers] + [True])  # [W+1]
        copies, shares = self.placement
        index, bound = route_entries(copies, shares, gone)
        index = torch.where(index >= 0, where[index], -1)
        return Routes(index.view(self.num_layers, self.num_experts, -1),
                      bound.view(self.num_layers, self.num_experts, -1))

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

    def first(self) -> torch.Tensor:
        """[L, E] the first live copy of each expert (-1 where none)."""
        return self.index[..., 0]


def route_entries(copies: torch.Tensor, shares: torch.Tensor, gone: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The routes of table entries as tensor operations: (index [N, C], bound [N, C]) as `Routes`
    holds them, for entries' copies [N, C] (worker indices, -1 padding), their shares [N, C] and
    `gone` [W+1] bool (the last slot, for padding, True).

    The rule, per entry: the live copies split the shares among themselves in candidate order;
    when none of them has a share, the first live copy takes everything; copies left with no share
    take no rows. Sums run left to right in float64, as a loop over the candidates would."""
    N, C = copies.shape
    live = ~gone[copies]  # [N, C] (padding indexes the last slot)
    share = torch.where(live, shares, 0.0)  # [N, C]
    total = share.cumsum(1)[:, -1]  # [N]
    first = live.to(torch.int8).argmax(1)  # [N] first live copy (0 when none)
    idle = live.any(1) & (total <= 0)  # [N] live copies, none with a share: the first takes all
    if bool(idle.any()):
        share[idle] = 0.0
        share[idle, first[idle]] = 1.0
        total = torch.where(idle, 1.0, total)
    keep = live & (share > 0)  # [N, C]
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept copies first, in order
    keep = keep.gather(1, order)
    fraction = share.gather(1, order) / torch.where(total > 0, total, 1.0).unsqueeze(1)  # [N, C]
    index = torch.where(keep, copies.gather(1, order), -1)
    bound = torch.where(keep, fraction.cumsum(1), float("inf")).to(torch.float32)
    last = keep.sum(1) - 1  # [N] the last kept copy takes whatever rounding leaves
    rows = (last >= 0).nonzero().squeeze(1)
    bound[rows, last[rows]] = float("inf")
    return index, bound


class LiveRoutes:
    """A routing table's routes under the current state of each expert worker, updated in place.

    Each worker is USABLE, SUSPECT (silent or late: used only for experts with no usable copy left)
    or GONE. `update` recomputes only the entries that name a worker whose state changed, with
    tensor operations, so a suspicion, a link or a fence costs time in proportion to the experts it
    touches, not a rebuild of every (layer, expert) in Python."""

    USABLE, SUSPECT, GONE = 0, 1, 2

    def __init__(self, table: RoutingTable, states: dict[str, int] | None = None) -> None:
        self.table = table
        self.workers = table.workers
        self._copies, self._shares = table.placement  # [N, C] each
        self.states = torch.zeros(len(self.workers), dtype=torch.int8)  # [W]
        N, C = self._copies.shape
        self.routes = Routes(torch.full((table.num_layers, table.num_experts, C), -1, dtype=torch.long),
                             torch.full((table.num_layers, table.num_experts, C), float("inf")))
        self._recompute(torch.arange(N), self._state_vector(states or {}))

    def _state_vector(self, states: dict[str, int]) -> torch.Tensor:
        return torch.tensor([states.get(w, self.USABLE) for w in self.workers], dtype=torch.int8)

    def update(self, states: dict[str, int]) -> int:
        """Adopt each worker's state (those not named: USABLE); returns how many entries changed."""
        new = self._state_vector(states)
        changed = (new != self.states).nonzero().squeeze(1)  # [w]
        if not changed.numel():
            return 0
        entries = torch.isin(self._copies, changed).any(1).nonzero().squeeze(1)  # [n] entries naming one
        self._recompute(entries, new)
        return int(entries.numel())

    def with_gone(self, names: set[str]) -> Routes:
        """Fresh routes (nothing updated) with `names` gone as well: for a resend that must avoid them."""
        states = self.states.clone()
        for i, w in enumerate(self.workers):
            if w in names:
                states[i] = self.GONE
        index, bound = self._compute(slice(None), states)
        shape = self.routes.index.shape
        return Routes(index.view(shape), bound.view(shape))

    def _recompute(self, entries: torch.Tensor, states: torch.Tensor) -> None:
        """Adopt `states` [W] and write the routes of `entries` [n] in place."""
        self.states = states
        index, bound = self._compute(entries, states)
        width = index.shape[1]
        self.routes.index.view(-1, width)[entries] = index
        self.routes.bound.view(-1, width)[entries] = bound

    def _compute(self, entries: torch.Tensor | slice, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routes of `entries` under `states` [W]. Suspects count as gone unless an entry has no
        usable copy; then they count as live (perhaps slow, not dead: the controller decides)."""
        copies, shares = self._copies[entries], self._shares[entries]  # [n, C]
        closed = torch.cat((states != self.USABLE, torch.ones(1, dtype=torch.bool)))  # [W+1]
        index, bound = route_entries(copies, shares, closed)
        stuck = (index[:, 0] < 0).nonzero().squeeze(1)  # entries with no usable copy
        if stuck.numel():
            dead = torch.cat((states == self.GONE, torch.ones(1, dtype=torch.bool)))
            index[stuck], bound[stuck] = route_entries(copies[stuck], shares[stuck], dead)
        return index, bound

"""The Expert Routing Table: logical expert -> ordered candidate expert workers, with an epoch.

Each attention worker's forwarding engine routes by it: a token for expert e of layer l goes to the
first candidate of (l, e) that it does not consider dead. The controller publishes a new table (a
higher epoch) when membership changes; a stale epoch on a frame shows which table its sender used.
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

    def __post_init__(self) -> None:
        if len(self.candidates) != self.num_layers * self.num_experts:
            raise ValueError(
                f"routing table has {len(self.candidates)} entries for {self.num_layers} layers x {self.num_experts} experts"
            )

    def of(self, layer: int, expert: int) -> tuple[str, ...]:
        return self.candidates[layer * self.num_experts + expert]

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

    def route_lookup(self, workers: list[str], dead: set[str]) -> torch.Tensor:
        """[L, E] index into `workers` of each expert's first live candidate, -1 where none is left."""
        position = {w: i for i, w in enumerate(workers)}
        table = torch.full((self.num_layers, self.num_experts), -1, dtype=torch.long)
        for i, entry in enumerate(self.candidates):
            for w in entry:
                if w not in dead and w in position:
                    table[i // self.num_experts, i % self.num_experts] = position[w]
                    break
        return table

    def to_proto(self, pb):
        """As a controller_pb2.RoutingTable (`pb` is the controller_pb2 module)."""
        return pb.RoutingTable(
            epoch=self.epoch, num_layers=self.num_layers, num_experts=self.num_experts,
            entries=[pb.Candidates(workers=list(c)) for c in self.candidates],
        )

    @classmethod
    def from_proto(cls, msg) -> "RoutingTable":
        return cls(msg.epoch, msg.num_layers, msg.num_experts, tuple(tuple(c.workers) for c in msg.entries))

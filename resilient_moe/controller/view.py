"""`ClusterView`: what every role knows of the cluster, from the controller's latest snapshot.

One type for the attention worker (which expert workers to link to, which to fence, the routing
table, the KV store), the expert worker (whose frames to drop), and the frontend (which attention
workers take new requests, and how loaded they are). Each role turns the `ClusterState` it is pushed
into a view and asks it; none keeps its own copy of fences or states.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from resilient_moe.controller import placement
from resilient_moe.controller.records import ENDED, SERVING, Roster, WorkerState
from resilient_moe.datapath.routing_table import RoutingTable
from resilient_moe.datapath.faults import LinkFault
from resilient_moe.proto import controller_pb2 as pb

ROLES = {pb.ATTENTION: "attention", pb.EXPERT: "expert", pb.FRONTEND: "frontend", pb.KV_STORE: "kv_store"}


def node_of(worker) -> str:
    """The failure domain a worker (a PeerView, a WorkerRecord, a WorkerInfo) runs in: its node where the
    launcher names one (Ray), else its host."""
    return getattr(worker, "node", "") or worker.host


def state_of(value: int) -> WorkerState:
    """The WorkerState of a controller_pb2.WorkerState value."""
    return WorkerState[pb.WorkerState.Name(value)] if value else WorkerState.STARTING


def state_to_pb(state: WorkerState) -> int:
    return pb.WorkerState.Value(state.name)


@dataclass(frozen=True)
class PeerView:
    """One worker's incarnation as the controller last reported it."""

    name: str
    role: str  # attention, expert, kv_store, frontend
    incarnation: int
    state: WorkerState
    data_address: str
    pid: int
    host: str
    load: Mapping[str, float]
    index: int = 0
    node: str = ""  # its failure domain (WorkerInfo.node)

    @property
    def serving(self) -> bool:
        return self.state in SERVING

    @property
    def takes_requests(self) -> bool:
        """An attention worker that new requests may go to: serving and not draining."""
        return self.role == "attention" and self.serving and bool(self.data_address)


@dataclass(frozen=True)
class ClusterView:
    """Live peers, fences, the routing epoch and table, injected faults: one snapshot, read-only."""

    epoch: int
    fenced: frozenset[tuple[str, int]]
    workers: Mapping[str, PeerView]
    resilience: bool = True
    faults: tuple[LinkFault, ...] = ()
    ert: pb.RoutingTable = field(default_factory=pb.RoutingTable, repr=False)

    @classmethod
    def from_proto(cls, state: pb.ClusterState) -> "ClusterView":
        workers = {
            w.name: PeerView(w.name, ROLES.get(w.role, "unknown"), w.incarnation, state_of(w.state), w.data_address,
                             w.pid, w.host, dict(w.load), w.index, w.node)
            for w in state.workers
        }
        return cls(state.epoch, frozenset((f.name, f.incarnation) for f in state.fenced), workers, state.resilience,
                   tuple(LinkFault.from_proto(f) for f in state.faults), state.ert)

    @property
    def routing_epoch(self) -> int:
        return self.ert.epoch

    @cached_property
    def routing(self) -> RoutingTable | None:
        """The routing table (read from the snapshot when first asked: most views leave it unread)."""
        return RoutingTable.from_proto(self.ert) if self.ert.num_layers else None

    def of_role(self, role: str) -> list[PeerView]:
        return sorted((w for w in self.workers.values() if w.role == role), key=lambda w: w.name)

    def is_fenced(self, name: str, incarnation: int) -> bool:
        return (name, incarnation) in self.fenced

    def ended(self, name: str, incarnation: int) -> bool:
        """Is this incarnation fenced or gone (never to send or answer again)?"""
        if self.is_fenced(name, incarnation):
            return True
        peer = self.workers.get(name)
        return peer is not None and peer.incarnation == incarnation and peer.state in ENDED

    def reachable(self, peer: PeerView) -> bool:
        """A worker to link to: it has an address and serves, or drains (it still finishes work)."""
        return bool(peer.data_address) and (peer.serving or peer.state == WorkerState.DRAINING) \
            and not self.is_fenced(peer.name, peer.incarnation)

    def kv_stores(self) -> list[PeerView]:
        """Every KV store the controller knows of, live or not, by index."""
        return sorted(self.of_role("kv_store"), key=lambda w: w.index)

    @staticmethod
    def kv_store_live(store: PeerView) -> bool:
        return store.state == WorkerState.READY and bool(store.data_address)

    def draining(self, name: str) -> bool:
        peer = self.workers.get(name)
        return peer is not None and peer.state == WorkerState.DRAINING


def desired_roster(state: pb.ClusterState) -> Roster | None:
    """The roster the controller reconciles towards, from its snapshot (None in one that names none)."""
    if not state.HasField("desired"):
        return None
    return Roster(state.desired.attention_workers, state.desired.expert_workers)


def retiring(worker: pb.WorkerInfo, desired: Roster | None) -> bool:
    """Removed from the roster on purpose (a scale-down): it drains, leaves and is never replaced, so
    it is not among the workers that should be running."""
    return desired is not None and not desired.holds(ROLES.get(worker.role, "unknown"), worker.index)


def retired(worker: pb.WorkerInfo, desired: Roster | None) -> bool:
    """Removed on purpose and ended: it belongs to the history (the events), no longer to the live
    views (/admin/cluster's workers, the dashboard, `status`, the per-worker metrics). A worker that
    ended while still on the roster (declared dead, or drained on its own) is not retired: it stays
    visible, fenced or gone, until its replacement registers under its name."""
    return retiring(worker, desired) and state_of(worker.state) in ENDED


def unprotected_by_node(state: pb.ClusterState) -> dict[str, list[tuple[int, int]]]:
    """node -> the (layer, expert) pairs that losing it would leave with no live copy, from a cluster
    snapshot's routing table and its workers' nodes (controller/placement.py `unprotected_by_node`)."""
    num_experts = max(1, state.ert.num_experts)
    copies = {divmod(i, num_experts): tuple(c.workers) for i, c in enumerate(state.ert.entries) if c.workers}
    return placement.unprotected_by_node(copies, {w.name: w.node for w in state.workers if w.node})

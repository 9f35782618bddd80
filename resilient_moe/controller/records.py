"""The controller's vocabulary: a worker's state and record, cluster events, the roster, orders to the
launcher, the controller's settings and what a heartbeat hears back. Plain data, no behaviour beyond
small helpers; `ClusterModel` (state.py) moves them."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from resilient_moe.controller.placement import ExpertKey


class WorkerState(enum.Enum):
    """Where a worker is in its life, as the controller sees it (the module docstring has the transitions)."""

    STARTING = "starting"  # ordered (or part of the initial roster); not registered yet
    LOADING = "loading"  # registered, loading weights
    READY = "ready"  # serving
    SUSPECT = "suspect"  # missed heartbeats or reported by a peer; still routed to
    DRAINING = "draining"  # planned removal: no new work, finishes or hands over what it has, then leaves
    FENCED = "fenced"  # declared dead: its incarnation's frames are dropped everywhere
    GONE = "gone"  # left in an orderly way


SERVING = frozenset({WorkerState.READY, WorkerState.SUSPECT})
ENDED = frozenset({WorkerState.FENCED, WorkerState.GONE})
REPLACED_ROLES = ("expert", "attention", "kv_store")
TRACKED_ROLES = ("attention", "expert", "kv_store", "frontend")  # of the workers the controller tracks


@dataclass
class WorkerRecord:
    """The controller's book on one worker name: its current incarnation and what it reported."""

    name: str
    role: str  # "attention", "expert", "frontend", "kv_store"
    index: int
    incarnation: int  # 0: no incarnation registered yet
    pid: int
    host: str
    data_address: str = ""
    state: WorkerState = WorkerState.STARTING
    experts: list[ExpertKey] = field(default_factory=list)  # expert worker: what it reports holding
    last_heartbeat: float = 0.0
    load: dict[str, float] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    since: float = 0.0  # clock time it entered its state
    node: str = ""  # its failure domain: the Ray node id (hex) on Ray, the hostname locally


@dataclass(frozen=True)
class ClusterEvent:
    time: float  # unix time
    kind: str
    worker: str
    detail: str = ""


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_experts: int
    sparse_layers: tuple[int, ...]


@dataclass(frozen=True)
class Roster:
    """The desired number of workers of each role (names aw-0.., ew-0..)."""

    attention_workers: int
    expert_workers: int

    def holds(self, role: str, index: int) -> bool:
        """Does the roster ask for this worker? Only attention and expert workers are scaled; a worker
        of any other role is always wanted."""
        if role == "attention":
            return index < self.attention_workers
        if role == "expert":
            return index < self.expert_workers
        return True


@dataclass
class Order:
    """An order to the launcher; see the module docstring for when it is done."""

    id: int
    action: str  # "start", "stop", "restart-all"
    worker: str  # "" for restart-all
    pid: int  # start: the process it replaces (0: none); stop: the process to stop
    issued_at: float  # unix time
    generation: int = 0  # restart-all: the restart generation
    floor: int = 0  # restart-all: incarnations from this one on count as restarted
    resumed: bool = False  # recovered from a predecessor's snapshot and sent again

    def key(self) -> tuple[str, str, int, int]:
        return self.action, self.worker, self.pid, self.generation


def kv_store_name(index: int) -> str:
    """The first KV store keeps the name it had when there was one; the others are numbered."""
    return "kv-store" if index == 0 else f"kv-store-{index}"


@dataclass(frozen=True)
class ControllerSettings:
    """What the controller takes from the deployment (see DeploymentConfig for each setting)."""

    attention_workers: int
    expert_workers: int
    kv_store: bool = False  # the roster has KV store processes (checkpointing on)
    kv_stores: int = 1  # how many
    primary_policy: str = "contiguous"
    shadow_policy: str = "spread"
    shadow_slots: int | None = None  # per expert worker per sparse layer; None: one shadow of every expert
    resilience: bool = True
    heartbeat_timeout_s: float = 1.0
    tick_interval_s: float = 0.05
    startup_timeout_s: float = 120.0
    max_attention_workers: int | None = None  # a cap on scaling; None: none
    load_half_life_s: float = 30.0
    rebalance_interval_s: float = 0.0  # 0: rebalance on demand only
    worker_nodes: tuple[tuple[str, str], ...] = ()  # (worker, node) as the launcher places them; empty: one node

    @classmethod
    def from_deployment(cls, dep, shadow_slots: int | None,
                        worker_nodes: tuple[tuple[str, str], ...] = ()) -> "ControllerSettings":
        return cls(
            attention_workers=dep.attention_workers, expert_workers=dep.expert_workers,
            kv_store=dep.resilience and dep.kv_checkpoint and bool(dep.redis_url), kv_stores=dep.kv_stores,
            primary_policy=dep.placement,
            shadow_policy=dep.shadow_policy, shadow_slots=shadow_slots, resilience=dep.resilience,
            heartbeat_timeout_s=dep.heartbeat_timeout_s, tick_interval_s=dep.heartbeat_interval_s,
            startup_timeout_s=dep.startup_timeout_s, max_attention_workers=dep.max_attention_workers,
            load_half_life_s=dep.load_half_life_s, rebalance_interval_s=dep.rebalance_interval_s,
            worker_nodes=tuple(worker_nodes),
        )


@dataclass(frozen=True)
class HeartbeatAnswer:
    """What a heartbeat hears back: whether its incarnation still counts, and (expert workers) which
    experts to load and which copies to drop."""

    alive: bool
    load_experts: list[ExpertKey] = field(default_factory=list)
    drop_experts: list[ExpertKey] = field(default_factory=list)

"""The controller's model of the cluster, as a reconcile loop over desired and observed state.

Desired state: the roster (how many attention and expert workers; from the DeploymentConfig, then
changed by `scale`), the expert placement the workers should hold (`target`), and for the
restart-everything baseline the restart generation. Observed state: one `WorkerRecord` per worker
name, whose `WorkerState` moves only as below, with membership, incarnations, fences, the expert
load the workers report and the placement the routing table serves from (`active`).

    STARTING --register--> LOADING --ready--> READY <--heartbeats resume-- SUSPECT
        (ordered, or the       |                |  \\--missed heartbeats, a peer's report--^
         initial roster)       |                |
                               +---- drain / removed from the roster ----> DRAINING --left--> GONE
    any live state --declared dead (silence, a process gone)--> FENCED
    FENCED or GONE --a new incarnation registers--> LOADING

Each `reconcile` pass (orders.py) compares the two and issues orders: `Order`s to the launcher (start a worker,
stop one that was removed, restart everything in the baseline), and to expert workers (load the
experts of the target placement, then drop the copies it no longer needs; sent in heartbeat
replies). Orders are idempotent (the same need never issues a second order while one is
outstanding, and carrying one out twice changes nothing) and part of the persisted snapshot, so a
controller that dies right after issuing one is succeeded by one that sends it again. An order is
done when the observed state shows it (a new registration, a worker gone, every worker restarted).

A rebalance loads new copies first, switches the routing table to the new placement (a new epoch)
once every worker holds its part of it, and drops the old copies only after every attention worker
routes by that epoch. Plain Python with an injectable clock, so tests drive it without processes
or sockets; placement decisions are the pure functions of placement.py. Beside this file: the
vocabulary (records.py), the reconcile pass (orders.py) and the persisted snapshot (snapshot.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable

from resilient_moe import procs
from resilient_moe.controller import placement
from resilient_moe.controller.fault_records import ROLES as FAULT_ROLES
from resilient_moe.controller.fault_records import FaultRecord, FaultRecords, observed_cause
from resilient_moe.controller.orders import ReconcilePass
from resilient_moe.controller.placement import ExpertKey, Placement
from resilient_moe.controller.records import (
    ENDED,
    SERVING,
    TRACKED_ROLES,
    ClusterEvent,
    ControllerSettings,
    HeartbeatAnswer,
    ModelShape,
    Order,
    Roster,
    WorkerRecord,
    WorkerState,
    kv_store_name,
)
from resilient_moe.controller.snapshot import Persistence
from resilient_moe.datapath.faults import LinkFault
from resilient_moe.datapath.routing_table import RoutingTable
from resilient_moe.deployment import ATTENTION_WORKERS_LIMIT

log = logging.getLogger("resilient_moe.controller")

BUSY_GRACE = 10  # heartbeat timeouts a silent worker whose process still runs gets before it is declared dead
# deaths_ROLE: faults of that role, one per fault record (incarnations declared dead, and the exits of
# Redis, controllers, fork servers and supervisors reported to it): a crash loop shows as their rate;
# /metrics `worker_deaths_total{role}`; persisted with the others, so a restarted controller keeps counting
COUNTERS = ("orders_issued", "orders_completed", "orders_resumed", "orders_expired", "rebalances", "scale_events",
            "drains", *(f"deaths_{role}" for role in FAULT_ROLES))


class ClusterModel(ReconcilePass, Persistence):
    """Desired and observed state and the reconcile pass between them; every mutation bumps `version`
    so watchers can wait on it."""

    def __init__(
        self,
        shape: ModelShape,
        settings: ControllerSettings,
        clock: Callable[[], float] = time.monotonic,
        liveness: Callable[[WorkerRecord], str] = lambda r: procs.process_state(r.pid, r.host),
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.shape = shape
        self.settings = settings
        self.clock = clock
        self.wall = wall
        self.liveness = liveness
        self._last_tick: float | None = None
        self.resilience = settings.resilience
        self.desired = Roster(settings.attention_workers, settings.expert_workers)
        self.restart_generation = 0
        self.epoch = 1
        self.workers: dict[str, WorkerRecord] = {}
        self.fenced: set[tuple[str, int]] = set()
        self.events: deque[ClusterEvent] = deque(maxlen=500)
        self.fault_records = FaultRecords()  # every component's faults (fault_records.py)
        self.next_incarnation = 1
        self.version = 0
        self.orders: dict[int, Order] = {}
        self.next_order = 1
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.faults: dict[str, LinkFault] = {}  # injected datapath faults by id (chaos testing)
        self.load: dict[ExpertKey, float] = {}  # decayed tokens per (layer, expert), all copies together
        self._load_at = clock()
        self.last_rebalance = clock()
        self.active = self._plan(self.expert_names(), None, None)  # nothing observed yet: spread
        self.target = self.active
        self.switch_epoch = 1
        now = clock()
        for name, (role, index) in self.roster().items():  # the launcher starts the initial roster
            self.workers[name] = WorkerRecord(name, role, index, 0, 0, "", since=now)
        self.ert = self._build_ert()
        if self.active.unprotected and self.resilience:
            self._event("unprotected", "", f"{len(self.active.unprotected)} (layer, expert) pairs have no shadow: "
                        + ", ".join(f"{l}/{e}" for l, e in self.active.unprotected[:16]))

    # ---- desired state ----------------------------------------------------------------------

    def roster(self) -> dict[str, tuple[str, int]]:
        """name -> (role, index) of every worker the desired state asks for."""
        names: dict[str, tuple[str, int]] = {}
        if self.settings.kv_store:
            names.update({kv_store_name(i): ("kv_store", i) for i in range(self.settings.kv_stores)})
        names.update({f"ew-{i}": ("expert", i) for i in range(self.desired.expert_workers)})
        names.update({f"aw-{i}": ("attention", i) for i in range(self.desired.attention_workers)})
        return names

    def expert_names(self) -> list[str]:
        return [f"ew-{i}" for i in range(self.desired.expert_workers)]

    def scale(self, attention_workers: int = 0, expert_workers: int = 0) -> Roster:
        """Change the roster (0: unchanged); raises ValueError naming what is not possible. Attention
        workers have no ceiling but the deployment's optional `max_attention_workers` (the KV store
        grows a region for each one added)."""
        attention = attention_workers or self.desired.attention_workers
        experts = expert_workers or self.desired.expert_workers
        cap = self.settings.max_attention_workers
        if cap is not None and attention > cap:
            raise ValueError(f"attention_workers must be at most max_attention_workers ({cap}, the deployment's "
                             f"cap), got {attention}")
        if not 1 <= attention <= ATTENTION_WORKERS_LIMIT:
            raise ValueError(f"attention_workers must be between 1 and {ATTENTION_WORKERS_LIMIT}, got {attention}")
        if not 1 <= experts <= self.shape.num_experts:
            raise ValueError(f"expert_workers must be between 1 and the model's {self.shape.num_experts} experts, "
                             f"got {experts}")
        if any(o.action == "restart-all" for o in self.orders.values()):
            raise ValueError("a restart of every worker is under way; scale once it is done")
        before = self.desired
        if (attention, experts) == (before.attention_workers, before.expert_workers):
            return before
        self.desired = Roster(attention, experts)
        self.counters["scale_events"] += 1
        self._event("scale", "", f"attention workers {before.attention_workers} -> {attention}, expert workers "
                    f"{before.expert_workers} -> {experts}")
        return self.desired

    def _plan(self, workers: list[str], load: dict[ExpertKey, float] | None,
              current: Placement | None) -> Placement:
        slots = self.settings.shadow_slots
        if slots is None:
            slots = placement.default_shadow_slots(self.shape.num_experts, len(workers), self.resilience)
        if not self.resilience:
            slots = 0
        return placement.plan_placement(self.settings.shadow_policy, self.shape.num_experts, workers,
                                        list(self.shape.sparse_layers), slots, self.settings.primary_policy, load,
                                        current, self.resilience, node_of=self.node_of())

    def node_of(self) -> dict[str, str]:
        """worker -> node: where each registered worker reported it runs, else where the launcher
        planned it (empty on one node)."""
        nodes = dict(self.settings.worker_nodes)
        nodes.update({r.name: r.node for r in self.workers.values() if r.node})
        return nodes

    def unprotected_by_node(self) -> dict[str, list[ExpertKey]]:
        """node -> the (layer, expert) pairs that its loss would leave with no live copy right now."""
        num_experts = self.ert.num_experts
        live = {(i // num_experts, i % num_experts): entry for i, entry in enumerate(self.ert.candidates)
                if i // num_experts in self.shape.sparse_layers}
        return placement.unprotected_by_node(live, self.node_of())

    def observed_load(self) -> dict[ExpertKey, float] | None:
        """The decayed per-expert load, or None before any token was reported."""
        return dict(self.load) if any(v > 0 for v in self.load.values()) else None

    def rebalance(self, reason: str, min_gain: float | None = None) -> tuple[bool, str]:
        """Plan the placement again from the observed load; (started, what happened). With `min_gain`,
        only if the plan's expected imbalance is below `min_gain` times the current one."""
        if self.rebalancing:
            return False, "a rebalance is already under way"
        self.last_rebalance = self.clock()
        load = self.observed_load()
        if self.settings.shadow_policy == "spread":
            return False, "shadow_policy is spread: placement does not depend on load (set load_aware)"
        if load is None:
            return False, "no expert load has been reported yet"
        plan = self._plan(self.expert_names(), load, self.active)
        if plan.copies == self.active.copies and plan.shares == self.active.shares:
            return False, "the placement already fits the observed load"
        before, after = placement.imbalance(self.active, load), placement.imbalance(plan, load)
        if min_gain is not None and after >= min_gain * before:
            return False, f"expected imbalance {before:.2f} -> {after:.2f}: not worth moving experts"
        self.target = plan
        moved = sum(len(set(plan.held_by(w)) - set(self.active.held_by(w))) for w in plan.workers)
        detail = (f"{reason}: loading {moved} expert copies; expected imbalance (max/mean per expert worker) "
                  f"{before:.2f} -> {after:.2f}")
        self._event("rebalance", "", detail)
        return True, detail

    @property
    def rebalancing(self) -> bool:
        return self.target is not self.active

    # ---- routing ----------------------------------------------------------------------------

    def _build_ert(self) -> RoutingTable:
        """The active placement, leaving out expert workers that are not serving (dead, or replaced and
        still loading: their shadows are promoted) and draining ones where another copy is left."""
        serving = {r.name for r in self.workers.values() if r.role == "expert"
                   and (r.state in SERVING or r.state == WorkerState.DRAINING)}
        draining = {r.name for r in self.workers.values() if r.role == "expert" and r.state == WorkerState.DRAINING}
        return placement.routing_table(
            self.epoch, list(self.shape.sparse_layers), self.shape.num_layers, self.shape.num_experts,
            self.active, dead=set(self.active.workers) - serving, draining=draining,
        )

    def _publish_routing(self, reason: str) -> None:
        ert = self._build_ert()
        if ert.candidates != self.ert.candidates or ert.shares != self.ert.shares:
            self.epoch += 1
            self.ert = self._build_ert()
            self._event("epoch", "", f"routing table epoch {self.epoch}: {reason}")

    def experts_for(self, name: str) -> list[ExpertKey]:
        """Every (layer, expert) this expert worker is asked to hold: its part of the active placement
        and of the target one (during a rebalance both)."""
        if name not in self.roster():
            return []
        return sorted(set(self.active.held_by(name)) | set(self.target.held_by(name)))

    def unprotected(self) -> list[ExpertKey]:
        """(layer, expert) pairs that have a single live copy right now (or none)."""
        return sorted(
            (i // self.ert.num_experts, i % self.ert.num_experts)
            for i, entry in enumerate(self.ert.candidates)
            if i // self.ert.num_experts in self.shape.sparse_layers and len(entry) < 2
        )

    # ---- membership -------------------------------------------------------------------------

    def _event(self, kind: str, worker: str, detail: str = "") -> None:
        self.events.append(ClusterEvent(self.wall(), kind, worker, detail))
        self.version += 1

    def _set_state(self, record: WorkerRecord, state: WorkerState) -> None:
        record.state = state
        record.since = self.clock()

    def register(self, name: str, role: str, index: int, pid: int, host: str, data_address: str = "",
                 node: str = "") -> WorkerRecord:
        """A worker process announces itself; it gets a fresh incarnation. A previous incarnation
        under the same name that is still alive in our books is fenced: the new one replaces it."""
        old = self.workers.get(name)
        if old is not None and old.incarnation and old.state not in ENDED:
            self._set_state(old, WorkerState.FENCED)
            self.fenced.add((old.name, old.incarnation))
            self._event("fenced", name, f"incarnation {old.incarnation} replaced by a new registration")
        record = WorkerRecord(name, role, index, self.next_incarnation, pid, host, data_address,
                              state=WorkerState.LOADING, last_heartbeat=self.clock(), since=self.clock(), node=node)
        self.next_incarnation += 1
        self.workers[name] = record
        self._event("registered", name, f"incarnation {record.incarnation}, pid {pid}")
        if old is not None and role == "expert":
            self._publish_routing(f"{name} replaced")
        return record

    def ready(self, name: str, incarnation: int, experts: list[ExpertKey], data_address: str) -> bool:
        record = self._current(name, incarnation)
        if record is None:
            return False
        if record.state == WorkerState.LOADING:
            self._set_state(record, WorkerState.READY)
        record.experts = sorted(experts)
        if data_address:
            record.data_address = data_address
        record.last_heartbeat = self.clock()
        self._event("ready", name, f"incarnation {incarnation}")
        self.fault_records.replaced(name, incarnation, self.wall())
        if record.role == "expert":
            self._publish_routing(f"{name} serving")
        return True

    def heartbeat(self, name: str, incarnation: int, load: dict[str, float],
                  expert_tokens: list[tuple[int, int, float]] = (),
                  experts: list[ExpertKey] | None = None) -> HeartbeatAnswer:
        """Record a heartbeat (its load, the expert tokens counted since the last one, and the experts
        held when they changed); not alive when that incarnation is fenced (it must stop). An expert
        worker hears which experts to load and which copies to drop."""
        if (name, incarnation) in self.fenced:
            return HeartbeatAnswer(False)
        record = self._current(name, incarnation)
        if record is None:
            return HeartbeatAnswer(False)
        record.last_heartbeat = self.clock()
        record.load = dict(load)
        for layer, expert, tokens in expert_tokens:
            if layer in self.shape.sparse_layers and 0 <= expert < self.shape.num_experts and tokens > 0:
                self.load[(layer, expert)] = self.load.get((layer, expert), 0.0) + float(tokens)
        if experts is not None and sorted(experts) != record.experts:
            record.experts = sorted(experts)
            self.version += 1
        if record.state == WorkerState.SUSPECT:
            self._set_state(record, WorkerState.READY)
            self._event("recovered", name, "heartbeats resumed")
        if record.role != "expert" or record.state not in SERVING:
            return HeartbeatAnswer(True)
        held = set(record.experts)
        wanted = set(self.experts_for(name))
        drop = sorted(held - wanted) if self._settled() else []
        return HeartbeatAnswer(True, sorted(wanted - held), drop)

    def drain(self, name: str, incarnation: int) -> int:
        """A worker leaves in a planned way (SIGTERM): no new work for it from now on. Returns the
        routing epoch once it is out of the routing table where another copy can serve."""
        record = self._current(name, incarnation)
        if record is not None and record.state in SERVING | {WorkerState.LOADING}:
            self._set_state(record, WorkerState.DRAINING)
            self.counters["drains"] += 1
            self._event("draining", name, f"incarnation {incarnation}: no new work; finishing what it has")
            if record.role == "expert":
                self._publish_routing(f"{name} draining")
        return self.epoch

    def deregister(self, name: str, incarnation: int) -> None:
        record = self._current(name, incarnation)
        if record is not None and record.state not in ENDED:
            self._set_state(record, WorkerState.GONE)
            self._event("stopped", name, f"incarnation {incarnation} left")
            if record.role == "expert":
                self._publish_routing(f"{name} left")

    def _current(self, name: str, incarnation: int) -> WorkerRecord | None:
        record = self.workers.get(name)
        if record is None or not incarnation or record.incarnation != incarnation or (name, incarnation) in self.fenced:
            return None
        return record

    # ---- failure handling -------------------------------------------------------------------

    def report_failure(self, reporter: str, suspect: str, incarnation: int, reason: str, process_gone: bool,
                       process: str = procs.GONE) -> None:
        """A peer saw a broken link or unanswered probes. A process that will not come back on its own
        (`process_gone`: `process` says how it was seen, gone or stopped) is declared dead at once (one
        that was draining has simply left); otherwise it becomes SUSPECT and the heartbeat timeout
        decides."""
        record = self.workers.get(suspect)
        if record is not None and record.state in ENDED and incarnation in (0, record.incarnation):
            # declared already (a peer was faster): the launcher's exit status still makes the cause exact
            if self.fault_records.refine(suspect, observed_cause(reason), reason, incarnation=record.incarnation):
                self.version += 1
            return
        if record is None or record.state in ENDED or not record.incarnation:
            return
        if incarnation and record.incarnation != incarnation:
            return  # about an incarnation that is already gone
        if process_gone and record.state == WorkerState.DRAINING:
            self.deregister(suspect, record.incarnation)
        elif process_gone:
            self.declare_dead(suspect, f"{reason} (reported by {reporter}; process {process})")
        elif record.state == WorkerState.READY:
            self._set_state(record, WorkerState.SUSPECT)
            self._event("suspect", suspect, f"{reason} (reported by {reporter})")

    def tick(self) -> list[str]:
        """One pass of the loop: declare dead every worker whose heartbeats stopped (returns their
        names), then reconcile.

        Silence alone is not enough on a busy host: a worker whose process is still there and not
        stopped (`liveness`, procs.py) is only late, starved of CPU like everyone else, and gets up to
        BUSY_GRACE timeouts; a stopped or exited one (or one on another host) is dead after one. A pause
        of the controller itself (it too can be starved) is nobody's silence: the time it was not
        ticking is added to every deadline."""
        now = self.clock()
        gap = now - self._last_tick if self._last_tick is not None else 0.0
        self._last_tick = now
        if gap > 3 * self.settings.tick_interval_s:
            for record in self.workers.values():
                record.last_heartbeat += gap - self.settings.tick_interval_s
        dead = []
        timeout = self.settings.heartbeat_timeout_s
        for record in list(self.workers.values()):
            if record.state in ENDED or record.state == WorkerState.STARTING:
                continue
            silent = now - record.last_heartbeat
            if silent <= timeout:
                continue
            state = self.liveness(record)
            if state in (procs.RUNNABLE, procs.SLEEPING) and silent <= BUSY_GRACE * timeout:
                continue
            self.declare_dead(record.name, f"no heartbeat for {silent:.2f}s (process {state})")
            dead.append(record.name)
        self.reconcile()
        return dead

    def declare_dead(self, name: str, reason: str) -> None:
        record = self.workers.get(name)
        if record is None or record.state in ENDED or not record.incarnation:
            return
        self._fence(record, reason)

    def _fence(self, record: WorkerRecord, reason: str) -> None:
        """Declare an incarnation dead: its frames are dropped everywhere from now on (the epoch
        changes with it), its shadows take over; `reconcile` asks the launcher for a replacement."""
        self._set_state(record, WorkerState.FENCED)
        self.fenced.add((record.name, record.incarnation))
        if record.role in TRACKED_ROLES:
            self.counters[f"deaths_{record.role}"] += 1
        self.epoch += 1
        self.ert = self._build_ert()
        self._event("dead", record.name, f"incarnation {record.incarnation}: {reason}")
        now = self.wall()
        self.fault_records.add(FaultRecord(
            record.name, record.role, record.incarnation, record.pid, observed_cause(reason), reason,
            last_seen=now - max(0.0, self.clock() - record.last_heartbeat), detected_at=now))
        self._event("fenced", record.name, f"incarnation {record.incarnation}, routing epoch {self.epoch}")
        if not self.resilience and record.role in ("expert", "attention"):
            # The restart-everything baseline: one death takes every worker down with it.
            for other in self.live():
                if other.role in ("expert", "attention"):
                    self._set_state(other, WorkerState.FENCED)
                    self.fenced.add((other.name, other.incarnation))
                    self._event("fenced", other.name, f"incarnation {other.incarnation}: restart-all after "
                                f"{record.name} died")
            self.ert = self._build_ert()

    def record_fault(self, record: FaultRecord) -> FaultRecord:
        """A fault of a component the controller does not track (Redis, the controller before this one,
        a supervisor, a fork server), or an update of one (its replacement time). For a worker it tracks,
        the launcher's exit status of a process it declared dead already makes that record's cause exact."""
        if record.role in TRACKED_ROLES:
            refined = self.fault_records.refine(record.component, record.cause, record.detail, pid=record.pid)
            if refined is not None:
                self.version += 1
            return refined or record
        kept = self.fault_records.add(record)
        if kept is record:
            self.counters[f"deaths_{record.role}"] += 1
            self._event("dead", record.component, f"pid {record.pid}: {record.cause}"
                        + (f" ({record.detail})" if record.detail and record.detail != record.cause else ""))
        if record.replaced_at and kept.replaced_at == record.replaced_at:
            self._event("replaced", record.component, f"pid {record.pid} replaced "
                        f"{max(0.0, record.replaced_at - record.detected_at):.2f}s after it was seen gone")
        return kept

    def live(self, role: str | None = None) -> list[WorkerRecord]:
        return [r for r in self.workers.values() if r.state in SERVING and (role is None or r.role == role)]

    # ---- injected faults (chaos testing) ----------------------------------------------------

    def set_faults(self, add: list[LinkFault], remove: list[str] = (), clear: bool = False) -> list[LinkFault]:
        """Change the injected datapath faults and return those in force; attention workers apply
        them from the next cluster state. Raises ValueError for a link naming an unknown worker."""
        for f in add:
            for name, role in ((f.source, "attention"), (f.target, "expert")):
                record = self.workers.get(name)
                if name and (record is None or record.role != role):
                    raise ValueError(f"fault {f.id}: {name!r} is not a known {role} worker")
        if clear:
            self.faults.clear()
        for fault_id in remove:
            self.faults.pop(fault_id, None)
        for f in add:
            self.faults[f.id] = f
        detail = "; ".join(f"{f.id}: {f.kind} {f.link}" for f in add) or "removed"
        self._event("faults", "", f"{len(self.active_faults())} in force ({detail})")
        return self.active_faults()

    def active_faults(self) -> list[LinkFault]:
        """Injected faults that have not expired (expired ones are forgotten)."""
        now = time.time()
        for fault_id in [i for i, f in self.faults.items() if not f.active(now)]:
            del self.faults[fault_id]
        return sorted(self.faults.values(), key=lambda f: f.id)

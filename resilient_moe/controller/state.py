"""The controller's model of the cluster: membership, incarnations, fences, the ERT and its epoch.

Plain Python with an injectable clock, so tests drive it without processes or sockets. The gRPC
server (server.py) wraps one instance behind a lock. Decisions about placement are delegated to the
pure functions of placement.py.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from resilient_moe import procs
from resilient_moe.controller import placement
from resilient_moe.datapath.ert import RoutingTable
from resilient_moe.datapath.faults import LinkFault

ExpertKey = tuple[int, int]

STARTING, READY, SUSPECT, DEAD, STOPPED = "STARTING", "READY", "SUSPECT", "DEAD", "STOPPED"
BUSY_GRACE = 10  # heartbeat timeouts a silent worker whose process still runs gets before it is declared dead


@dataclass
class WorkerRecord:
    name: str
    role: str  # "attention", "expert", "frontend", "kv_store"
    index: int
    incarnation: int
    pid: int
    host: str
    data_address: str = ""
    state: str = STARTING
    experts: list[ExpertKey] = field(default_factory=list)
    last_heartbeat: float = 0.0
    load: dict[str, float] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)


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


class ClusterModel:
    """Membership and routing state; every mutation bumps `version` so watchers can wait on it."""

    def __init__(
        self,
        shape: ModelShape,
        expert_workers: list[str],
        policy: str = "contiguous",
        heartbeat_timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        shadow_slots: int | None = None,
        shadow_policy: str = "spread",
        resilience: bool = True,
        liveness: Callable[[WorkerRecord], str] = lambda r: procs.process_state(r.pid, r.host),
        tick_interval_s: float = 0.05,
    ) -> None:
        """`shadow_slots`: shadow experts each expert worker holds per sparse layer (None: enough for one
        copy of every expert; ignored without resilience, which keeps no shadows)."""
        self.shape = shape
        self.clock = clock
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.liveness = liveness
        self.tick_interval_s = tick_interval_s
        self._last_tick: float | None = None
        self.resilience = resilience
        self.expert_names = list(expert_workers)
        self.primaries = placement.primary_placement(shape.num_experts, self.expert_names, policy)
        if not resilience or len(self.expert_names) < 2:
            shadow_slots = 0
        elif shadow_slots is None:
            shadow_slots = -(-shape.num_experts // (len(self.expert_names) - 1))
        self.shadow_slots = shadow_slots
        self.shadow_policy = shadow_policy
        self.plan = placement.shadow_placement(
            self.primaries, self.expert_names, list(shape.sparse_layers), shadow_slots,
            policy="spread" if shadow_policy == "load_aware" else shadow_policy,  # no load observed yet
        )
        self.epoch = 1
        self.workers: dict[str, WorkerRecord] = {}
        self.fenced: set[tuple[str, int]] = set()
        self.events: deque[ClusterEvent] = deque(maxlen=500)
        self.next_incarnation = 1
        self.version = 0
        # (action, worker, pid of the process it is about) for the launcher to carry out
        self.launcher_commands: list[tuple[str, str, int]] = []
        self.restart_pending = False  # baseline: a restart-all was asked for and is not complete yet
        self.faults: dict[str, LinkFault] = {}  # injected datapath faults by id (chaos testing)
        self.ert = self._build_ert()
        if self.plan.unprotected and resilience:
            self._event("unprotected", "", f"{len(self.plan.unprotected)} (layer, expert) pairs have no shadow: "
                        + ", ".join(f"{l}/{e}" for l, e in self.plan.unprotected[:16]))

    # ---- routing ----------------------------------------------------------------------------

    def _build_ert(self) -> RoutingTable:
        """Primary then shadows, leaving out expert workers that are not serving (dead or replaced and
        still loading): their shadows are promoted."""
        serving = {r.name for r in self.workers.values() if r.role == "expert" and r.state in (READY, SUSPECT)}
        absent = {name for name in self.expert_names if name not in serving}
        return placement.routing_table(
            self.epoch, list(self.shape.sparse_layers), self.shape.num_layers, self.shape.num_experts,
            self.primaries, self.plan.shadows, dead=absent,
        )

    def _publish_routing(self, reason: str) -> None:
        ert = self._build_ert()
        if ert.candidates != self.ert.candidates:
            self.epoch += 1
            self.ert = self._build_ert()
            self._event("epoch", "", f"routing table epoch {self.epoch}: {reason}")

    def experts_for(self, name: str) -> list[ExpertKey]:
        """Every (layer, expert) this expert worker is asked to hold: its primaries and its shadows."""
        primaries = [(layer, e) for layer in self.shape.sparse_layers for e, w in self.primaries.items() if w == name]
        return sorted(set(primaries) | set(self.plan.held_by(name)))

    def unprotected(self) -> list[ExpertKey]:
        """(layer, expert) pairs that have a single live copy right now (or none)."""
        return sorted(
            (i // self.ert.num_experts, i % self.ert.num_experts)
            for i, entry in enumerate(self.ert.candidates)
            if i // self.ert.num_experts in self.shape.sparse_layers and len(entry) < 2
        )

    # ---- membership -------------------------------------------------------------------------

    def _event(self, kind: str, worker: str, detail: str = "") -> None:
        self.events.append(ClusterEvent(time.time(), kind, worker, detail))
        self.version += 1

    def register(self, name: str, role: str, index: int, pid: int, host: str, data_address: str = "") -> WorkerRecord:
        """A worker process announces itself; it gets a fresh incarnation. A previous incarnation
        under the same name that is still alive in our books is fenced: the new one replaces it."""
        old = self.workers.get(name)
        if old is not None and old.state not in (DEAD, STOPPED):
            old.state = DEAD
            self.fenced.add((old.name, old.incarnation))
            self._event("fenced", name, f"incarnation {old.incarnation} replaced by a new registration")
        record = WorkerRecord(name, role, index, self.next_incarnation, pid, host, data_address,
                              last_heartbeat=self.clock())
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
        record.state = READY
        record.experts = sorted(experts)
        if data_address:
            record.data_address = data_address
        record.last_heartbeat = self.clock()
        self._event("ready", name, f"incarnation {incarnation}")
        if self.restart_pending and all(r.state == READY for r in self.workers.values()
                                        if r.role in ("expert", "attention")):
            self.restart_pending = False  # the restart-all is complete: the next death needs a new one
        if record.role == "expert":
            self._publish_routing(f"{name} serving")
        return True

    def heartbeat(self, name: str, incarnation: int, load: dict[str, float]) -> bool:
        """Record a heartbeat; returns False when that incarnation is fenced (it must stop)."""
        if (name, incarnation) in self.fenced:
            return False
        record = self._current(name, incarnation)
        if record is None:
            return False
        record.last_heartbeat = self.clock()
        record.load = dict(load)
        if record.state == SUSPECT:
            record.state = READY
            self._event("recovered", name, "heartbeats resumed")
        return True

    def deregister(self, name: str, incarnation: int) -> None:
        record = self._current(name, incarnation)
        if record is not None:
            record.state = STOPPED
            self._event("stopped", name, f"incarnation {incarnation} left")
            if record.role == "expert":
                self._publish_routing(f"{name} left")
            # A worker that leaves on its own (SIGTERM from an operator or a node drain) is replaced like a
            # dead one, so redundancy comes back; a launcher that is shutting down ignores the request.
            if self.resilience and record.role in ("expert", "attention", "kv_store"):
                self.launcher_commands.append(("start", name, record.pid))

    def _current(self, name: str, incarnation: int) -> WorkerRecord | None:
        record = self.workers.get(name)
        if record is None or record.incarnation != incarnation or (name, incarnation) in self.fenced:
            return None
        return record

    # ---- failure handling -------------------------------------------------------------------

    def report_failure(self, reporter: str, suspect: str, incarnation: int, reason: str, process_gone: bool) -> None:
        """A peer saw a broken link or unanswered probes. A process known to be gone is declared dead
        at once; otherwise it becomes SUSPECT and the heartbeat timeout decides."""
        record = self.workers.get(suspect)
        if record is None or record.state in (DEAD, STOPPED):
            return
        if incarnation and record.incarnation != incarnation:
            return  # about an incarnation that is already gone
        if process_gone:
            self.declare_dead(suspect, f"{reason} (reported by {reporter}; process gone)")
        elif record.state == READY:
            record.state = SUSPECT
            self._event("suspect", suspect, f"{reason} (reported by {reporter})")

    def tick(self) -> list[str]:
        """Declare dead every worker whose heartbeats stopped; returns their names.

        Silence alone is not enough on a busy host: a worker whose process is still there and not
        stopped (`liveness`, procs.py) is only late, starved of CPU like everyone else, and gets up to
        BUSY_GRACE timeouts; a stopped or exited one (or one on another host) is dead after one. A pause
        of the controller itself (it too can be starved) is nobody's silence: the time it was not
        ticking is added to every deadline."""
        now = self.clock()
        gap = now - self._last_tick if self._last_tick is not None else 0.0
        self._last_tick = now
        if gap > 3 * self.tick_interval_s:
            for record in self.workers.values():
                record.last_heartbeat += gap - self.tick_interval_s
        dead = []
        for record in list(self.workers.values()):
            if record.state in (DEAD, STOPPED):
                continue
            silent = now - record.last_heartbeat
            if silent <= self.heartbeat_timeout_s:
                continue
            state = self.liveness(record)
            if state in (procs.RUNNABLE, procs.SLEEPING) and silent <= BUSY_GRACE * self.heartbeat_timeout_s:
                continue
            self.declare_dead(record.name, f"no heartbeat for {silent:.2f}s (process {state})")
            dead.append(record.name)
        return dead

    def declare_dead(self, name: str, reason: str) -> None:
        record = self.workers.get(name)
        if record is None or record.state in (DEAD, STOPPED):
            return
        self._fence(record, reason)

    def _fence(self, record: WorkerRecord, reason: str) -> None:
        """Declare an incarnation dead: its frames are dropped everywhere from now on (the epoch
        changes with it), its shadows take over, and the launcher is asked for a replacement."""
        record.state = DEAD
        self.fenced.add((record.name, record.incarnation))
        self.epoch += 1
        self.ert = self._build_ert()
        self._event("dead", record.name, f"incarnation {record.incarnation}: {reason}")
        self._event("fenced", record.name, f"incarnation {record.incarnation}, routing epoch {self.epoch}")
        if not self.resilience:
            # The restart-everything baseline: one death takes every worker down with it.
            for other in self.live():
                if other.role in ("expert", "attention"):
                    other.state = DEAD
                    self.fenced.add((other.name, other.incarnation))
                    self._event("fenced", other.name, f"incarnation {other.incarnation}: restart-all after "
                                f"{record.name} died")
            self.ert = self._build_ert()
            # One restart at a time: deaths while it runs (the launcher kills the old processes itself,
            # or one dies while starting, which the launcher sees and retries) need no second one.
            if not self.restart_pending:
                self.restart_pending = True
                self.launcher_commands.append(("restart-all", record.name, record.pid))
        elif record.role in ("expert", "attention", "kv_store"):
            self.launcher_commands.append(("start", record.name, record.pid))

    # ---- persistence (Redis) ----------------------------------------------------------------

    def to_snapshot(self) -> dict:
        """What a restarted controller needs to carry on: membership, incarnations, fences, epoch.
        (Placement and shadows are pure functions of the deployment, recomputed on restart.)"""
        return {
            "epoch": self.epoch,
            "next_incarnation": self.next_incarnation,
            "fenced": sorted([name, inc] for name, inc in self.fenced),
            "workers": [
                {"name": r.name, "role": r.role, "index": r.index, "incarnation": r.incarnation, "pid": r.pid,
                 "host": r.host, "data_address": r.data_address, "state": r.state,
                 "experts": [list(e) for e in r.experts], "started_at": r.started_at}
                for r in self.workers.values()
            ],
            "events": [[e.time, e.kind, e.worker, e.detail] for e in list(self.events)[-100:]],
        }

    def restore(self, snapshot: dict) -> None:
        """Adopt a predecessor's snapshot; every live worker gets a fresh heartbeat deadline."""
        now = self.clock()
        self.epoch = int(snapshot["epoch"])
        self.next_incarnation = int(snapshot["next_incarnation"])
        self.fenced = {(str(n), int(i)) for n, i in snapshot["fenced"]}
        self.workers = {}
        for w in snapshot["workers"]:
            record = WorkerRecord(str(w["name"]), str(w["role"]), int(w["index"]), int(w["incarnation"]),
                                  int(w["pid"]), str(w["host"]), str(w["data_address"]), str(w["state"]),
                                  [tuple(e) for e in w["experts"]], last_heartbeat=now,
                                  started_at=float(w["started_at"]))
            self.workers[record.name] = record
        self.events.extend(ClusterEvent(float(t), str(k), str(w), str(d)) for t, k, w, d in snapshot["events"])
        self.ert = self._build_ert()
        self._event("controller", "controller", f"restarted; recovered {len(self.workers)} workers and routing "
                    f"epoch {self.epoch} from Redis")

    def live(self, role: str | None = None) -> list[WorkerRecord]:
        return [
            r for r in self.workers.values()
            if r.state in (READY, SUSPECT) and (role is None or r.role == role)
        ]

    def dead_expert_workers(self) -> set[str]:
        return {r.name for r in self.workers.values() if r.role == "expert" and r.state in (DEAD, STOPPED)}

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

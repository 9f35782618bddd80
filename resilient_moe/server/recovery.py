"""Per-fault recovery figures: what an SRE reads first after an incident.

A fault is one of the controller's fault records (controller/fault_records.py): any component's death,
hang or exit, with its cause as observed. For each one:
- detection: from its last sign of life (a worker's last heartbeat, as the controller saw it; an exit
  the launcher waited for is seen as it happens) to its declaration. An upper bound on the true
  detection time, by at most one heartbeat interval.
- replacement: from the declaration until a replacement serves (a newer incarnation ready, or the
  launcher's report that a new Redis, controller, fork server or supervisor runs).
- redundancy restored: from the last sign of life to the first snapshot in which it is replaced and no
  more (layer, expert) pairs are unprotected than before the fault.
- stall of its affected requests (p50, max): the API cannot tell which workers served a request, so
  every request in flight when the death was declared counts; its stall is its longest wait for a
  token (from its start, for the first) that overlaps [last sign of life, declaration].

`RecoveryTracker` is plain data plus a lock, fed by the cluster monitor (snapshots) and the API
(finished requests); ServingMetrics exports its figures and /admin/recovery lists them.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from resilient_moe.controller.fault_records import EXACT, cause_kind
from resilient_moe.proto import controller_pb2 as pb

REQUEST_MEMORY_S = 120.0  # finished requests kept this long, for faults declared after they ended
# A fault whose cause is not exact yet (a peer's report came before the launcher's exit status) is
# counted once this old, if nothing more exact came meanwhile (controller/fault_records.py `refine`).
SETTLE_S = 2.0
MAX_FAULTS = 100
MAX_REQUESTS = 5000


def stall_across(times: list[float], onset: float, declared: float) -> float | None:
    """The longest gap between consecutive `times` (a request's start, then its token arrivals) that
    overlaps [onset, declared]; None if the request was not in flight then."""
    gaps = [b - a for a, b in zip(times, times[1:]) if b >= onset and a <= declared]
    return max(gaps) if gaps else None


@dataclass
class Fault:
    """One fault record and how the cluster recovered from it."""

    worker: str  # the component: "ew-1", "redis", "supervisor", ...
    role: str
    incarnation: int
    pid: int
    cause: str  # as observed: "killed by signal 9 (SIGKILL)", "stopped", ...
    detail: str
    declared_at: float  # unix time it was declared dead (or its exit seen)
    last_heartbeat: float | None  # unix time of its last sign of life; None when unknown
    unprotected_before: int
    replaced_at: float | None = None
    restored_at: float | None = None
    stalls: list[float] = field(default_factory=list)
    counted: bool = False  # reported as new (to the metrics) once its cause is final

    @property
    def kind(self) -> str:
        return cause_kind(self.cause)

    @property
    def onset(self) -> float:
        return self.last_heartbeat if self.last_heartbeat is not None else self.declared_at

    @property
    def detection_s(self) -> float | None:
        return None if self.last_heartbeat is None else max(0.0, self.declared_at - self.last_heartbeat)

    @property
    def replacement_s(self) -> float | None:
        return None if self.replaced_at is None else max(0.0, self.replaced_at - self.declared_at)

    @property
    def restored_s(self) -> float | None:
        return None if self.restored_at is None else max(0.0, self.restored_at - self.onset)

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker": self.worker, "role": self.role, "incarnation": self.incarnation, "pid": self.pid,
            "kind": self.kind, "cause": self.cause, "detail": self.detail, "declared_at": self.declared_at,
            "last_heartbeat": self.last_heartbeat, "detection_s": self.detection_s,
            "replaced_at": self.replaced_at, "replacement_s": self.replacement_s, "restored_at": self.restored_at,
            "redundancy_restored_s": self.restored_s, "requests": len(self.stalls),
            "stall_p50_s": statistics.median(self.stalls) if self.stalls else None,
            "stall_max_s": max(self.stalls) if self.stalls else None,
        }


@dataclass
class _Request:
    times: list[float]  # unix: start, then token arrivals
    end: float


@dataclass
class Changes:
    """What one update found, for the metrics to observe."""

    new: list[Fault] = field(default_factory=list)
    replaced: list[Fault] = field(default_factory=list)
    restored: list[Fault] = field(default_factory=list)
    stalls: list[float] = field(default_factory=list)


class RecoveryTracker:
    """Faults and their recovery, from controller snapshots and finished requests (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.faults: deque[Fault] = deque(maxlen=MAX_FAULTS)
        self._by_key: dict[tuple[str, int, float], Fault] = {}  # (component, pid, declared at) -> its fault
        self._requests: deque[_Request] = deque(maxlen=MAX_REQUESTS)
        self._unprotected_ok = 0

    def observe(self, state: pb.ClusterState, now: float) -> Changes:
        """A controller snapshot received at unix time `now`."""
        changes = Changes()
        with self._lock:
            for record in state.fault_records:
                key = (record.component, record.pid, round(record.detected_at, 3))
                fault = self._by_key.get(key)
                if fault is None:
                    fault = Fault(record.component, record.role, record.incarnation, record.pid, record.cause,
                                  record.detail, record.detected_at, record.last_seen or None, self._unprotected_ok)
                    self._by_key[key] = fault
                    for request in self._requests:
                        self._add_stall(fault, request, changes)
                    self.faults.append(fault)
                fault.cause, fault.detail = record.cause, record.detail
                if not fault.counted and (fault.kind in EXACT or record.replaced_at or now - fault.declared_at >= SETTLE_S):
                    fault.counted = True  # its cause is final: counted once, under that cause
                    changes.new.append(fault)
                if record.replaced_at and fault.replaced_at is None and fault.counted:
                    fault.replaced_at = record.replaced_at
                    changes.replaced.append(fault)
            self._by_key = {k: f for k, f in self._by_key.items() if f in self.faults}
            unprotected = len(state.unprotected)
            for fault in self.faults:
                if fault.restored_at is None and fault.replaced_at is not None \
                        and unprotected <= fault.unprotected_before:
                    fault.restored_at = max(now, fault.replaced_at)
                    changes.restored.append(fault)
            if all(f.restored_at is not None for f in self.faults):
                self._unprotected_ok = unprotected
        return changes

    def request_done(self, started: float, arrivals: list[float], ended: float) -> Changes:
        """A request ended; `started`, `arrivals` (its tokens) and `ended` are unix times."""
        changes = Changes()
        request = _Request([started, *arrivals], ended)
        with self._lock:
            for fault in self.faults:
                self._add_stall(fault, request, changes)
            while self._requests and ended - self._requests[0].end > REQUEST_MEMORY_S:
                self._requests.popleft()
            self._requests.append(request)
        return changes

    @staticmethod
    def _add_stall(fault: Fault, request: _Request, changes: Changes) -> None:
        # In flight while the worker was failing: started before the death was declared and still
        # running at its onset. A request the survivors carried to its end before the controller
        # declared the death (their own detection is faster) was affected too.
        if not (request.times[0] <= fault.declared_at and request.end >= fault.onset):
            return
        stall = stall_across(request.times, fault.onset, fault.declared_at)
        if stall is not None:
            fault.stalls.append(stall)
            changes.stalls.append(stall)

    def table(self) -> list[dict[str, Any]]:
        """Every remembered fault, newest first."""
        with self._lock:
            return [f.to_dict() for f in reversed(self.faults)]

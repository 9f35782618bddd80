"""Per-fault recovery figures: what an SRE reads first after an incident.

A fault is a worker incarnation the controller declared dead. For each one:
- detection: from the worker's last heartbeat (its last sign of life the control plane saw) to the
  controller's "dead" event. It is an upper bound on the true detection time, by at most one
  heartbeat interval. The last heartbeat comes from the snapshot the controller pushes as it declares
  the death (the dead record's heartbeat age), so the API's polling interval does not blur it.
- redundancy restored: from the last heartbeat to the first snapshot in which a newer incarnation of
  the worker is ready and no more (layer, expert) pairs are unprotected than before the fault.
- stall of its affected requests (p50, max): the API cannot tell which workers served a request, so
  every request in flight when the death was declared counts; its stall is its longest wait for a
  token (from its start, for the first) that overlaps [last heartbeat, declaration].

`RecoveryTracker` is plain data plus a lock, fed by the cluster monitor (snapshots) and the API
(finished requests); ServingMetrics exports its figures and /admin/recovery lists them.
"""

from __future__ import annotations

import re
import statistics
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from resilient_moe.proto import controller_pb2 as pb

REQUEST_MEMORY_S = 120.0  # finished requests kept this long, for faults declared after they ended
MAX_FAULTS = 100
MAX_REQUESTS = 5000


def failure_kind(detail: str) -> str:
    """How a death was detected, from the controller's event detail."""
    text = detail.lower()
    if "no heartbeat" in text:
        return "heartbeat_timeout"
    if "probe" in text:
        return "probe_timeout"
    if "link" in text:
        return "link_closed"
    return "reported"


def _incarnation(detail: str) -> int:
    match = re.match(r"incarnation (\d+)", detail)
    return int(match.group(1)) if match else 0


def stall_across(times: list[float], onset: float, declared: float) -> float | None:
    """The longest gap between consecutive `times` (a request's start, then its token arrivals) that
    overlaps [onset, declared]; None if the request was not in flight then."""
    gaps = [b - a for a, b in zip(times, times[1:]) if b >= onset and a <= declared]
    return max(gaps) if gaps else None


@dataclass
class Fault:
    """One declared death and how the cluster recovered from it."""

    worker: str
    role: str
    incarnation: int
    kind: str
    detail: str
    declared_at: float  # unix time of the controller's "dead" event
    last_heartbeat: float | None  # unix time; None when no snapshot showed it alive
    unprotected_before: int
    restored_at: float | None = None
    stalls: list[float] = field(default_factory=list)

    @property
    def onset(self) -> float:
        return self.last_heartbeat if self.last_heartbeat is not None else self.declared_at

    @property
    def detection_s(self) -> float | None:
        return None if self.last_heartbeat is None else max(0.0, self.declared_at - self.last_heartbeat)

    @property
    def restored_s(self) -> float | None:
        return None if self.restored_at is None else max(0.0, self.restored_at - self.onset)

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker": self.worker, "role": self.role, "incarnation": self.incarnation, "kind": self.kind,
            "detail": self.detail, "declared_at": self.declared_at, "last_heartbeat": self.last_heartbeat,
            "detection_s": self.detection_s, "restored_at": self.restored_at,
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
    restored: list[Fault] = field(default_factory=list)
    stalls: list[float] = field(default_factory=list)


class RecoveryTracker:
    """Faults and their recovery, from controller snapshots and finished requests (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.faults: deque[Fault] = deque(maxlen=MAX_FAULTS)
        self._known: set[tuple[str, int, float]] = set()  # (worker, incarnation, declared_at) seen
        self._heartbeats: dict[tuple[str, int], float] = {}  # (worker, incarnation) -> last heartbeat (unix)
        self._requests: deque[_Request] = deque(maxlen=MAX_REQUESTS)
        self._unprotected_ok = 0

    def observe(self, state: pb.ClusterState, now: float, roles: dict[str, str]) -> Changes:
        """A controller snapshot received at unix time `now`; `roles`: worker name -> role name."""
        changes = Changes()
        with self._lock:
            for w in state.workers:
                if w.role in (pb.ATTENTION, pb.EXPERT, pb.KV_STORE):
                    self._heartbeats[(w.name, w.incarnation)] = now - w.heartbeat_age_s
            for e in state.events:
                if e.kind != "dead":
                    continue
                key = (e.worker, _incarnation(e.detail), e.time)
                if key in self._known:
                    continue
                self._known.add(key)
                fault = Fault(e.worker, roles.get(e.worker, "unknown"), key[1], failure_kind(e.detail), e.detail,
                              e.time, self._heartbeats.get(key[:2]), self._unprotected_ok)
                for request in self._requests:
                    self._add_stall(fault, request, changes)
                self.faults.append(fault)
                changes.new.append(fault)
            unprotected = len(state.unprotected)
            ready = {w.name: w.incarnation for w in state.workers if w.state == pb.READY}
            for fault in self.faults:
                if fault.restored_at is None and ready.get(fault.worker, 0) > fault.incarnation \
                        and unprotected <= fault.unprotected_before:
                    fault.restored_at = now
                    changes.restored.append(fault)
            if all(f.restored_at is not None for f in self.faults):
                self._unprotected_ok = unprotected
            live = {(w.name, w.incarnation) for w in state.workers}
            for key in [k for k in self._heartbeats if k not in live]:
                del self._heartbeats[key]
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

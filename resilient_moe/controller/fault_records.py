"""One fault record for every component: what died, how (as observed), and when it was replaced.

Every view of failures reads these records: `/admin/recovery`, the dashboard, `resilient-moe status` and
/metrics (server/recovery.py adds the stall of the requests in flight and the time until redundancy
returned). The controller keeps them (ClusterState.fault_records, persisted with its snapshot):

- a worker it declares dead (attention, expert, KV store, frontend) gets one as it is fenced, with the
  cause from the declaration's evidence, and its `replaced_at` once a newer incarnation is ready;
- a component it cannot see itself is reported to it (`RecordFault`): the launcher reports a Redis or a
  controller that exited (and again once its restart serves), an adopting supervisor the one it took
  over from. A report with the same component, pid and detection time updates the record.

The cause is what was observed, never a guess: "killed by signal 9 (SIGKILL)" and "exited with code 3"
(the exit status the launcher's wait saw), "stopped" (SIGSTOP or a debugger: the process exists, it
runs again only if resumed), "process gone", "node lost", "no heartbeat" (silent while it runs, past
the busy grace), "unresponsive to probes", "link closed", or "reported" when nothing more is known.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import asdict, dataclass, fields

from resilient_moe.proto import controller_pb2 as pb

MAX_RECORDS = 100

# The cause a declaration's reason gives, most specific first (the launcher's exit status wins over a
# peer's report of the silence that followed it).
_CAUSES = (
    (re.compile(r"node \S* ?lost", re.I), "node lost"),
    (re.compile(r"killed by signal \d+(?: \(\w+\))?", re.I), None),
    (re.compile(r"exited with code -?\d+", re.I), None),
    (re.compile(r"process stopped", re.I), "stopped"),
    (re.compile(r"process gone", re.I), "process gone"),
    (re.compile(r"probes? (?:unanswered|timed out|timeout)|unanswered probes?|probe-timeout", re.I),
     "unresponsive to probes"),
    (re.compile(r"no heartbeat", re.I), "no heartbeat"),
    (re.compile(r"link(?:-| )closed|broken link", re.I), "link closed"),
)

EXACT = ("killed", "exited", "stopped", "node_lost")  # causes that say what happened, not only that it did


def observed_cause(reason: str) -> str:
    """The cause a declaration's `reason` (its evidence, as words) shows."""
    for pattern, cause in _CAUSES:
        match = pattern.search(reason)
        if match:
            return cause or match.group(0)
    return "reported"


def cause_kind(cause: str) -> str:
    """The metrics label of a cause (a bounded set: the cause without its numbers): "killed by signal 9
    (SIGKILL)" -> "killed"."""
    for prefix, kind in (("killed", "killed"), ("exited", "exited"), ("stopped", "stopped"), ("process gone", "gone"),
                         ("node lost", "node_lost"), ("no heartbeat", "no_heartbeat"),
                         ("unresponsive", "unresponsive"), ("link closed", "link_closed")):
        if cause.startswith(prefix):
            return kind
    return "reported"


@dataclass
class FaultRecord:
    component: str
    role: str
    incarnation: int
    pid: int
    cause: str
    detail: str
    last_seen: float  # unix; 0 when unknown
    detected_at: float  # unix
    replaced_at: float = 0.0  # unix; 0 while no replacement serves

    def key(self) -> tuple[str, int, float]:
        return self.component, self.pid, round(self.detected_at, 3)

    def to_pb(self) -> pb.FaultRecord:
        return pb.FaultRecord(**asdict(self))

    @classmethod
    def from_pb(cls, message: pb.FaultRecord) -> "FaultRecord":
        return cls(**{f.name: getattr(message, f.name) for f in fields(cls)})


class FaultRecords:
    """The last MAX_RECORDS fault records, oldest first (plain data: the controller's lock guards it)."""

    def __init__(self) -> None:
        self.records: deque[FaultRecord] = deque(maxlen=MAX_RECORDS)

    def add(self, record: FaultRecord) -> FaultRecord:
        """A new record, or (same component, pid and detection time) an update of one: a replacement
        time, a better cause. Returns the record kept."""
        for kept in self.records:
            if kept.key() == record.key():
                kept.replaced_at = record.replaced_at or kept.replaced_at
                if record.cause != "reported":
                    kept.cause, kept.detail = record.cause, record.detail or kept.detail
                return kept
        self.records.append(record)
        return record

    def refine(self, component: str, cause: str, detail: str, incarnation: int = 0, pid: int = 0) -> FaultRecord | None:
        """Evidence that came after the declaration: the latest record of that incarnation (or process)
        takes an exact cause (an exit status, a lost node, a stopped process) in place of a vaguer one (a
        peer's report of a closed link, silence, "gone"). Returns the record changed, if any."""
        for record in reversed(self.records):
            if record.component == component and (record.incarnation == incarnation if incarnation else
                                                  record.pid == pid):
                if cause_kind(cause) in EXACT and cause_kind(record.cause) not in EXACT:
                    record.cause, record.detail = cause, f"{record.detail}; then: {detail}"
                    return record
                return None
        return None

    def replaced(self, component: str, incarnation: int, now: float) -> list[FaultRecord]:
        """A newer incarnation of `component` is ready: its earlier faults are replaced now."""
        done = [r for r in self.records
                if r.component == component and not r.replaced_at and r.incarnation < incarnation]
        for record in done:
            record.replaced_at = now
        return done

    def to_pb(self) -> list[pb.FaultRecord]:
        return [r.to_pb() for r in self.records]

    def dump(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    def load(self, rows: list[dict]) -> None:
        names = {f.name for f in fields(FaultRecord)}
        for row in rows:
            if isinstance(row, dict) and names <= set(row):
                self.records.append(FaultRecord(**{n: row[n] for n in names}))


ROLES = ("attention", "expert", "kv_store", "frontend", "controller", "redis", "supervisor", "fork_server")
MAX_TEXT = 1000


def fault_record_problem(message: pb.FaultRecord) -> str | None:
    """What is wrong with a reported record (a RecordFault request), or None: every field is bounded."""
    if not message.component or len(message.component) > 128:
        return f"component must be 1 to 128 characters, got {len(message.component)}"
    if message.role not in ROLES:
        return f"role must be one of {', '.join(ROLES)}, got {message.role[:64]!r}"
    if not message.cause or len(message.cause) > MAX_TEXT or len(message.detail) > MAX_TEXT:
        return f"cause must be 1 to {MAX_TEXT} characters and detail at most {MAX_TEXT}"
    if not message.detected_at > 0 or message.last_seen < 0 or message.replaced_at < 0 or message.pid < 0:
        return "detected_at must be a positive unix time; last_seen, replaced_at and pid not negative"
    if message.replaced_at and message.replaced_at < message.detected_at:
        return "replaced_at is before detected_at"
    return None

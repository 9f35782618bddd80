"""What an attention worker makes of an expert worker's silence or lateness: a pure judgement per peer
per look (`judge`), which the forwarding engine acts on (extend deadlines, suspect, probe).

Before acting on silence or lateness it looks at the peer's process when it runs on this host
(procs.py, `is_busy`): one that is runnable is busy or starved of CPU, not lost, so its deadlines are
extended (doubling) instead of loading the other workers with its parts, up to a grace; one that is
stopped, gone or asleep with a part overdue (so the frame was lost) is acted on at once. So is a part
the worker skipped: it answered a part sent after it (a worker answers a link's parts in order), so
this one was lost or its answer is late. Silence counts from when the peer should have answered (the
expert time of what it owes, as measured), so a worker busy with a big part is not probed, only one
that runs late.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from resilient_moe.datapath.expert_calls import Part
from resilient_moe.datapath.expert_peers import ExpertPeer
from resilient_moe.procs import RUNNABLE, process_state


class Action(enum.Enum):
    NONE = "none"
    EXTEND = "extend"  # parts are late but the peer's process is busy: give them more time
    LATE = "late"  # parts are late and the peer is not busy: suspect it and resend them
    SILENT = "silent"  # probes went unanswered: suspect it
    PROBE = "probe"  # quiet past its expected answer: send a probe


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str = ""
    late: tuple[Part, ...] = ()


NOTHING = Verdict(Action.NONE)


def judge(peer: ExpertPeer, now: float, s_per_row: float, probe_interval_s: float, probe_misses: int,
          busy: Callable[[ExpertPeer, float], bool]) -> Verdict:
    """What to do about `peer` now. `s_per_row`: measured expert time per row; `busy(peer, waited_s)`:
    whether its process is runnable and the grace is not used up."""
    if not peer.outstanding or peer.fenced:
        return NOTHING
    late = tuple(p for p in peer.outstanding.values() if p.deadline < now)
    if late:
        skipped = any(p.seq < peer.newest_answered for p in late)
        if not skipped and busy(peer, now - min(p.sent_at for p in late)):
            return Verdict(Action.EXTEND, late=late)
        worst = max(now - p.deadline for p in late)
        return Verdict(Action.LATE, f"{len(late)} part(s) overdue by up to {1000 * worst:.0f} ms", late)
    if not peer.routable:
        return NOTHING
    oldest = min(part.sent_at for part in peer.outstanding.values())
    quiet = now - max(peer.last_heard, oldest + s_per_row * peer.inflight_rows)
    if quiet < probe_interval_s * (min(peer.probes_sent, probe_misses) + 1):
        return NOTHING
    if peer.probes_sent >= probe_misses:
        if busy(peer, quiet):
            return NOTHING
        return Verdict(Action.SILENT, f"{peer.probes_sent} probes unanswered, silent for {1000 * quiet:.0f} ms")
    return Verdict(Action.PROBE)


def is_busy(peer: ExpertPeer, waited_s: float, now: float, grace_s: float, look_every_s: float) -> bool:
    """Is the peer's process runnable on this host (busy, or starved of CPU) and not yet past the grace?
    Looked up at most once every `look_every_s` (it reads /proc); the answer is cached on the peer."""
    if waited_s > grace_s:
        return False
    if now - peer.busy_checked_at >= look_every_s:
        info = peer.link.peer
        peer.busy_checked_at, peer.busy = now, process_state(info.pid, info.host) == RUNNABLE
    return peer.busy

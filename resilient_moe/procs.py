"""Process liveness on this host, read from /proc (no signal sent, so it works for any process).

Detection uses it as a second path before acting on silence: a peer that misses probes or heartbeats
while its process is runnable is busy or starved of CPU (wait for it), while one that is stopped
(SIGSTOP, a debugger) or gone is not coming back on its own. Only processes on this host can be looked
at; for others the answer is UNKNOWN and callers fall back to their timeouts.
"""

from __future__ import annotations

import os
import threading

GONE = "gone"  # exited, or a zombie not yet reaped
STOPPED = "stopped"  # SIGSTOP or traced: runs again only if someone resumes it
RUNNABLE = "runnable"  # running, or waiting for a CPU, or in uninterruptible I/O
SLEEPING = "sleeping"  # waiting for an event (an idle worker sleeps in epoll)
UNKNOWN = "unknown"  # on another host

_STATES = {"R": RUNNABLE, "D": RUNNABLE, "S": SLEEPING, "I": SLEEPING, "T": STOPPED, "t": STOPPED,
           "Z": GONE, "X": GONE, "x": GONE}


def _code(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def process_state(pid: int, host: str = "127.0.0.1") -> str:
    """GONE, STOPPED, RUNNABLE or SLEEPING for a process on this host; UNKNOWN elsewhere.

    RUNNABLE if any of its threads is (a Python thread waiting for the GIL sleeps while the one
    holding it runs, so the main thread alone would mislead)."""
    if host not in ("127.0.0.1", "localhost", "::1", os.uname().nodename):
        return UNKNOWN
    if pid <= 0:
        return GONE
    leader = _STATES.get(_code(f"/proc/{pid}/stat") or "X", RUNNABLE)
    if leader != SLEEPING:
        return leader
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return GONE
    for tid in threads:
        if _STATES.get(_code(f"/proc/{pid}/task/{tid}/stat") or "S", RUNNABLE) == RUNNABLE:
            return RUNNABLE
    return SLEEPING


def process_alive(pid: int) -> bool:
    """True while `pid` runs on this host; a zombie (exited, not yet reaped) counts as gone."""
    return _STATES.get(_code(f"/proc/{pid}/stat") or "X", RUNNABLE) != GONE if pid > 0 else False


def background_thread() -> None:
    """Run the calling thread at the lowest CPU priority (Linux nice values are per thread), so that
    background work (loading experts, setting up links) never takes a core from serving. Meant for
    threads that end: the priority is not raised again (that would need CAP_SYS_NICE)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        pass

"""Process liveness on this host, read from /proc (no signal sent, so it works for any process).

Detection uses it as a second path before acting on silence: a peer that misses probes or heartbeats
while its process is runnable is busy or starved of CPU (wait for it), while one that is stopped
(SIGSTOP, a debugger) or gone is not coming back on its own. Only processes on this host can be looked
at: a peer counts as local when the address it publishes is one of this host's (loopback, the host
name, or any address the kernel holds as local, which is what a peer on the same Ray node publishes);
for others the answer is UNKNOWN and callers fall back to their timeouts.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import threading
import time

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
    if not is_this_host(host):
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


@functools.lru_cache(maxsize=1)
def _local_addresses() -> frozenset[str]:
    """Every address this host's kernel delivers locally (read once)."""
    found = {"127.0.0.1", "localhost", "::1", os.uname().nodename}
    try:  # IPv4: entries of the local routing table marked "/32 host LOCAL", each under its address
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            previous = ""
            for line in f:
                if "/32 host LOCAL" in line and previous:
                    found.add(previous)
                parts = line.split()
                previous = parts[1] if len(parts) >= 2 and parts[0] in ("|--", "+--") else ""
    except OSError:
        pass
    try:  # IPv6: one address (32 hex digits) per line
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                found.add(str(ipaddress.IPv6Address(int(line.split()[0], 16))))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(found)


def is_this_host(host: str) -> bool:
    """Does `host` (an address or a host name a peer published) name this host?"""
    return host in _local_addresses() or host.strip("[]") in _local_addresses()


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


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def own_usage() -> dict[str, float]:
    """This process's CPU time (seconds, every thread, since it started), resident memory (bytes) and
    dumpable flag (0: hardened, `harden_process`): what every role's heartbeat reports, so the dashboard and /metrics show them on any backend."""
    usage = {"cpu_s": time.process_time(), "dumpable": float(dumpable())}
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            usage["rss_bytes"] = float(int(f.read().split()[1]) * _PAGE_BYTES)
    except (OSError, IndexError, ValueError):
        pass
    return usage


PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


@functools.cache
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def harden_process() -> None:
    """What every role process (and the fork server) calls first: make it non-dumpable, so that another
    process of the same user, not root, can no longer open its /proc/PID/mem, /proc/PID/environ or
    /proc/PID/fd/* (which would give it the cluster secret, or the KV store's memfd), nor ptrace it
    (py-spy and gdb need root then). Its /proc/PID/stat and /proc/PID/task stay readable, which is all
    liveness (process_state) reads. Linux only; elsewhere nothing. The flag survives fork and is reset
    by execve, so an exec'd process calls this again."""
    if not os.uname().sysname == "Linux":
        return
    import ctypes

    if _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def dumpable() -> int:
    """This process's dumpable flag (0: hardened), reported in every heartbeat; -1 where unknown."""
    if not os.uname().sysname == "Linux":
        return -1
    return int(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))

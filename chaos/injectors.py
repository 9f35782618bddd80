"""Carrying out faults: signals to worker processes, a CPU hog beside a worker, datapath faults.

Process faults signal pids that the admin API reported (targets.local_pid refuses anything else).
Datapath faults go through `POST /admin/faults` with a duration, so the server lifts them on time even
if this tool dies. Whatever else a fault leaves in place (a stopped process, hog processes, pinned
CPU affinity) is undone by `Injector.cleanup`, which the runner calls however the run ends.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from chaos.scenario import FaultSpec
from chaos.targets import (AdminClient, ClusterView, TargetError, Worker, describe_link_fault, local_pid, node_members,
                           pick_link, pick_worker)
from resilient_moe.errors import ResilientMoeError

RESPAWN_TIMEOUT_S = 120.0  # crash-loop: longest wait for a replacement before giving up
_HOG = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


@dataclass
class Injection:
    """What one fault did: when, to what, and what went wrong if it could not be carried out."""

    index: int
    spec: FaultSpec
    planned: float  # unix time it was due
    started: float = 0.0  # unix time it took effect (0: never)
    ended: float = 0.0  # unix time its effect was lifted (kill/terminate: = started; crash-loop: last kill)
    targets: list[str] = field(default_factory=list)  # worker ids, or links "aw-0->*"
    killed: list[tuple[float, str, int]] = field(default_factory=list)  # (time, worker, pid) per kill/terminate
    error: str | None = None

    def to_dict(self) -> dict:
        return {"index": self.index, "fault": self.spec.fault, "target": self.spec.target, "where": self.spec.where,
                "describe": self.spec.describe(), "planned": self.planned, "started": self.started,
                "ended": self.ended, "targets": self.targets,
                "killed": [{"time": t, "worker": w, "pid": p} for t, w, p in self.killed], "error": self.error}


def die_with_parent() -> None:
    """In a child before exec: the kernel kills it when the tool exits, however the tool exits."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class Injector:
    """Injects faults into one cluster; safe to call from several threads (one per fault)."""

    def __init__(self, admin: AdminClient, rng: random.Random, stop: threading.Event, run_id: str,
                 log: Callable[[str], None] = lambda line: None,
                 restart_supervisor: Callable[[], None] | None = None) -> None:
        """`restart_supervisor`: runs the same serve command again (the tool started the server), so a
        supervisor-kill is followed by an adoption."""
        self.admin = admin
        self.restart_supervisor = restart_supervisor
        self.rng = rng
        self.stop = stop
        self.run_id = run_id
        self.log = log
        self._lock = threading.Lock()
        self._stopped: set[int] = set()  # pids we sent SIGSTOP and no SIGCONT yet
        self._hogs: set[subprocess.Popen] = set()
        self._pinned: dict[int, set[int]] = {}  # thread id -> its affinity before we pinned it
        self._link_faults: set[str] = set()

    def view(self) -> ClusterView:
        return self.admin.cluster()

    def live_worker(self, spec: FaultSpec) -> Worker:
        """The worker a process fault hits; a named one that is being replaced is waited for."""
        deadline = time.monotonic() + RESPAWN_TIMEOUT_S
        while True:
            worker = pick_worker(spec.target, self.view(), self.rng, spec.where)
            if worker.live:
                return worker
            if time.monotonic() > deadline:
                raise TargetError(f"{spec.where}: {worker.id} was not serving within {RESPAWN_TIMEOUT_S:.0f}s")
            if self.stop.wait(0.05):
                raise TargetError(f"{spec.where}: the run ended while waiting for {worker.id} to serve again")

    def inject(self, injection: Injection) -> None:
        """Carry out one fault, blocking for its duration; errors are recorded on the injection."""
        spec = injection.spec
        try:
            if spec.is_link_fault:
                self._link(injection)
            elif spec.fault == "supervisor-kill":
                self._supervisor_kill(injection)
            elif spec.fault in ("kill", "terminate", "frontend-kill"):
                sig = signal.SIGTERM if spec.fault == "terminate" else signal.SIGKILL
                self._signal(injection, self.live_worker(spec), sig)
                injection.ended = injection.started
            elif spec.fault == "hang":
                self._hang(injection)
            elif spec.fault == "crash-loop":
                self._crash_loop(injection)
            elif spec.fault == "node-kill":
                self._node_kill(injection)
                injection.ended = injection.started
            elif spec.fault == "slow":
                self._slow(injection)
        except ResilientMoeError as e:
            injection.error = str(e)
        except Exception as e:  # a fault thread must never die silently: its failure is part of the report
            injection.error = f"{type(e).__name__}: {e}"
        if injection.error:
            self.log(f"  ! {spec.where}: {spec.describe()} failed: {injection.error}")
        if not injection.ended and injection.started:
            injection.ended = time.time()

    # ---- process faults ----------------------------------------------------------------------

    def _signal(self, injection: Injection, worker, sig: int) -> None:
        pid = local_pid(worker)
        now = time.time()
        os.kill(pid, sig)
        if not injection.started:
            injection.started = now
        if worker.id not in injection.targets:
            injection.targets.append(worker.id)
        injection.killed.append((now, worker.id, pid))
        self.log(f"  {signal.Signals(sig).name} {worker.id} (pid {pid})")

    def _supervisor_kill(self, injection: Injection) -> None:
        """SIGKILL the supervisor; the cluster serves on. With a restart (the tool started the server),
        the same serve command runs again after `restart_after_s` and adopts the cluster."""
        supervisor = self.live_worker(injection.spec)
        self._signal(injection, supervisor, signal.SIGKILL)
        injection.ended = injection.started
        if self.restart_supervisor is not None and not self.stop.wait(injection.spec.restart_after_s):
            self.restart_supervisor()
            self.log("  the same serve command again: it adopts the cluster")

    def _node_kill(self, injection: Injection) -> None:
        """Take one node down at once, as a lost node or a power cut would: through the server's
        launcher (POST /admin/node-kill), whose backend knows how on its kind of cluster (under Ray it
        kills the node's raylet), so the node may be any host."""
        node, members = node_members(self.view(), injection.spec.target, injection.spec.where)
        now = time.time()
        self.admin.kill_node(node)
        injection.started = injection.started or now
        for worker in members:
            injection.targets.append(worker.id)
            injection.killed.append((now, worker.id, worker.pid))
        self.log(f"  node-kill {node[:12]}: {', '.join(f'{w.id} (pid {w.pid})' for w in members)}")

    def _hang(self, injection: Injection) -> None:
        spec = injection.spec
        worker = self.live_worker(spec)
        pid = local_pid(worker)
        with self._lock:
            injection.started = time.time()
            os.kill(pid, signal.SIGSTOP)
            self._stopped.add(pid)
        injection.targets.append(worker.id)
        self.log(f"  SIGSTOP {worker.id} (pid {pid}) for {spec.duration_s:g}s")
        try:
            self.stop.wait(spec.duration_s)
        finally:
            self._cont(pid)
            injection.ended = time.time()
            self.log(f"  SIGCONT {worker.id} (pid {pid})")

    def _cont(self, pid: int) -> None:
        with self._lock:
            if pid in self._stopped:
                self._stopped.discard(pid)
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    def _crash_loop(self, injection: Injection) -> None:
        spec = injection.spec
        worker = self.live_worker(spec)
        for i in range(spec.count):
            if i:
                last_time, name, last_pid = injection.killed[-1]
                worker = self._wait_replacement(name, last_pid, last_time + spec.interval_s)
                if worker is None:
                    return
            self._signal(injection, worker, signal.SIGKILL)
        injection.ended = injection.killed[-1][0]

    def _wait_replacement(self, name: str, old_pid: int, not_before: float):
        deadline = time.monotonic() + RESPAWN_TIMEOUT_S
        while not self.stop.is_set():
            worker = self.view().worker(name)
            if worker is not None and worker.state == "READY" and worker.pid != old_pid and time.time() >= not_before:
                return worker
            if time.monotonic() > deadline:
                raise ResilientMoeError(f"no replacement of {name} became ready within {RESPAWN_TIMEOUT_S:.0f}s")
            self.stop.wait(0.05)
        return None

    def _slow(self, injection: Injection) -> None:
        """Pin the worker's threads to one core and run busy processes on that core beside it."""
        spec = injection.spec
        worker = self.live_worker(spec)
        pid = local_pid(worker)
        cpu = max(os.sched_getaffinity(pid))
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        hogs = []
        try:
            with self._lock:
                for tid in threads:
                    try:
                        self._pinned.setdefault(tid, os.sched_getaffinity(tid))
                        os.sched_setaffinity(tid, {cpu})
                    except ProcessLookupError:
                        pass
                for _ in range(spec.hogs):
                    hog = subprocess.Popen([sys.executable, "-c", _HOG, str(cpu)], preexec_fn=die_with_parent,
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
                    self._hogs.add(hog)
                    hogs.append(hog)
            injection.started = time.time()
            injection.targets.append(worker.id)
            self.log(f"  slow {worker.id} (pid {pid}): {spec.hogs} busy process(es) on cpu {cpu} for {spec.duration_s:g}s")
            self.stop.wait(spec.duration_s)
        finally:
            self._end_hogs(hogs)
            self._unpin(threads)
            injection.ended = time.time()

    def _end_hogs(self, hogs: list[subprocess.Popen]) -> None:
        with self._lock:
            for hog in hogs:
                if hog in self._hogs:
                    self._hogs.discard(hog)
                    hog.kill()
                    hog.wait()

    def _unpin(self, threads: list[int]) -> None:
        with self._lock:
            for tid in threads:
                original = self._pinned.pop(tid, None)
                if original is not None:
                    try:
                        os.sched_setaffinity(tid, original)
                    except OSError:
                        pass  # the thread (or the process) is gone

    # ---- datapath faults ---------------------------------------------------------------------

    def _link(self, injection: Injection) -> None:
        spec = injection.spec
        link = pick_link(spec.target, self.view(), self.rng, spec.where)
        fault_id = f"chaos-{self.run_id}-{injection.index}"
        with self._lock:
            self._link_faults.add(fault_id)
        self.admin.set_faults(add=[describe_link_fault(spec, link, fault_id)])
        injection.started = time.time()
        injection.targets.append(link)
        self.log(f"  {spec.describe().replace(spec.target, link)}")
        try:
            self.stop.wait(spec.duration_s)
        finally:
            injection.ended = time.time()
            try:
                self.admin.set_faults(remove=[fault_id])  # it expires by itself too; this is belt and braces
            finally:
                with self._lock:
                    self._link_faults.discard(fault_id)

    # ---- undo everything ---------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Resume stopped processes, end hogs, restore affinity, lift datapath faults; returns problems."""
        problems = []
        for pid in list(self._stopped):
            self._cont(pid)
        self._end_hogs(list(self._hogs))
        self._unpin(list(self._pinned))
        if self._link_faults:
            try:
                self.admin.set_faults(remove=sorted(self._link_faults))
                self._link_faults.clear()
            except ResilientMoeError as e:
                problems.append(f"could not lift datapath faults {sorted(self._link_faults)}: {e}")
        return problems

"""One scenario run against a live server: load and faults on a timeline, a failure-free replay, the report.

    1. wait until every worker is ready; resolve `every:` targets and check every target exists
    2. drive the workload; a scheduler thread starts each fault on time (a thread per fault, so they
       may overlap); a monitor polls GET /admin/cluster for events and recovery
    3. undo whatever faults left behind, wait for the cluster to heal
    4. replay every completed request failure-free and compare token ids
    5. report.json, report.md, timeline.png in the output directory
"""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable

from chaos import report as reports
from chaos.injectors import RESPAWN_TIMEOUT_S, Injection, Injector
from chaos.scenario import Scenario
from chaos.targets import AdminClient, AdminError, ClusterView, Event, check_targets, expand_every
from chaos.workload import RequestResult, drive, replay, replay_concurrency
from resilient_moe.errors import ResilientMoeError

MONITOR_INTERVAL_S = 0.1


class RunError(ResilientMoeError):
    """The run could not be carried out (server unreachable, cluster never healthy)."""


class Monitor:
    """Polls GET /admin/cluster on a thread: snapshots (None while it fails) and every event seen."""

    def __init__(self, url: str, token: str | None, interval_s: float = MONITOR_INTERVAL_S) -> None:
        self.admin = AdminClient(url, token, timeout_s=2.0)
        self.interval_s = interval_s
        self.snapshots: list[tuple[float, ClusterView | None]] = []
        self._events: dict[tuple, Event] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-monitor", daemon=True)

    def start(self) -> "Monitor":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                view = self.admin.cluster()
                for e in view.events:
                    self._events[(e.time, e.kind, e.worker, e.detail)] = e
                self.snapshots.append((view.time, view))
            except AdminError:
                self.snapshots.append((time.time(), None))
            self._stop.wait(self.interval_s)

    @property
    def events(self) -> list[Event]:
        return sorted(self._events.values(), key=lambda e: e.time)

    def latest(self) -> ClusterView | None:
        return next((v for _, v in reversed(self.snapshots) if v is not None), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.admin.close()


def wait_ready(admin: AdminClient, timeout_s: float, baseline: ClusterView | None = None) -> ClusterView:
    """The cluster once every attention and expert worker is READY with no datapath fault in force
    (and, given a baseline, healthy against it)."""
    deadline = time.monotonic() + timeout_s
    problem = "no answer yet"
    while True:
        try:
            view = admin.cluster()
            workers = view.of_roles(("attention", "expert"), live_only=False)
            waiting = [f"{w.id} is {w.state.lower()}" for w in workers if w.state != "READY"]
            if baseline is not None and not reports.healthy(view, baseline):
                waiting.append("the starting roster is not all ready, or redundancy is not restored")
            if view.faults:
                waiting.append(f"datapath faults in force: {', '.join(view.faults)}")
            if workers and not waiting:
                return view
            problem = "; ".join(waiting) or "no attention or expert worker reported"
        except AdminError as e:
            problem = str(e)
        if time.monotonic() > deadline:
            raise RunError(f"the cluster was not healthy within {timeout_s:g}s: {problem}")
        time.sleep(0.1)


def run(scenario: Scenario, url: str, token: str | None, out: Path,
        log: Callable[[str], None] = print, restart_supervisor: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run `scenario` against the server at `url`; writes the report to `out` and returns it.
    `restart_supervisor`: how to run the server's serve command again (a supervisor-kill adopts)."""
    admin = AdminClient(url, token)
    try:
        return _run(scenario, url, token, admin, out, log, restart_supervisor)
    finally:
        admin.close()


def _run(scenario: Scenario, url: str, token: str | None, admin: AdminClient, out: Path,
         log: Callable[[str], None], restart_supervisor: Callable[[], None] | None = None) -> dict[str, Any]:
    # Step 1: a healthy cluster, and targets that exist in it.
    baseline = wait_ready(admin, scenario.settle_timeout_s)
    faults = expand_every(list(scenario.faults), baseline)
    check_targets(faults, baseline)
    workload = scenario.workload
    mode = f"concurrency {workload.concurrency}" if workload.concurrency else f"{workload.rate:g} requests/s"
    log(f"scenario {scenario.name}: {len(faults)} fault(s) over {workload.duration_s:g}s of load ({mode}) "
        f"against {url}")

    # Step 2: load and faults.
    run_id = secrets.token_hex(3)
    stop = threading.Event()
    monitor = Monitor(url, token).start()
    try:
        t0 = time.time()
        clock = lambda line: log(f"[{time.time() - t0:7.2f}s] {line.strip()}")  # noqa: E731
        injections = [Injection(i, spec, planned=t0 + spec.at_s) for i, spec in enumerate(faults)]
        results = _load_and_faults(scenario, url, token, injections, run_id, stop, t0, clock, log, restart_supervisor)

        # Step 3: let the cluster heal (the monitor keeps watching: recovery times come from it).
        try:
            wait_ready(admin, scenario.settle_timeout_s, baseline)
            clock("cluster healthy again")
        except RunError as e:
            clock(f"warning: {e}; the replay may fail")
    finally:
        monitor.stop()

    # Step 4: the failure-free replay.
    completed = [r.spec for r in results if r.ok]
    concurrency = replay_concurrency(workload, results)
    log(f"replaying {len(completed)} completed requests failure-free (concurrency {concurrency})")
    reference = asyncio.run(replay(url, completed, concurrency, workload.request_timeout_s))

    # Step 5: the report.
    report = reports.analyse(scenario, injections, results, reference, monitor.snapshots, monitor.events,
                             baseline, t0)
    reports.write(report, results, reference, out)
    return report


def _load_and_faults(scenario: Scenario, url: str, token: str | None, injections: list[Injection], run_id: str,
                     stop: threading.Event, t0: float, clock: Callable[[str], None],
                     log: Callable[[str], None], restart_supervisor=None) -> list[RequestResult]:
    """Drive the workload while a scheduler starts each fault on time; undo what faults left behind."""
    workload = scenario.workload
    fault_admin = AdminClient(url, token)
    injector = Injector(fault_admin, random.Random(workload.seed), stop, run_id, log=clock,
                        restart_supervisor=restart_supervisor)
    threads: list[threading.Thread] = []

    def schedule() -> None:
        for inj in injections:
            if stop.wait(max(0.0, inj.planned - time.time())):
                return
            clock(f"{inj.spec.where}: {inj.spec.describe()}")
            thread = threading.Thread(target=injector.inject, args=(inj,), name=f"fault-{inj.index}", daemon=True)
            thread.start()
            threads.append(thread)

    def on_done(result: RequestResult) -> None:
        if result.error:
            clock(f"request {result.spec.index} lost: {result.error}")

    scheduler = threading.Thread(target=schedule, name="chaos-scheduler", daemon=True)
    try:
        scheduler.start()
        results = asyncio.run(drive(url, workload, t0 + workload.duration_s, on_done))
        clock(f"load finished: {len(results)} requests, {sum(1 for r in results if not r.ok)} lost")
        scheduler.join()
        longest = max((i.spec.duration_s + (RESPAWN_TIMEOUT_S if i.spec.fault == "crash-loop" else 0)
                       for i in injections), default=0.0)
        deadline = time.monotonic() + longest + 30
        for thread in threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        return results
    finally:
        stop.set()  # faults still running end now (a hang is resumed, a partition lifted)
        scheduler.join(5)
        for thread in threads:
            thread.join(10)
        for problem in injector.cleanup():
            log(f"warning: {problem}")
        fault_admin.close()

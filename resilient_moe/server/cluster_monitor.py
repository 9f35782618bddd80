"""What the API knows about the cluster: the controller's latest snapshot plus the launcher's processes.

`ClusterMonitor` polls the controller on a thread of its own (heartbeat loads only reach us through
GetState) and feeds the metrics; `/ready`, `/admin/cluster` and the dashboard read its snapshot. It
also takes the snapshots the controller pushes on every change, so a death is seen as it is declared.
`cluster_json` and `readiness` are pure functions of that snapshot, tested without processes.

/admin/cluster is a contract (the chaos tool finds its targets through it):

    {"workers": [{"id", "role", "pid", "host", "node", "incarnation", "state", "experts", "shadows", "load",
                  "started_at", "retiring"}],
     "ert": {"epoch", "entries": [{"layer", "expert", "workers": [primary, shadow...]}]},
     "events": [{"time", "kind", "worker", "detail"}],
     "unprotected": [[layer, expert], ...],
     "unprotected_by_node": {node: [[layer, expert], ...]}}

`role` is one of attention, expert, controller, kv_store, redis, frontend; `state` is the controller's
WorkerState (controller/state.py): starting, loading, ready, suspect, draining, fenced or gone (a
process the controller does not track: ready while it runs, else gone); `experts` are the (layer,
expert) pairs a worker serves as first choice in the routing table,
`shadows` the other copies it holds; `node` is its failure domain (the Ray node id in hex under the Ray
launcher, the hostname under the local one); `unprotected_by_node` says, for every node holding a copy of
some expert, which (layer, expert) pairs its loss would leave with no live copy; `started_at` is the unix time the incarnation registered (or the
process started, for one the controller does not track; 0 when unknown).

`workers` is the live cluster: a worker removed from the roster on purpose (a scale-down) is listed,
with `retiring` true, only while it drains; once it has left it is retired (controller/view.py
`retired`) and only the events tell of it. A worker that died while on the roster stays listed,
fenced, until its replacement registers. Ready counts are out of the workers that are not retiring.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Mapping, Protocol

from resilient_moe.controller.client import ControllerClient
from resilient_moe.controller.view import desired_roster, retired, retiring, unprotected_by_node
from resilient_moe.procs import process_alive
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.metrics import ROLE_NAMES, STATE_NAMES

log = logging.getLogger("resilient_moe.server")


class ClusterSource(Protocol):
    """Where the API reads the cluster from; a `Launcher` is one."""

    pids: Mapping[str, int]  # launcher-started processes by name ("controller", "aw-0", "redis", ...)

    def state(self) -> pb.ClusterState:
        """The controller's current view (raises when it is unreachable)."""


def process_started_at(pid: int) -> float:
    """Unix time `pid` started on this host (0.0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def role_of(name: str) -> str:
    """The role of a launcher process that the controller does not track, from its name."""
    if name == "controller":
        return "controller"
    prefix = name.split("-", 1)[0]
    return {"aw": "attention", "ew": "expert"}.get(prefix, name.replace("-", "_"))


def _pairs(refs) -> list[list[int]]:
    return sorted([r.layer, r.expert] for r in refs)


def cluster_json(
    state: pb.ClusterState | None,
    pids: Mapping[str, int],
    frontend: dict[str, Any] | None = None,
    alive: Callable[[int], bool] = process_alive,
    nodes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The /admin/cluster document (see the module docstring) from a snapshot and the launcher's pids.

    `state` None means the controller is unreachable: the launcher's processes are still listed.
    `frontend` is this API process's own entry (id, pid, host, load). `nodes`: the node of each launcher
    process (default: this host's name, where the local launcher runs them all)."""
    here = os.uname().nodename
    nodes = nodes or {}
    workers: list[dict[str, Any]] = []
    primaries: dict[str, list[list[int]]] = {}
    entries: list[dict[str, Any]] = []
    if state is not None:
        num_experts = max(1, state.ert.num_experts)
        for i, candidates in enumerate(state.ert.entries):
            if not candidates.workers:
                continue  # a dense layer
            layer, expert = divmod(i, num_experts)
            entries.append({"layer": layer, "expert": expert, "workers": list(candidates.workers)})
            primaries.setdefault(candidates.workers[0], []).append([layer, expert])
        desired = desired_roster(state)
        for w in state.workers:
            if retired(w, desired):
                continue  # scaled away: its story stays in the events
            held = _pairs(w.experts)
            first = sorted(primaries.get(w.name, [])) if w.state in (pb.READY, pb.SUSPECT) else []
            first_set = {tuple(p) for p in first}
            workers.append({
                "id": w.name, "role": ROLE_NAMES.get(w.role, "unknown"), "pid": w.pid, "host": w.host,
                "node": w.node or nodes.get(w.name, here), "incarnation": w.incarnation, "state": STATE_NAMES.get(w.state, "unknown"),
                "experts": first, "shadows": [p for p in held if tuple(p) not in first_set],
                "load": dict(w.load), "started_at": w.started_at, "retiring": retiring(w, desired),
            })
    tracked = {w["id"] for w in workers} | ({w.name for w in state.workers} if state is not None else set())
    for name, pid in sorted(pids.items()):
        if name in tracked:
            continue
        running = alive(pid)
        if name == "controller" and state is None:
            running = False  # alive or not, it does not answer
        workers.append({"id": name, "role": role_of(name), "pid": pid, "host": "127.0.0.1",
                        "node": nodes.get(name, here), "incarnation": 0,
                        "state": "ready" if running else "gone", "experts": [], "shadows": [], "load": {},
                        "started_at": process_started_at(pid) if running else 0.0, "retiring": False})
    if frontend is not None and not any(w["id"] == frontend["id"] for w in workers):  # a frontend role registers
        pid = frontend.get("pid", os.getpid())
        workers.append({"id": frontend["id"], "role": "frontend", "pid": pid,
                        "host": frontend.get("host", "127.0.0.1"), "node": frontend.get("node", here),
                        "incarnation": 0, "state": "ready",
                        "experts": [], "shadows": [], "load": dict(frontend.get("load", {})),
                        "started_at": process_started_at(pid), "retiring": False})
    events = [] if state is None else [
        {"time": e.time, "kind": e.kind, "worker": e.worker, "detail": e.detail} for e in state.events
    ]
    return {
        "workers": workers,
        "ert": {"epoch": 0 if state is None else state.ert.epoch, "entries": entries},
        "events": events,
        "unprotected": [] if state is None else _pairs(state.unprotected),
        "unprotected_by_node": {} if state is None else {
            node: [list(key) for key in keys] for node, keys in unprotected_by_node(state).items()},
    }



def readiness(state: pb.ClusterState | None, pids: Mapping[str, int],
              alive: Callable[[int], bool] = process_alive) -> list[str]:
    """Why the cluster is not ready to serve; empty when every worker is up.

    Every launcher process must run, and every attention and expert worker of the desired roster must
    be READY in its current incarnation (workers being removed by a scale-down do not count); with no
    launcher (`pids` empty), every other worker the controller tracks too."""
    if state is None:
        return ["the controller is unreachable"]
    problems = []
    tracked = {w.name: w for w in state.workers}
    roster = {f"aw-{i}" for i in range(state.desired.attention_workers)} | \
        {f"ew-{i}" for i in range(state.desired.expert_workers)}
    others = [n for n in pids if not n.startswith(("aw-", "ew-"))] if pids else \
        [w.name for w in state.workers if w.role not in (pb.ATTENTION, pb.EXPERT)]
    names = sorted(set(others) | roster)
    for name in names:
        worker = tracked.get(name)
        if worker is not None:
            if worker.state != pb.READY:
                problems.append(f"{name} is {STATE_NAMES.get(worker.state, 'unknown')}")
            elif name in pids and worker.pid != pids[name]:
                problems.append(f"{name} is being replaced")
        elif name == "controller":
            continue  # it answered: that is the snapshot
        elif name.startswith(("aw-", "ew-")):
            problems.append(f"{name} has not registered yet")
        elif not alive(pids[name]):
            problems.append(f"{name} (pid {pids[name]}) is not running")
    if not any(w.role == pb.ATTENTION and w.state == pb.READY for w in state.workers):
        problems.append("no attention worker is ready")
    return problems


class ClusterMonitor:
    """Polls the controller every `interval_s`, keeps the latest snapshot, and calls `on_update` with it
    (None while the controller does not answer); with `on_pushed`, also calls it with each snapshot
    the controller pushes on a change (when the source has a `controller_address`)."""

    def __init__(self, source: ClusterSource, on_update: Callable[[pb.ClusterState | None], None],
                 interval_s: float = 0.5, on_pushed: Callable[[pb.ClusterState], None] | None = None) -> None:
        self.source = source
        self.on_update = on_update
        self.on_pushed = on_pushed
        self.interval_s = interval_s
        self._watch: ControllerClient | None = None
        self.state: pb.ClusterState | None = None
        self.fetched_at = 0.0  # time.monotonic() of the last answer
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-monitor", daemon=True)

    def start(self) -> "ClusterMonitor":
        self.poll()
        self._thread.start()
        address = getattr(self.source, "controller_address", None)
        if self.on_pushed is not None and address:
            self._watch = ControllerClient(address)
            self._watch.start_watch("api-monitor", self.on_pushed)
        return self

    def poll(self) -> pb.ClusterState | None:
        """Ask the controller now; returns the fresh state (None when it did not answer)."""
        try:
            state = self.source.state()
        except Exception as e:  # unreachable, restarting: keep serving from the last snapshot
            self.error = str(e).splitlines()[0] if str(e) else type(e).__name__
            state = None
        else:
            self.state, self.fetched_at, self.error = state, time.monotonic(), ""
        try:
            self.on_update(state)
        except Exception:
            log.exception("cluster update handler failed")
        return state

    @property
    def reachable(self) -> bool:
        return not self.error and time.monotonic() - self.fetched_at < max(5.0, 4 * self.interval_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.close()
        if self._thread.is_alive():
            self._thread.join(5)

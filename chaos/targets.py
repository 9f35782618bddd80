"""The server's admin API as the chaos tool sees it, and how a fault's target names workers.

Every target is found through `GET /admin/cluster` of the running server (nothing is hard-coded):
workers by id (`aw-0`), services by role (`controller`, `kv-store`, `redis`), and selectors
(`random:ew`, `every:aw`). Process faults signal the pids that endpoint reports, so the tool must run
on the same host as the workers it signals; it refuses pids on other hosts.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass, field
from typing import Any

from chaos.scenario import LINK_FAULTS, SELECTOR_ROLES, SERVICES, FaultSpec
from resilient_moe.errors import ResilientMoeError

SERVICE_ROLES = {"controller": "controller", "kv-store": "kv_store", "redis": "redis", "supervisor": "supervisor"}
LIVE = ("READY", "SUSPECT")


class AdminError(ResilientMoeError):
    """The admin API could not be reached or refused the call; the message says which and why."""


class TargetError(ResilientMoeError):
    """A fault's target names nothing in the cluster (or nothing live right now)."""


@dataclass(frozen=True)
class Worker:
    id: str
    role: str  # attention, expert, controller, kv_store, redis, frontend
    pid: int
    host: str
    incarnation: int
    state: str  # the WorkerState, upper case: STARTING, LOADING, READY, SUSPECT, DRAINING, FENCED, GONE
    node: str = ""  # its failure domain (Ray node id, or the hostname)

    @property
    def live(self) -> bool:
        return self.state in LIVE


@dataclass(frozen=True)
class Event:
    time: float  # unix time
    kind: str
    worker: str
    detail: str


@dataclass(frozen=True)
class ClusterView:
    """One answer of GET /admin/cluster, reduced to what the tool uses."""

    time: float  # unix time of the answer
    workers: tuple[Worker, ...]
    epoch: int
    unprotected: int
    faults: tuple[str, ...]  # ids of the injected datapath faults in force
    events: tuple[Event, ...] = field(default=(), repr=False)

    @classmethod
    def from_json(cls, data: Any, now: float) -> "ClusterView":
        try:
            workers = tuple(
                Worker(str(w["id"]), str(w["role"]), int(w.get("pid") or 0), str(w.get("host") or ""),
                       int(w.get("incarnation") or 0), str(w.get("state") or "").upper(), str(w.get("node") or ""))
                for w in data["workers"]
            )
            events = tuple(Event(float(e["time"]), str(e["kind"]), str(e.get("worker") or ""), str(e.get("detail") or ""))
                           for e in data.get("events") or [])
            ert = data.get("ert") or {}
            faults = tuple(str(f.get("id")) for f in data.get("faults") or [] if isinstance(f, dict))
            return cls(now, workers, int(ert.get("epoch") or 0), len(data.get("unprotected") or []), faults, events)
        except (KeyError, TypeError, ValueError) as e:
            raise AdminError(f"GET /admin/cluster answered an unexpected shape ({type(e).__name__}: {e})") from None

    def worker(self, worker_id: str) -> Worker | None:
        return next((w for w in self.workers if w.id == worker_id), None)

    def of_roles(self, roles: tuple[str, ...], live_only: bool = True) -> list[Worker]:
        return sorted((w for w in self.workers if w.role in roles and (w.live or not live_only)), key=lambda w: w.id)


class AdminClient:
    """`GET /admin/cluster` and `POST /admin/faults` of one server, with its admin bearer token."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 5.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise AdminError(f"{method} {self.url}{path}: {type(e).__name__}: {e}") from None
        if response.status_code in (401, 403):
            raise AdminError(f"{method} {self.url}{path}: the admin token was rejected (HTTP {response.status_code}); "
                             "pass --token or set RESILIENT_MOE_ADMIN_TOKEN")
        if response.status_code != 200:
            raise AdminError(f"{method} {self.url}{path}: HTTP {response.status_code}: {_error_message(response)}")
        try:
            return response.json()
        except ValueError:
            raise AdminError(f"{method} {self.url}{path}: the answer is not JSON") from None

    def cluster(self) -> ClusterView:
        import time

        data = self._call("GET", "/admin/cluster")
        return ClusterView.from_json(data, time.time())

    def faults(self) -> list[dict]:
        """The injected datapath faults in force (GET /admin/faults)."""
        return list(self._call("GET", "/admin/faults").get("faults") or [])

    def set_faults(self, add: list[dict] = (), remove: list[str] = (), clear: bool = False) -> list[dict]:
        """Datapath faults in force after the change (see resilient_moe/server/admin_faults.py)."""
        data = self._call("POST", "/admin/faults", {"add": list(add), "remove": list(remove), "clear": clear})
        return list(data.get("faults") or [])

    def kill_node(self, node: str) -> dict:
        """Take a node down through the server's launcher (POST /admin/node-kill): its backend's way,
        which under Ray kills the node's raylet, so it works whatever host the node is."""
        return self._call("POST", "/admin/node-kill", {"node": node})

    def close(self) -> None:
        self._http.close()


def _error_message(response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message"))
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])
    except ValueError:
        pass
    return response.text[:200]


# ---- resolving targets ------------------------------------------------------------------------


def expand_every(faults: list[FaultSpec], view: ClusterView) -> list[FaultSpec]:
    """Replace each `every:` fault by one fault per matching live worker, `interval_s` apart."""
    from dataclasses import replace

    out = []
    for f in faults:
        if not f.target.startswith("every:"):
            out.append(f)
            continue
        roles = SELECTOR_ROLES[f.target.split(":", 1)[1]]
        workers = view.of_roles(roles)
        if not workers:
            raise TargetError(f"{f.where}.target: {f.target} matches no live worker")
        for i, w in enumerate(workers):
            out.append(replace(f, target=w.id, at_s=f.at_s + i * f.interval_s, where=f"{f.where} ({w.id})"))
    return sorted(out, key=lambda f: f.at_s)


def check_targets(faults: list[FaultSpec], view: ClusterView) -> None:
    """Fail before the run when a fault names a worker or service the cluster does not have."""
    for f in faults:
        if f.target.startswith("random:"):
            roles = SELECTOR_ROLES[f.target.split(":", 1)[1]]
            if not view.of_roles(roles, live_only=False):
                raise TargetError(f"{f.where}.target: the cluster has no {' or '.join(roles)} worker")
            continue
        if f.is_link_fault:
            for name, role in zip(_link_ends(f.target, view), ("attention", "expert")):
                if name:
                    _need(view, name, f.where, role)
            continue
        if f.fault == "node-kill":
            node_members(view, f.target, f.where)
        elif f.target in SERVICES:
            _service(view, f.target, f.where)
        else:
            _need(view, f.target, f.where)


def pick_worker(target: str, view: ClusterView, rng: random.Random, where: str = "target") -> Worker:
    """The worker a process fault hits now."""
    if target.startswith("random:"):
        roles = SELECTOR_ROLES[target.split(":", 1)[1]]
        live = view.of_roles(roles)
        if not live:
            raise TargetError(f"{where}: no live {' or '.join(roles)} worker to pick for {target}")
        return rng.choice(live)
    if target in SERVICES:
        return _service(view, target, where)
    return _need(view, target, where)


def pick_link(target: str, view: ClusterView, rng: random.Random, where: str = "target") -> str:
    """The links a datapath fault covers now, as "source->target" with "*" for any."""
    if target.startswith("random:"):
        worker = pick_worker(target, view, rng, where)
        return f"{worker.id}->*" if worker.role == "attention" else f"*->{worker.id}"
    source, dest = _link_ends(target, view)
    for name in (source, dest):
        if name:
            _need(view, name, where)
    return f"{source or '*'}->{dest or '*'}"


def _link_ends(target: str, view: ClusterView) -> tuple[str, str]:
    if "->" in target:
        source, dest = target.split("->", 1)
        return ("" if source == "*" else source), ("" if dest == "*" else dest)
    worker = view.worker(target)
    if worker is not None and worker.role == "attention":
        return target, ""
    return "", target


def _need(view: ClusterView, worker_id: str, where: str, role: str | None = None) -> Worker:
    worker = view.worker(worker_id)
    if worker is None:
        names = ", ".join(w.id for w in view.workers) or "none"
        raise TargetError(f"{where}: no worker {worker_id!r} in the cluster (workers: {names})")
    if role is not None and worker.role != role:
        raise TargetError(f"{where}: {worker_id!r} is a {worker.role} worker, a link needs an {role} worker there")
    return worker


def _service(view: ClusterView, name: str, where: str) -> Worker:
    role = SERVICE_ROLES[name]
    found = view.of_roles((role,), live_only=False)
    if not found:
        roles = ", ".join(sorted({w.role for w in view.workers})) or "none"
        raise TargetError(f"{where}: the cluster reports no {name} (roles present: {roles})")
    live = [w for w in found if w.live]
    return (live or found)[0]


NODE_KILLED_ROLES = ("attention", "expert", "kv_store", "controller", "redis")


def node_members(view: ClusterView, target: str, where: str = "target") -> tuple[str, list[Worker]]:
    """The node a node-kill target names (`node:ID` or an unambiguous start of it; `node-of:WORKER`)
    and the processes running on it. The frontend is left out: the tool drives its workload through it."""
    kind, _, name = target.partition(":")
    nodes = sorted({w.node for w in view.workers if w.node})
    if kind == "node-of":
        worker = _need(view, name, where)
        if not worker.node:
            raise TargetError(f"{where}: {name} reports no node (a server without node fields)")
        node = worker.node
    else:
        matches = [n for n in nodes if n == name] or [n for n in nodes if n.startswith(name)]
        if len(matches) != 1:
            raise TargetError(f"{where}: {target!r} names {'no' if not matches else 'more than one'} node "
                              f"(nodes: {', '.join(n[:12] for n in nodes) or 'none'})")
        node = matches[0]
    members = [w for w in view.workers if w.node == node and w.role in NODE_KILLED_ROLES and w.state not in
               ("FENCED", "GONE") and w.pid > 0]
    if not members:
        raise TargetError(f"{where}: node {node[:12]} runs no process of the cluster that a node-kill may kill")
    return node, sorted(members, key=lambda w: w.id)


# ---- signalling pids from the admin API ------------------------------------------------------


def local_pid(worker: Worker) -> int:
    """The worker's pid, when it is a process on this host that is not this tool."""
    local = {"", "127.0.0.1", "localhost", "::1", "0.0.0.0", socket.gethostname(), os.uname().nodename}
    if worker.host not in local:
        raise TargetError(f"{worker.id} runs on {worker.host}; process faults need the tool on that host")
    if worker.pid <= 1 or worker.pid in (os.getpid(), os.getppid()):
        raise TargetError(f"{worker.id} reports pid {worker.pid}, which this tool will not signal")
    return worker.pid


def describe_link_fault(spec: FaultSpec, link: str, fault_id: str) -> dict:
    """The body entry of POST /admin/faults for one datapath fault."""
    assert spec.fault in LINK_FAULTS
    body = {"id": fault_id, "kind": spec.fault, "link": link, "duration_s": spec.duration_s}
    if spec.fault == "delay":
        body.update(delay_ms=spec.delay_ms, jitter_ms=spec.jitter_ms)
    elif spec.fault == "drop":
        body.update(drop_rate=spec.drop_rate, retransmit_ms=spec.retransmit_ms)
    return body

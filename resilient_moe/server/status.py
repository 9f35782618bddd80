"""`resilient-moe status`: the cluster in a terminal, read from a running server's admin API.

It shows the workers by role and node (state, load, pid, uptime, last failure), the routing epoch, the
unprotected experts, the recovery figures of recent faults and the latest cluster events, drawn with
`rich`. `--watch` redraws until Ctrl-C.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from resilient_moe.errors import ResilientMoeError

ROLE_ORDER = ("controller", "redis", "kv_store", "frontend", "attention", "expert")
STATE_STYLE = {"ready": "green", "starting": "yellow", "loading": "yellow", "suspect": "yellow", "draining": "yellow",
               "fenced": "bold red", "gone": "dim"}
EVENT_STYLE = {"dead": "red", "fenced": "red", "suspect": "yellow", "ready": "green", "recovered": "green",
               "epoch": "blue"}


class StatusError(ResilientMoeError):
    """The server could not be read (unreachable, or the admin token was refused)."""


@dataclass(frozen=True)
class Snapshot:
    """What one refresh read from the server."""

    url: str
    cluster: dict[str, Any]
    faults: list[dict[str, Any]]
    taken_at: float


def fetch(url: str, token: str, timeout_s: float = 10.0) -> Snapshot:
    """Read /admin/cluster and /admin/recovery; raises StatusError with what went wrong."""
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as http:
            cluster = http.get("/admin/cluster")
            recovery = http.get("/admin/recovery")
    except httpx.HTTPError as e:
        raise StatusError(f"cannot reach {url}: {e}") from None
    for response in (cluster, recovery):
        if response.status_code in (401, 403):
            raise StatusError(f"{url} refused the admin token (HTTP {response.status_code}): pass --token TOKEN or set "
                              "RESILIENT_MOE_ADMIN_TOKEN (serve prints the token)")
        if response.status_code != 200:
            raise StatusError(f"{response.request.url}: HTTP {response.status_code}: {response.text[:200]}")
    try:
        return Snapshot(url, cluster.json(), recovery.json()["faults"], time.time())
    except (ValueError, KeyError) as e:
        raise StatusError(f"{url} does not answer like a resilient-moe server ({e})") from None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _load(worker: dict[str, Any]) -> str:
    load = worker.get("load", {})
    if worker["role"] == "attention":
        text = f"running {load.get('running', 0):.0f} · waiting {load.get('waiting', 0):.0f}"
        if "kv_cache_usage_perc" in load:
            text += f" · KV {100 * load['kv_cache_usage_perc']:.0f}%"
        return text
    if worker["role"] == "expert":
        return f"{len(worker.get('experts', []))} primary · {len(worker.get('shadows', []))} shadow"
    if worker["role"] == "frontend":
        return f"in flight {load.get('unfinished', 0):.0f}"
    return " · ".join(f"{k} {v:,.0f}" if abs(v) >= 1000 else f"{k} {v:g}" for k, v in sorted(load.items())[:3])


def render(snapshot: Snapshot) -> Group:
    """The whole view of one snapshot."""
    cluster, now = snapshot.cluster, snapshot.taken_at
    workers = cluster["workers"]
    deaths: dict[str, dict[str, Any]] = {}
    for event in cluster["events"]:
        if event["kind"] == "dead":
            deaths[event["worker"]] = event  # events are oldest first: the last one wins
    wanted = [w for w in workers if not w.get("retiring")]  # a worker being scaled away should not run
    ready = sum(1 for w in wanted if w["state"] == "ready")
    header = Text.assemble(
        ("resilient-moe ", "bold"), snapshot.url, "  ·  routing epoch ", (str(cluster["ert"]["epoch"]), "bold"),
        "  ·  ", (f"{ready}/{len(wanted)}", "bold green" if ready == len(wanted) else "bold yellow"), " ready",
        "  ·  ", (f"{len(cluster['unprotected'])}", "bold red" if cluster["unprotected"] else "bold"),
        " unprotected experts")

    table = Table(title="Workers", title_justify="left", expand=False)
    for column in ("role", "node", "worker", "state", "pid", "uptime", "load", "last failure"):
        table.add_column(column, no_wrap=column != "last failure")
    rank = {role: i for i, role in enumerate(ROLE_ORDER)}
    for w in sorted(workers, key=lambda w: (rank.get(w["role"], len(rank)), w["host"], w["id"])):
        started = w.get("started_at") or 0.0
        death = deaths.get(w["id"])
        failure = f"{_duration(now - death['time'])} ago: {death['detail']}" if death else ""
        table.add_row(w["role"], w["host"], w["id"], Text(w["state"], style=STATE_STYLE.get(w["state"], "")),
                      str(w["pid"]), _duration(now - started) if started and w["state"] != "fenced" else "–",
                      _load(w), failure)

    parts: list[Any] = [header, table]
    if cluster["unprotected"]:
        pairs = [f"{layer}/{expert}" for layer, expert in cluster["unprotected"]]
        parts.append(Text(f"Unprotected experts (layer/expert, a single live copy): {' '.join(pairs[:32])}"
                          + (f" and {len(pairs) - 32} more" if len(pairs) > 32 else ""), style="red"))
    recovery = Table(title="Recovery (per fault)", title_justify="left")
    for column in ("declared", "worker", "how", "detection", "redundancy restored", "requests", "stall p50",
                   "stall max"):
        recovery.add_column(column, no_wrap=True)
    for f in snapshot.faults[:10]:
        restored = _duration(f["redundancy_restored_s"]) if f["redundancy_restored_s"] is not None else \
            Text("not yet", style="yellow")
        recovery.add_row(time.strftime("%H:%M:%S", time.localtime(f["declared_at"])),
                         f"{f['worker']} #{f['incarnation']}", f["kind"].replace("_", " "), _duration(f["detection_s"]),
                         restored, str(f["requests"]), _duration(f["stall_p50_s"]), _duration(f["stall_max_s"]))
    parts.append(recovery if snapshot.faults else Text("Recovery: no fault so far", style="green"))
    events = Table(title="Recent events", title_justify="left", show_header=False)
    for column in ("time", "kind", "worker", "detail"):
        events.add_column(column, no_wrap=column != "detail")
    for e in cluster["events"][-8:]:
        events.add_row(time.strftime("%H:%M:%S", time.localtime(e["time"])),
                       Text(e["kind"], style=EVENT_STYLE.get(e["kind"], "")), e["worker"] or "cluster", e["detail"])
    parts.append(events)
    return Group(*parts)


def show(url: str, token: str, watch: bool = False, interval_s: float = 2.0, console: Console | None = None) -> None:
    """Print the status once, or (`watch`) redraw it every `interval_s` until interrupted."""
    console = console or Console()
    url = url.rstrip("/")
    if not watch:
        console.print(render(fetch(url, token)))
        return
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while True:
            try:
                live.update(render(fetch(url, token)), refresh=True)
            except StatusError as e:
                live.update(Text(f"{time.strftime('%H:%M:%S')} {e} (retrying)", style="red"), refresh=True)
            time.sleep(interval_s)

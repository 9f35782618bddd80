"""`resilient-moe status`: the cluster in a terminal, read from a running server's admin API.

Most important first: a summary line (routing epoch, workers ready out of those that should run,
unprotected experts), the unprotected experts, the workers (failing and recovering ones first: node,
state, pid, uptime, load, last failure), the recovery figures of recent faults and the latest cluster
events, drawn with `rich`. Every row is one line cut to the terminal's width: a long failure detail
ends in an ellipsis instead of wrapping, and on a narrow terminal the columns that matter least
(role, load, pid, uptime) are left out so that the last failure keeps room. `--watch` redraws until Ctrl-C
and fits the terminal's height as well: the workers table is cut (healthy workers last) so that the
recent events always show. Nodes are named as the dashboard names them.
"""

from __future__ import annotations

import re
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
STATE_RANK = {"fenced": 0, "gone": 0, "suspect": 1, "starting": 2, "loading": 2, "draining": 3, "ready": 4}
NODE_CHARS = 12  # the dashboard labels a node by the first 12 characters of its id (a Ray node id is 56)
WORKER_COLUMNS = ("role", "node", "worker", "state", "pid", "up", "load", "last failure")
OPTIONAL_COLUMNS = ("node", "up", "pid", "load", "role")  # kept in this order while the width allows
EVENTS = 8  # recent events shown once; in watch mode, as many as a quarter of the height (at least 3)
FAULTS = 10  # faults shown once; in watch mode, as many as an eighth of the height (at least 1)


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
        text = f"run {load.get('running', 0):.0f} wait {load.get('waiting', 0):.0f}"
        if "kv_cache_usage_perc" in load:
            text += f" KV {100 * load['kv_cache_usage_perc']:.0f}%"
        return text
    if worker["role"] == "expert":
        return f"{len(worker.get('experts', []))} pri {len(worker.get('shadows', []))} sh"
    if worker["role"] == "frontend":
        return f"{load.get('unfinished', 0):.0f} in flight"
    return " ".join(f"{k} {v:,.0f}" if abs(v) >= 1000 else f"{k} {v:g}" for k, v in sorted(load.items())[:2])


def node_label(worker: dict[str, Any]) -> str:
    """The node as the dashboard labels it: its failure domain (hostname, or Ray node id), cut short."""
    return (worker.get("node") or "?")[:NODE_CHARS]


def choose_columns(width: int, widths: dict[str, int]) -> list[str]:
    """The worker columns that fit `width` (each takes its content's width and one space): worker,
    state and last failure always; then node, uptime, pid, load and role while the last failure keeps
    at least half of the width (the most telling column of a failing worker); each only with the
    ones before it."""
    keep = {"worker", "state", "last failure"}
    used = widths["worker"] + widths["state"] + 2
    room = max(24, width // 2)
    for column in OPTIONAL_COLUMNS:
        if width - used - (widths[column] + 1) < min(room, widths["last failure"]):
            break
        keep.add(column)
        used += widths[column] + 1
    return [c for c in WORKER_COLUMNS if c in keep]


def _one_line(text: Text) -> Text:
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


def _table(title: str, columns: list[str], rows: list[list[Any]], width: int, show_header: bool = True) -> Table:
    """A borderless table of one-line rows: every column as wide as its content, but the last, which
    gets what is left of `width` (rich would otherwise shrink every column to fit, the short ones too)."""
    table = Table(title=title, title_justify="left", title_style="bold", box=None, padding=(0, 1, 0, 0),
                  pad_edge=False, show_edge=False, show_header=show_header, header_style="bold")
    widths = [max([len(c) if show_header else 1] + [len(str(r[i])) for r in rows]) for i, c in enumerate(columns)]
    widths[-1] = max(1, min(widths[-1], width - sum(w + 1 for w in widths[:-1]) - 1))
    for column, w in zip(columns, widths):
        table.add_column(column, width=w, no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*row)
    return table


def render(snapshot: Snapshot, width: int = 160, height: int | None = None) -> Group:
    """The whole view of one snapshot, every row one line of at most `width` characters; with `height`
    (watch mode) at most that many lines, cutting the workers table before the recent events."""
    cluster, now = snapshot.cluster, snapshot.taken_at
    workers = cluster["workers"]
    deaths: dict[str, dict[str, Any]] = {}
    for event in cluster["events"]:
        if event["kind"] == "dead":
            deaths[event["worker"]] = event  # events are oldest first: the last one wins
    wanted = [w for w in workers if not w.get("retiring")]  # a worker being scaled away should not run
    ready = sum(1 for w in wanted if w["state"] == "ready")
    unprotected = cluster["unprotected"]
    summary = Text.assemble(
        snapshot.url, " · routing epoch ", (str(cluster["ert"]["epoch"]), "bold"),
        " · ", (f"{ready}/{len(wanted)}", "bold green" if ready == len(wanted) else "bold yellow"), " ready",
        " · ", (str(len(unprotected)), "bold red" if unprotected else "bold"), " unprotected")
    for extra, style, first in ((time.strftime(" · %H:%M:%S", time.localtime(now)), "", False),
                                ("resilient-moe ", "bold", True)):  # each only where the line still fits
        if len(summary) + len(extra) <= width:
            summary = Text.assemble((extra, style), summary) if first else Text.assemble(summary, (extra, style))
    parts: list[Any] = [_one_line(summary)]
    if unprotected:
        parts.append(_unprotected_line(unprotected, width))

    # Step 1: how many rows each section gets. Events and faults are capped; the workers take the rest.
    events = cluster["events"][-(EVENTS if height is None else max(3, height // 4)):]
    faults = snapshot.faults[:FAULTS if height is None else max(1, height // 8)]
    ordered = _by_importance(workers, deaths)
    shown, cut = ordered, 0
    if height is not None:
        def other_lines() -> int:  # all but the worker rows: summary, titles, header, recovery, events
            return len(parts) + 2 + (2 + len(faults) if faults else 1) + (1 + len(events) if events else 1)

        while height - other_lines() < min(2, len(ordered)) and (len(faults) > 1 or len(events) > 1):
            if len(faults) > 1:
                faults = faults[:-1]
            else:
                events = events[1:]
        room = max(0, height - other_lines())
        if len(ordered) > room:
            shown = ordered[:max(0, room - 1)]  # the last line says what was left out
            cut = len(ordered) - len(shown)

    # Step 2: the workers, failing and recovering first.
    rows = []
    for w in shown:
        started = w.get("started_at") or 0.0
        death = deaths.get(w["id"])
        rows.append({
            "role": w["role"], "node": node_label(w), "worker": w["id"],
            "state": Text(w["state"], style=STATE_STYLE.get(w["state"], "")), "pid": str(w["pid"]),
            "up": _duration(now - started) if started and w["state"] != "fenced" else "–", "load": _load(w),
            "last failure": _failure(death, now) if death else "",
        })
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in WORKER_COLUMNS}
    columns = choose_columns(width, widths)
    parts.append(_table("Workers", columns, [[r[c] for c in columns] for r in rows], width))
    if cut:
        left = ordered[len(shown):]
        not_ready = sum(1 for w in left if w["state"] != "ready")
        parts.append(_one_line(Text(f"… and {cut} more workers" + (f", {not_ready} not ready" if not_ready else
                                                                       ", all ready"), style="dim")))

    # Step 3: recovery per fault, then the recent events (always shown).
    if faults:
        rows = []
        for f in faults:
            restored = _duration(f["redundancy_restored_s"]) if f["redundancy_restored_s"] is not None else \
                Text("not yet", style="yellow")
            rows.append([time.strftime("%H:%M:%S", time.localtime(f["declared_at"])),
                         f"{f['worker']}" + (f" #{f['incarnation']}" if f["incarnation"] else ""),
                         _duration(f["detection_s"]), restored, str(f["requests"]), _duration(f["stall_p50_s"]),
                         _duration(f["stall_max_s"]), f["cause"]])
        parts.append(_table("Recovery (per fault)", ["declared", "worker", "detect", "restored", "reqs", "stall p50",
                                                     "stall max", "cause"], rows, width))
    else:
        parts.append(_one_line(Text("Recovery: no fault so far", style="green")))
    rows = [[time.strftime("%H:%M:%S", time.localtime(e["time"])), Text(e["kind"], style=EVENT_STYLE.get(e["kind"], "")),
             e["worker"] or "cluster", e["detail"]] for e in events]
    parts.append(_table("Recent events", ["time", "kind", "worker", "detail"], rows, width, show_header=False)
                 if events else _one_line(Text("Recent events: none yet")))
    return Group(*parts)


def _failure(death: dict[str, Any], now: float) -> str:
    """When the worker was last declared dead and why: "12.0 s ago #3: no heartbeat for 1.10s (...)"."""
    detail = re.sub(r"^incarnation (\d+): ", r"#\1: ", death["detail"])
    return f"{_duration(now - death['time'])} ago {detail}" if detail.startswith("#") else \
        f"{_duration(now - death['time'])} ago: {detail}"


def _by_importance(workers: list[dict[str, Any]], deaths: dict[str, Any]) -> list[dict[str, Any]]:
    """Failing and recovering workers first (fenced, suspect, loading, draining), then ready ones that
    failed before, then the rest; by role, node and name within each."""
    rank = {role: i for i, role in enumerate(ROLE_ORDER)}
    return sorted(workers, key=lambda w: (STATE_RANK.get(w["state"], 0), w["id"] not in deaths,
                                          rank.get(w["role"], len(rank)), node_label(w), w["id"]))


def _unprotected_line(pairs: list[list[int]], width: int) -> Text:
    """The unprotected (layer, expert) pairs, as many as one line of `width` holds."""
    lead = "Unprotected (layer/expert, one live copy):"
    names = [f"{layer}/{expert}" for layer, expert in pairs]
    shown: list[str] = []
    for i, name in enumerate(names):
        rest = len(names) - i - 1
        tail = f" and {rest} more" if rest else ""
        if len(" ".join([lead, *shown, name])) + len(tail) > width:
            break
        shown.append(name)
    left = len(names) - len(shown)
    return _one_line(Text(" ".join([lead, *shown]) + (f" and {left} more" if left else ""), style="red"))


def show(url: str, token: str, watch: bool = False, interval_s: float = 2.0, console: Console | None = None) -> None:
    """Print the status once, or (`watch`) redraw it every `interval_s` until interrupted, sized to the
    terminal each time (a line is left for the cursor)."""
    console = console or Console()
    url = url.rstrip("/")
    if not watch:
        console.print(render(fetch(url, token), console.width))
        return
    size = console.size
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while True:
            width, height = console.size
            if (width, height) != size:  # a resized terminal reflows what was drawn: start from a clear one
                size = (width, height)
                console.clear()
            try:
                live.update(render(fetch(url, token), width, max(1, height - 1)), refresh=True)
            except StatusError as e:
                live.update(_one_line(Text(f"{time.strftime('%H:%M:%S')} {e} (retrying)", style="red")),
                            refresh=True)
            time.sleep(interval_s)

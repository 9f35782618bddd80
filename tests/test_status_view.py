"""`resilient-moe status` drawn from a realistic snapshot at given terminal sizes, without a server:
every row fits the width (nothing wraps), watch mode fits the height with the recent events always
shown, failing workers come first, and nodes are labelled as the dashboard labels them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from conftest import wait_until
from resilient_moe.server.status import NODE_CHARS, Snapshot, choose_columns, node_label, render

NOW = 1_800_000_000.0
NODES = ("gpu-node-a.cluster.internal", "gpu-node-b.cluster.internal", "0f3a9c1d2e4b5a6f7081920a3b4c5d6e7f8091a2b3c4d5e6f7a8b9c0")
LONG = ("no heartbeat for 3.21s (process stopped); the link to aw-1 closed with 14 frames outstanding and "
        "3 parts resent to shadows on gpu-node-b")


def worker_at(now: float, name: str, role: str, state: str, node: str, **extra) -> dict:
    return {"id": name, "role": role, "pid": 40000 + len(name) * 37 + hash(name) % 900, "host": "127.0.0.1",
            "node": node, "incarnation": 3, "state": state, "experts": [], "shadows": [], "load": {},
            "started_at": now - 4000, "retiring": False, **extra}


def snapshot(now: float = NOW) -> Snapshot:
    """18 workers on 3 nodes (one fenced, one suspect, one loading, one being scaled away), long failure
    details, 31 events, 6 faults, 64 unprotected experts."""
    def worker(*args, **extra) -> dict:
        return worker_at(now, *args, **extra)

    workers = [worker("controller", "controller", "ready", NODES[0]), worker("redis", "redis", "ready", NODES[0]),
               worker("kv-store", "kv_store", "ready", NODES[0], load={"regions": 4, "bytes": 123456789}),
               worker("kv-store-1", "kv_store", "ready", NODES[1]),
               worker("fe-0", "frontend", "ready", NODES[0], load={"unfinished": 12}),
               worker("fe-1", "frontend", "ready", NODES[1], load={"unfinished": 9})]
    for i in range(4):
        workers.append(worker(f"aw-{i}", "attention", "loading" if i == 2 else "ready", NODES[i % 3],
                              load={"running": 31, "waiting": 120, "kv_cache_usage_perc": 0.87}))
    for i in range(8):
        state = {3: "fenced", 5: "suspect"}.get(i, "ready")
        workers.append(worker(f"ew-{i}", "expert", state, NODES[i % 3], experts=[[0, e] for e in range(8)],
                              shadows=[[1, e] for e in range(80)]))
    workers.append(worker("ew-8", "expert", "draining", NODES[2], retiring=True))
    events = []
    for i in range(30):
        kind = ("dead", "fenced", "registered", "ready", "epoch", "order")[i % 6]
        name = ("ew-3", "aw-2", "ew-1", "ew-5")[i % 4]
        detail = f"incarnation {i}: {LONG}" if kind == "dead" else f"routing table epoch {i}: {LONG[:60]}"
        events.append({"time": now - 300 + i * 10, "kind": kind, "worker": name, "detail": detail})
    events.append({"time": now - 1, "kind": "suspect", "worker": "ew-5", "detail": "the newest event: probes missed"})
    faults = [{"declared_at": now - 100 * i, "worker": f"ew-{i}", "incarnation": i, "kind": "no_heartbeat",
               "cause": "no heartbeat" if i % 2 else "killed by signal 9 (SIGKILL)",
               "detection_s": 1.2, "redundancy_restored_s": None if i == 0 else 4.5, "requests": 16,
               "stall_p50_s": 0.4, "stall_max_s": 2.5} for i in range(6)]
    cluster = {"workers": workers, "ert": {"epoch": 42, "entries": []}, "events": events,
               "unprotected": [[layer, e] for layer in range(4) for e in range(16)], "unprotected_by_node": {}}
    return Snapshot("http://127.0.0.1:8000", cluster, faults, now)


def draw(width: int, height: int | None) -> list[str]:
    console = Console(width=width, height=height or 25, record=True, color_system=None)
    console.print(render(snapshot(), width, height))
    return console.export_text().rstrip("\n").split("\n")


@pytest.mark.parametrize("width,height", [(80, 24), (160, 50), (80, None), (160, None)])
def test_every_row_fits_the_terminal_and_the_recent_events_show(width, height):
    lines = draw(width, height)
    text = "\n".join(lines)
    assert max(len(line) for line in lines) <= width, text
    if height is not None:
        assert len(lines) <= height, f"{len(lines)} lines:\n{text}"
    assert "http://127.0.0.1:8000 · routing epoch 42 · 15/18 ready · 64 unprotected" in lines[0]
    assert lines[0].startswith("resilient-moe ") == (width > 100) and not lines[0].endswith("…")
    assert lines[1].startswith("Unprotected (layer/expert, one live copy): 0/0 0/1") and "more" in lines[1]
    assert "Recent events" in text and "the newest event" in text, text
    # Failing and recovering workers first, whatever is cut; a failure keeps room for its cause.
    table = lines[:next(i for i, line in enumerate(lines) if line.startswith("Recovery"))]
    rows = [line for line in table if re.search(r" (ew|aw)-\d ", line)]
    assert [re.search(r" ((?:ew|aw)-\d) ", r).group(1) for r in rows[:4]] == ["ew-3", "ew-5", "aw-2", "ew-8"]
    fenced = rows[0]
    assert "fenced" in fenced and " ago #24: no heartbeat for 3.2" in fenced, fenced
    assert len(fenced.split(" ago ", 1)[1]) >= width // 2 - 12
    if height is None:
        assert len(rows) == 13, "printed once, every worker is listed"
    elif height == 24:
        assert re.search(r"… and \d+ more workers, all ready", text), text
    assert NODES[2][:NODE_CHARS] in text and NODES[2] not in text


def test_the_wide_view_has_every_column():
    header = next(line for line in draw(200, 50) if line.startswith("role"))
    assert header.split() == ["role", "node", "worker", "state", "pid", "up", "load", "last", "failure"]
    narrow = next(line for line in draw(80, 24) if "worker" in line and "state" in line)
    assert "node" in narrow and "last failure" in narrow and "role" not in narrow


def test_columns_of_less_importance_go_first_when_narrow():
    widths = {"role": 9, "node": 12, "worker": 10, "state": 8, "pid": 6, "up": 6, "load": 18, "last failure": 90}
    assert choose_columns(200, widths) == ["role", "node", "worker", "state", "pid", "up", "load", "last failure"]
    assert choose_columns(80, widths) == ["node", "worker", "state", "up", "last failure"]
    assert choose_columns(150, widths) == ["node", "worker", "state", "pid", "up", "load", "last failure"]
    assert choose_columns(40, widths) == ["worker", "state", "last failure"]


def test_nodes_are_labelled_as_the_dashboard_labels_them():
    page = (Path(__file__).parents[1] / "resilient_moe/server/static/dashboard.html").read_text(encoding="utf-8")
    assert re.search(r'"node " \+ node\.slice\(0, (\d+)\)', page).group(1) == str(NODE_CHARS)
    assert node_label({"node": NODES[2], "host": "127.0.0.1"}) == NODES[2][:NODE_CHARS]
    assert node_label({"node": "gpu-node-a", "host": "127.0.0.1"}) == "gpu-node-a"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux missing")
def test_watch_in_a_real_terminal_adapts_to_its_size(tmp_path):
    """`status --watch` in a tmux window of 80x24, then resized to 160x50: no row wraps, the view fits
    the window, and the recent events stay on screen."""
    class Admin(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            snap = snapshot(time.time())
            body = json.dumps(snap.cluster if self.path == "/admin/cluster" else {"faults": snap.faults}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Admin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    socket = f"rmoe-status-{os.getpid()}"
    tmux = ["tmux", "-L", socket, "-f", os.devnull]
    command = (f"cd {Path(__file__).parents[1]} && TERM=xterm-256color {sys.executable} -m resilient_moe.cli status "
               f"--watch --interval 0.2 --url http://127.0.0.1:{server.server_address[1]} --token t")

    def screen() -> list[str]:
        out = subprocess.run([*tmux, "capture-pane", "-p", "-J", "-t", "status"], capture_output=True, text=True,
                             timeout=10).stdout
        return out.rstrip("\n").split("\n")

    def shows(width: int, height: int) -> bool:
        lines = screen()
        return len(lines) >= height // 2 and "Recent events" in "\n".join(lines) and \
            "the newest event" in "\n".join(lines) and max(len(line) for line in lines) <= width

    try:
        subprocess.run([*tmux, "new-session", "-d", "-s", "status", "-x", "80", "-y", "24", command], check=True,
                       timeout=10, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
        wait_until(lambda: shows(80, 24), 30, "the watch view at 80x24")
        small = screen()
        assert len(small) <= 24 and max(len(line) for line in small) <= 80, "\n".join(small)
        subprocess.run([*tmux, "resize-window", "-t", "status", "-x", "160", "-y", "50"], check=True, timeout=10)
        wait_until(lambda: shows(160, 50) and len(screen()) > 24, 30, "the watch view at 160x50")
        time.sleep(0.5)  # a few more redraws at the new size
        large = screen()
        assert len(large) <= 50 and max(len(line) for line in large) <= 160, "\n".join(large)
        assert sum(1 for line in large if re.search(r" (ew|aw)-\d ", line)) > \
            sum(1 for line in small if re.search(r" (ew|aw)-\d ", line)), "the larger window shows more"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
        server.shutdown()

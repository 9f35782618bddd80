"""The built-in /dashboard page, rendered by headless Chromium against a running server: it shows the
workers with their state, CPU and memory, the routing table of every layer, asks for the admin token
when it has none, and shows the failure event after a worker is killed. The layout of many fault labels
is checked on the same page served with a recorded series of faults (a page-logic test: the page is
the unit, its inputs are the admin API's documents)."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time

import httpx
import pytest

from conftest import wait_until
from serving import ADMIN_TOKEN, admin_headers, serving_stack, streams_through_kill

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium missing (Debian package; .ci/run installs it)")


@pytest.fixture(scope="module")
def stack(tiny_model, fork_server, tmp_path_factory):
    with serving_stack(tiny_model, fork_server, tmp_path_factory.mktemp("dashboard-logs")) as s:
        yield s


def render(url: str, profile, window: str = "1400,1000") -> str:
    """The page's DOM after its scripts ran (virtual time lets the polling fetches complete)."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={profile}", f"--window-size={window}", "--virtual-time-budget=4000", "--dump-dom", url],
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def workers_shown(dom: str) -> dict[str, str]:
    return dict(re.findall(r'data-worker="([^"]+)" data-role="[^"]+" data-state="([^"]+)"', dom))


def test_dashboard_shows_workers_and_routing(stack, tmp_path):
    dom = render(f"{stack.url}/dashboard#token={ADMIN_TOKEN}", tmp_path / "profile")
    shown = workers_shown(dom)
    for name in stack.cluster.pids:  # controller, aw-*, ew-*
        assert shown.get(name) == "ready", (name, shown)
    assert shown.get(stack.frontend.name) == "ready"
    # Grouped by node: the local launcher runs every process on this host, one node named after it.
    assert re.findall(r'class="node" data-node="([^"]+)"', dom) == [os.uname().nodename]
    # the routing table: a cell for every (layer, expert) of every layer, coloured by its live copies
    entries = httpx.get(f"{stack.url}/admin/cluster", headers=admin_headers(), timeout=10).json()["ert"]["entries"]
    cells = dict(re.findall(r'data-cell="(\d+/\d+)" data-copies="(\d+)"', dom))
    assert set(cells) == {f"{e['layer']}/{e['expert']}" for e in entries} and len({e["layer"] for e in entries}) > 1
    assert all(int(copies) == len(e["workers"]) for e in entries
               for copies in [cells[f"{e['layer']}/{e['expert']}"]])  # all healthy: every copy is live
    # each process's resident memory from its heartbeat; the KV store's use of its memory
    usage = dict(re.findall(r'data-usage="([^"]+)">([^<]+)<', dom))
    assert all("RSS " in usage.get(name, "") for name in ("aw-0", "aw-1", "ew-0", "ew-1")), usage
    assert any(" of " in text and "regions" in text for name, text in usage.items() if name.startswith("kv")), usage
    assert re.search(r'class="event" data-kind="ready" data-worker="aw-0"', dom)


def test_dashboard_without_token_asks_for_it(stack, tmp_path):
    dom = render(f"{stack.url}/dashboard", tmp_path / "profile")
    assert "admin token needed" in dom
    assert workers_shown(dom) == {}


def test_dashboard_shows_a_killed_worker_and_its_recovery(stack, tmp_path):
    """SIGKILL an expert worker while requests stream: the event log, the recovery table (detection
    time, stall) and the latency chart's markers show the fault, and /metrics has the same figures."""
    results = streams_through_kill(stack, "ew-1", [[1, 45, 393, 84], [1, 17, 230, 99, 12]], max_tokens=40)
    assert all(r.done and r.error is None for r in results)

    def fault_recorded():
        faults = httpx.get(f"{stack.url}/admin/recovery", headers=admin_headers(), timeout=10).json()["faults"]
        return next((f for f in faults if f["worker"] == "ew-1" and f["stall_max_s"] is not None), None)

    fault = wait_until(fault_recorded, 15, "the recovery table to hold ew-1's fault with its stall")
    assert fault["detection_s"] is not None and fault["requests"] == 2
    dom = render(f"{stack.url}/dashboard#token={ADMIN_TOKEN}", tmp_path / "profile")
    assert re.search(r'class="event" data-kind="dead" data-worker="ew-1"', dom), dom[-3000:]
    assert "ew-1" in workers_shown(dom)  # still listed: dead, or already replaced
    row = re.search(r'<tr class="fault" data-worker="ew-1" data-detection="([0-9.e-]+)" data-stall-max="([0-9.e-]+)"',
                    dom)
    assert row, dom.split('id="recovery"', 1)[-1][:2000]
    assert float(row.group(1)) == pytest.approx(fault["detection_s"])
    assert float(row.group(2)) == pytest.approx(fault["stall_max_s"])
    assert "ew-1 dead" in re.search(r'id="itl-chart"[^>]*data-markers="([^"]*)"', dom).group(1)
    metrics = httpx.get(f"{stack.url}/metrics", timeout=10).text
    for name, key in (("detection", "detection_s"), ("stall_max", "stall_max_s")):
        gauge = re.search(rf'^resilient_moe_last_fault_{name}_seconds\{{role="expert",worker="ew-1"\}} (\S+)$',
                          metrics, re.M)
        assert gauge and float(gauge.group(1)) == pytest.approx(fault[key]), (name, metrics[-3000:])
    assert re.search(r"^resilient_moe_failover_stall_seconds_count [1-9]", metrics, re.M)


# ---- the page's layout of many faults, on recorded documents ----------------------------------------


def _recorded_documents(now: float) -> dict[str, dict]:
    """/admin/* documents of a cluster that lost 12 workers within two minutes, each restored 2 s later."""
    workers = [{"id": f"ew-{i}", "role": "expert", "pid": 100 + i, "host": "127.0.0.1", "node": "host-a",
                "incarnation": 2, "state": "ready", "experts": [], "shadows": [], "load": {}, "started_at": now - 60}
               for i in range(4)]
    entries = [{"layer": layer, "expert": expert, "workers": [f"ew-{expert % 4}", f"ew-{(expert + 1) % 4}"][:1 + layer % 2]}
               for layer in range(8) for expert in range(16)]
    faults = [{"worker": f"ew-{i % 4}", "incarnation": 1, "role": "expert", "kind": "process_gone", "detail": "killed",
               "declared_at": now - 120 + 5 * i, "restored_at": now - 118 + 5 * i, "detection_s": 0.2,
               "redundancy_restored_s": 2.0, "requests": 3, "stall_p50_s": 0.1, "stall_max_s": 0.3} for i in range(12)]
    series = [{"time": now - 200 + t, "tokens_per_s": 50.0, "itl_mean_s": 0.02, "running": 4, "waiting": 1,
               "ttft_mean_s": 0.1, "errors_per_s": 0.5, "rejected_per_s": 2.0} for t in range(200)]
    return {"/admin/cluster": {"workers": workers, "ert": {"epoch": 3, "entries": entries}, "events": [],
                               "unprotected": [], "unprotected_by_node": {}},
            "/admin/recovery": {"faults": faults}, "/admin/timeseries": {"series": series, "model": "recorded"}}


@pytest.fixture
def recorded_dashboard():
    from resilient_moe.server.api import DASHBOARD
    documents = _recorded_documents(time.time())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = DASHBOARD.read_bytes() if self.path.startswith("/dashboard") else \
                json.dumps(documents[self.path]).encode() if self.path in documents else None
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "text/html" if self.path.startswith("/dashboard") else "application/json")
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", documents
    finally:
        server.shutdown()
        server.server_close()


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("window", ["1400,1000", "800,900"], ids=["wide", "narrow"])
def test_fault_labels_never_overlap_and_every_layer_is_shown(recorded_dashboard, tmp_path, window):
    url, documents = recorded_dashboard
    dom = render(f"{url}/dashboard#token=recorded", tmp_path / "profile", window)
    boxes = json.loads(re.search(r'id="itl-chart-labels" data-label-boxes="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    assert boxes and all(b[2] > b[0] and b[3] > b[1] for b in boxes)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not _overlap(a, b), (a, b)
    # every marker is labelled: on its own, or counted in the label before it ("ew-1 dead +2")
    labelled = sum(1 + (int(m.group(1)) if m else 0) for b in boxes for m in [re.search(r"\+(\d+)$", b[4])])
    assert labelled == 24  # 12 deaths, 12 restorations
    cells = dict(re.findall(r'data-cell="(\d+/\d+)" data-copies="(\d+)"', dom))
    assert len(cells) == 8 * 16  # every layer, not the first few
    assert re.search(r'id="errors-now">0\.5 5xx/s, 2\.0 429/s<', dom) and re.search(r'id="queue-now">4 running, 1 waiting<', dom)
    assert {cells[f"{e['layer']}/{e['expert']}"] for e in documents["/admin/cluster"]["ert"]["entries"]
            if len(e["workers"]) == 1} == {"1"}


def test_dashboard_drops_a_worker_scaled_away_and_keeps_its_events(stack, tmp_path):
    """Last in this module (it shrinks the shared stack): 2 -> 1 expert workers. Once ew-1 has left, the
    page no longer shows it among the workers, its events stay, and every worker that should run is ready."""
    answer = httpx.post(f"{stack.url}/admin/scale", json={"expert_workers": 1}, headers=admin_headers(), timeout=10)
    assert answer.status_code == 200, answer.text

    def gone() -> bool:
        cluster = httpx.get(f"{stack.url}/admin/cluster", headers=admin_headers(), timeout=10).json()
        return "ew-1" not in {w["id"] for w in cluster["workers"]} and \
            all(w["state"] == "ready" for w in cluster["workers"])

    wait_until(gone, 60, "ew-1 to drain, leave and retire")
    dom = render(f"{stack.url}/dashboard#token={ADMIN_TOKEN}", tmp_path / "profile")
    shown = workers_shown(dom)
    assert "ew-1" not in shown and shown.get("ew-0") == "ready", shown
    assert re.search(r'class="event" data-kind="stopped" data-worker="ew-1"', dom), dom[-3000:]
    summary = re.search(r'id="summary"[^>]*>(.*?)</div>', dom, re.S).group(1)
    assert f"<b>{len(shown)}/{len(shown)}</b> ready" in summary, summary

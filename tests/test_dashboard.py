"""The built-in /dashboard page, rendered by headless Chromium against a running server: it shows the
workers with their state and the routing table, asks for the admin token when it has none, and shows
the failure event after a worker is killed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

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


def render(url: str, profile) -> str:
    """The page's DOM after its scripts ran (virtual time lets the polling fetches complete)."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={profile}", "--virtual-time-budget=4000", "--dump-dom", url],
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
    assert 'id="ert-table"' in dom and "ew-0" in dom.split('id="ert-table"', 1)[1]
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

"""The built-in /dashboard page, rendered by headless Chromium against a running server: it shows the
workers with their state and the routing table, asks for the admin token when it has none, and shows
the failure event after a worker is killed."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import httpx
import pytest

from conftest import wait_until
from serving import ADMIN_TOKEN, admin_headers, serving_stack

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium missing (Debian package; .ci/run installs it)")


@pytest.fixture(scope="module")
def stack(tiny_model, zygote, tmp_path_factory):
    with serving_stack(tiny_model, zygote, tmp_path_factory.mktemp("dashboard-logs")) as s:
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
    assert 'id="ert-table"' in dom and "ew-0" in dom.split('id="ert-table"', 1)[1]
    assert re.search(r'class="event" data-kind="ready" data-worker="aw-0"', dom)


def test_dashboard_without_token_asks_for_it(stack, tmp_path):
    dom = render(f"{stack.url}/dashboard", tmp_path / "profile")
    assert "admin token needed" in dom
    assert workers_shown(dom) == {}


def test_dashboard_shows_a_killed_worker(stack, tmp_path):
    victim = stack.cluster.pids["ew-1"]
    os.kill(victim, signal.SIGKILL)

    def death_reported():
        events = httpx.get(f"{stack.url}/admin/cluster", headers=admin_headers(), timeout=10).json()["events"]
        return any(e["kind"] == "dead" and e["worker"] == "ew-1" for e in events)

    wait_until(death_reported, 15, "the controller to declare ew-1 dead")
    dom = render(f"{stack.url}/dashboard#token={ADMIN_TOKEN}", tmp_path / "profile")
    assert re.search(r'class="event" data-kind="dead" data-worker="ew-1"', dom), dom[-3000:]
    assert "ew-1" in workers_shown(dom)  # still listed: dead, or already replaced

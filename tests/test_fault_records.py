"""One fault record for every component, with its cause as observed, on a live cluster: an expert worker
SIGKILLed (killed by signal 9) and one SIGSTOPped (stopped, not "gone": its process still exists), the
private Redis SIGKILLed, and the controller stopped with SIGTERM (exited with code 0). Each appears in /admin/recovery, the event list and /metrics with its detection and replacement
times; streams running through the expert-worker kill give the tokens of a failure-free run.
"""

from __future__ import annotations

import os
import re
import signal

import httpx
import pytest

from conftest import pid_alive, wait_until
from serving import admin_headers, serving_stack, stream_completion, streams_through_kill

PROMPTS = [[1, 45, 393, 84], [1, 17, 230, 99, 12]]


@pytest.fixture(scope="module")
def stack(tiny_model, fork_server, tmp_path_factory):
    with serving_stack(tiny_model, fork_server, tmp_path_factory.mktemp("fault-records-logs"), expert_workers=3) as s:
        yield s


def recovery(stack) -> list[dict]:
    return httpx.get(f"{stack.url}/admin/recovery", headers=admin_headers(), timeout=10).json()["faults"]


def record_of(stack, component: str, pid: int, replaced: bool = True, timeout_s: float = 60) -> dict:
    """The fault record of `component`'s process `pid`, once it is replaced (or at all)."""
    def found():
        return next((f for f in recovery(stack) if f["worker"] == component and f["pid"] == pid
                     and (f["replaced_at"] is not None or not replaced)), None)

    return wait_until(found, timeout_s, f"a fault record of {component} (pid {pid})"
                      + (" with its replacement" if replaced else ""))


def metric(stack, name: str, **labels) -> float:
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}\{{{re.escape(selector)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_killed_expert_worker_is_killed_by_signal_9_and_its_streams_are_identical(stack):
    expected = [stream_completion(stack.url, p, 40).token_ids for p in PROMPTS]
    pid = stack.cluster.pids["ew-1"]
    results = streams_through_kill(stack, "ew-1", PROMPTS, max_tokens=40)
    assert [r.token_ids for r in results] == expected and all(r.error is None for r in results)
    fault = record_of(stack, "ew-1", pid)
    assert fault["cause"] == "killed by signal 9 (SIGKILL)" and fault["kind"] == "killed", fault
    assert fault["role"] == "expert" and fault["detection_s"] is not None
    assert fault["replacement_s"] > 0 and fault["replaced_at"] >= fault["declared_at"]
    assert metric(stack, "resilient_moe_failures_detected_total", role="expert", kind="killed") >= 1
    assert metric(stack, "resilient_moe_replacement_seconds_count", role="expert") >= 1


def test_a_stopped_expert_worker_is_stopped_not_gone(stack):
    pid = stack.cluster.pids["ew-0"]
    os.kill(pid, signal.SIGSTOP)
    try:
        fault = record_of(stack, "ew-0", pid, replaced=False)
        assert fault["cause"] == "stopped", fault
        assert pid_alive(pid), "its process still exists: it was stopped, not gone"
        wait_until(lambda: stack.cluster.pids["ew-0"] != pid, 60, "a replacement of the stopped ew-0")
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGCONT)  # it sees it is fenced and leaves (the launcher ends it otherwise)
    assert record_of(stack, "ew-0", pid)["kind"] == "stopped"


def test_redis_and_the_controller_are_components_with_fault_records_too(stack):
    redis_pid = stack.cluster.pids["redis"]
    os.kill(redis_pid, signal.SIGKILL)
    fault = record_of(stack, "redis", redis_pid)
    assert fault["role"] == "redis" and fault["cause"] == "killed by signal 9 (SIGKILL)", fault
    assert 0 < fault["replacement_s"] < 30
    controller_pid = stack.cluster.pids["controller"]
    os.kill(controller_pid, signal.SIGTERM)
    fault = record_of(stack, "controller", controller_pid)
    assert fault["role"] == "controller" and fault["cause"].startswith("exited with code "), fault
    events = httpx.get(f"{stack.url}/admin/cluster", headers=admin_headers(), timeout=10).json()["events"]
    seen = {(e["kind"], e["worker"]) for e in events}
    assert {("dead", "redis"), ("replaced", "redis"), ("dead", "controller"), ("replaced", "controller")} <= seen
    assert metric(stack, "resilient_moe_failures_detected_total", role="redis", kind="killed") == 1
    # serving goes on: a request after both replacements is answered
    assert len(stream_completion(stack.url, PROMPTS[0], 4).token_ids) == 4

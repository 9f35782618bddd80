"""/metrics on a real cluster: promtool accepts it, it counts the traffic, it covers every process, and
every metric the Grafana dashboard queries is exported."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.metrics import ServingMetrics
from resilient_moe.controller.fault_records import cause_kind, observed_cause
from resilient_moe.server.recovery import RecoveryTracker
from serving import serving_stack

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "configs" / "grafana" / "resilient-moe.json"
PROMETHEUS_CONFIG = ROOT / "configs" / "prometheus.yml"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing (Debian package 'prometheus'; .ci/run installs it)")


@pytest.fixture(scope="module")
def stack(tiny_model, fork_server, tmp_path_factory):
    with serving_stack(tiny_model, fork_server, tmp_path_factory.mktemp("metrics-logs")) as s:
        yield s


def scrape(stack) -> str:
    response = httpx.get(f"{stack.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def traffic(stack) -> None:
    """A plain, a streamed, a chat and a failed request."""
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        assert http.post("/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 6, "temperature": 0,
                                                  "ignore_eos": True}).status_code == 200
        with http.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "stream": True,
                                                          "ignore_eos": True}) as r:
            assert r.status_code == 200 and list(r.iter_lines())[-2] == "data: [DONE]"
        assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 4, "ignore_eos": True}).status_code == 200
        assert http.post("/v1/completions", json={"prompt": [1], "suffix": "x"}).status_code == 400


def test_metrics_count_the_traffic(stack):
    before = scrape(stack)
    traffic(stack)
    after = scrape(stack)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("resilient_moe_generation_tokens_total") == 6 + 5 + 4
    assert delta("resilient_moe_request_success_total", finished_reason="length") == 3
    assert delta("resilient_moe_time_to_first_token_seconds_count") == 3
    assert delta("resilient_moe_e2e_request_latency_seconds_count") == 3
    assert delta("resilient_moe_inter_token_latency_seconds_count") == 5 + 4 + 3
    assert delta("resilient_moe_request_queue_time_seconds_count") == 3
    assert delta("resilient_moe_prompt_tokens_total") >= 3 + 2 + 2


def test_cluster_gauges_cover_every_process(stack):
    def every_process_up():
        text = scrape(stack)
        up = {dict(labels)["worker"]: v for (name, labels), v in samples(text).items()
              if name == "resilient_moe_worker_up"}
        expected = set(stack.cluster.pids) | {stack.frontend.name}
        return set(up) == expected and all(v == 1.0 for v in up.values()) and text

    text = wait_until(every_process_up, 10, "worker_up for every process")
    assert value(text, "resilient_moe_worker_up", worker="controller", role="controller") == 1.0
    assert value(text, "resilient_moe_worker_state", worker="aw-0", role="attention", state="ready") == 1.0
    assert value(text, "resilient_moe_worker_state", worker="aw-0", role="attention", state="fenced") == 0.0
    assert value(text, "resilient_moe_ert_epoch") >= 1
    assert value(text, "resilient_moe_shadow_experts_active") > 0  # two expert workers shadow each other


def test_every_worker_reports_its_cpu_and_memory_and_the_kv_store_its_use(stack):
    """From each process's heartbeat: CPU seconds that grow, resident memory of a loaded process, and the
    KV stores' capacity and touched bytes."""
    workers = {name: "attention" if name.startswith("aw-") else "expert"
               for name in stack.cluster.pids if name.startswith(("aw-", "ew-"))}

    def memory_of_every_worker():
        text = scrape(stack)
        return all(value(text, "resilient_moe_worker_resident_memory_bytes", worker=w, role=r) > 0
                   for w, r in workers.items()) and samples(text)

    first = wait_until(memory_of_every_worker, 10, "every worker's resident memory")
    for w, r in workers.items():
        rss = first[("resilient_moe_worker_resident_memory_bytes", (("role", r), ("worker", w)))]
        assert rss > 20 * 2**20, (w, rss)  # torch and the model's weights are resident
    cpu_key = ("resilient_moe_worker_cpu_seconds_total", (("role", "attention"), ("worker", "aw-0")))
    assert first[cpu_key] > 0
    traffic(stack)
    wait_until(lambda: samples(scrape(stack)).get(cpu_key, 0.0) > first[cpu_key], 10,
               "aw-0's CPU seconds to grow with its traffic")
    store = {(dict(labels)["worker"], dict(labels)["kind"]): v for (name, labels), v in samples(scrape(stack)).items()
             if name == "resilient_moe_kv_store_bytes"}
    assert store, "no KV store reported its memory"
    for worker, _ in store:
        assert 0 <= store[(worker, "resident")] <= store[(worker, "capacity")]


@needs_promtool
def test_promtool_accepts_real_metrics(stack, tmp_path):
    traffic(stack)
    text = scrape(stack)
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == "", check.stdout + check.stderr


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]
    assert exprs, "the dashboard queries nothing"
    return {m for e in exprs for m in re.findall(r"\bresilient_moe_[a-z0-9_]+", e)}


def test_dashboard_queries_only_exported_metrics(stack):
    traffic(stack)
    text = scrape(stack)
    exported = set()
    for family in text_string_to_metric_families(text):
        exported.add(family.name)
        exported.update(s.name for s in family.samples)
        if family.type == "counter":
            exported.add(family.name + "_total")
        if family.type == "histogram":
            exported.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    queried = dashboard_metrics()
    assert queried - exported == set()
    # the dashboard covers latency, throughput, per-worker state and failures
    for needed in ("resilient_moe_time_to_first_token_seconds_bucket", "resilient_moe_inter_token_latency_seconds_bucket",
                   "resilient_moe_generation_tokens_total", "resilient_moe_worker_up",
                   "resilient_moe_failures_detected_total", "resilient_moe_failover_stall_seconds_bucket",
                   "resilient_moe_fault_detection_seconds_bucket", "resilient_moe_redundancy_restore_seconds_bucket",
                   "resilient_moe_last_fault_detection_seconds", "resilient_moe_last_fault_stall_max_seconds",
                   "resilient_moe_worker_cpu_seconds_total", "resilient_moe_worker_resident_memory_bytes",
                   "resilient_moe_kv_store_bytes"):
        assert needed in queried


@needs_promtool
def test_prometheus_config_scrapes_the_default_server():
    check = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert '"127.0.0.1:8000"' in PROMETHEUS_CONFIG.read_text()


# ---- pure pieces -----------------------------------------------------------------------------


def test_causes_as_observed_from_the_evidence():
    for reason, cause, kind in [
        ("no heartbeat for 1.20s (process runnable)", "no heartbeat", "no_heartbeat"),
        ("no heartbeat for 1.20s (process stopped)", "stopped", "stopped"),
        ("link-closed (reported by aw-0; process gone)", "process gone", "gone"),  # and the controller it gone
        ("link-closed (reported by aw-0)", "link closed", "link_closed"),
        ("3 probes unanswered for 900 ms (process stopped) (reported by aw-1; process stopped)", "stopped", "stopped"),
        ("3 probes unanswered for 900 ms (process sleeping)", "unresponsive to probes", "unresponsive"),
        ("process 812 killed by signal 9 (SIGKILL) (reported by launcher; process gone)", "killed by signal 9 (SIGKILL)",
         "killed"),
        ("process 812 exited with code 3 (reported by launcher; process gone)", "exited with code 3", "exited"),
        ("process 812 died with the fork server (node 3f2a9c lost)", "node lost", "node_lost"),
        ("something else", "reported", "reported"),
    ]:
        assert observed_cause(reason) == cause, reason
        assert cause_kind(cause) == kind, cause


def _record(component="ew-1", role="expert", incarnation=2, pid=700, cause="killed by signal 9 (SIGKILL)",
            last_seen=0.0, detected_at=0.0, replaced_at=0.0) -> pb.FaultRecord:
    return pb.FaultRecord(component=component, role=role, incarnation=incarnation, pid=pid, cause=cause,
                          detail=f"process {pid} {cause}", last_seen=last_seen, detected_at=detected_at,
                          replaced_at=replaced_at)


def test_recovery_figures_per_fault():
    """A worker's last heartbeat, its declared death, a replacement: detection, replacement and restore
    times and the stalls of the requests in flight, in /metrics and in the recovery table."""
    metrics = ServingMetrics()
    t = time.time() - 30.0

    def snapshot(received: float, replaced_at: float = 0.0, unprotected=0, records=True):
        pairs = [pb.ExpertRef(layer=0, expert=e) for e in range(unprotected)]
        found = [_record(last_seen=t + 1.2, detected_at=t + 1.25, replaced_at=replaced_at)] if records else []
        metrics.update_cluster(pb.ClusterState(fault_records=found, unprotected=pairs), [], 0, now=received)

    snapshot(t + 0.5, records=False)
    # the request started before the fault; its tokens come every 10 ms, then a 300 ms gap across it
    arrivals = [t + 0.6 + 0.01 * i for i in range(60)] + [t + 1.5 + 0.01 * i for i in range(10)]  # gap 1.19 -> 1.5
    metrics.finished(1.0, "length", t + 0.55, arrivals)  # finished before the death is seen: still counted
    metrics.finished(0.1, "length", t - 20.0, [t - 19.9, t - 19.8])  # long before: not in flight
    snapshot(t + 1.3, unprotected=4)  # pushed as it is declared
    snapshot(t + 1.8, unprotected=4)  # the same record again counts once
    snapshot(t + 3.0, replaced_at=t + 2.9, unprotected=4)  # replaced, but experts still unprotected
    snapshot(t + 4.2, replaced_at=t + 2.9, unprotected=0)
    [fault] = metrics.recovery.table()
    assert fault["worker"] == "ew-1" and fault["role"] == "expert" and fault["kind"] == "killed"
    assert fault["cause"] == "killed by signal 9 (SIGKILL)" and fault["pid"] == 700
    assert fault["detection_s"] == pytest.approx(0.05, abs=1e-6)
    assert fault["replacement_s"] == pytest.approx(1.65, abs=1e-6)
    assert fault["redundancy_restored_s"] == pytest.approx(3.0, abs=1e-6)
    assert fault["requests"] == 1 and fault["stall_max_s"] == pytest.approx(0.31, abs=1e-6)
    text = metrics.render().decode()
    assert value(text, "resilient_moe_failures_detected_total", role="expert", kind="killed") == 1.0
    assert value(text, "resilient_moe_fault_detection_seconds_count", role="expert") == 1.0
    assert value(text, "resilient_moe_fault_detection_seconds_sum", role="expert") == pytest.approx(0.05, abs=1e-6)
    assert value(text, "resilient_moe_replacement_seconds_sum", role="expert") == pytest.approx(1.65, abs=1e-6)
    assert value(text, "resilient_moe_redundancy_restore_seconds_sum", role="expert") == pytest.approx(3.0, abs=1e-6)
    assert value(text, "resilient_moe_failover_stall_seconds_count") == 1.0
    assert value(text, "resilient_moe_failover_stall_seconds_sum") == pytest.approx(0.31, abs=1e-6)
    assert value(text, "resilient_moe_last_fault_stall_max_seconds", worker="ew-1", role="expert") == \
        pytest.approx(0.31, abs=1e-6)
    assert value(text, "resilient_moe_last_fault_detection_seconds", worker="ew-1", role="expert") == \
        pytest.approx(0.05, abs=1e-6)
    assert value(text, "resilient_moe_last_fault_replacement_seconds", worker="ew-1", role="expert") == \
        pytest.approx(1.65, abs=1e-6)


def test_a_fault_of_a_component_the_controller_does_not_track_is_one_too():
    """A Redis the launcher saw killed and started again: a fault like any, replaced once it answers."""
    tracker = RecoveryTracker()
    t = 1000.0
    gone = _record("redis", "redis", 0, 900, "killed by signal 9 (SIGKILL)", last_seen=t, detected_at=t)
    changes = tracker.observe(pb.ClusterState(fault_records=[gone]), now=t + 0.1)
    assert [(f.worker, f.kind, f.detection_s) for f in changes.new] == [("redis", "killed", 0.0)]
    back = _record("redis", "redis", 0, 900, "killed by signal 9 (SIGKILL)", last_seen=t, detected_at=t,
                   replaced_at=t + 0.4)
    changes = tracker.observe(pb.ClusterState(fault_records=[back]), now=t + 0.5)
    assert changes.new == [] and [f.replacement_s for f in changes.replaced] == [pytest.approx(0.4)]
    assert [f.restored_s for f in changes.restored] == [pytest.approx(0.5)]


def test_a_request_that_ended_before_the_death_was_declared_still_counts():
    """The survivors route around a dead expert worker faster than the controller declares it: a
    request in flight at the failure's onset that ends before the declaration saw the stall too; one
    that ended before the onset did not."""
    tracker = RecoveryTracker()
    t = 1000.0
    carried = [t + 0.5 + 0.01 * i for i in range(50)] + [t + 1.2, t + 1.21]  # a 0.21 s gap at the failure
    assert tracker.request_done(t + 0.4, carried, t + 1.21).stalls == []  # no fault known yet
    assert tracker.request_done(t + 0.1, [t + 0.2, t + 0.9], t + 0.9).stalls == []  # over before the onset
    dead = _record(cause="exited with code 3", last_seen=t + 1.0, detected_at=t + 1.5)
    changes = tracker.observe(pb.ClusterState(fault_records=[dead]), now=t + 1.5)
    assert [f.worker for f in changes.new] == ["ew-1"]
    assert changes.stalls == [pytest.approx(0.21)]



def test_a_fault_is_counted_once_under_its_final_cause():
    """A peer's report may come before the launcher's exit status: the fault is counted (metrics) once
    its cause is exact, or after SETTLE_S when nothing more exact came."""
    from resilient_moe.server.recovery import SETTLE_S

    tracker = RecoveryTracker()
    t = 1000.0
    vague = _record(cause="link closed", last_seen=t, detected_at=t)
    assert tracker.observe(pb.ClusterState(fault_records=[vague]), now=t + 0.1).new == []
    exact = _record(cause="killed by signal 9 (SIGKILL)", last_seen=t, detected_at=t)
    assert [f.kind for f in tracker.observe(pb.ClusterState(fault_records=[exact]), now=t + 0.3).new] == ["killed"]
    assert tracker.observe(pb.ClusterState(fault_records=[exact]), now=t + 0.5).new == []  # once
    other = _record(component="aw-0", role="attention", cause="no heartbeat", last_seen=t, detected_at=t + 1)
    assert tracker.observe(pb.ClusterState(fault_records=[exact, other]), now=t + 1.5).new == []
    late = tracker.observe(pb.ClusterState(fault_records=[exact, other]), now=t + 1 + SETTLE_S)
    assert [(f.worker, f.kind) for f in late.new] == [("aw-0", "no_heartbeat")]


def test_the_dashboard_series_carries_5xx_and_429_rates(monkeypatch):
    """The API's server errors and refusals at capacity per second, from the responses counter (only the
    /v1 routes: an admin endpoint's refusal is no API error)."""
    import resilient_moe.server.metrics as metrics_module

    clock = [1000.0]
    monkeypatch.setattr(metrics_module.time, "time", lambda: clock[0])
    metrics = ServingMetrics()
    metrics.update_cluster(None, [], 0)  # the first sample: a baseline
    metrics.responses.labels(code="503", handler="/v1/completions").inc(3)
    metrics.responses.labels(code="500", handler="/v1/chat/completions").inc(1)
    metrics.responses.labels(code="429", handler="/v1/completions").inc(6)
    metrics.responses.labels(code="503", handler="/admin/scale").inc(5)
    metrics.responses.labels(code="200", handler="/v1/completions").inc(50)
    clock[0] += 2.0
    metrics.update_cluster(None, [], 0)
    [point] = list(metrics.series)
    assert point["errors_per_s"] == pytest.approx(2.0) and point["rejected_per_s"] == pytest.approx(3.0)

"""The alerting rules (configs/prometheus/alerts.yml): promtool accepts them and their unit tests
(tests/alerts/alerts_test.yml: each alert fires in one case and stays silent in another), every series
they query exists in a real /metrics scrape, and the metrics added for them count."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from resilient_moe import procs
from resilient_moe.controller.records import ControllerSettings, ModelShape
from resilient_moe.controller.state import ClusterModel
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend_server import ControlPlane
from resilient_moe.server.limits import BodyLimit
from resilient_moe.server.metrics import ResponseCounter, ServingMetrics
from resilient_moe.server.metrics_merge import MergedRequests
from serving import serving_stack

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "configs" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "tests" / "alerts" / "alerts_test.yml"
PROMETHEUS_CONFIG = ROOT / "configs" / "prometheus.yml"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing (Debian package 'prometheus'; .ci/run installs it)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def queried_series(rules: list[dict]) -> dict[str, set[str]]:
    """Every resilient_moe_ series name the rules' expressions select, with the `le` of each bucket
    selected: the names as PromQL sees them (a counter's _total, a histogram's _bucket, _sum, _count)."""
    found: dict[str, set[str]] = {}
    for rule in rules:
        for name, matchers in re.findall(r"\b(resilient_moe_[A-Za-z0-9_]+)(\{[^}]*\})?", rule["expr"]):
            found.setdefault(name, set()).update(re.findall(r'\ble="([^"]+)"', matchers))
    return found


def exported_series(text: str) -> dict[str, set[str]]:
    """The sample names of a scrape (what Prometheus stores), with the `le` of each bucket sample."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            les = series.setdefault(sample.name, set())
            if "le" in sample.labels:
                les.add(sample.labels["le"])
    return series


def missing_series(queried: dict[str, set[str]], exported: dict[str, set[str]]) -> list[str]:
    missing = []
    for name, les in sorted(queried.items()):
        if name not in exported:
            missing.append(name)
        missing += [f'{name}{{le="{le}"}}' for le in sorted(les - exported.get(name, set()))]
    return missing


# ---- promtool --------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_rules_and_the_config_loading_them():
    check = promtool("check", "rules", str(ALERTS))
    assert check.returncode == 0, check.stdout + check.stderr
    config = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert config.returncode == 0, config.stdout + config.stderr
    assert f"{len(alert_rules())} rules found" in config.stdout, "prometheus.yml does not load alerts.yml"


@needs_promtool
def test_promtool_unit_tests_of_every_alert():
    run = promtool("test", "rules", str(ALERT_TESTS))
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_has_a_firing_and_a_silent_unit_test():
    firing, silent = set(), set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert firing == names and silent == names


def test_every_alert_says_how_bad_what_and_where_to_look():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert "for" in rule, rule["alert"]
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert "$labels" in annotations["summary"] + annotations["description"], rule["alert"]


def test_the_expression_parser_finds_names_suffixes_and_buckets():
    rules = [{"expr": 'sum(increase(resilient_moe_a_seconds_count[5m])) - sum(increase('
                      'resilient_moe_a_seconds_bucket{le="0.4", job="x"}[5m])) > resilient_moe_b_total'}]
    assert queried_series(rules) == {"resilient_moe_a_seconds_count": set(), "resilient_moe_a_seconds_bucket": {"0.4"},
                                     "resilient_moe_b_total": set()}
    queried = queried_series(alert_rules())
    assert len(queried) >= 10 and queried["resilient_moe_failover_stall_seconds_bucket"] == {"0.4"}


# ---- the series exist --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_model, fork_server, tmp_path_factory):
    with serving_stack(tiny_model, fork_server, tmp_path_factory.mktemp("alerts-logs")) as s:
        yield s


def scrape(stack) -> str:
    response = httpx.get(f"{stack.url}/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def value(text: str, name: str, **labels) -> float:
    return next((s.value for family in text_string_to_metric_families(text) for s in family.samples
                 if s.name == name and s.labels == labels), 0.0)


def test_every_series_the_alerts_query_is_exported(stack):
    """A rule over a series that never exists never fires: each name (and each bucket) the rules select
    is in a real scrape, once a request and a refused one went through."""
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        assert http.post("/v1/completions", json={"prompt": [1, 5], "max_tokens": 2}).status_code == 200
        assert http.post("/v1/completions", json={"prompt": [1], "max_tokens": -1}).status_code == 400
    text = wait_until(lambda: "resilient_moe_redis_up" in (t := scrape(stack)) and t, 10, "the control plane's gauges")
    assert missing_series(queried_series(alert_rules()), exported_series(text)) == []


def test_http_responses_and_control_plane_on_a_real_stack(stack):
    before = scrape(stack)
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        assert http.post("/v1/completions", json={"prompt": [1, 5], "max_tokens": 2}).status_code == 200
        assert http.post("/v1/completions", json={"prompt": [1], "max_tokens": -1}).status_code == 400
        assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        assert http.get("/no/such/path").status_code == 404
    after = scrape(stack)
    delta = lambda **labels: (value(after, "resilient_moe_http_responses_total", **labels)  # noqa: E731
                              - value(before, "resilient_moe_http_responses_total", **labels))
    assert delta(code="200", handler="/v1/completions") == 1
    assert delta(code="400", handler="/v1/completions") == 1
    assert delta(code="400", handler="/v1/chat/completions") == 1
    assert delta(code="404", handler="other") == 1
    assert delta(code="200", handler="/metrics") == 1  # the first scrape, counted as its answer started
    assert value(after, "resilient_moe_redis_up") == 1.0  # the stack's private Redis
    assert value(after, "resilient_moe_supervisor_up") == 1.0  # frontends: 0, the API runs in the supervisor
    assert value(after, "resilient_moe_experts_without_live_copy") == 0.0
    assert value(after, "resilient_moe_worker_deaths_total", role="expert") == 0.0


# ---- the metrics added for the alerts, without processes ---------------------------------------


def test_responses_count_by_code_and_route():
    metrics = ServingMetrics()
    app = FastAPI()

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    @app.post("/busy")
    async def busy():
        raise HTTPException(429, "full")

    @app.get("/bug")
    async def bug():
        raise RuntimeError("a bug")

    app.add_middleware(BodyLimit, max_bytes=16)
    app.add_middleware(ResponseCounter, counter=metrics.responses)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/ok").status_code == 200
        assert [client.post("/busy").status_code for _ in range(2)] == [429, 429]
        assert client.get("/bug").status_code == 500
        assert client.post("/busy", content=b"x" * 64).status_code == 413  # refused by BodyLimit, counted outside
        assert client.get("/missing").status_code == 404
    text = metrics.render().decode()
    count = lambda code, handler: value(text, "resilient_moe_http_responses_total", code=code, handler=handler)  # noqa: E731
    assert count("200", "/ok") == 1 and count("429", "/busy") == 2 and count("500", "/bug") == 1
    assert count("413", "other") == 1 and count("404", "other") == 1


def test_experts_without_live_copy_and_deaths_by_role():
    """Layer 0 is dense (empty entries, not listed); of layer 1, expert 0 has one copy, expert 1 none."""
    metrics = ServingMetrics()
    ert = pb.RoutingTable(epoch=3, num_layers=2, num_experts=2, entries=[
        pb.Candidates(), pb.Candidates(), pb.Candidates(workers=["ew-0"]), pb.Candidates()])
    state = pb.ClusterState(ert=ert, unprotected=[pb.ExpertRef(layer=1, expert=0), pb.ExpertRef(layer=1, expert=1)],
                            counters={"deaths_expert": 2.0, "deaths_attention": 1.0})
    metrics.update_cluster(state, [], 0)
    text = metrics.render().decode()
    assert value(text, "resilient_moe_unprotected_experts") == 2.0
    assert value(text, "resilient_moe_experts_without_live_copy") == 1.0
    assert value(text, "resilient_moe_worker_deaths_total", role="expert") == 2.0
    assert value(text, "resilient_moe_worker_deaths_total", role="attention") == 1.0
    assert value(text, "resilient_moe_worker_deaths_total", role="frontend") == 0.0


def test_the_controller_counts_deaths_by_role_across_its_restart():
    def model() -> ClusterModel:
        return ClusterModel(ModelShape(1, 4, (0,)), ControllerSettings(attention_workers=1, expert_workers=2),
                            clock=lambda: 100.0, liveness=lambda record: procs.UNKNOWN)

    first = model()
    for name, role in (("ew-0", "expert"), ("ew-1", "expert"), ("aw-0", "attention")):
        record = first.register(name, role, int(name[-1]), pid=10, host="h")
        first.ready(name, record.incarnation, first.experts_for(name), f"addr-{name}")
    first.declare_dead("ew-1", "test")
    first.declare_dead("ew-1", "test")  # the same incarnation again: one death
    first.declare_dead("aw-0", "test")
    assert first.counters["deaths_expert"] == 1 and first.counters["deaths_attention"] == 1
    restored = model()
    restored.restore(json.loads(json.dumps(first.to_snapshot())))  # through JSON, as in Redis
    assert restored.counters["deaths_expert"] == 1 and restored.counters["deaths_kv_store"] == 0


class FakeRedis:
    def __init__(self, lease: bytes | None = None, down: bool = False) -> None:
        self.lease, self.down = lease, down

    def get(self, key: str):
        if self.down:
            raise ConnectionError("connection refused")
        return self.lease


def lease(pid: int, host: str | None = None) -> bytes:
    return f'{{"pid": {pid}, "host": "{host or socket.gethostname()}", "started": 0}}'.encode()


def test_control_plane_health_from_redis_and_the_lease():
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert ControlPlane(FakeRedis(lease(os.getpid())), "c").health() == {"redis_up": 1.0, "supervisor_up": 1.0}
    assert ControlPlane(FakeRedis(lease(dead.pid)), "c").health() == {"redis_up": 1.0, "supervisor_up": 0.0}
    assert ControlPlane(FakeRedis(lease(dead.pid, "another-host")), "c").health()["supervisor_up"] == 1.0
    assert ControlPlane(FakeRedis(None), "c").health() == {"redis_up": 1.0, "supervisor_up": 0.0}
    assert ControlPlane(FakeRedis(down=True), "c").health() == {"redis_up": 0.0}  # the lease cannot be read
    assert ControlPlane(FakeRedis(None), "c", in_supervisor=True).health() == {"redis_up": 1.0, "supervisor_up": 1.0}
    metrics = ServingMetrics()
    metrics.control_plane = ControlPlane(FakeRedis(down=True), "c")
    metrics.update_cluster(None, [], 0)
    text = metrics.render().decode()
    assert value(text, "resilient_moe_redis_up") == 0.0 and "resilient_moe_supervisor_up" not in text


class DictRedis:
    """The few Redis calls MergedRequests makes, over a dict (no expiry)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: bytes, ex: int | None = None) -> None:
        self.data[key] = value

    def scan_iter(self, match: str, count: int = 100):
        return [k for k in self.data if k.startswith(match.rstrip("*"))]

    def mget(self, keys):
        return [self.data.get(k) for k in keys]

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


def test_summed_counters_never_go_down_whichever_frontend_answers():
    """A scrape publishes its frontend's series before reading the others': the sum a later scrape at
    another frontend gives is never below an earlier one (a decrease would read as a counter reset)."""
    redis = DictRedis()
    frontends = []
    for name in ("fe-0", "fe-1"):
        registry = CollectorRegistry()
        counter = Counter("responses", "x", namespace="t", registry=registry)
        merged = MergedRequests(registry)
        merged.redis, merged.cluster_id, merged.name = redis, "c", name  # share() without its publishing thread
        frontends.append((merged, counter))

    def scrape(i: int) -> float:
        return next(s.value for f in frontends[i][0].collect() for s in f.samples if s.name == "t_responses_total")

    seen = []
    for step, (counted_at, scraped_at) in enumerate([(0, 1), (0, 0), (1, 0), (0, 1), (1, 1), (0, 0)]):
        frontends[counted_at][1].inc(step + 1)
        seen.append(scrape(scraped_at))
    assert seen == sorted(seen) and seen[-1] == sum(range(1, 7))

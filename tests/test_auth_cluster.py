"""Authentication on a real local cluster (issue 11): a process without the cluster secret cannot
register, call the admin gRPC, connect a datapath link or get the KV store's memory; one with it can
(the positive control, so that each refusal is shown to come from authentication); refusals are
counted and exported; no command line holds the secret or a worker's config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_until, worker_load
from resilient_moe import auth
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.launch import fork_server as fork_server_module
from resilient_moe.launch import make_cluster
from resilient_moe.launch.launcher import Launcher
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.metrics import ServingMetrics

PROBE = Path(__file__).with_name("auth_probe.py")
ATTEMPTS = ("register", "admin", "link", "aw_link", "kv_store")


@pytest.fixture(scope="module")
def cluster(tiny_model, fork_server, tmp_path_factory):
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=1)
    with make_cluster(dep, log_dir=tmp_path_factory.mktemp("auth-cluster"), fork_server=fork_server) as cluster:
        yield cluster


def probe(cluster: Launcher, mode: str) -> dict[str, str]:
    """Run tests/auth_probe.py in a fresh process: with this process's secret, another, or none."""
    state = cluster.state()
    where = {"controller": cluster.controller_address,
             "link": next(w.data_address for w in state.workers if w.name == "ew-0"),
             "aw_link": next(w.data_address for w in state.workers if w.name == "aw-0"),
             "kv_store": next(w.data_address for w in state.workers if w.name == "kv-store")}
    env = {k: v for k, v in os.environ.items() if k != auth.SECRET_ENV}
    if mode == "right":
        env[auth.SECRET_ENV] = auth.secret().hex()
    out = subprocess.run([sys.executable, str(PROBE), mode], input=json.dumps(where), env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_secret_holder_gets_in(cluster):
    assert probe(cluster, "right") == dict.fromkeys(ATTEMPTS, "ok")


@pytest.mark.parametrize("mode", ["wrong", "none"])
def test_a_process_without_the_secret_is_refused_and_counted(cluster, mode):
    before = cluster.state()
    aw0 = next(w for w in before.workers if w.name == "aw-0")
    base = {"grpc": before.counters.get("auth_refused_grpc", 0.0),
            "link": worker_load(cluster, "ew-0", "auth_refused_link"),
            "aw-link": worker_load(cluster, "aw-0", "auth_refused_link"),
            "kv-store": worker_load(cluster, "kv-store", "auth_refused_kv-store")}
    result = probe(cluster, mode)
    for what in ("register", "admin"):
        assert result[what].startswith("UNAUTHENTICATED: authentication failed"), result
    assert "authentication failed" in result["link"], result
    assert "authentication failed" in result["aw_link"], result
    assert "authentication failed" in result["kv_store"], result
    # Nothing it asked for happened: aw-0 was not fenced, no fault is in force.
    after = cluster.state()
    assert next((w.incarnation, w.state) for w in after.workers if w.name == "aw-0") == (aw0.incarnation, pb.READY)
    assert not after.faults
    # Counted where refused: the controller (its snapshot), the expert worker and the KV store (heartbeats).
    assert after.counters["auth_refused_grpc"] >= base["grpc"] + 2
    wait_until(lambda: worker_load(cluster, "ew-0", "auth_refused_link") >= base["link"] + 1, 10,
               "the expert worker to report the refused link")
    wait_until(lambda: worker_load(cluster, "aw-0", "auth_refused_link") >= base["aw-link"] + 1, 10,
               "the attention worker to report the refused link")
    wait_until(lambda: worker_load(cluster, "kv-store", "auth_refused_kv-store") >= base["kv-store"] + 1, 10,
               "the KV store to report the refused hand-over")
    # Logged where refused (at most a line per kind per 10 s: a later test may find only the first).
    for process, line in (("controller", "refused a gRPC call to /"), ("ew-0", "refused a link"),
                          ("aw-0", "refused a link"), ("kv-store", "refused the KV store")):
        assert line in cluster.log_tail(process, 400), f"{process} did not log the refusal"
    # ... and exported by the frontend process's /metrics.
    metrics = ServingMetrics()
    metrics.update_cluster(cluster.state(), [], 0)
    text = metrics.render().decode()
    for process, purpose in (("controller", "grpc"), ("ew-0", "link"), ("kv-store", "kv-store")):
        assert f'resilient_moe_auth_refused_total{{process="{process}",purpose="{purpose}"}}' in text


def test_no_command_line_holds_the_secret_or_a_config(cluster):
    secret = auth.secret().hex().encode()
    password = auth.derived_key("redis").encode()
    pids = {**cluster.pids, "fork_server": cluster.fork_server.proc.pid}
    assert {"controller", "kv-store", "redis", "aw-0", "ew-0"} <= set(pids)
    for name, pid in pids.items():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        assert cmdline, f"{name} has no command line (gone?)"
        assert secret not in cmdline and password not in cmdline, name
        assert b"{" not in cmdline and b"deployment" not in cmdline, f"{name}'s command line holds a config"
    # The workers hold the secret: every one registered and became ready through authenticated gRPC.
    assert all(w.state == pb.READY for w in cluster.state().workers if w.name in pids)


def test_the_private_redis_wants_the_password(cluster):
    import redis

    url = cluster.deployment.redis_url
    assert redis.Redis.from_url(url).ping()
    path = url.rpartition("@")[2]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=path).get("x")


def test_a_cold_worker_reads_its_config_from_an_inherited_memfd():
    text = json.dumps({"deployment": "x" * 300_000})  # larger than a pipe holds
    fd = fork_server_module._config_memfd(text)
    assert os.get_inheritable(fd)
    assert fork_server_module._read_config_fd(fd) == text

"""The launcher's behaviour, one suite for both backends (local processes and a Ray test cluster on
loopback): worker replacement, Redis and controller deaths, scaling both roles (attention workers
above the start count), drain, restart-all (warm and cold, checking which ran) and a crash loop ending
in `fatal`. Requests in flight finish token-identical to the colocated engine.

Under Ray the roles run on other nodes' fork servers; on this host their processes are still visible
in /proc, so the same checks (pids, affinity, nice values) read them the same way.
"""

from __future__ import annotations

import os
import random
import signal

import grpc
import pytest

from conftest import wait_until, worker_load
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch import launcher as launcher_module
from resilient_moe.launch import make_cluster
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend import Frontend

BACKENDS = ("local", "ray")


def workload(n: int = 12, max_tokens: int = 32, seed: int = 41):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(3, 20))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model):
    prompts, params = workload()
    return [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]


@pytest.fixture(params=BACKENDS)
def launch(request, tiny_model, tmp_path):
    """launch(**settings) -> a started cluster on the parametrized backend; stopped afterwards."""
    backend = request.param
    fork_server = request.getfixturevalue("fork_server") if backend == "local" else None
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    started = []

    def start(**settings):
        dep = DeploymentConfig(model=str(tiny_model), launcher=backend, **settings)
        cluster = make_cluster(dep, log_dir=tmp_path / f"logs-{len(started)}", fork_server=fork_server)
        started.append(cluster)
        return cluster.start()

    start.backend = backend
    yield start
    for cluster in started:
        cluster.stop()


def ready(cluster, name: str, not_pid: int = 0) -> pb.WorkerInfo | None:
    """The worker's record once its current process (not `not_pid`) is READY (None while the
    controller does not answer, e.g. while a new one starts)."""
    try:
        state = cluster.state()
    except grpc.RpcError:
        return None
    w = next((w for w in state.workers if w.name == name), None)
    return w if w is not None and w.state == pb.READY and w.pid == cluster.pids.get(name) != not_pid else None


def nice_values(pid: int) -> set[int]:
    """The nice value of every thread of a process (field 19 of /proc/PID/task/TID/stat)."""
    return {nice_of_thread(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def scale(cluster, **roster) -> None:
    cluster.client.stub.Scale(pb.ScaleRequest(**roster), timeout=10)


def nice_of_thread(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def streams(cluster):
    prompts, params = workload()
    frontend = Frontend(cluster.controller_address).start()
    handles = [frontend.submit(p, params) for p in prompts]
    wait_until(lambda: all(len(h.tokens) >= 4 for h in handles), 120, "requests to be mid-generation")
    return frontend, handles


def finish(frontend, handles) -> list[list[int]]:
    try:
        return [h.wait(180).token_ids for h in handles]
    finally:
        frontend.close()


def test_killed_workers_are_replaced_pinned_at_their_priority_and_no_token_changes(launch, reference):
    cluster = launch(attention_workers=2, expert_workers=2)
    start_nice = os.getpriority(os.PRIO_PROCESS, 0)
    frontend, handles = streams(cluster)
    peers = {"ew-0": cluster.pids["ew-1"], "aw-1": cluster.pids["aw-0"]}  # first starts, untouched
    first_start = {name: nice_values(pid) for name, pid in peers.items()}
    old = {name: cluster.pids[name] for name in ("ew-0", "aw-1")}
    for name in old:
        cluster.kill(name)
    assert finish(frontend, handles) == reference
    for name, pid in old.items():
        wait_until(lambda: ready(cluster, name, pid), 120, f"a replacement for {name}")
        new = cluster.procs[name]
        assert new.pid != pid
        if new.cpus:  # cpu_affinity auto: pinned to what it was given, one GEMM thread per core
            assert sorted(os.sched_getaffinity(new.pid)) == sorted(new.cpus), name
            wait_until(lambda: worker_load(cluster, name, "threads") == len(new.cpus), 10, f"{name}'s threads")
        # It loaded at the lowest priority (a serving cluster) on a thread that ended: the replacement's
        # threads run at the priorities a first start's do (its serving thread at the cluster's start
        # priority; only what is background by design, such as an expert worker's link acceptor, lower).
        # (the loading thread ends just after the worker reports ready: allow it a moment to go)
        wait_until(lambda: nice_values(new.pid) == first_start[name], 10,
                   f"{name}'s threads at a first start's priorities {first_start[name]}")
        assert nice_of_thread(new.pid, new.pid) == start_nice, name
    assert {name for name, _, _ in cluster.replaced} >= set(old)
    # each death is a fault record with the exit status the backend saw, and its replacement time
    records = wait_until(lambda: (r := {(f.component, f.pid): f for f in cluster.state().fault_records})
                         and all(k in r and r[k].replaced_at for k in old.items()) and r, 30,
                         "fault records of both kills, replaced")
    for key in old.items():
        assert records[key].cause == "killed by signal 9 (SIGKILL)", records[key]


def test_redis_and_the_controller_are_started_again_and_serving_goes_on(launch, reference):
    cluster = launch(attention_workers=1, expert_workers=2)
    frontend, handles = streams(cluster)
    old_redis, old_controller = cluster.pids["redis"], cluster.pids["controller"]
    cluster.kill("redis")
    wait_until(lambda: cluster.pids["redis"] != old_redis and not cluster.procs["redis"].exited, 30,
               "the launcher to start Redis again")
    cluster.kill("controller")
    wait_until(lambda: cluster.pids["controller"] != old_controller and ready(cluster, "aw-0"), 60,
               "a new controller that answers")
    assert finish(frontend, handles) == reference
    assert cluster.fatal is None
    records = wait_until(lambda: (r := {f.component: f for f in cluster.state().fault_records
                                        if f.component in ("redis", "controller") and f.replaced_at})
                         and len(r) == 2 and r, 30, "fault records of Redis and the controller, replaced")
    assert (records["redis"].pid, records["controller"].pid) == (old_redis, old_controller)
    assert all(r.cause == "killed by signal 9 (SIGKILL)" for r in records.values()), records


def test_scaling_both_roles_above_the_start_count_and_back(launch, reference):
    cluster = launch(attention_workers=1, expert_workers=2, max_attention_workers=2)
    frontend, handles = streams(cluster)
    scale(cluster, attention_workers=2, expert_workers=3)
    for name in ("aw-1", "ew-2"):
        wait_until(lambda: ready(cluster, name), 120, f"{name}, added by scaling")
    if launch.backend == "ray":
        assert cluster.nodes["aw-1"] != cluster.head and cluster.nodes["ew-2"] != cluster.head
    scale(cluster, attention_workers=1, expert_workers=2)
    wait_until(lambda: "aw-1" not in cluster.pids and "ew-2" not in cluster.pids, 120,
               "the launcher to stop the workers scaling removed")
    assert finish(frontend, handles) == reference


def test_a_drained_attention_worker_hands_its_requests_over(launch, reference):
    cluster = launch(attention_workers=2, expert_workers=2)
    frontend, handles = streams(cluster)
    old = cluster.pids["aw-0"]
    cluster.kill("aw-0", signal.SIGTERM)  # a planned leave: it drains, then it is replaced
    assert finish(frontend, handles) == reference
    wait_until(lambda: ready(cluster, "aw-0", old), 120, "a replacement for the drained aw-0")
    events = [e.kind for e in cluster.state().events if e.worker == "aw-0"]
    assert "draining" in events


@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_restart_all_restarts_every_worker_the_way_it_is_told(launch, reference, mode):
    cluster = launch(attention_workers=1, expert_workers=2, resilience=False, baseline_restart=mode)
    frontend, handles = streams(cluster)
    before = {name: cluster.pids[name] for name in ("aw-0", "ew-0", "ew-1")}
    cluster.kill("ew-0")
    wait_until(lambda: cluster.restarts and cluster.restarts[-1][1] > 0, 180, "a restart of every worker")
    frontend.close()
    for name, pid in before.items():
        assert cluster.pids[name] != pid, f"{name} was not restarted"
        with open(f"/proc/{cluster.pids[name]}/cmdline", "rb") as f:
            cold = b"--cold" in f.read()
        assert cold == (mode == "cold"), (name, mode)  # cold: a fresh interpreter; warm: a fork
    prompts, params = workload()
    fresh = Frontend(cluster.controller_address).start()
    try:
        assert [o.token_ids for o in fresh.generate(prompts, params, timeout_s=180)] == reference
    finally:
        fresh.close()


def test_a_crash_loop_ends_the_cluster_with_a_clear_error(launch, monkeypatch):
    monkeypatch.setattr(launcher_module, "CRASH_LOOP", 2)
    cluster = launch(attention_workers=1, expert_workers=2)
    for _ in range(6):
        if cluster.fatal:
            break
        pid = cluster.pids["ew-1"]
        cluster.kill("ew-1")
        wait_until(lambda: cluster.fatal or cluster.pids["ew-1"] != pid, 60, "ew-1 to be started again or given up")
    assert cluster.fatal and "ew-1" in cluster.fatal and "keeps exiting" in cluster.fatal

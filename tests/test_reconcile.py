"""The reconcile loop keeps its promises with real processes: an order survives the controller that
issued it, and experts with no live copy left are waited for, not failed.

Each test runs a live cluster and compares every request's tokens with the colocated engine's.
"""

from __future__ import annotations

import json
import os
import random
import signal

import grpc
import pytest
import redis

from conftest import pid_alive, wait_until, worker_load
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.controller.server import controller_key
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch import make_cluster
from resilient_moe.launch.launcher import Launcher
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend import Frontend


def workload(n: int = 16, max_tokens: int = 40, seed: int = 21):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(2, 24))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model):
    prompts, params = workload()
    return [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]


def state_or_none(cluster: Launcher) -> pb.ClusterState | None:
    try:
        return cluster.state()
    except grpc.RpcError:
        return None  # the controller is being started again


def worker(state: pb.ClusterState, name: str) -> pb.WorkerInfo:
    return next(w for w in state.workers if w.name == name)


def test_an_order_the_launcher_never_took_is_carried_out_after_a_controller_restart(tiny_model, reference, fork_server,
                                                                                   tmp_path):
    """A hung expert worker is declared dead and the controller orders a replacement; the launcher
    does not take it (its intake is held) and the controller is killed right after the order reached
    Redis. The next controller recovers the order and sends it again: redundancy comes back, and the
    requests in flight finish token-identical."""
    prompts, params = workload(n=8)
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=3)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        victim = cluster.pids["ew-1"]
        try:
            handles = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 4 for h in handles), 60, "requests to be mid-generation")
            cluster.hold_orders.set()
            os.kill(victim, signal.SIGSTOP)

            def ordered():
                state = state_or_none(cluster)
                return state is not None and next((o for o in state.orders if o.action == "start"
                                                   and o.worker == "ew-1" and o.pid == victim), None)
            order = wait_until(ordered, 30, "the controller to order a replacement for the hung ew-1")
            store = redis.Redis.from_url(cluster.deployment.redis_url)
            key = controller_key(cluster.cluster_id)
            wait_until(lambda: any(o["id"] == order.id for o in json.loads(store.get(key) or b"{}").get("orders", [])),
                       10, "the order to be persisted in Redis")
            old_controller = cluster.pids["controller"]
            cluster.kill("controller", signal.SIGKILL)
            assert cluster.pids["ew-1"] == victim, "the launcher took no order"

            def resumed():
                state = state_or_none(cluster)
                return state is not None and cluster.pids["controller"] != old_controller and \
                    any(o.id == order.id and o.resumed for o in state.orders) and state
            state = wait_until(resumed, 60, "a new controller that recovered the order")
            assert state.counters["orders_resumed"] >= 1
            assert cluster.pids["ew-1"] == victim and state.unprotected, "nothing restored redundancy meanwhile"
            cluster.hold_orders.clear()
            wait_until(lambda: (s := state_or_none(cluster)) is not None and worker(s, "ew-1").state == pb.READY
                       and worker(s, "ew-1").pid != victim and not s.unprotected and not s.orders, 60,
                       "a replacement ew-1 and every expert protected again")
            assert [h.wait(120).token_ids for h in handles] == reference[:8]
            assert state_or_none(cluster).counters["orders_completed"] >= 1
        finally:
            frontend.close()
            if pid_alive(victim):
                os.kill(victim, signal.SIGCONT)  # fenced: it exits on its own
    assert not pid_alive(victim)


def test_two_expert_workers_killed_at_the_same_instant(tiny_model, reference, fork_server, tmp_path):
    """Some experts lose every copy at once. Their rows wait for the replacements to load them
    (bounded by expert_wait_s) instead of failing: all 16 requests finish token-identical."""
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=3)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            doomed = {"ew-0", "ew-1"}
            lost = [c.workers for c in cluster.state().ert.entries if c.workers and set(c.workers) <= doomed]
            assert lost, "some experts have both copies on the two workers killed"
            handles = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 4 for h in handles), 60, "requests to be mid-generation")
            pids = [cluster.pids[n] for n in sorted(doomed)]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            tokens = [h.wait(120).token_ids for h in handles]
            assert tokens == reference
            wait_until(lambda: sum(worker_load(cluster, aw, "held_parts") for aw in ("aw-0", "aw-1")) >= 1, 10,
                       "the attention workers to report rows held until a replacement had their experts")
            assert sum(worker_load(cluster, aw, "held_expired") for aw in ("aw-0", "aw-1")) == 0
        finally:
            frontend.close()

"""Replicated KV checkpoints on real processes, real Redis and real TCP: two KV stores, one replica of
every checkpoint. A simulated node loss (an attention worker and its primary KV store SIGKILLed at the
same instant) is survived token-identically with every restore read from the replica; the replacement
store gets the live blocks again, so a second node loss (the other worker and its store) is survived
the same way."""

from __future__ import annotations

import os
import random
import signal

import pytest

from conftest import wait_until, worker_load
from resilient_moe.config import DeploymentConfig, EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch.local import LocalCluster
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend import Frontend


def workload(n: int = 8, max_tokens: int = 200):
    rng = random.Random(11)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(20, 40))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model):
    prompts, params = workload()
    return [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]


def ready_incarnation(cluster: LocalCluster, name: str) -> int:
    return next((w.incarnation for w in cluster.state().workers if w.name == name and w.state == pb.READY), 0)


def lose_node(cluster: LocalCluster, worker: str, store: str) -> None:
    """SIGKILL an attention worker and its primary KV store at the same instant."""
    pids = [cluster.pids[worker], cluster.pids[store]]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # both stop before either dies: no one sees one die first
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_node_loss_restores_from_the_replica_and_redundancy_comes_back(tiny_model, reference, zygote, tmp_path):
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=2, kv_stores=2, kv_replicas=1)
    with LocalCluster(dep, log_dir=tmp_path, zygote=zygote) as cluster:
        assert {"kv-store", "kv-store-1"} <= set(cluster.pids)
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, params) for p in prompts]
            # aw-i's primary is the i-th store, its replica the other one (replication.place_stores)
            wait_until(lambda: all(len(h.tokens) >= 24 for h in handles), 60, "requests to be mid-generation")
            for aw in ("aw-0", "aw-1"):
                wait_until(lambda: worker_load(cluster, aw, "ckpt_replica_acks") > 0, 20, f"{aw}'s replica to ack")
                assert worker_load(cluster, aw, "ckpt_replicas") == 1
            on_victim = [h for h in handles if h.worker == "aw-0" and not h.done]
            assert on_victim, "the frontend spread requests over both attention workers"

            # First node loss: aw-0 and its primary store.
            old_store = ready_incarnation(cluster, "kv-store")
            lose_node(cluster, "aw-0", "kv-store")
            wait_until(lambda: worker_load(cluster, "aw-1", "ckpt_restored") >= len(on_victim), 60,
                       "aw-1 to restore aw-0's requests")
            assert worker_load(cluster, "aw-1", "ckpt_restored_replica") == len(on_victim), "read from the replica"
            assert worker_load(cluster, "aw-1", "ckpt_restored_local") == 0
            assert worker_load(cluster, "aw-1", "requests_recomputed") == 0
            assert worker_load(cluster, "aw-1", "ckpt_restore_stamp_mismatches") == 0

            # Redundancy comes back: the replacement store gets aw-1's live blocks again.
            wait_until(lambda: ready_incarnation(cluster, "kv-store") not in (0, old_store), 60, "a new kv-store")
            wait_until(lambda: worker_load(cluster, "aw-1", "ckpt_replica_reships") >= 1, 20,
                       "aw-1 to ship its live blocks to the new store")
            wait_until(lambda: ready_incarnation(cluster, "aw-0") > 0, 60, "a new aw-0")
            wait_until(lambda: worker_load(cluster, "aw-1", "ckpt_replica_pending") == 0
                       and worker_load(cluster, "aw-1", "ckpt_replicas") == 1, 20, "aw-1's replica to catch up")
            on_second = [h for h in handles if h.worker == "aw-1" and not h.done]
            if not on_second:
                pytest.skip("every request finished before the second node loss (machine too fast)")

            # Second node loss: aw-1 and its primary store; the new aw-0 restores from the new kv-store.
            lose_node(cluster, "aw-1", "kv-store-1")
            assert [h.wait(180).token_ids for h in handles] == reference
            wait_until(lambda: worker_load(cluster, "aw-0", "ckpt_restored_replica") >= len(on_second), 30,
                       "the new aw-0 to restore aw-1's requests from the replica")
            assert worker_load(cluster, "aw-0", "requests_recomputed") == 0
        finally:
            frontend.close()

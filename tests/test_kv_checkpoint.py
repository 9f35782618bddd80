"""KV checkpoints in a real KV store process with metadata in a real (private) Redis server.

Records appear while requests run and are gone after they finish; a Redis outage neither stalls
serving nor loses a request (a failover then recomputes from the token log); a full store stops
checkpointing some requests, visibly, and nothing else changes.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import redis

from conftest import wait_until, worker_load
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.model.config import ModelConfig
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.errors import ConfigError
from resilient_moe.kvstore import keys
from resilient_moe.kvstore.commit_records import parse_entries
from resilient_moe.kvstore.memory_layout import StoreLayout, parse_address
from resilient_moe.launch import make_cluster
from resilient_moe.launch.launcher import Launcher
from resilient_moe.server.frontend import Frontend


def workload(seed: int = 5, n: int = 12, max_tokens: int = 48):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(10, 40))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model):
    prompts, params = workload()
    return [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]


def test_commit_records_follow_requests_and_are_cleaned_up(tiny_model, reference, fork_server, tmp_path):
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=2)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        assert "redis" in cluster.pids and "kv-store" in cluster.pids
        db = redis.Redis.from_url(cluster.deployment.redis_url)
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 10 for h in handles), 60, "requests to be mid-generation")
            commit = wait_until(lambda: db.hgetall(keys.commit_key(cluster.cluster_id, handles[0].request_id)), 10,
                                "a commit record")
            n = int(commit[b"n"])
            assert n > 0 and n % 16 == 0, "whole blocks are committed"
            assert n >= len(prompts[0]) // 16 * 16, "the prompt's full blocks are committed"
            blocks, _ = parse_entries(db.lrange(keys.blocks_key(cluster.cluster_id, handles[0].request_id), 0, -1))
            assert commit[b"owner"] == b"aw-0" and len(blocks) * 16 >= n
            # The tokens list holds the delivered tokens up to the last commit, built from deltas.
            committed = [int(t) for t in db.lrange(keys.tokens_key(cluster.cluster_id, handles[0].request_id), 0, -1)]
            assert committed and committed == handles[0].token_ids[:len(committed)]
            assert [h.wait(60).token_ids for h in handles] == reference
            wait_until(lambda: not [k for k in db.scan_iter(match=f"rmoe:{cluster.cluster_id}:*")
                                    if b":commit:" in k or b":tokens:" in k or b":blocks:" in k], 10,
                       "every record to be deleted after the requests finished")
            assert db.get(f"rmoe:{cluster.cluster_id}:controller"), "the controller's state is in Redis too"
            wait_until(lambda: worker_load(cluster, "aw-0", "ckpt_commits") > 0, 5, "commit counters")
            assert worker_load(cluster, "aw-0", "ckpt_store_full") == 0
            db.close()
        finally:
            frontend.close()


def test_redis_outage_neither_stalls_nor_loses_requests(tiny_model, reference, fork_server, tmp_path):
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=2)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        redis_pid = cluster.pids["redis"]
        try:
            handles = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 5 for h in handles), 60, "requests to be mid-generation")
            os.kill(redis_pid, signal.SIGSTOP)  # Redis hangs: every command times out
            try:
                before = min(len(h.tokens) for h in handles)
                wait_until(lambda: min(len(h.tokens) for h in handles) >= before + 5, 30,
                           "decoding to go on while Redis is down")
                os.kill(cluster.pids["aw-0"], signal.SIGKILL)  # and now a failover that cannot read Redis
                tokens = [h.wait(120).token_ids for h in handles]
            finally:
                os.kill(redis_pid, signal.SIGCONT)
            assert tokens == reference
            assert worker_load(cluster, "aw-1", "ckpt_commit_errors") > 0, "the failed commits are counted"
            assert worker_load(cluster, "aw-1", "recomputed_tokens") > 0, "the moved requests were recomputed"
        finally:
            frontend.close()


def test_a_full_store_stops_checkpointing_visibly(tiny_model, reference, fork_server, tmp_path):
    prompts, params = workload()
    # 1 MiB: 64 blocks of 16 tokens for this model, 32 per attention worker: less than its requests need.
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=2, kv_store_bytes=1 << 20)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 20 for h in handles), 60, "requests to be mid-generation")
            os.kill(cluster.pids["aw-0"], signal.SIGKILL)
            assert [h.wait(120).token_ids for h in handles] == reference
            assert worker_load(cluster, "aw-1", "ckpt_store_full") > 0
        finally:
            frontend.close()


def test_store_layout_and_address_validation(tiny_model):
    import torch

    model = ModelConfig.from_pretrained(tiny_model)
    layout = StoreLayout.for_deployment(model, 1 << 20, 16, torch.float32, attention_workers=2)
    row = 2 * model.num_layers * model.num_kv_heads * model.head_dim * 4
    # each region is kv_store_bytes // attention_workers at most, as many blocks as fit beside its header
    assert layout.region_blocks == ((1 << 19) - layout.header_bytes) // (row * 16)
    assert layout.region_bytes <= 1 << 19 and layout.header_bytes >= 64 + 16 * layout.region_blocks
    assert layout.region_bytes % 4096 == 0 and layout.header_bytes % 4096 == 0
    assert layout.region(0) == range(0, layout.region_blocks)
    assert layout.region(5) == range(5 * layout.region_blocks, 6 * layout.region_blocks)  # scaled up: no ceiling
    assert layout.offset(5) == 5 * layout.region_bytes and layout.region_of(layout.region(5)[-1]) == 5
    assert layout.max_regions == 1024  # no max_attention_workers: only the absolute bound
    capped = StoreLayout.for_deployment(model, 1 << 20, 16, torch.float32, attention_workers=2, max_attention_workers=3)
    with pytest.raises(ValueError, match="no KV store region 3: regions are 0 to 2"):
        capped.region(3)
    with pytest.raises(ConfigError, match=r"kv_store_bytes \(\d+\) gives each of the 2 attention workers a region"):
        StoreLayout.for_deployment(model, row * 16, 16, torch.float32, attention_workers=2)
    assert parse_address("memfd:@rmoe-c1-kv-store-3:4096") == ("@rmoe-c1-kv-store-3", 4096)
    assert parse_address("memfd:@rmoe-c1-kv-store-3:4096;tcp:127.0.0.1:5000") == ("@rmoe-c1-kv-store-3", 4096)
    for bad in ("memfd:12:7:4096", "memfd:@x", "tcp:1:2:3", "memfd:@:4096", "memfd:@a:b"):
        with pytest.raises(ValueError, match="not a KV store address"):
            parse_address(bad)
    with pytest.raises(ConfigError, match="kv_store_bytes"):
        DeploymentConfig(kv_store_bytes=100)
    with pytest.raises(ConfigError, match="redis_url"):
        DeploymentConfig(redis_url="http://localhost")


def test_controller_restart_recovers_the_cluster_from_redis(tiny_model, reference, fork_server, tmp_path):
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=2)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            before = {w.name: w.incarnation for w in cluster.state().workers}
            handles = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 5 for h in handles), 60, "requests to be mid-generation")
            old = cluster.pids["controller"]
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: cluster.pids["controller"] != old, 10, "the launcher to start a new controller")
            state = wait_until(lambda: _state_or_none(cluster), 10, "the new controller to answer")
            assert {w.name: w.incarnation for w in state.workers} == before, "same workers, same incarnations"
            assert any(e.kind == "controller" and "recovered" in e.detail for e in state.events)
            # The new controller still handles failures: an expert worker dies, a replacement joins.
            os.kill(cluster.pids["ew-1"], signal.SIGKILL)
            assert [h.wait(120).token_ids for h in handles] == reference
            wait_until(lambda: any(w.name == "ew-1" and w.incarnation > before["ew-1"] and w.state == 2
                                   for w in cluster.state().workers), 30, "a replacement ew-1")
        finally:
            frontend.close()


def _state_or_none(cluster: Launcher):
    try:
        return cluster.state()
    except Exception:
        return None


def test_redis_killed_mid_run_is_restarted_and_nothing_is_lost(tiny_model, reference, fork_server, tmp_path):
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=2)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 5 for h in handles), 60, "requests to be mid-generation")
            old = cluster.pids["redis"]
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: cluster.pids["redis"] != old, 10, "the launcher to start Redis again")
            db = redis.Redis.from_url(cluster.deployment.redis_url)

            def controller_state_back():
                try:
                    return db.get(f"rmoe:{cluster.cluster_id}:controller")
                except redis.ConnectionError:
                    return None  # the new server is still starting

            wait_until(controller_state_back, 10, "the controller to write its state into the new Redis")
            os.kill(cluster.pids["aw-0"], signal.SIGKILL)
            assert [h.wait(120).token_ids for h in handles] == reference
            db.close()
        finally:
            frontend.close()


def test_a_relative_log_dir_works_with_the_private_redis(tiny_model, fork_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # redis-server changes directory: paths handed to it must be absolute
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=1)
    with make_cluster(dep, log_dir="logs", fork_server=fork_server) as cluster:
        assert redis.Redis.from_url(cluster.deployment.redis_url).ping()
    assert (tmp_path / "logs" / "redis.log").is_file()

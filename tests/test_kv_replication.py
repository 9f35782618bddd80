"""Replicated KV checkpoints on real processes, real Redis and real TCP: two KV stores, one replica of
every checkpoint. A simulated node loss (an attention worker and its primary KV store SIGKILLed at the
same instant) is survived token-identically with every restore read from the replica; the replacement
store gets the live blocks again, so a second node loss (the other worker and its store) is survived
the same way. A store process refuses a TCP client without the cluster secret. Without a cluster: a
checkpointer's writes reach a replica over TCP, a dropped connection is retried, and a restore reads
the replica over TCP."""

from __future__ import annotations

import os
import random
import signal
import socket

import pytest
import redis
import torch

from conftest import wait_until, worker_load
from resilient_moe import auth
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.kvstore import keys
from resilient_moe.kvstore.checkpoint import KVCheckpointer
from resilient_moe.kvstore.remote import RemoteStore, RemoteStoreError
from resilient_moe.kvstore.replication import StoreRef
from resilient_moe.kvstore.memory_layout import MemfdServer, StoreMemory, layout_for, split_address
from resilient_moe.launch import make_cluster
from resilient_moe.launch.launcher import Launcher
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend import Frontend
from resilient_moe.server.metrics import ClusterCollector


def workload(n: int = 8, max_tokens: int = 200):
    rng = random.Random(11)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(20, 40))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model):
    prompts, params = workload()
    return [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]


def ready_incarnation(cluster: Launcher, name: str) -> int:
    return next((w.incarnation for w in cluster.state().workers if w.name == name and w.state == pb.READY), 0)


def lose_node(cluster: Launcher, worker: str, store: str) -> None:
    """SIGKILL an attention worker and its primary KV store at the same instant."""
    pids = [cluster.pids[worker], cluster.pids[store]]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # both stop before either dies: no one sees one die first
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def check_store_authentication(cluster: Launcher, name: str) -> None:
    """A real store process refuses a client without the cluster secret (and counts it), and serves
    one with it."""
    store = next(w for w in cluster.state().workers if w.name == name)
    address = split_address(store.data_address)[1]
    layout = layout_for(cluster.worker_config("aw-0"))
    ours = auth.secret()
    auth.install(auth.new_secret())  # a process that does not hold the cluster's secret
    try:
        with pytest.raises(RemoteStoreError, match="authentication failed"):
            RemoteStore(address, layout, "intruder")
    finally:
        auth.install(ours)
    wait_until(lambda: worker_load(cluster, name, "tcp_auth_refused") == 1, 10, "the store to count the refusal")
    client = RemoteStore(address, layout, "aw-0")
    stamps, _ = client.read(torch.tensor([0]))
    assert stamps.shape == (1, 2)
    client.close()


def restore_metric(cluster: Launcher, worker: str) -> dict[str, float]:
    """resilient_moe_kv_restore_total{worker, source} as /metrics shows it, by source."""
    collector = ClusterCollector()
    collector.update(cluster.state(), [], 0)
    family = next(m for m in collector.collect() if m.name == "resilient_moe_kv_restore")
    return {s.labels["source"]: s.value for s in family.samples
            if s.name.endswith("_total") and s.labels["worker"] == worker}


def test_node_loss_restores_from_the_replica_and_redundancy_comes_back(tiny_model, reference, fork_server, tmp_path):
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=2, kv_stores=2, kv_replicas=1)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        assert {"kv-store", "kv-store-1"} <= set(cluster.pids)
        check_store_authentication(cluster, "kv-store-1")
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
            assert restore_metric(cluster, "aw-1") == {"local": 0, "replica": len(on_victim), "recompute": 0}

            # Redundancy comes back: the replacement store gets aw-1's live blocks again.
            wait_until(lambda: ready_incarnation(cluster, "kv-store") not in (0, old_store), 60, "a new kv-store")
            wait_until(lambda: worker_load(cluster, "aw-1", "ckpt_replica_reships") >= 1, 20,
                       "aw-1 to ship its live blocks to the new store")
            wait_until(lambda: ready_incarnation(cluster, "aw-0") > 0, 60, "a new aw-0")
            wait_until(lambda: worker_load(cluster, "aw-1", "ckpt_replica_pending") == 0
                       and worker_load(cluster, "aw-1", "ckpt_replicas") == 1, 20, "aw-1's replica to catch up")
            assert [h.wait(180).token_ids for h in handles] == reference

            # Second node loss, under a new load: aw-1 and its primary store; the new aw-0 restores
            # aw-1's requests from the replacement kv-store, which holds aw-1's replicas now.
            acks = worker_load(cluster, "aw-1", "ckpt_replica_acks")
            # (placement goes by the load each worker reports, as the frontend's view last showed it)
            def reported(name: str) -> float:
                peer = frontend.view.workers.get(name) if frontend.view is not None else None
                return sum(peer.load.get(k, 0.0) for k in ("running", "waiting", "restoring")) if peer else -1.0

            wait_until(lambda: reported("aw-0") == 0 and reported("aw-1") == 0, 20,
                       "the frontend to see the first load done")
            second = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 24 for h in second), 60, "the new requests to be mid-generation")
            on_second = [h for h in second if h.worker == "aw-1" and not h.done]
            assert on_second, "the frontend spread the new requests over both attention workers"
            # (acks count requests whose replicated prefix grew: a few rounds for every request on aw-1)
            wait_until(lambda: worker_load(cluster, "aw-1", "ckpt_replica_acks") >= acks + 3 * len(on_second), 60,
                       "aw-1's replica to ack the new requests' blocks")
            lose_node(cluster, "aw-1", "kv-store-1")
            assert [h.wait(180).token_ids for h in second] == reference
            wait_until(lambda: worker_load(cluster, "aw-0", "ckpt_restored_replica") >= len(on_second), 30,
                       "the new aw-0 to restore aw-1's requests from the replica")
            assert worker_load(cluster, "aw-0", "requests_recomputed") == 0
        finally:
            frontend.close()


# ---- a real checkpointer, a replica over TCP, without a cluster ---------------------------------


class Writer:
    """An engine whose checkpointer maps its own primary store (incarnation `store`), stepped as an
    attention worker steps it."""

    def __init__(self, model_dir, layout, db, index: int, store: int, memory: StoreMemory) -> None:
        self.engine = LLMEngine(model_dir, EngineConfig())
        self.ckpt = KVCheckpointer(self.engine, layout, index, db, "test", f"aw-{index}", 100 + index)
        self.handoff = MemfdServer(memory, f"@rmoe-test-kv-{os.getpid()}-{index}")
        self.ckpt.attach(self.handoff.address, store)
        wait_until(lambda: self.ckpt.counters["store_attaches"] == 1, 10, f"aw-{index} to map its store")
        wait_until(lambda: self.ckpt.settled() and self.ckpt._ready_store == store, 10, "the region claim")
        self.tokens: dict[str, list[int]] = {}

    def step(self) -> None:
        for event in self.engine.step():
            self.tokens.setdefault(event.request_id, []).append(event.token_id)
        self.ckpt.after_step()


@pytest.fixture
def stores(tiny_model):
    """(layout, [three stores' memory], a TCP server over the third one, incarnation 12)."""
    from resilient_moe import auth
    from resilient_moe.model.config import ModelConfig
    from resilient_moe.kvstore.remote import StoreServer
    from resilient_moe.kvstore.memory_layout import StoreLayout

    if not auth.has_secret():
        auth.install(auth.new_secret())
    layout = StoreLayout.for_deployment(ModelConfig.from_pretrained(tiny_model), 4 << 20, 16, torch.float32, 2)
    memories = [StoreMemory(layout, f"test-kv-store-{i}") for i in range(3)]
    server = StoreServer(memories[2], "kv-store-1", 12).start()
    try:
        yield layout, memories, server
    finally:
        server.close()
        for memory in memories:
            memory.close()


def test_writes_reach_the_replica_and_a_restore_reads_it_over_tcp(tiny_model, stores, redis_server):
    """aw-0 writes into its primary (store 11) and ships to the replica (store 12, over TCP); a dropped
    connection is tried again with every live block; aw-1, whose own primary is another store and
    for which store 11 is gone, restores aw-0's requests from the replica over TCP, token-identically."""
    layout, memories, server = stores
    prompts, params = workload(n=3, max_tokens=160)  # room: the drop is seen on a later write
    reference = [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]
    db = redis.Redis(unix_socket_path=redis_server)
    replica = StoreRef("kv-store-1", 1, 12, f"memfd:@none:0;{server.address}", "h")
    writer = Writer(tiny_model, layout, db, 0, 11, memories[0])
    reader = Writer(tiny_model, layout, db, 1, 13, memories[1])
    try:
        writer.ckpt.use_replicas([replica], [replica])
        ids = [f"r{i}" for i in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts):
            writer.engine.add_request(request_id, prompt, params)
        while min(len(writer.tokens.get(r, [])) for r in ids) < 12:
            writer.step()
        # a dropped connection: given up, then tried again with every live block
        for conn in list(server._conns):
            conn.shutdown(socket.SHUT_RDWR)
        wait_until(lambda: writer.step() or writer.ckpt.stats()["ckpt_replica_errors"] >= 1, 20, "the failure")
        wait_until(lambda: writer.step() or writer.ckpt.counters["replica_reships"] >= 1, 20, "a retry")
        while min(len(writer.tokens.get(r, [])) for r in ids) < 24:
            writer.step()

        def record(request_id):
            return {k.decode(): v.decode() for k, v in db.hgetall(keys.commit_key("test", request_id)).items()}

        wait_until(lambda: writer.ckpt.settled() and writer.ckpt.stats()["ckpt_replica_pending"] == 0
                   and all(record(r).get("replica:12") == str(db.llen(keys.blocks_key("test", r))) for r in ids),
                   20, "the replica to hold every committed block, and the records to say so")
        assert all(record(r)["store"] == "11" for r in ids)
        seen = {r: list(writer.tokens[r]) for r in ids}
        writer.ckpt.stop()
        reader.ckpt.use_replicas([], [replica])  # store 11 is not alive: only the replica is
        moved = {r: reader.engine.new_sequence(r, p, params, output_ids=seen[r]) for r, p in zip(ids, prompts)}
        for seq in moved.values():
            reader.ckpt.request_restore(seq)
        ready = {}
        wait_until(lambda: ready.update({s.request_id: (s, rows, n) for s, rows, n in reader.ckpt.finished_restores()})
                   or len(ready) == len(ids), 10, "the restores")
        assert reader.ckpt.counters["restored_replica"] == len(ids)
        assert reader.ckpt.counters["restore_stamp_mismatches"] == 0
        for request_id, (seq, rows, n) in ready.items():
            assert n >= 16 and reader.engine.resume(seq, rows, n) == n
            reader.tokens[request_id] = list(seen[request_id])
        for _ in range(1000):
            if not reader.engine.has_unfinished():
                break
            reader.step()
        assert [reader.tokens[r] for r in ids] == reference
        assert server.counters["auth_refused"] == 0 and server.counters["reads"] >= 1
    finally:
        for w in (writer, reader):
            w.ckpt.stop()
            w.handoff.close()
        db.close()

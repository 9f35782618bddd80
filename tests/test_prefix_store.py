"""Prefix reuse across attention workers through the KV store (kvstore/prefix_index.py): a full block
that one worker checkpointed is read into another worker's cache instead of being computed, checked
with the stamps and fencing of a failover restore; a stale or fenced source is never used (the blocks
are computed), and the tokens are those of a run without any cache, bit for bit."""

from __future__ import annotations

import os
import random

import pytest
import redis
import torch

from conftest import wait_until
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.kvstore import keys
from resilient_moe.kvstore.memory_layout import MemfdServer, StoreLayout, StoreMemory, claim_region
from resilient_moe.kvstore.prefix_index import PrefixEntry, usable_run
from resilient_moe.model.config import ModelConfig

PREFIX = 96  # six blocks of 16


def _prompts(n: int, seed: int = 21, vocab: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(PREFIX)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(length)] for length in (5, 17, 1, 30)[:n]]


PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture
def stack(tiny_model, redis_server):
    """(writer aw-0, reader aw-1, the store's memory, the Redis client, caching-off reference tokens)."""
    from test_kv_windows import Worker

    prompts = _prompts(4)
    reference = [r.token_ids for r in LLMEngine(tiny_model, EngineConfig(enable_prefix_caching=False)).generate(
        prompts, PARAMS)]
    layout = StoreLayout.for_deployment(ModelConfig.from_pretrained(tiny_model), 4 << 20, 16, torch.float32,
                                        attention_workers=2)
    memory = StoreMemory(layout, "test-prefix-store")
    db = redis.Redis(unix_socket_path=redis_server)
    db.flushdb()
    with MemfdServer(memory, f"@rmoe-test-prefix-store-{os.getpid()}") as server:
        workers = [Worker(tiny_model, layout, server.address, db, i) for i in range(2)]
        for w in workers:
            w.ckpt.publish_prefixes = True
        try:
            yield workers[0], workers[1], memory, db, prompts, reference
        finally:
            for w in workers:
                w.close()
            db.close()
    memory.close()


def admit(worker, request_id: str, prompt: list[int]) -> int:
    """What an attention worker does with a new request: look its missing prefix up in the store, and
    queue it with what was found; returns the positions read from the store."""
    seq = worker.engine.new_sequence(request_id, prompt, PARAMS)
    if not worker.ckpt.request_prefix(seq):
        worker.engine.scheduler.add(seq)
        return 0
    ready = []
    wait_until(lambda: ready.extend(worker.ckpt.finished_prefixes()) or ready, 10, "the prefix lookup")
    found, start, rows = ready[0]
    assert found is seq
    return worker.engine.add_with_prefix(seq, start, rows)


def computed_prompt_tokens(worker, from_store: int = 0) -> int:
    """Prompt tokens the worker's requests computed: neither found in its prefix cache nor read from the store."""
    s = worker.engine.scheduler
    return s.prefix_query_tokens - s.prefix_hit_tokens - from_store


def publish(writer, prompt: list[int]) -> None:
    """The writer serves a request to its end: its full blocks are checkpointed (and named in the index),
    then released with it (their rows stay in the store until the region reuses them)."""
    assert admit(writer, "a", prompt) == 0  # nothing in the store yet
    writer.run()
    writer.ckpt.after_step()  # the finished request's release
    wait_until(lambda: writer.ckpt.settled() and writer.ckpt.counters["prefix_published"] >= PREFIX // 16, 10,
               "the writer's blocks to be named in the prefix index")


def test_a_prefix_checkpointed_by_one_worker_is_read_by_another_token_identically(stack):
    writer, reader, _, db, prompts, reference = stack
    publish(writer, prompts[0])
    assert writer.tokens["a"] == reference[0]
    # b shares the six prefix blocks: aw-1 never saw them, reads them from aw-0's (released) checkpoint
    assert admit(reader, "b", prompts[1]) == PREFIX
    reader.run()
    assert reader.tokens["b"] == reference[1]
    assert reader.ckpt.counters["prefix_found_blocks"] == PREFIX // 16
    assert reader.ckpt.counters["prefix_stamp_mismatches"] == 0
    # it prefilled only what follows the prefix (the read blocks count as hits), and cached the read blocks:
    assert computed_prompt_tokens(reader, PREFIX) == len(prompts[1]) - PREFIX
    assert admit(reader, "c", prompts[2]) == 0  # c's prefix is in aw-1's own cache now: no lookup
    reader.run()
    assert reader.tokens["c"] == reference[2]
    assert reader.engine.scheduler.prefix_hit_tokens == PREFIX
    assert computed_prompt_tokens(reader, PREFIX) == len(prompts[1]) + len(prompts[2]) - 2 * PREFIX
    # aw-1 checkpointed b's blocks too (the read ones included): the index names the latest writer
    first_hash = reader.engine.scheduler.prefix_hashes(reader.engine.new_sequence("x", prompts[3], PARAMS))[0]
    assert PrefixEntry.parse(db.get(keys.prefix_key("test", first_hash))).owner == "aw-1"


def _rewrite_first_block(memory: StoreMemory, db, prompt_hash: bytes) -> None:
    """What the region does when it reuses the block for other rows: another generation, other rows."""
    entry = PrefixEntry.parse(db.get(keys.prefix_key("test", prompt_hash)))
    region = memory.region(0)
    local = entry.block - region.first_block
    region.stamps[local, 1] = entry.gen + 1000
    region.rows[:, local * 16 : (local + 1) * 16] = 0.5


def test_a_block_rewritten_since_it_was_named_is_computed_instead(stack):
    writer, reader, memory, db, prompts, reference = stack
    publish(writer, prompts[0])
    first_hash = reader.engine.scheduler.prefix_hashes(reader.engine.new_sequence("x", prompts[1], PARAMS))[0]
    _rewrite_first_block(memory, db, first_hash)
    assert admit(reader, "b", prompts[1]) == 0  # the run starts at the rewritten block: nothing usable
    reader.run()
    assert reader.tokens["b"] == reference[1]
    assert reader.ckpt.counters["prefix_stamp_mismatches"] == 1
    assert computed_prompt_tokens(reader) == len(prompts[1])


def test_blocks_of_a_fenced_writer_are_computed_instead(stack):
    writer, reader, memory, db, prompts, reference = stack
    publish(writer, prompts[0])
    # the controller fenced aw-0's incarnation: its entries are not used
    reader.ckpt.fenced = frozenset({("aw-0", 1)})
    assert admit(reader, "b", prompts[1]) == 0
    reader.run()
    assert reader.tokens["b"] == reference[1]
    assert reader.ckpt.counters["prefix_fenced"] == 1
    assert reader.ckpt.counters["prefix_found_blocks"] == 0


def test_blocks_in_a_region_a_successor_claimed_are_computed_instead(stack):
    writer, reader, memory, db, prompts, reference = stack
    publish(writer, prompts[0])
    # a successor of aw-0 claimed its region (seen in the store before any cluster view says so)
    assert claim_region(memory.region(0), 2) is None
    assert admit(reader, "b", prompts[3]) == 0
    reader.run()
    assert reader.tokens["b"] == reference[3]
    assert reader.ckpt.counters["prefix_fenced"] == 1
    assert reader.ckpt.counters["prefix_found_blocks"] == 0


def test_usable_run_is_one_writer_one_region_and_parse_rejects_malformed_entries():
    layout = StoreLayout(2, 8, torch.float32, 16, region_blocks=10)
    e = [PrefixEntry(1, b, 3, 2 * (b + 1), "aw-0") for b in range(4)]
    assert usable_run(e, layout, set()) == e
    assert usable_run([None, *e], layout, set()) == []
    assert usable_run([*e[:2], None, e[3]], layout, set()) == e[:2]
    assert usable_run([e[0], PrefixEntry(1, 1, 4, 4, "aw-0")], layout, set()) == [e[0]]  # another incarnation
    assert usable_run([e[0], PrefixEntry(1, 12, 3, 4, "aw-0")], layout, set()) == [e[0]]  # another region
    assert usable_run([e[0], e[0]], layout, set()) == [e[0]]  # a block named twice
    assert usable_run(e, layout, {("aw-0", 3)}) == []
    assert PrefixEntry.parse(e[0].encode()) == e[0]
    assert PrefixEntry.parse(PrefixEntry(1, 2, 3, 4, "a:b").encode()).owner == "a:b"
    for bad in (b"", b"1:2:3", b"1:2:3:5:aw-0", b"x:2:3:4:aw-0", b"1:2:3:4:", b"0:2:3:4:aw-0"):
        assert PrefixEntry.parse(bad) is None, bad


def test_setting_is_validated():
    from resilient_moe.deployment import DeploymentConfig
    from resilient_moe.errors import ConfigError

    assert DeploymentConfig.from_dict({"model": "m"}).prefix_store is True
    dep = DeploymentConfig.from_dict({"model": "m", "prefix_store": False})
    assert DeploymentConfig.from_dict(dep.to_dict()).prefix_store is False
    with pytest.raises(ConfigError, match="prefix_store"):
        DeploymentConfig.from_dict({"model": "m", "prefix_store": "no"})


# ---- a serving stack: 2 attention + 2 expert workers, KV checkpoints on (the default with Redis) ------


def test_serving_stack_reuses_a_prefix_another_attention_worker_computed(tiny_model, fork_server, tmp_path):
    """A prefix aw-0 computed and checkpointed is read by aw-1, which never saw it, instead of prefilled;
    once aw-0 is killed (fenced, its region claimed by its replacement) a prefix it left in the store is
    prefilled again. Every stream has the tokens of a caching-off run."""
    import signal

    import httpx

    from conftest import worker_load
    from serving import serving_stack, stream_completion

    rng = random.Random(31)
    prefixes = [[rng.randrange(3, 500) for _ in range(48)] for _ in range(2)]
    prompts = [p + [rng.randrange(3, 500) for _ in range(n)] for p in prefixes for n in (3, 9)]
    reference = LLMEngine(tiny_model, EngineConfig(max_model_len=160, enable_prefix_caching=False))
    expected = [r.token_ids for r in reference.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))]
    with serving_stack(tiny_model, fork_server, tmp_path, attention_workers=2, expert_workers=2,
                       max_model_len=160) as stack:
        cluster = stack.cluster
        target = ["aw-0"]
        stack.frontend._pick_worker = lambda prompt_ids: target[0]  # the test places each request

        def serve(i: int, worker: str) -> None:
            target[0] = worker
            result = stream_completion(stack.url, prompts[i], 20, ignore_eos=True)
            assert result.error is None and result.token_ids == expected[i]

        serve(0, "aw-0")
        wait_until(lambda: worker_load(cluster, "aw-0", "ckpt_prefix_published") >= 3, 20,
                   "aw-0 to name the prefix blocks it checkpointed")
        serve(1, "aw-1")  # shares 48 tokens (3 blocks) with prompt 0, which aw-1 never saw
        wait_until(lambda: worker_load(cluster, "aw-1", "prefix_store_hit_tokens") == 48, 20,
                   "aw-1 to report the prefix read from the store")
        assert worker_load(cluster, "aw-1", "prefix_store_restores") == 1
        assert worker_load(cluster, "aw-1", "prefix_hit_tokens") == 0  # its own cache had none of it
        # /metrics reads the cluster monitor's snapshot, which may be a poll behind the controller
        metrics = wait_until(lambda: (t := httpx.get(f"{stack.url}/metrics").text) and
                             'resilient_moe_prefix_store_hit_tokens_total{worker="aw-1"} 48.0' in t and t, 10,
                             "/metrics to show aw-1's prefix read from the store")
        assert 'resilient_moe_prefix_store_restores_total{worker="aw-1"} 1.0' in metrics

        # a source that was fenced: aw-0 computes the second prefix, then dies; its replacement claims its region
        serve(2, "aw-0")
        wait_until(lambda: worker_load(cluster, "aw-0", "ckpt_prefix_published") >= 6, 20, "the second prefix")
        old = next(w.incarnation for w in cluster.state().workers if w.name == "aw-0")
        os.kill(cluster.pids["aw-0"], signal.SIGKILL)
        wait_until(lambda: any(w.name == "aw-0" and w.incarnation != old and worker_load(cluster, "aw-0",
                                                                                         "ckpt_store_attaches") >= 1
                               for w in cluster.state().workers), 90, "aw-0's replacement to map the store")
        misses = worker_load(cluster, "aw-1", "prefix_store_misses")
        serve(3, "aw-1")
        wait_until(lambda: worker_load(cluster, "aw-1", "prefix_store_misses") == misses + 1, 20,
                   "aw-1 to report the lookup that found nothing usable")
        assert worker_load(cluster, "aw-1", "prefix_store_hit_tokens") == 48
        assert worker_load(cluster, "aw-1", "ckpt_prefix_fenced") == 1  # fenced in its view, or its region claimed


def test_a_prefix_in_another_store_is_read_over_tcp(tiny_model, redis_server):
    """The writer's primary store is not the reader's: the reader reads the blocks from it over TCP
    (kvstore/remote.py), with the same stamp checks."""
    from resilient_moe import auth
    from resilient_moe.kvstore.remote import StoreServer
    from resilient_moe.kvstore.replication import StoreRef
    from test_kv_replication import Writer

    if not auth.has_secret():
        auth.install(auth.new_secret())
    prompts = _prompts(2)
    reference = [r.token_ids for r in LLMEngine(tiny_model, EngineConfig(enable_prefix_caching=False)).generate(
        prompts, PARAMS)]
    layout = StoreLayout.for_deployment(ModelConfig.from_pretrained(tiny_model), 4 << 20, 16, torch.float32, 2)
    memories = [StoreMemory(layout, f"test-prefix-store-{i}") for i in range(2)]
    server = StoreServer(memories[0], "kv-store", 11).start()
    db = redis.Redis(unix_socket_path=redis_server)
    writer = Writer(tiny_model, layout, db, 0, 11, memories[0])
    reader = Writer(tiny_model, layout, db, 1, 13, memories[1])
    try:
        for w in (writer, reader):
            w.ckpt.publish_prefixes = True
        writer.engine.add_request("a", prompts[0], PARAMS)
        while writer.engine.has_unfinished():
            writer.step()
        writer.ckpt.after_step()
        wait_until(lambda: writer.ckpt.settled() and writer.ckpt.counters["prefix_published"] >= PREFIX // 16, 10,
                   "the writer's blocks to be named")
        reader.ckpt.use_replicas([], [StoreRef("kv-store", 0, 11, f"memfd:@none:0;{server.address}", "h")])
        assert admit(reader, "b", prompts[1]) == PREFIX
        while reader.engine.has_unfinished():
            reader.step()
        assert [writer.tokens["a"], reader.tokens["b"]] == reference
        assert server.counters["reads"] >= 1
    finally:
        for w in (writer, reader):
            w.ckpt.stop()
            w.handoff.close()
        server.close()
        db.close()
        for memory in memories:
            memory.close()

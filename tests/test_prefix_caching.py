"""Automatic prefix caching (engine/kv_cache.py BlockAllocator, engine/scheduler.py): a request reuses
the KV blocks of the longest cached prefix of full blocks, and its tokens are those of a run without
the cache, bit for bit (batch-invariant kernels: a reused block holds what a recompute would write)."""

from __future__ import annotations

import random

import pytest

from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.engine.kv_cache import BlockAllocator, block_hashes
from resilient_moe.errors import ConfigError

ROOT = b"model"


# ---- (a) the allocator and the hashes -------------------------------------------------------------


def test_chained_hashes_depend_on_the_prefix_and_skip_a_partial_block():
    a = block_hashes(ROOT, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # the partial last block [9] has no hash: it is never shared
    b = block_hashes(ROOT, [9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert a[1] != b[1], "the same block tokens after another prefix must hash differently"
    assert block_hashes(ROOT, [1, 2, 3, 4, 5, 6, 7, 8], 4) == a
    assert block_hashes(b"other model", [1, 2, 3, 4], 4)[0] != a[0]
    assert block_hashes(a[0], [5, 6, 7, 8], 4) == a[1:]  # extending a chain gives the same hashes


def test_refcounts_share_and_release_blocks():
    alloc = BlockAllocator(4, caching=True)
    h = block_hashes(ROOT, list(range(8)), 4)
    mine = alloc.allocate(2)
    for block, bh in zip(mine, h):
        alloc.register(block, bh)
    assert alloc.match(h) == mine and alloc.num_reclaimed(mine) == 0
    theirs = alloc.acquire(alloc.match(h))
    assert [alloc.refcount(b) for b in mine] == [2, 2] and alloc.num_free == 2
    alloc.free(mine)
    assert [alloc.refcount(b) for b in mine] == [1, 1] and alloc.num_free == 2
    alloc.free(theirs)
    assert alloc.num_free == 4 and alloc.match(h) == mine  # refcount 0: evictable, still cached
    assert alloc.num_reclaimed(mine) == 2
    alloc.acquire(mine)
    assert alloc.num_free == 2
    with pytest.raises(AssertionError):
        alloc.free(mine + mine)  # released more often than held


def test_eviction_takes_uncached_blocks_first_then_least_recently_freed():
    alloc = BlockAllocator(4, caching=True)
    hashes = block_hashes(ROOT, list(range(12)), 4)
    blocks = alloc.allocate(3)
    for block, bh in zip(blocks, hashes):
        alloc.register(block, bh)
    alloc.free(blocks)  # released last block first: the prefix is the most recently freed
    assert alloc.allocate(1) == [3] and alloc.num_evictions == 0  # the never-cached block goes first
    assert alloc.allocate(1) == [blocks[2]] and alloc.num_evictions == 1  # then the deepest block
    assert alloc.match(hashes) == blocks[:2]
    assert alloc.allocate(1) == [blocks[1]]
    assert alloc.match(hashes) == blocks[:1]
    alloc.acquire([blocks[0]])  # a hit makes it held: nothing left to evict
    with pytest.raises(RuntimeError):
        alloc.allocate(1)


def test_a_duplicate_hash_keeps_the_first_block_and_caching_off_registers_nothing():
    alloc = BlockAllocator(3, caching=True)
    h = block_hashes(ROOT, list(range(4)), 4)[0]
    a, b = alloc.allocate(2)
    alloc.register(a, h)
    alloc.register(b, h)  # computed twice at once: b stays private
    assert alloc.match([h]) == [a]
    alloc.free([b])
    assert alloc.num_cached == 1 and alloc.num_free == 2
    off = BlockAllocator(2)
    block = off.allocate(1)[0]
    off.register(block, h)
    assert off.match([h]) == []


def test_setting_is_validated():
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching="yes")
    assert EngineConfig().enable_prefix_caching is True
    from resilient_moe.deployment import DeploymentConfig

    dep = DeploymentConfig.from_dict({"model": "m", "engine": {"enable_prefix_caching": False}})
    assert dep.engine.enable_prefix_caching is False
    assert DeploymentConfig.from_dict(dep.to_dict()).engine.enable_prefix_caching is False
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        DeploymentConfig.from_dict({"model": "m", "engine": {"enable_prefix_caching": 1}})


# ---- (b) the engine: caching on gives the tokens of caching off ------------------------------------


def _shared_prefix_prompts(n, prefix_len, seed=3, vocab=300):
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    # suffixes of various lengths, some ending just past a block boundary (one token left to compute)
    return [prefix + [rng.randrange(3, vocab) for _ in range(rng.choice([1, 2, 7, 16, 17, 30]))] for _ in range(n)]


def _params(n, sampled):
    if not sampled:
        return SamplingParams(max_tokens=8, ignore_eos=True)
    return [SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.9, top_p=0.9, seed=100 + i) for i in range(n)]


def _run(model_dir, prompts, params, **config):
    engine = LLMEngine(model_dir, EngineConfig(**config))
    return [r.token_ids for r in engine.generate(prompts, params)], engine


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_shared_prefix_identical_with_and_without_cache(tiny_model, sampled):
    prompts = _shared_prefix_prompts(32, 512)
    params = _params(len(prompts), sampled)
    off, off_engine = _run(tiny_model, prompts, params, enable_prefix_caching=False)
    on, engine = _run(tiny_model, prompts, params)
    assert on == off
    s = engine.scheduler
    assert off_engine.scheduler.prefix_query_tokens == 0
    assert s.prefix_query_tokens == sum(len(p) for p in prompts)
    # the first prompt computes the 512-token prefix (32 blocks); each later one finds it cached,
    # except those admitted in the same step before it was computed
    assert s.prefix_hit_tokens >= 512 * (len(prompts) - 4), s.prefix_hit_tokens
    hits = s.prefix_hit_tokens
    # and the second run of the same prompts on a warm cache finds every full block but the last token's
    warm = engine.generate(prompts, params)
    assert [r.token_ids for r in warm] == off
    bs = engine.config.block_size
    assert s.prefix_hit_tokens - hits >= sum((len(p) - 1) // bs * bs for p in prompts)


def test_a_block_seen_at_another_position_is_not_reused(tiny_model):
    """Block Y cached at positions [16, 32) (after X) is not what a prompt starting with Y needs: the
    chained hash tells them apart, so nothing is reused and the tokens are those of caching off."""
    rng = random.Random(21)
    x, y, z = ([rng.randrange(3, 300) for _ in range(16)] for _ in range(3))
    prompts = [x + y + z + [7], y + z + [7]]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    off, _ = _run(tiny_model, prompts, params, enable_prefix_caching=False)
    engine = LLMEngine(tiny_model, EngineConfig())
    on = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert on == off
    assert engine.scheduler.prefix_hit_tokens == 0


def test_preemption_and_eviction_under_a_small_cache_identical(tiny_model):
    prompts = _shared_prefix_prompts(8, 64, seed=5)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    off, _ = _run(tiny_model, prompts, params, enable_prefix_caching=False)
    on, engine = _run(tiny_model, prompts, params, kv_cache_tokens=256, block_size=16)
    assert on == off
    assert engine.scheduler.num_preemptions > 0, "the small cache should have forced preemptions"
    assert engine.allocator.num_evictions > 0, "the small cache should have evicted cached blocks"
    assert engine.scheduler.prefix_hit_tokens > 0


def test_a_request_aborted_while_its_step_runs_registers_nothing(tiny_model):
    """An attention worker aborts a request (its client went away, a restart-all) between scheduling a
    step and taking its output: its blocks are freed already, so nothing of it enters the cache (this
    crashed the worker with an IndexError), and the request beside it goes on."""
    engine = LLMEngine(tiny_model, EngineConfig(enable_prefix_caching=True))
    engine.add_request("gone", list(range(3, 70)), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("stays", list(range(100, 150)), SamplingParams(max_tokens=4, ignore_eos=True))
    batch = engine.scheduler.schedule()
    assert {s.request_id for s in batch.seqs} == {"gone", "stays"}
    output = engine.runner.run(batch.seqs, 1)
    engine.scheduler.abort("gone")  # before its output is taken (the pipeline's micro-batches overlap)
    engine.scheduler.postprocess(batch, output.all_logits())
    cached = engine.scheduler.allocator
    stays = next(s for s in engine.scheduler.running if s.request_id == "stays")
    assert len(stays.block_hashes) == 50 // 16 and len(cached.match(stays.block_hashes)) == 50 // 16
    gone_hashes = block_hashes(engine.scheduler.prefix_root, list(range(3, 67)), 16)
    assert cached.match(gone_hashes) == [], "an aborted request's blocks entered the cache"


def test_chunked_prefill_counts_cached_tokens_as_computed(tiny_model):
    prompts = _shared_prefix_prompts(3, 300, seed=9)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    off, _ = _run(tiny_model, prompts[:1] * 2 + prompts[1:], params, enable_prefix_caching=False,
                  max_prefill_tokens_per_step=64)
    engine = LLMEngine(tiny_model, EngineConfig(max_prefill_tokens_per_step=64))
    first = engine.generate(prompts[:1], params)
    steps = engine.step_count
    again = engine.generate(prompts[:1], params)  # all but its last partial block is cached
    assert engine.step_count - steps == 4  # one step for the last tokens (and the first sample), then 3 decodes
    rest = engine.generate(prompts[1:], params)
    assert [r.token_ids for r in first + again + rest] == off


def test_every_family_identical_with_and_without_cache(tiny_models):
    """Sliding windows (gpt_oss), latent caches (deepseek_v3) and the rest: reuse gives the same tokens."""
    for family, model_dir in tiny_models.items():
        prompts = _shared_prefix_prompts(4, 80, seed=1, vocab=200)
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        off, _ = _run(model_dir, prompts, params, enable_prefix_caching=False)
        on, engine = _run(model_dir, prompts, params)  # admitted together: little to share yet
        warm = [r.token_ids for r in engine.generate(prompts, params)]
        assert on == off and warm == off, family
        assert engine.scheduler.prefix_hit_tokens >= 4 * 80 // 16 * 16, family


@pytest.fixture(scope="module")
def new_families(tmp_path_factory):
    from test_parity_families import NEW_FAMILIES, save_family_model

    root = tmp_path_factory.mktemp("prefix-families")
    return {family: save_family_model(root / family, family, seed=3 + i) for i, family in enumerate(NEW_FAMILIES)}


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_latent_and_sliding_window_caches_identical_with_and_without_cache(new_families, family):
    """DeepSeek's latent rows and GPT-OSS's sliding-window layers (window 6, far shorter than the shared
    prefix; the engine's cache keeps every layer's rows of every position, so a reused block is whole)."""
    prompts = _shared_prefix_prompts(4, 80, seed=2)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    off, _ = _run(new_families[family], prompts, params, enable_prefix_caching=False)
    on, engine = _run(new_families[family], prompts, params)
    warm = [r.token_ids for r in engine.generate(prompts, params)]
    assert on == off and warm == off
    assert engine.scheduler.prefix_hit_tokens >= 4 * 80 // 16 * 16


# ---- the KV checkpoint of a request that reused cached blocks ---------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_request_that_reused_blocks_checkpoints_and_restores_whole(tmp_path, redis_server, tiny_model, new_families,
                                                                     family):
    """The checkpointer ships every block of a request, those it found cached included, so its record
    lists every block and a restore elsewhere finishes it token-identically. The restored full blocks
    enter the adopter's prefix cache, except a windowed model's (its restore brings only the window)."""
    import os

    import redis
    import torch

    from conftest import wait_until
    from resilient_moe.kvstore import keys
    from resilient_moe.kvstore.commit_records import parse_entries
    from resilient_moe.kvstore.memory_layout import MemfdServer, StoreLayout, StoreMemory
    from resilient_moe.model.config import ModelConfig
    from test_kv_windows import Worker

    model_dir = tiny_model if family == "mixtral" else new_families[family]
    prompts = _shared_prefix_prompts(3, 96, seed=8)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    reference = [r.token_ids for r in LLMEngine(model_dir, EngineConfig(enable_prefix_caching=False)).generate(
        prompts, params)]
    layout = StoreLayout.for_deployment(ModelConfig.from_pretrained(model_dir), 4 << 20, 16, torch.float32,
                                        attention_workers=2)
    memory = StoreMemory(layout, "test-kv-store")
    db = redis.Redis(unix_socket_path=redis_server)
    with MemfdServer(memory, f"@rmoe-test-prefix-kv-{os.getpid()}") as server:
        writer = Worker(model_dir, layout, server.address, db, 0)
        reader = Worker(model_dir, layout, server.address, db, 1)
        try:
            writer.engine.add_request("a", prompts[0], params)
            writer.run()  # the shared 96 tokens (6 blocks) are cached now, refcount 0
            writer.engine.add_request("b", prompts[1], params)
            while len(writer.tokens.get("b", [])) < 20:
                writer.step()
            assert writer.engine.scheduler.prefix_hit_tokens == 96
            n = (len(prompts[1]) + 19) // 16 * 16  # its full blocks, reused ones included

            def record():
                return {k.decode(): v.decode() for k, v in db.hgetall(keys.commit_key("test", "b")).items()}

            wait_until(lambda: record().get("n") == str(n), 10, f"the commit of {n} positions")
            blocks, _ = parse_entries(db.lrange(keys.blocks_key("test", "b"), 0, -1))
            assert len(blocks) == n // 16, "every block of the request is checkpointed, the reused ones too"
            seen = writer.tokens["b"]
            writer.close()
            seq = reader.engine.new_sequence("b", prompts[1], params, output_ids=seen)
            reader.ckpt.request_restore(seq)
            ready = []
            wait_until(lambda: ready.extend(reader.ckpt.finished_restores()) or ready, 10, "the restore")
            _, rows, restored = ready[0]
            assert restored == n
            assert reader.engine.resume(seq, rows, restored) == n
            reader.tokens["b"] = list(seen)
            reader.run()
            assert reader.tokens["b"] == reference[1]
            reader.engine.add_request("c", prompts[2], params)
            reader.run()
            assert reader.tokens["c"] == reference[2]
            hits = reader.engine.scheduler.prefix_hit_tokens
            assert hits == (96 if family == "mixtral" else 0)
        finally:
            writer.close()
            reader.close()
            db.close()
    memory.close()


# ---- (d) a serving stack: 2 attention + 2 expert workers, caching on --------------------------------


def test_serving_stack_with_caching_identical_through_an_attention_worker_kill(tiny_model, fork_server, tmp_path):
    """Requests sharing a prefix, served with the prefix cache on: the tokens of a failure-free
    caching-off run, and still after SIGKILLing an attention worker mid-stream (its requests, which
    reused cached blocks, restore on the other one from checkpoints that hold every block)."""
    import httpx

    from conftest import wait_until
    from serving import admin_headers, serving_stack, stream_completion, streams_through_kill

    rng = random.Random(12)
    prefix = [rng.randrange(3, 500) for _ in range(48)]
    prompts = [prefix + [rng.randrange(3, 500) for _ in range(n)] for n in (3, 5, 9, 17, 2)]
    reference = LLMEngine(tiny_model, EngineConfig(max_model_len=160, enable_prefix_caching=False))
    expected = [r.token_ids for r in reference.generate(prompts, SamplingParams(max_tokens=80, ignore_eos=True))]
    with serving_stack(tiny_model, fork_server, tmp_path, attention_workers=2, expert_workers=2,
                       max_model_len=160) as stack:
        for prompt, want in zip(prompts, expected):  # one at a time: each later one finds the prefix cached
            result = stream_completion(stack.url, prompt, 80, ignore_eos=True)
            assert result.error is None and result.token_ids == want

        def hits():
            cluster = httpx.get(f"{stack.url}/admin/cluster", headers=admin_headers()).json()
            return {w["id"]: w["load"].get("prefix_hit_tokens", 0) for w in cluster["workers"] if w["role"] == "attention"}

        # cache-aware routing sent every later one where the first went (loads within two requests): each
        # found the 48-token prefix cached there
        wait_until(lambda: sorted(hits().values()) == [0, 4 * 48], 10, "the attention workers to report prefix hits")
        results = streams_through_kill(stack, "aw-0", prompts, max_tokens=80, kill_after_tokens=24)
        for result, want in zip(results, expected):
            assert result.error is None and result.done and result.finish_reason == "length"
            assert result.token_ids == want

        def restored():
            cluster = httpx.get(f"{stack.url}/admin/cluster", headers=admin_headers()).json()
            return next(w for w in cluster["workers"] if w["id"] == "aw-1")["load"].get("ckpt_restored", 0) >= 1

        wait_until(restored, 10, "aw-1 to report requests restored from the KV store")
        metrics = httpx.get(f"{stack.url}/metrics").text
        assert 'resilient_moe_prefix_hit_tokens_total{worker="aw-1"}' in metrics


def test_real_width_shared_prefix_identical_with_and_without_cache(real_width):
    """At hidden 2048 (64 experts, top-8): a 1024-token shared prefix reused by later requests gives the
    tokens of computing it again, and the first request still matches transformers."""
    model_dir, prompt, hf_tokens = real_width
    rng = random.Random(6)
    prompts = [prompt] + [prompt[:1024] + [rng.randrange(3, 1024) for _ in range(n)] for n in (1, 20)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    off, _ = _run(model_dir, prompts, params, max_model_len=4096, enable_prefix_caching=False)
    engine = LLMEngine(model_dir, EngineConfig(max_model_len=4096))
    on = [engine.generate([p], params)[0].token_ids for p in prompts]  # one at a time: the later ones hit
    assert on[0] == hf_tokens
    assert on == off
    assert engine.scheduler.prefix_hit_tokens == 2 * 1024


# ---- cache-aware routing (frontend) ----------------------------------------------------------------


def test_placement_prefers_a_worker_that_shares_the_prefix_within_two_requests():
    from resilient_moe.controller.placement import AttentionLoad, choose_attention_worker

    loads = {"aw-0": AttentionLoad(900, 0.5, requests=3, seats=8), "aw-1": AttentionLoad(100, 0.9, requests=1, seats=8),
             "aw-2": AttentionLoad(500, 0.7, requests=2, seats=8)}
    assert choose_attention_worker(loads) == "aw-1"
    assert choose_attention_worker(loads, {"aw-0": 64, "aw-2": 32}) == "aw-0", "the longest shared prefix"
    assert choose_attention_worker(loads, {"aw-1": 64, "aw-0": 64}) == "aw-1", "no longer than the best: load wins"
    far = dict(loads, **{"aw-0": AttentionLoad(900, 0.5, requests=4, seats=8)})
    assert choose_attention_worker(far, {"aw-0": 64}) == "aw-1", "more than two requests busier"
    full = dict(loads, **{"aw-0": AttentionLoad(900, 0.5, requests=2, seats=2)})
    assert choose_attention_worker(full, {"aw-0": 64}) == "aw-1", "no free seat"


def test_recent_prefixes_match_whole_blocks_and_forget_a_lost_worker():
    from resilient_moe.server.prefix_affinity import RecentPrefixes

    recent = RecentPrefixes(capacity=4)
    system = list(range(40))  # two full blocks and a partial one
    recent.add("aw-0", RecentPrefixes.hashes(system + [1, 2]))
    assert recent.shared(RecentPrefixes.hashes(system + [7] * 10), ["aw-0", "aw-1"]) == {"aw-0": 32, "aw-1": 0}
    assert recent.shared(RecentPrefixes.hashes([5] + system), ["aw-0"]) == {"aw-0": 0}
    recent.add("aw-0", RecentPrefixes.hashes(list(range(100, 164))))  # 4 blocks: the oldest two go
    assert recent.shared(RecentPrefixes.hashes(system), ["aw-0"]) == {"aw-0": 0}
    recent.forget("aw-0")
    assert recent.shared(RecentPrefixes.hashes(list(range(100, 164))), ["aw-0"]) == {"aw-0": 0}

"""Sliding-window layers need only their window: what the KV checkpoint writes and restores for them.

The rules are pure functions (`LayerWindows`); the checkpoint test drives a real `KVCheckpointer`
against a real KV store (a memfd, mapped as attention workers map it) and a private Redis: a GPT-OSS
whose window (6) is far shorter than its requests writes the sliding layers' rows only inside the
window, restores read only that window, a restore cut short by a rewritten block steps back to a
prefix whose window was written, and every restored request finishes token-identically.
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest
import redis
import torch

from conftest import wait_until
from test_parity_families import family_config, save_family_model
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.model.config import ModelConfig
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.engine.kv_cache import MAX_GAPS, LayerWindows, RestoredRows, new_kv_cache
from resilient_moe.kvstore import keys
from resilient_moe.kvstore.checkpoint import KVCheckpointer
from resilient_moe.kvstore.commit_records import parse_entries
from resilient_moe.kvstore.memory_layout import MappedStore, MemfdServer, StoreLayout, StoreMemory

CPU = torch.device("cpu")


def windows_of(family: str, **overrides) -> LayerWindows:
    return LayerWindows.of(ModelConfig.from_hf_dict(family_config(family, **overrides).to_dict()))


def test_layer_windows_of_each_kind_of_model():
    oss = windows_of("gpt_oss", layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    assert (oss.full, oss.windowed, oss.window) == ((1,), (0, 2), 6)
    deepseek = windows_of("deepseek_v3")
    assert (deepseek.full, deepseek.windowed, deepseek.window) == ((0, 1, 2), (), None)
    assert deepseek.first_needed(1000) == 0 and deepseek.gap(0, 1000) is None
    assert deepseek.restorable(48, [(0, 40)]) == 48, "no sliding layer: every prefix is restorable"
    # A query at n reads keys in (n - 6, n]: positions n - 5 .. n - 1 of the cache.
    assert [oss.first_needed(n) for n in (0, 3, 5, 6, 48)] == [0, 0, 0, 1, 43]
    assert oss.gap(0, 48) == (0, 43) and oss.gap(48, 64) == (48, 59) and oss.gap(60, 64) is None
    # With a block of slack, a write keeps the window of its commit point less 16 as well.
    slack = LayerWindows.of(ModelConfig.from_hf_dict(family_config("gpt_oss").to_dict()), slack=16)
    assert slack.gap(0, 48) == (0, 27) and slack.gap(48, 64) is None and slack.first_needed(48) == 43


def test_restorable_steps_back_past_gaps_to_a_written_window():
    w = LayerWindows(full=(1,), windowed=(0,), window=6)
    gaps = [(0, 43), (48, 91), (96, 107)]  # writes of [0, 48), [48, 96), [96, 112)
    assert w.restorable(112, gaps) == 112  # the last commit: its window [107, 112) was written
    assert w.restorable(96, gaps) == 96 and w.restorable(48, gaps) == 48  # earlier commits too
    assert w.restorable(64, gaps) == 48, "[59, 64) lies in the gap of the write that ended at 96"
    assert w.restorable(90, gaps) == 48
    assert w.restorable(32, gaps) == 0
    assert w.restorable(111, gaps) == 96, "a prefix one short of a commit needs [106, 111)"
    wide = LayerWindows(full=(), windowed=(0, 1), window=100)  # a window wider than a whole write
    assert wide.restorable(64, [(0, 0)]) == 64 and wide.gap(16, 64) is None


def test_a_long_request_keeps_a_bounded_list_of_gaps():
    w = LayerWindows(full=(1,), windowed=(0,), window=6)
    gaps: list[tuple[int, int]] = []
    for start in range(0, 640, 16):  # 40 blocks written one by one, each skipping its first 11 rows
        gaps = w.add_gap(gaps, start, start + 16)
    assert len(gaps) == MAX_GAPS
    assert gaps[0] == (0, 395) and gaps[1:] == [(s, s + 11) for s in range(400, 640, 16)], "the oldest merged"
    assert w.restorable(640, gaps) == 640 and w.restorable(400, gaps) == 400
    assert w.restorable(384, gaps) == 0, "inside the merged span: steps back to its start, never onto a gap"


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_gather_and_scatter_any_set_of_layers(family):
    cfg = ModelConfig.from_hf_dict(family_config(family).to_dict())
    g = torch.Generator().manual_seed(1)
    cache = new_kv_cache(cfg, num_blocks=4, block_size=4, dtype=torch.float32, device=CPU)
    slots = torch.tensor([5, 0, 14, 9])
    everything = torch.randn(cfg.num_layers, 4, cache.row_width, generator=g)
    cache.scatter(slots, everything)
    assert torch.equal(cache.gather(slots, (2, 0)), everything[[2, 0]])
    assert cache.gather(slots, ()).shape == (0, 4, cache.row_width)
    fresh = torch.randn(1, 2, cache.row_width, generator=g)
    cache.scatter(slots[:2], fresh, (1,))  # only layer 1 of those two slots changes
    expected = everything.clone()
    expected[1, :2] = fresh[0]
    assert torch.equal(cache.gather(slots), expected)
    # Restored rows land in the same places, sliding layers' older slots untouched.
    windows = cache.windows
    table = torch.randn(cfg.num_layers, 16, cache.row_width, generator=g)  # a store's rows [L, R, W]
    rows = torch.tensor([3, 7, 8, 2])  # the store rows of positions 0..3
    restored = RestoredRows.read(table, windows, rows)
    target = new_kv_cache(cfg, 4, 4, torch.float32, CPU)
    restored.scatter_into(target, slots)
    got = target.gather(slots)
    for layer in range(cfg.num_layers):
        start = restored.first if layer in windows.windowed else 0
        assert torch.equal(got[layer, start:], table[layer, rows[start:]])
        assert not got[layer, :start].any(), "rows outside the window are never read"
    rows_read = len(windows.full) * 4 + len(windows.windowed) * (4 - restored.first)
    assert restored.nbytes == rows_read * cache.row_width * 4


# ---- a real checkpointer ----------------------------------------------------------------------


class Worker:
    """An engine with a checkpointer into a shared store, stepped as an attention worker steps it."""

    def __init__(self, model_dir, layout: StoreLayout, address: str, db, index: int, **engine) -> None:
        self.engine = LLMEngine(model_dir, EngineConfig(**engine))
        self.ckpt = KVCheckpointer(self.engine, layout, index, db, "test", f"aw-{index}", 1)
        self.ckpt.attach(address, 1)
        wait_until(lambda: self.ckpt.counters["store_attaches"] == 1, 10, f"aw-{index} to map the store")
        time.sleep(0.1)  # the region claim and predecessor scan happen right after the map
        self.tokens: dict[str, list[int]] = {}

    def step(self) -> None:
        for event in self.engine.step():
            self.tokens.setdefault(event.request_id, []).append(event.token_id)
        self.ckpt.after_step()

    def run(self) -> None:
        for _ in range(1000):
            if not self.engine.has_unfinished():
                return
            self.step()
        raise AssertionError("did not finish")

    def close(self) -> None:
        self.ckpt.stop()


@pytest.fixture
def store(tmp_path):
    """(model dir, layout, address) of a KV store memfd for a GPT-OSS with window 6."""
    model_dir = save_family_model(tmp_path / "gpt_oss", "gpt_oss", seed=6)
    cfg = ModelConfig.from_pretrained(model_dir)
    layout = StoreLayout.for_deployment(cfg, 4 << 20, 16, torch.float32, attention_workers=2)
    memory = StoreMemory(layout, "test-kv-store")
    try:
        with MemfdServer(memory, f"@rmoe-test-kv-{os.getpid()}") as server:
            yield model_dir, layout, server.address
    finally:
        memory.close()


def test_checkpoint_writes_and_restores_only_the_window_of_sliding_layers(store, redis_server):
    model_dir, layout, address = store
    cfg = ModelConfig.from_pretrained(model_dir)
    rng = random.Random(4)
    prompts = {f"r{i}": [rng.randrange(3, 320) for _ in range(100)] for i in range(2)}
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    reference = dict(zip(prompts, (r.token_ids for r in LLMEngine(model_dir, EngineConfig()).generate(
        list(prompts.values()), params))))
    db = redis.Redis(unix_socket_path=redis_server)
    # Prompts prefilled 48 tokens a step: commits at 48, 96, then each full block of decoding.
    writer = Worker(model_dir, layout, address, db, 0, max_prefill_tokens_per_step=48)
    reader = Worker(model_dir, layout, address, db, 1)
    try:
        for request_id, prompt in prompts.items():
            writer.engine.add_request(request_id, prompt, params)
        while min(len(writer.tokens.get(r, [])) for r in prompts) < 20:  # 119 positions cached: 112 committed
            writer.step()

        def record(request_id):
            return {k.decode(): v.decode() for k, v in db.hgetall(keys.commit_key("test", request_id)).items()}

        wait_until(lambda: all(record(r).get("n") == "112" for r in prompts), 10, "the commits of 112 positions")
        windows = writer.ckpt.windows
        assert windows.slack == 16
        # Writes of [0, 48), [48, 96) and [96, 112) kept the sliding rows from the window of 32, 80, 96 on.
        gaps = json.loads(record("r0")["gaps"])
        assert gaps == [[0, 27], [48, 75]], "sliding rows outside the window were never written"
        # r0's block of positions [64, 80) is rewritten after its commit (as a fenced writer would): its
        # restore can use [0, 64) only, and [59, 64) of its sliding layers lies in the second gap: the
        # restore steps back to 48, where that write began.
        mapped = MappedStore(address, layout)
        region = mapped.region(0)  # the writer's
        blocks, _ = parse_entries(db.lrange(keys.blocks_key("test", "r0"), 0, -1))
        region.stamps[blocks[4] - region.first_block, 1] += 2
        mapped.close()
        # r1's frontend had seen only 12 of its 20 tokens: it resumes at 111 positions, one short of
        # the commit, whose window [106, 111) the last write kept (the block of slack).
        seen = {"r0": writer.tokens["r0"], "r1": writer.tokens["r1"][:12]}
        moved = {r: reader.engine.new_sequence(r, prompts[r], params, output_ids=seen[r]) for r in prompts}
        writer.close()
        for seq in moved.values():
            reader.ckpt.request_restore(seq)
        ready = {}
        wait_until(lambda: ready.update({s.request_id: (s, rows, n) for s, rows, n in reader.ckpt.finished_restores()})
                   or len(ready) == 2, 10, "the restores")
        _, rows0, n0 = ready["r0"]
        _, rows1, n1 = ready["r1"]
        assert (n0, n1) == (48, 111)
        assert (rows0.first, rows1.first) == (43, 106)
        width = cfg.kv_row_width * 4
        assert rows1.nbytes == (len(windows.full) * 111 + len(windows.windowed) * 5) * width
        assert reader.ckpt.counters["restored_bytes"] == rows0.nbytes + rows1.nbytes
        assert reader.ckpt.counters["restore_stamp_mismatches"] == 1
        for request_id, (seq, rows, n) in ready.items():
            assert reader.engine.resume(seq, rows, n) == n
            reader.tokens[request_id] = list(seen[request_id])
        reader.run()
        assert reader.tokens == reference
    finally:
        writer.close()
        reader.close()
        db.close()

"""KV bytes per token, and restoring a request's KV vs re-prefilling it at long context: DeepSeek-V3's latent
attention (MLA) against Qwen3-MoE of the same width.

Two random-weight checkpoints with the same hidden size (2048), layers, heads (16) and routed experts
(16, top-2), each with its own family's attention at its released widths:
  - deepseek_v3 with DeepSeek-V3's latent attention (kv_lora_rank 512, qk_rope_head_dim 64,
    qk_nope_head_dim 128, v_head_dim 128, q_lora_rank 1536): its cache keeps 576 numbers per token and layer;
  - qwen3_moe with Qwen3-30B-A3B's grouped-query attention (4 kv heads of 128): K and V, 1024;
  - and, for the sliding-window rule, gpt_oss with the same K and V and GPT-OSS's window of 128 on
    every other layer: a restore reads only the window of those layers (engine/kv_cache.py, LayerWindows).

For each, one request with a --context-token prompt decodes a few tokens on an attention worker that
checkpoints its KV through the real `KVCheckpointer` into a KV store (a memfd, mapped as attention
workers map it) with commit records in a private Redis. A second engine then takes the request over:
  - restore: the committed rows are read back (Redis record, stamps, store), scattered into its cache,
    and only the positions after the last commit are computed before the next token;
  - re-prefill: every position is computed again from the token log (what happens with no checkpoint).
Both must give the same next token (checked). One CPU thread, float32.

    python benchmarks/bench_mla_restore.py [--context 4096] [--layers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resilient_moe.engine.config import EngineConfig, SamplingParams  # noqa: E402
from resilient_moe.model.config import ModelConfig  # noqa: E402
from resilient_moe.engine.engine import LLMEngine  # noqa: E402
from resilient_moe.kvstore.checkpoint import KVCheckpointer  # noqa: E402
from resilient_moe.kvstore.keys import commit_key  # noqa: E402
from resilient_moe import auth  # noqa: E402
from resilient_moe.kvstore.memory_layout import MemfdServer, StoreLayout, StoreMemory  # noqa: E402
from resilient_moe.model.tiny import TinySize, make_tiny_model  # noqa: E402

# DeepSeek-V3's latent attention widths (its config.json).
DEEPSEEK_V3_ATTENTION = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
                         "q_lora_rank": 1536}
DECODED = 4  # tokens the request has produced when its attention worker is lost
CLUSTER = "bench"


@contextlib.contextmanager
def private_redis():
    """A redis-server on a Unix socket in a temporary directory; yields a client."""
    with tempfile.TemporaryDirectory(prefix="rmoe-bench-redis-") as tmp:
        sock = os.path.join(tmp, "redis.sock")
        server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket", sock,
                                   "--save", "", "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=sock)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(redis.RedisError):
                    client.ping()
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.01)
            yield client
        finally:
            client.close()
            server.kill()
            server.wait()


def build_models(root: Path, layers: int, context: int) -> dict[str, Path]:
    size = TinySize(hidden_size=2048, num_layers=layers, num_heads=16, num_kv_heads=4, num_experts=16, top_k=2,
                    intermediate_size=256, vocab_size=1024, max_position_embeddings=2 * context)
    return {
        "deepseek_v3 (MLA)": make_tiny_model(root / "deepseek_v3", "deepseek_v3", seed=1, size=size,
                                             overrides=DEEPSEEK_V3_ATTENTION),
        "qwen3_moe (GQA)": make_tiny_model(root / "qwen3_moe", "qwen3_moe", seed=1, size=size,
                                           overrides={"head_dim": 128}),
        "gpt_oss (GQA, window 128)": make_tiny_model(root / "gpt_oss", "gpt_oss", seed=1, size=size,
                                                     overrides={"sliding_window": 128}),
    }


class Worker:
    """An engine and its checkpointer into the shared store (as an attention worker holds them)."""

    def __init__(self, model: Path, engine_config: EngineConfig, layout: StoreLayout, address: str, db,
                 index: int) -> None:
        self.engine = LLMEngine(model, engine_config)
        self.ckpt = KVCheckpointer(self.engine, layout, index, db, CLUSTER, f"aw-{index}", 1)
        self.ckpt.attach(address, 1)
        wait(lambda: self.ckpt.counters["store_attaches"] == 1, "the store to be mapped")
        time.sleep(0.2)  # the region claim and the predecessor scan follow the map

    def step_until(self, request_id: str) -> int:
        """Step (checkpointing after each) until `request_id` produces a token; that token."""
        for _ in range(100_000):
            events = [e for e in self.engine.step() if e.request_id == request_id]
            self.ckpt.after_step()
            if events:
                return events[0].token_id
        raise RuntimeError("no token")


def wait(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.0005)


def measure(model: Path, context: int, db) -> dict:
    cfg = ModelConfig.from_pretrained(model)
    engine_config = EngineConfig(max_model_len=2 * context, kv_cache_tokens=2 * (context + 256))
    per_token = cfg.kv_bytes_per_token  # float32, every layer
    layout = StoreLayout.for_deployment(cfg, 4 * (context + 256) * per_token + (1 << 20), 16, torch.float32, 2)
    memory = StoreMemory(layout, "rmoe-bench-kv-store")
    server = MemfdServer(memory, f"@rmoe-bench-kv-{os.getpid()}")
    address = server.address
    rng = random.Random(0)
    prompt = [rng.randrange(3, cfg.vocab_size) for _ in range(context)]
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    try:
        # Step 1: the first attention worker prefills and decodes, checkpointing as it goes.
        first = Worker(model, engine_config, layout, address, db, 0)
        seq = first.engine.add_request("r", prompt, params)
        for _ in range(DECODED):
            first.step_until("r")
        committed = seq.num_cached // 16 * 16
        wait(lambda: db.hget(commit_key(CLUSTER, "r"), "n") == str(committed).encode(), "the last commit")
        outputs = list(seq.output_ids)
        first.ckpt.stop()
        del first
        # Step 2: the second one restores it from the store and computes the rest.
        second = Worker(model, engine_config, layout, address, db, 1)
        moved = second.engine.new_sequence("r", prompt, params, output_ids=outputs)
        t0 = time.perf_counter()
        second.ckpt.request_restore(moved)
        ready: list = []
        wait(lambda: ready.extend(second.ckpt.finished_restores()) or ready, "the restore")
        t1 = time.perf_counter()
        _, rows, n = ready[0]
        assert second.engine.resume(moved, rows, n) == n > 0
        t2 = time.perf_counter()
        restored_token = second.step_until("r")
        t3 = time.perf_counter()
        second.engine.abort("r")
        # Step 3: the same request recomputed from its token log alone.
        again = second.engine.new_sequence("again", prompt, params, output_ids=outputs)
        t4 = time.perf_counter()
        second.engine.resume(again)
        recomputed_token = second.step_until("again")
        t5 = time.perf_counter()
        assert restored_token == recomputed_token, "restore and re-prefill disagree"
        second.ckpt.stop()
        restored_bytes = second.ckpt.counters["restored_bytes"]
    finally:
        server.close()
        memory.close()
    return {
        "kv_row_width": cfg.kv_row_width, "layers": cfg.num_layers, "kv_bytes_per_token_fp32": per_token,
        "kv_bytes_per_token_bf16": per_token // 2, "positions": len(prompt) + len(outputs), "restored_positions": n,
        "restored_bytes_per_position": restored_bytes / n, "restore_read_s": t1 - t0, "restore_scatter_s": t2 - t1,
        "restore_tail_s": t3 - t2, "restore_s": t3 - t0, "reprefill_s": t5 - t4,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens of the request that is moved")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of both models")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.context < 64 or args.layers < 1:
        parser.error("--context must be at least 64 and --layers at least 1")
    torch.set_num_threads(1)
    auth.ensure_secret()  # the store hands its memory only to holders of a cluster secret
    results = {}
    with tempfile.TemporaryDirectory(prefix="rmoe-bench-mla-") as tmp, private_redis() as db:
        for name, model in build_models(Path(tmp), args.layers, args.context).items():
            print(f"{name}: prefilling {args.context} tokens, checkpointing, restoring ...", flush=True)
            results[name] = measure(model, args.context, db)
    print(f"\nKV per token and restore vs re-prefill at {args.context} tokens of context "
          f"(hidden 2048, {args.layers} layers, 16 heads, 16 experts top-2; 1 thread, float32)\n")
    header = ("model", "KV/token/layer", "KV B/token fp32", "bf16", "restored B/pos", "read ms", "scatter ms",
              "tail ms", "restore ms", "re-prefill ms", "speed-up")
    rows = [(name, str(r["kv_row_width"]), str(r["kv_bytes_per_token_fp32"]), str(r["kv_bytes_per_token_bf16"]),
             f"{r['restored_bytes_per_position']:.0f}", f"{1e3 * r['restore_read_s']:.1f}",
             f"{1e3 * r['restore_scatter_s']:.1f}", f"{1e3 * r['restore_tail_s']:.1f}", f"{1e3 * r['restore_s']:.1f}",
             f"{1e3 * r['reprefill_s']:.0f}", f"{r['reprefill_s'] / r['restore_s']:.0f}x")
            for name, r in results.items()]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    for line in (header, *rows):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
    mla, gqa = results["deepseek_v3 (MLA)"], results["qwen3_moe (GQA)"]
    print(f"\nMLA keeps {mla['kv_bytes_per_token_fp32'] / gqa['kv_bytes_per_token_fp32']:.2f}x the KV bytes of GQA per "
          f"token; expanded to per-head K and V it would be {16 * (128 + 64 + 128)} numbers per token and layer. "
          "read: Redis record + store copy; tail: positions after the last commit, and the next token; "
          "restored B/pos: bytes read back per restored position (GPT-OSS: its sliding layers' window only).")
    if args.json:
        Path(args.json).write_text(json.dumps({"context": args.context, "layers": args.layers, "results": results},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

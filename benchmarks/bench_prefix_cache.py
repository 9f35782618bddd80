"""Automatic prefix caching: time to first token when requests share a system prompt (colocated engine,
the tiny checkpoint by default).

R requests share an S-token system prompt, each followed by its own U-token question, and generate G
tokens. Each run uses a fresh engine, caching off or on; with caching on the cache is warmed first by
one request carrying the system prompt (as a server that has served it before). Two arrival patterns:

  - sequential: one request at a time on an idle engine (TTFT is the request's own prefill);
  - burst: all R arrive at once (TTFT includes waiting for the prefills queued before it).

Prints TTFT p50 / p99, the prompt tokens the engine computed (prefill, warm-up excluded) and the
off / on ratios. Tokens are checked to be the same with and without the cache.

`--cross-worker`: instead, the first request of a system prompt on an attention worker that never saw
it, which another worker (aw-0) served and checkpointed before: two engines with KV checkpointers into
one KV store (memfd) and a private redis-server (must be on PATH), without and with the store path
(kvstore/prefix_index.py); each of `--requests` system prompts is new to the reader.

    python benchmarks/bench_prefix_cache.py [--model DIR] [--requests 64] [--system 1024] [--user 32]
    python benchmarks/bench_prefix_cache.py --cross-worker [--requests 8] [--system 1024]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resilient_moe.engine.config import EngineConfig, SamplingParams  # noqa: E402
from resilient_moe.engine.engine import LLMEngine  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(model: str, prompts: list[list[int]], system: list[int], params: SamplingParams, caching: bool,
        burst: bool, threads: int | None) -> tuple[list[float], int, list[list[int]]]:
    """(TTFT of each request in s, prompt tokens computed, tokens of each request)."""
    config = EngineConfig(max_model_len=len(prompts[0]) + params.max_tokens + 16, enable_prefix_caching=caching,
                          kv_cache_tokens=len(prompts) * (len(prompts[0]) + params.max_tokens + 32),
                          torch_threads=threads)
    engine = LLMEngine(model, config)
    engine.generate([system + [1]], SamplingParams(max_tokens=1))  # warm: kernels, and the cache when on
    computed = 0

    def count(seqs) -> None:
        nonlocal computed
        computed += sum(min(s.num_scheduled, max(0, len(s.prompt_ids) - s.num_cached)) for s in seqs)

    engine.on_scheduled = count
    ttft: list[float] = []
    tokens: list[list[int]] = []
    groups = [prompts] if burst else [[p] for p in prompts]
    for group in groups:
        start = time.perf_counter()
        first: dict[str, float] = {}
        out: dict[str, list[int]] = {}
        for i, prompt in enumerate(group):
            engine.add_request(f"r{i}", prompt, params)
        while engine.has_unfinished():
            for event in engine.step():
                first.setdefault(event.request_id, time.perf_counter() - start)
                out.setdefault(event.request_id, []).append(event.token_id)
        ttft += [first[f"r{i}"] for i in range(len(group))]
        tokens += [out[f"r{i}"] for i in range(len(group))]
    return ttft, computed, tokens


def cross_worker(model: str, requests: int, system_tokens: int, user_tokens: int, params: SamplingParams,
                 threads: int | None) -> None:
    """TTFT of a system prompt's first request on a worker that never saw it, without / with the store."""
    import os
    import shutil
    import subprocess

    import redis
    import torch

    from resilient_moe.kvstore.checkpoint import KVCheckpointer
    from resilient_moe.kvstore.memory_layout import MemfdServer, StoreLayout, StoreMemory
    from resilient_moe.model.config import ModelConfig

    from resilient_moe import auth

    if not auth.has_secret():  # the store's hand-over proves the cluster secret
        auth.install(auth.new_secret())
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 300) for _ in range(system_tokens + user_tokens)] for _ in range(requests)]
    tmp = tempfile.mkdtemp()
    sock = os.path.join(tmp, "redis.sock")
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket", sock,
                               "--save", "", "--appendonly", "no", "--dir", tmp],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = EngineConfig(max_model_len=len(prompts[0]) + params.max_tokens + 16, torch_threads=threads,
                          kv_cache_tokens=4 * (len(prompts[0]) + params.max_tokens + 32))
    layout = StoreLayout.for_deployment(ModelConfig.from_pretrained(model), 3 * requests * len(prompts[0]) * 4
                                        * ModelConfig.from_pretrained(model).num_layers
                                        * ModelConfig.from_pretrained(model).kv_row_width + (16 << 20),
                                        config.block_size, torch.float32, attention_workers=3)
    memory = StoreMemory(layout, "bench-prefix-store")
    try:
        while True:
            try:
                db = redis.Redis(unix_socket_path=sock)
                db.ping()
                break
            except redis.RedisError:
                time.sleep(0.05)
        with MemfdServer(memory, f"@rmoe-bench-prefix-{os.getpid()}") as handoff:
            def worker(index: int, publish: bool):
                engine = LLMEngine(model, config)
                engine.generate([[5, 6, 7]], SamplingParams(max_tokens=1))  # warm the kernels
                engine.scheduler.prefix_query_tokens = engine.scheduler.prefix_hit_tokens = 0  # warm-up excluded
                ckpt = KVCheckpointer(engine, layout, index, db, "bench", f"aw-{index}", 1)
                ckpt.publish_prefixes = publish
                ckpt.attach(handoff.address, 1)
                deadline = time.monotonic() + 10
                while ckpt.counters["store_attaches"] < 1:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the checkpointer could not map the KV store")
                    time.sleep(0.01)
                time.sleep(0.1)
                return engine, ckpt

            def serve(engine, ckpt, request_id: str, prompt: list[int]) -> tuple[float, list[int]]:
                start = time.perf_counter()
                seq = engine.new_sequence(request_id, prompt, params)
                if ckpt.request_prefix(seq):
                    ready = []
                    while not ready:
                        ready = ckpt.finished_prefixes()
                        time.sleep(0.0002)
                    engine.add_with_prefix(*ready[0])
                else:
                    engine.scheduler.add(seq)
                ttft, tokens = None, []
                while engine.has_unfinished():
                    for event in engine.step():
                        ttft = ttft if ttft is not None else time.perf_counter() - start
                        tokens.append(event.token_id)
                    ckpt.after_step()
                ckpt.after_step()
                return ttft, tokens

            writer = worker(0, True)
            for i, prompt in enumerate(prompts):
                serve(*writer, f"w{i}", prompt)
            while not writer[1].settled():
                time.sleep(0.01)
            writer[1].stop()
            print(f"cross-worker: {requests} system prompts of {system_tokens} tokens (+{user_tokens} own), each "
                  f"served and checkpointed by aw-0 first; TTFT of its first request on a worker that never saw it")
            print(f"{'store path':<11} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'prefill tokens':>15}")
            rows = {}
            for index, publish in ((1, False), (2, True)):
                engine, ckpt = worker(index, publish)
                results = [serve(engine, ckpt, f"r{i}", p[:system_tokens] + p[::-1][:user_tokens])
                           for i, p in enumerate(prompts)]
                computed = engine.scheduler.prefix_query_tokens - engine.scheduler.prefix_hit_tokens \
                    - ckpt.counters["prefix_found_blocks"] * config.block_size
                ttft = [t for t, _ in results]
                rows[publish] = (percentile(ttft, 0.5), percentile(ttft, 0.99), [t for _, t in results])
                print(f"{'on' if publish else 'off':<11} {1000 * rows[publish][0]:>12.1f} {1000 * rows[publish][1]:>12.1f} "
                      f"{computed:>15}")
                ckpt.stop()
            assert rows[False][2] == rows[True][2], "the store path changed the tokens"
            print(f"{'ratio':<11} {rows[False][0] / rows[True][0]:>11.1f}x {rows[False][1] / rows[True][1]:>11.1f}x")
    finally:
        memory.close()
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: a tiny mixtral, written to a temp dir)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--system", type=int, default=1024, help="tokens of the shared system prompt")
    parser.add_argument("--user", type=int, default=32, help="tokens of each request's own part")
    parser.add_argument("--tokens", type=int, default=8, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cross-worker", action="store_true",
                        help="the first request of a prefix on a worker that never saw it, through the KV store")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from resilient_moe.model.tiny import make_tiny_model

        model = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "mixtral", seed=7)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    if args.cross_worker:
        cross_worker(str(model), args.requests, args.system, args.user, params, args.threads)
        return
    rng = random.Random(0)
    system = [rng.randrange(3, 300) for _ in range(args.system)]
    prompts = [system + [rng.randrange(3, 300) for _ in range(args.user)] for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    print(f"{args.requests} requests, {args.system}-token shared system prompt + {args.user} own tokens, "
          f"{args.tokens} generated")
    print(f"{'arrival':<11} {'cache':<5} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'prefill tokens':>15}")
    for burst in (False, True):
        rows = {}
        for caching in (False, True):
            ttft, computed, tokens = run(str(model), prompts, system, params, caching, burst, args.threads)
            rows[caching] = (percentile(ttft, 0.5), percentile(ttft, 0.99), computed, tokens)
            p50, p99, _, _ = rows[caching]
            print(f"{'burst' if burst else 'sequential':<11} {'on' if caching else 'off':<5} {1000 * p50:>12.1f} "
                  f"{1000 * p99:>12.1f} {computed:>15}")
        off, on = rows[False], rows[True]
        assert off[3] == on[3], "caching changed the tokens"
        print(f"{'':<11} {'ratio':<5} {off[0] / on[0]:>11.1f}x {off[1] / on[1]:>11.1f}x "
              f"{off[2] / max(1, on[2]):>14.1f}x")


if __name__ == "__main__":
    main()

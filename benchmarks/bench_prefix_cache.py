"""Automatic prefix caching: time to first token when requests share a system prompt (colocated engine,
the tiny checkpoint by default).

R requests share an S-token system prompt, each followed by its own U-token question, and generate G
tokens. Each run uses a fresh engine, caching off or on; with caching on the cache is warmed first by
one request carrying the system prompt (as a server that has served it before). Two arrival patterns:

  - sequential: one request at a time on an idle engine (TTFT is the request's own prefill);
  - burst: all R arrive at once (TTFT includes waiting for the prefills queued before it).

Prints TTFT p50 / p99, the prompt tokens the engine computed (prefill, warm-up excluded) and the
off / on ratios. Tokens are checked to be the same with and without the cache.

    python benchmarks/bench_prefix_cache.py [--model DIR] [--requests 64] [--system 1024] [--user 32]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: a tiny mixtral, written to a temp dir)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--system", type=int, default=1024, help="tokens of the shared system prompt")
    parser.add_argument("--user", type=int, default=32, help="tokens of each request's own part")
    parser.add_argument("--tokens", type=int, default=8, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    model = args.model
    if model is None:
        from resilient_moe.model.tiny import make_tiny_model

        model = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "mixtral", seed=7)
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

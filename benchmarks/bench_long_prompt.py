"""Long prompts at real widths: what a prompt's prefill does to streams that are decoding, chunked vs
unchunked, and prefill throughput colocated vs disaggregated.

The checkpoint has Qwen3-30B-A3B's attention and routing shapes (hidden 2048, 16 heads of 128, 4 kv
heads, 64 experts, top-8; 2 layers, experts 128 wide to keep CPU time down), random weights, written
by transformers' save_pretrained (cached in --cache).

Part 1 (colocated engine, one process): 8 streams decode; a prompt of each length arrives; the
streams' inter-token gaps from its arrival until its first token (p50, p99, max), next to their steady
gap, with prompt chunks sized by time (the default max_step_ms), in fixed chunks of --chunk tokens a step,
and whole (one step).

Part 2: time to first token of one prompt, colocated vs 1 attention worker + 2 expert workers (shm),
as prefill throughput (prompt tokens / s).

    python benchmarks/bench_long_prompt.py [--prompts 1024,4096,8192] [--chunk 512] [--no-part2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resilient_moe.deployment import DeploymentConfig  # noqa: E402
from resilient_moe.engine.config import EngineConfig, SamplingParams  # noqa: E402
from resilient_moe.engine.engine import LLMEngine  # noqa: E402
from resilient_moe.launch import make_cluster  # noqa: E402
from resilient_moe.server.frontend import Frontend  # noqa: E402

SHAPE = dict(vocab_size=1024, hidden_size=2048, intermediate_size=256, moe_intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=64,
             num_experts_per_tok=8, max_position_embeddings=16384, initializer_range=0.05, norm_topk_prob=True)
STREAMS = 8


def checkpoint(cache: Path) -> Path:
    path = cache / "real-width-qwen3-moe"
    if not (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM, Qwen3MoeConfig

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**SHAPE), attn_implementation="eager")
        model.save_pretrained(path)
    return path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def gaps_while_prefilling(model: Path, prompt_len: int, chunk: int, max_step_ms: float | None) -> dict:
    """Steady gap, then the streams' gaps while a prompt of `prompt_len` tokens is prefilled."""
    engine = LLMEngine(model, EngineConfig(max_model_len=prompt_len + 64, max_prefill_tokens_per_step=chunk,
                                           max_step_ms=max_step_ms,
                                           max_num_batched_tokens=max(chunk + STREAMS, 4096),
                                           kv_cache_tokens=prompt_len + 64 * STREAMS + 1024))
    rng = random.Random(prompt_len)
    for i in range(STREAMS):
        engine.add_request(f"s{i}", [rng.randrange(3, 1000) for _ in range(16)],
                           SamplingParams(max_tokens=4000, ignore_eos=True))

    def step() -> float:
        began = time.perf_counter()
        engine.step()
        return time.perf_counter() - began

    for _ in range(3):
        step()
    steady = [step() for _ in range(8)]
    engine.add_request("long", [rng.randrange(3, 1000) for _ in range(prompt_len)], SamplingParams(max_tokens=1))
    gaps = []
    while any(s.request_id == "long" for s in engine.scheduler.running + list(engine.scheduler.waiting)):
        gaps.append(step())
    return {"steady_p50_ms": 1000 * statistics.median(steady), "p50_ms": 1000 * statistics.median(gaps),
            "p99_ms": 1000 * percentile(gaps, 0.99), "max_ms": 1000 * max(gaps), "steps": len(gaps),
            "prefill_s": sum(gaps)}


def ttft_colocated(model: Path, prompt: list[int]) -> float:
    engine = LLMEngine(model, EngineConfig(max_model_len=len(prompt) + 8))
    began = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=1))
    return time.perf_counter() - began


def ttft_disaggregated(model: Path, prompt: list[int]) -> float:
    dep = DeploymentConfig(model=str(model), attention_workers=1, expert_workers=2, kv_checkpoint=False,
                           engine=EngineConfig(max_model_len=len(prompt) + 8))
    with make_cluster(dep) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            frontend.generate([[5, 6, 7]], SamplingParams(max_tokens=2), timeout_s=120)  # warm the links
            began = time.perf_counter()
            frontend.generate([prompt], SamplingParams(max_tokens=1), timeout_s=1200)
            return time.perf_counter() - began
        finally:
            frontend.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default="1024,4096,8192", help="prompt lengths (tokens)")
    parser.add_argument("--chunk", type=int, default=512, help="max_prefill_tokens_per_step when chunked")
    parser.add_argument("--prefill-prompt", type=int, default=3000, help="prompt length of part 2")
    parser.add_argument("--no-part2", action="store_true", help="skip part 2 (time to first token)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rmoe-bench"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    lengths = [int(x) for x in args.prompts.split(",")]
    model = checkpoint(args.cache)
    results: dict = {"part1": [], "part2": {}}

    print(f"Part 1: {STREAMS} decoding streams while a prompt is prefilled (colocated, default threads): chunks "
          f"sized by time (max_step_ms default: 4x the steady decode step; cap 4096), in fixed {args.chunk}-token "
          "chunks (the time target off), and unchunked")
    print(f"{'prompt':>7} {'mode':>12} {'steady p50':>11} {'p50':>9} {'p99':>9} {'max':>9} {'max/steady':>10} "
          f"{'steps':>6} {'prefill s':>9}")
    for length in lengths:
        modes = (("by time", 4096, None), (f"fixed {args.chunk}", args.chunk, 1e9),
                 ("unchunked", length + STREAMS, 1e9))
        for label, chunk, max_step_ms in modes:
            row = gaps_while_prefilling(model, length, chunk, max_step_ms)
            row |= {"prompt": length, "mode": label}
            results["part1"].append(row)
            print(f"{length:>7} {label:>12} {row['steady_p50_ms']:>9.1f}ms {row['p50_ms']:>7.1f}ms "
                  f"{row['p99_ms']:>7.1f}ms {row['max_ms']:>7.1f}ms {row['max_ms'] / row['steady_p50_ms']:>9.1f}x "
                  f"{row['steps']:>6} {row['prefill_s']:>9.2f}", flush=True)

    if args.no_part2:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return 0
    prompt = [random.Random(1).randrange(3, 1000) for _ in range(args.prefill_prompt)]
    print(f"\nPart 2: prefill of a {len(prompt)}-token prompt (time to first token)")
    colocated = ttft_colocated(model, prompt)
    disaggregated = ttft_disaggregated(model, prompt)
    results["part2"] = {"prompt": len(prompt), "colocated_s": colocated, "disaggregated_s": disaggregated}
    print(f"{'':>24} {'TTFT':>8} {'prefill tok/s':>14}")
    for label, seconds in (("colocated", colocated), ("1 AW + 2 EW (shm)", disaggregated)):
        print(f"{label:>24} {seconds:>7.2f}s {len(prompt) / seconds:>14.0f}")
    print(f"{'disaggregated/colocated':>24} {colocated / disaggregated:>8.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

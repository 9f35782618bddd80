"""One long request beside short ones: does it slow every decode step down?

Colocated engine (Qwen3-MoE by default: hidden 512, 8 layers, 8 experts top-2), as `resilient-moe
generate` runs it (default threads): 32 requests of 16 prompt tokens (uniform) against 31 of 16 plus
one of 2000 (mixed). The decode step is measured from the difference of a 72- and an 8-token run of
the same batch, so the prefill (the long prompt's included) cancels: step = (t72 - t8) / 64. Runs
alternate uniform / mixed on one warm engine, --repeats times; medians are printed with the ratio.

When decode attention gathered every sequence's keys padded to the longest, the mixed batch paid
32 x 2000 keys a layer; reading each row's own keys through its block table, it pays the sum.

    python benchmarks/bench_mixed_lengths.py [--long 2000] [--repeats 3] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resilient_moe.engine.config import EngineConfig, SamplingParams  # noqa: E402
from resilient_moe.engine.engine import LLMEngine  # noqa: E402
from bench_offline import add_model_arguments, model_from_arguments  # noqa: E402

LONG_TOKENS, SHORT_TOKENS = 72, 8


def timed_generate(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> float:
    began = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "qwen3_moe")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--short", type=int, default=16, help="prompt tokens of the short requests")
    parser.add_argument("--long", type=int, default=2000, help="prompt tokens of the long request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="default: the engine's (every core this process owns)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model_dir = model_from_arguments(args, Path(tmp.name))
    g = torch.Generator().manual_seed(0)
    uniform = torch.randint(3, 8000, (args.batch, args.short), generator=g).tolist()
    mixed = uniform[:-1] + [torch.randint(3, 8000, (args.long,), generator=g).tolist()]
    engine = LLMEngine(model_dir, EngineConfig(max_num_seqs=args.batch, max_model_len=args.long + LONG_TOKENS + 8,
                                               torch_threads=args.threads))
    timed_generate(engine, mixed, 2)  # warm-up
    steps: dict[str, list[float]] = {"uniform": [], "mixed": []}
    for _ in range(args.repeats):
        for name, prompts in (("uniform", uniform), ("mixed", mixed)):
            long_run = timed_generate(engine, prompts, LONG_TOKENS)
            short_run = timed_generate(engine, prompts, SHORT_TOKENS)
            steps[name].append((long_run - short_run) / (LONG_TOKENS - SHORT_TOKENS))
    result = {name: {"step_ms": 1000 * statistics.median(v), "tokens_per_s": args.batch / statistics.median(v),
                     "runs_ms": [1000 * s for s in v]} for name, v in steps.items()}
    result["ratio"] = result["mixed"]["step_ms"] / result["uniform"]["step_ms"]
    print(f"decode step, colocated, {args.family} hidden {args.hidden_size}, {args.layers} layers, {args.experts} experts "
          f"top-{args.top_k}, batch {args.batch}, threads {engine.config.threads}; (t{LONG_TOKENS} - t{SHORT_TOKENS}) / "
          f"{LONG_TOKENS - SHORT_TOKENS}, median of {args.repeats}")
    print(f"{'batch':<34} {'step ms':>8} {'tok/s':>8}  runs (ms)")
    for name, label in (("uniform", f"{args.batch} x {args.short}"),
                        ("mixed", f"{args.batch - 1} x {args.short} + 1 x {args.long}")):
        r = result[name]
        print(f"{label:<34} {r['step_ms']:>8.1f} {r['tokens_per_s']:>8.1f}  "
              + ", ".join(f"{v:.1f}" for v in r["runs_ms"]))
    print(f"mixed / uniform decode step: {result['ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

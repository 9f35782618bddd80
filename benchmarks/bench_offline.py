"""Decode throughput and per-step latency: the colocated engine vs transformers' generate().

Both run the same checkpoint (hidden 512, 8 experts, top-2, 8 layers by default), float32, with the
same torch thread count, on prompts of equal length so HF needs no padding. Decode throughput counts
generated tokens after the first (the prefill's) over the time of the decode steps alone.

    python benchmarks/bench_offline.py [--batch-sizes 1,8,32] [--new-tokens 64] [--json out.json]
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

from resilient_moe.config import EngineConfig, SamplingParams  # noqa: E402
from resilient_moe.engine.engine import LLMEngine  # noqa: E402
from resilient_moe.model.tiny import TinySize, make_tiny_model  # noqa: E402


def bench_engine(model_dir: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:
    engine = LLMEngine(model_dir, EngineConfig(torch_threads=threads, max_num_seqs=len(prompts)))
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    step_times = []
    first = True
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        if not first:  # the first step is the prefill
            step_times.append(elapsed)
        first = False
    return _summary(step_times, len(prompts))


def bench_hf(model_dir: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([Stamp()]))
    with torch.no_grad():
        model.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        stamps.clear()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]  # one decode step between consecutive stamps
    return _summary(step_times, len(prompts))


def _summary(step_times: list[float], batch: int) -> dict:
    total = sum(step_times)
    return {
        "tokens_per_s": batch * len(step_times) / total,
        "step_ms_p50": 1000 * statistics.median(step_times),
        "step_ms_p99": 1000 * sorted(step_times)[min(len(step_times) - 1, int(0.99 * len(step_times)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--family", default="mixtral")
    parser.add_argument("--model", help="existing checkpoint (default: a random one of the size below)")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(args.model) if args.model else make_tiny_model(
        Path(tmp.name) / "model", args.family, seed=0,
        size=TinySize(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                      num_experts=args.experts, top_k=2, intermediate_size=2 * args.hidden_size,
                      vocab_size=8192, max_position_embeddings=4096),
    )
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, 8000, (batch, args.prompt_len), generator=g).tolist()
        ours = bench_engine(model_dir, prompts, args.new_tokens, args.threads)
        hf = bench_hf(model_dir, prompts, args.new_tokens, args.threads)
        rows.append({"batch": batch, "engine": ours, "hf": hf, "speedup": ours["tokens_per_s"] / hf["tokens_per_s"]})

    print(f"decode, {args.family}, hidden {args.hidden_size}, {args.experts} experts top-2, {args.layers} layers, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} thread(s), float32")
    print(f"{'batch':>5} | {'engine tok/s':>12} {'step p50 ms':>11} {'p99 ms':>7} | {'HF tok/s':>9} {'step p50 ms':>11} "
          f"{'p99 ms':>7} | {'engine/HF':>9}")
    for r in rows:
        e, h = r["engine"], r["hf"]
        print(f"{r['batch']:>5} | {e['tokens_per_s']:>12.1f} {e['step_ms_p50']:>11.2f} {e['step_ms_p99']:>7.2f} | "
              f"{h['tokens_per_s']:>9.1f} {h['step_ms_p50']:>11.2f} {h['step_ms_p99']:>7.2f} | {r['speedup']:>8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

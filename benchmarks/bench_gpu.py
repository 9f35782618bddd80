"""Decode on one GPU: the batch-invariant Triton kernels vs the torch path vs transformers' generate().

The model is a slice of Qwen3-30B-A3B (hidden 2048, 32 heads / 4 kv heads of 128, 128 experts of width
768, top-8, vocabulary 151936, 4 layers), random weights, bfloat16, written once by transformers in
its on-disk format. For batches of 1, 32 and 128 it measures decode throughput (generated tokens per
second over pure decode steps, after the prefill) for:

* `--kernels triton`: resilient_moe/kernels, batch-invariant;
* `--kernels torch`: the same engine on plain torch ops (cuBLAS, per-expert loop), NOT batch-invariant;
* transformers' generate() on the same checkpoint (sdpa attention).

It compares each with the HBM roofline: bytes one decode step must read (attention-side weights, the
experts the step's tokens actually route to, the LM head, and the KV cache of every sequence) over
4.8 TB/s (H200). It checks batch invariance on the GPU: a request's greedy tokens alone and inside a
batch of 64. It prints a table and the issue's targets, and writes JSON. Sized for about 5 minutes on
an H200 (8 at most); on a machine without CUDA it exits at once and says so.

    python benchmarks/bench_gpu.py [--json bench_gpu.json] [--decode-steps 32] [--model DIR]
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
from resilient_moe.model.config import ModelConfig  # noqa: E402
from resilient_moe.engine.engine import LLMEngine  # noqa: E402

HBM_BYTES_PER_S = 4.8e12  # H200
BATCHES = (1, 32, 128)
INVARIANCE_CROWD = 64
QWEN3_30B_A3B_SLICE = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)


def build_checkpoint(out: Path):
    """Random Qwen3-MoE slice written by transformers (on the GPU, so initialisation takes seconds); the
    model stays on the GPU for the generate() baseline."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**QWEN3_30B_A3B_SLICE), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    model.save_pretrained(out)
    return model.eval()


def engine_for(model_dir: Path, kernels: str, prompt_len: int, steps: int) -> LLMEngine:
    tokens = max(BATCHES) * (prompt_len + steps + 8)
    return LLMEngine(model_dir, EngineConfig(
        device="cuda", dtype="bfloat16", kernels=kernels, max_num_seqs=max(BATCHES, INVARIANCE_CROWD),
        max_num_batched_tokens=tokens, max_prefill_tokens_per_step=tokens, kv_cache_tokens=2 * tokens,
    ))


def prompts_for(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()


def bench_engine(engine: LLMEngine, prompts: list[list[int]], steps: int) -> dict:
    """Decode throughput over `steps` pure decode steps (the prefill is one step and is not timed)."""
    engine.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up: compiles, allocates
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)  # the prefill's token, the counted step's, then `steps`
    for i, prompt in enumerate(prompts):
        engine.add_request(f"b{i}", prompt, params)
    engine.step()  # the prefill: every prompt at once
    experts_per_layer = routed_experts(engine)  # one decode step, untimed, to count the experts it reads
    torch.cuda.synchronize()
    times = []
    while engine.has_unfinished() and len(times) < steps:
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished():
        engine.step()
    return summary(times, len(prompts)) | {"experts_per_layer": experts_per_layer}


def routed_experts(engine: LLMEngine) -> float:
    """Mean number of distinct experts one decode step's tokens route to per MoE layer."""
    executor = engine.runner.executor
    counts: list[int] = []
    submit = executor.submit

    def counting(micro_batch, call):
        counts.append(int(call.expert_ids.unique().numel()))
        submit(micro_batch, call)

    executor.submit = counting
    try:
        engine.step()
    finally:
        executor.submit = submit
    return statistics.mean(counts)


def bench_hf(model, prompts: list[list[int]], steps: int) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts, device="cuda")
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([Stamp()]))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        stamps.clear()
        model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kwargs)
    return summary([b - a for a, b in zip(stamps, stamps[1:])], len(prompts))


def summary(step_times: list[float], batch: int) -> dict:
    return {"tokens_per_s": batch * len(step_times) / sum(step_times),
            "step_ms_p50": 1000 * statistics.median(step_times)}


def roofline(cfg: ModelConfig, batch: int, experts_per_layer: float, context: int) -> dict:
    """Bytes one decode step reads at best (bfloat16), and the tokens/s that HBM bandwidth allows."""
    D, H, G, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attention = D * H * d + 2 * D * G * d + H * d * D + 2 * d + 2 * D  # q, k, v, o, q/k norms, layer norms
    router = cfg.num_experts * D
    experts = experts_per_layer * cfg.expert_bytes(dtype_bytes=2)
    per_layer = 2 * (attention + router) + experts
    lm_head = 2 * cfg.vocab_size * D
    kv = batch * context * cfg.num_layers * cfg.kv_row_width * 2
    step_bytes = cfg.num_layers * per_layer + lm_head + 2 * D + kv
    return {"step_bytes": step_bytes, "tokens_per_s": batch / (step_bytes / HBM_BYTES_PER_S)}


def invariance(engine: LLMEngine, prompt_len: int, vocab: int, new_tokens: int) -> bool:
    """Greedy tokens of one request alone and inside a batch of INVARIANCE_CROWD are the same."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    crowd = prompts_for(INVARIANCE_CROWD, prompt_len, vocab, seed=99)
    alone = engine.generate(crowd[17:18], params)[0].token_ids
    return engine.generate(crowd, params)[17].token_ids == alone


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--json", default="bench_gpu.json", help="write the results here")
    parser.add_argument("--model", help="an existing checkpoint of the slice (default: build one)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py measures GPU decode and needs a CUDA device; none is visible here "
              "(torch.cuda.is_available() is False). Nothing was run.", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_gpu.py needs Triton: bash scripts/install-triton", file=sys.stderr)
        return 2
    started = time.monotonic()
    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(args.model) if args.model else Path(tmp.name) / "qwen3-30b-a3b-slice"
    hf_model = None
    if args.model:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
        hf_model = hf_model.to("cuda").eval()
    else:
        hf_model = build_checkpoint(model_dir)
    cfg = ModelConfig.from_pretrained(model_dir)
    print(f"[{time.monotonic() - started:5.0f}s] checkpoint ready: {model_dir}", flush=True)

    rows: dict[int, dict] = {batch: {"batch": batch} for batch in BATCHES}
    invariant: dict[str, bool] = {}
    for kernels in ("triton", "torch"):
        engine = engine_for(model_dir, kernels, args.prompt_len, args.decode_steps)
        for batch in BATCHES:
            result = bench_engine(engine, prompts_for(batch, args.prompt_len, cfg.vocab_size, batch), args.decode_steps)
            rows[batch][kernels] = result
            print(f"[{time.monotonic() - started:5.0f}s] {kernels:6} batch {batch:3}: "
                  f"{result['tokens_per_s']:9.1f} tok/s", flush=True)
        invariant[kernels] = invariance(engine, args.prompt_len, cfg.vocab_size, new_tokens=16)
        del engine
        torch.cuda.empty_cache()
    for batch in BATCHES:
        rows[batch]["hf"] = bench_hf(hf_model, prompts_for(batch, args.prompt_len, cfg.vocab_size, batch),
                                     args.decode_steps)
        print(f"[{time.monotonic() - started:5.0f}s] HF     batch {batch:3}: "
              f"{rows[batch]['hf']['tokens_per_s']:9.1f} tok/s", flush=True)
    for batch in BATCHES:
        context = args.prompt_len + args.decode_steps // 2  # mean context over the timed steps
        rows[batch]["roofline"] = roofline(cfg, batch, rows[batch]["triton"]["experts_per_layer"], context)

    print(f"\ndecode, Qwen3-30B-A3B slice ({cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.top_k}, "
          f"hidden {cfg.hidden_size}), bfloat16, prompt {args.prompt_len}, {args.decode_steps} timed decode steps, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'batch':>5} | {'triton tok/s':>12} {'torch tok/s':>11} {'HF tok/s':>9} | {'triton/torch':>12} "
          f"{'triton/HF':>9} | {'experts/layer':>13} {'MB/step':>8} {'roofline tok/s':>14} {'% roofline':>10}")
    for batch in BATCHES:
        r = rows[batch]
        t, p, h, roof = r["triton"], r["torch"], r["hf"], r["roofline"]
        r["triton_vs_torch"] = t["tokens_per_s"] / p["tokens_per_s"]
        r["triton_vs_hf"] = t["tokens_per_s"] / h["tokens_per_s"]
        r["roofline_fraction"] = t["tokens_per_s"] / roof["tokens_per_s"]
        print(f"{batch:>5} | {t['tokens_per_s']:>12.1f} {p['tokens_per_s']:>11.1f} {h['tokens_per_s']:>9.1f} | "
              f"{r['triton_vs_torch']:>11.2f}x {r['triton_vs_hf']:>8.2f}x | {t['experts_per_layer']:>13.1f} "
              f"{roof['step_bytes'] / 1e6:>8.0f} {roof['tokens_per_s']:>14.0f} {100 * r['roofline_fraction']:>9.1f}%")
    targets = {
        "triton at most 10% slower than torch (every batch)": all(rows[b]["triton_vs_torch"] >= 0.9 for b in BATCHES),
        "triton >= 3x HF at batch 32": rows[32]["triton_vs_hf"] >= 3.0,
        "triton >= 50% of the roofline at batch 128": rows[128]["roofline_fraction"] >= 0.5,
        f"triton: same tokens alone and in a batch of {INVARIANCE_CROWD}": invariant["triton"],
    }
    print(f"\ntorch path: same tokens alone and in a batch of {INVARIANCE_CROWD}: {invariant['torch']} "
          "(not guaranteed: not batch-invariant)")
    for name, met in targets.items():
        print(f"{'MET ' if met else 'MISSED'} {name}")
    Path(args.json).write_text(json.dumps({"rows": list(rows.values()), "invariant": invariant, "targets": targets,
                                           "device": torch.cuda.get_device_name(),
                                           "wall_s": time.monotonic() - started}, indent=2))
    print(f"\nwrote {args.json} after {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

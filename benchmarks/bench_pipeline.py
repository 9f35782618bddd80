"""Decode throughput and per-step latency: colocated engine vs disaggregated (1 AW + E EW), m = 1..3.

The ping-pong claim (MegaScale-Infer): with m >= 2 micro-batches, attention of one overlaps the experts
of another, so with attention and expert workers each on a core of their own (cpu_affinity auto) and
T_a ~ T_e, decode throughput approaches (T_a + T_e + T_c) / max(T_a, T_e) times that of m = 1.

For each batch size and micro-batch count it runs a steady decode load and reports, from counters
the workers publish in their heartbeats:
  T_a  attention-side time per micro-batch per sparse layer (AW step time not spent waiting),
  T_e  expert time per frame on an expert worker (compute + reply),
  T_c  transfer: mean frame round trip minus T_e,
  idle fractions of the AW (waiting for experts) and of the EWs (nothing to do),
and whether every m gave the same tokens. The overlap condition of DESIGN.md is T_a ~ T_e,
T_c < max(T_a, T_e) and m >= 2 (1 + T_c / max(T_a, T_e)) (column "m needed").

    python benchmarks/bench_pipeline.py [--batch-sizes 32,64] [--micro-batches 1,2,3] [--expert-workers 1]
                                        [--runs 5] [--json out.json]

The colocated engine runs with 1 thread ("vs col") and with 2 ("vs 2thr": what the two cores the
disaggregated workers get would give it); `--runs` repeats it all and prints every run.
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

from resilient_moe.deployment import DeploymentConfig  # noqa: E402
from resilient_moe.engine.config import EngineConfig, SamplingParams  # noqa: E402
from resilient_moe.engine.engine import LLMEngine  # noqa: E402
from resilient_moe.launch import make_cluster  # noqa: E402
from resilient_moe.launch.fork_server import ForkServer  # noqa: E402
from resilient_moe.model.tiny import TinySize, make_tiny_model  # noqa: E402
from resilient_moe.planner.profile import pipeline_times  # noqa: E402
from resilient_moe.server.frontend import Frontend  # noqa: E402


def prompts_for(batch: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, 500, (batch, prompt_len), generator=g).tolist()


def colocated(model: Path, prompts: list[list[int]], new_tokens: int, threads: int = 1) -> dict:
    engine = LLMEngine(model, EngineConfig(max_num_seqs=len(prompts), torch_threads=threads))
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    steps = []
    engine.step()  # prefill
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    return {"tokens_per_s": len(prompts) * len(steps) / sum(steps), "step_ms": 1000 * statistics.median(steps)}


def decode_load(cluster, prompts: list[list[int]], new_tokens: int, attention: list[str], experts: list[str]) -> dict:
    """Run `prompts` as one decode load on a started cluster: steady decode tokens/s (from the moment every
    request has its first token to the last token), the median gap between tokens, the stage times from
    the workers' heartbeat counters, and the tokens."""
    frontend = Frontend(cluster.controller_address).start()
    try:
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        warm = frontend.submit(prompts[0], SamplingParams(max_tokens=4, ignore_eos=True))
        warm.wait(120)
        time.sleep(0.2)
        before = cluster.state()
        handles = [frontend.submit(p, params) for p in prompts]
        for h in handles:
            h.wait(600)
        time.sleep(0.15)  # one more heartbeat carries the final counters
        after = cluster.state()
    finally:
        frontend.close()
    start = max(h.tokens[0].arrived for h in handles)
    end = max(h.tokens[-1].arrived for h in handles)
    decoded = sum(sum(1 for t in h.tokens[1:] if t.arrived > start) for h in handles)
    gaps = [b.arrived - a.arrived for h in handles for a, b in zip(h.tokens[1:], h.tokens[2:])]
    times = pipeline_times(before, after, attention, experts)
    return {
        "tokens_per_s": decoded / (end - start),
        "step_ms": 1000 * statistics.median(gaps),
        "T_a_ms": 1000 * times.T_a,
        "T_e_ms": 1000 * times.T_e,
        "T_c_ms": 1000 * times.T_c,
        "aw_idle": times.aw_idle,
        "ew_idle": times.ew_idle,
        "tokens": [h.token_ids for h in handles],
    }


def disaggregated(model: Path, prompts: list[list[int]], new_tokens: int, m: int, fork_server: ForkServer,
                  expert_workers: int) -> dict:
    dep = DeploymentConfig(model=str(model), attention_workers=1, expert_workers=expert_workers, micro_batches=m,
                           engine=EngineConfig(max_num_seqs=len(prompts)), heartbeat_interval_s=0.05,
                           kv_checkpoint=False)
    with make_cluster(dep, fork_server=fork_server) as cluster:
        return decode_load(cluster, prompts, new_tokens, ["aw-0"], [f"ew-{i}" for i in range(expert_workers)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="32,64")
    parser.add_argument("--micro-batches", default="1,2,3")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate-size", type=int, default=0, help="expert width (default: 2 x hidden)")
    parser.add_argument("--expert-workers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=1, help="repeat everything this many times and print every run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = make_tiny_model(Path(tmp.name) / "model", "mixtral", seed=0, size=TinySize(
        hidden_size=args.hidden_size, num_layers=args.layers, num_heads=8, num_kv_heads=4, num_experts=8, top_k=2,
        intermediate_size=args.intermediate_size or 2 * args.hidden_size, vocab_size=4096,
        max_position_embeddings=4096))
    torch.set_num_threads(1)
    fork_server = ForkServer()
    fork_server.wait_hello(120)
    rows = []
    try:
        for run in range(1, args.runs + 1):
            for batch in [int(b) for b in args.batch_sizes.split(",")]:
                prompts = prompts_for(batch, args.prompt_len)
                base = colocated(model, prompts, args.new_tokens)
                rows.append({"run": run, "batch": batch, "mode": "colocated", **base})
                two = colocated(model, prompts, args.new_tokens, threads=2)
                rows.append({"run": run, "batch": batch, "mode": "colocated 2thr", **two,
                             "vs_colocated": two["tokens_per_s"] / base["tokens_per_s"]})
                first = None
                for m in [int(x) for x in args.micro_batches.split(",")]:
                    result = disaggregated(model, prompts, args.new_tokens, m, fork_server, args.expert_workers)
                    first = first or result
                    result["same_tokens"] = result["tokens"] == first["tokens"]
                    result["vs_m1"] = result["tokens_per_s"] / first["tokens_per_s"]
                    longest = max(result["T_a_ms"], result["T_e_ms"])
                    result["m_needed"] = 2 * (1 + result["T_c_ms"] / longest) if longest else float("nan")
                    rows.append({"run": run, "batch": batch, "mode": f"1AW+{args.expert_workers}EW m={m}", **result,
                                 "vs_colocated": result["tokens_per_s"] / base["tokens_per_s"],
                                 "vs_colocated_2thr": result["tokens_per_s"] / two["tokens_per_s"]})
    finally:
        fork_server.shutdown()

    print(f"decode, mixtral hidden {args.hidden_size}, {args.layers} layers, 8 experts top-2, float32, "
          f"{args.new_tokens} new tokens; workers pinned to cores of their own; times per micro-batch per sparse layer")
    print(f"{'run':>3} {'batch':>5} {'mode':<14} {'tok/s':>8} {'step ms':>8} {'vs col':>6} {'vs 2thr':>7} "
          f"{'vs m=1':>6} {'T_a ms':>7} {'T_e ms':>7} {'T_c ms':>7} {'AW idle':>8} {'EW idle':>8} {'m needed':>8} "
          f"{'same tokens':>11}")
    for r in rows:
        if r["mode"].startswith("colocated"):
            print(f"{r['run']:>3} {r['batch']:>5} {r['mode']:<14} {r['tokens_per_s']:>8.1f} {r['step_ms']:>8.2f} "
                  f"{r.get('vs_colocated', 1.0):>6.2f}")
        else:
            print(f"{r['run']:>3} {r['batch']:>5} {r['mode']:<14} {r['tokens_per_s']:>8.1f} {r['step_ms']:>8.2f} "
                  f"{r['vs_colocated']:>6.2f} {r['vs_colocated_2thr']:>7.2f} {r['vs_m1']:>6.2f} {r['T_a_ms']:>7.2f} "
                  f"{r['T_e_ms']:>7.2f} {r['T_c_ms']:>7.2f} {r['aw_idle']:>8.0%} {r['ew_idle']:>8.0%} "
                  f"{r['m_needed']:>8.1f} {str(r['same_tokens']):>11}")
    if args.runs > 1:
        print("m = 2 over m = 1, run by run:", ", ".join(
            f"{r['vs_m1']:.2f}x" for r in rows if r["mode"].endswith("m=2")))
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "tokens"} for r in rows], indent=2))


if __name__ == "__main__":
    main()

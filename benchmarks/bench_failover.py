"""Failover stall under steady decode load: resilient mode vs the restart-everything baseline.

A local cluster (1 attention worker and 3 expert workers for EW faults, 2 + 2 for AW faults) decodes
N concurrent requests; once every request is in steady decode, the fault is injected into one
worker. Every token's arrival time is recorded at the frontend.

  detection  time from the signal to the controller's first failure event (suspect, dead, fenced)
  stall      per affected request: its largest inter-token gap after the fault minus the steady
             p50 gap (before the fault), reported as p50 / p99 / max over requests
  identical  every request's tokens equal those of a failure-free run of the same cluster
  unaffected AW faults only: the stall of requests on the other attention worker (nan for EW faults,
             where every request is affected)

The same fault then runs with `--resilience off` (any death fences and restarts every worker in a
fresh interpreter and re-runs in-flight requests from scratch), and the ratio of the stalls is
printed. A last pair of failure-free runs compares throughput with shadow experts loaded and
without (shadow budget 0). A PNG of throughput over time, fault marked, goes to --plot.

    python benchmarks/bench_failover.py --fault ew-kill [--requests 32] [--plot failover.png]
    python benchmarks/bench_failover.py --fault ew-hang
    python benchmarks/bench_failover.py --fault aw-kill
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resilient_moe.config import DeploymentConfig, EngineConfig, SamplingParams  # noqa: E402
from resilient_moe.launch.local import LocalCluster, Zygote  # noqa: E402
from resilient_moe.model.demo import demo_model_dir  # noqa: E402
from resilient_moe.server.frontend import Frontend  # noqa: E402

FAULTS = {"ew-kill": ("ew-1", signal.SIGKILL), "ew-hang": ("ew-1", signal.SIGSTOP),
          "aw-kill": ("aw-0", signal.SIGKILL), "aw-hang": ("aw-0", signal.SIGSTOP)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def workload(n: int, max_tokens: int):
    g = torch.Generator().manual_seed(n)
    prompts = [torch.randint(3, 500, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def deployment(model: Path, fault: str, n: int, **overrides) -> DeploymentConfig:
    aw = fault.startswith("aw")
    return DeploymentConfig(model=str(model), attention_workers=2 if aw else 1, expert_workers=2 if aw else 3,
                            micro_batches=2, engine=EngineConfig(max_num_seqs=n), **overrides)


def run(dep: DeploymentConfig, zygote: Zygote, prompts, params, fault: str | None, warm_tokens: int) -> dict:
    """One cluster run; returns tokens, arrival times, fault time and the controller's events."""
    with LocalCluster(dep, zygote=zygote) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            started = time.monotonic()
            handles = [frontend.submit(p, params) for p in prompts]
            deadline = time.monotonic() + 120
            while min(len(h.tokens) for h in handles) < warm_tokens and time.monotonic() < deadline:
                time.sleep(0.005)
            fault_at = fault_wall = None
            victim = None
            on_victim = [True] * len(handles)
            if fault is not None:
                name, sig = FAULTS[fault]
                if name.startswith("aw"):  # only its requests are affected; the others are the control group
                    on_victim = [h.worker == name for h in handles]
                victim = cluster.pids[name]
                fault_wall, fault_at = time.time(), time.monotonic()
                os.kill(victim, sig)
            for h in handles:
                h.wait(300)
            finished = time.monotonic()
            if sig_is_stop(fault) and victim is not None:
                try:
                    os.kill(victim, signal.SIGCONT)
                except ProcessLookupError:
                    pass  # the baseline's restart killed it
            events = [(e.time, e.kind, e.worker) for e in cluster.state().events]
        finally:
            frontend.close()
    return {"tokens": [h.token_ids for h in handles], "arrivals": [[t.arrived for t in h.tokens] for h in handles],
            "fault_at": fault_at, "fault_wall": fault_wall, "events": events, "started": started,
            "finished": finished, "victim": FAULTS[fault][0] if fault else None,
            "moved": sum(h.moves for h in handles), "on_victim": on_victim}


def sig_is_stop(fault: str | None) -> bool:
    return fault is not None and FAULTS[fault][1] == signal.SIGSTOP


def analyse(result: dict) -> dict:
    fault_at = result["fault_at"]
    steady = [b - a for arr in result["arrivals"] for a, b in zip(arr, arr[1:]) if b < fault_at]
    p50 = statistics.median(steady)
    stalls, others = [], []
    for arr, affected in zip(result["arrivals"], result["on_victim"]):
        after = [b - a for a, b in zip(arr, arr[1:]) if b >= fault_at]
        (stalls if affected else others).append(max(0.0, max(after, default=0.0) - p50))
    # The first failure event after the fault (the baseline may first notice a casualty of the victim).
    detect = [t - result["fault_wall"] for t, kind, worker in result["events"]
              if kind in ("suspect", "dead", "fenced") and t >= result["fault_wall"]]
    return {"steady_p50_ms": 1000 * p50, "stall_p50_ms": 1000 * percentile(stalls, 50),
            "stall_p99_ms": 1000 * percentile(stalls, 99), "stall_max_ms": 1000 * max(stalls),
            "detect_ms": 1000 * min(detect) if detect else float("nan"),
            "unaffected_p99_ms": 1000 * percentile(others, 99) if others else float("nan")}


def throughput_series(result: dict, bin_s: float = 0.1) -> tuple[list[float], list[float]]:
    t0 = result["started"]
    times = sorted(t - t0 for arr in result["arrivals"] for t in arr)
    bins = int((result["finished"] - t0) / bin_s) + 1
    counts = [0] * bins
    for t in times:
        counts[min(bins - 1, int(t / bin_s))] += 1
    return [i * bin_s for i in range(bins)], [c / bin_s for c in counts]


def plot(results: dict[str, dict], fault: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 3 * len(results)), sharex=False)
    for ax, (label, result) in zip(axes, results.items()):
        xs, ys = throughput_series(result)
        ax.plot(xs, ys, lw=1.2)
        ax.axvline(result["fault_at"] - result["started"], color="red", ls="--", label=f"{fault} injected")
        ax.set_title(label)
        ax.set_ylabel("tokens/s")
        ax.legend(loc="lower right")
    axes[-1].set_xlabel("seconds since the load started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", choices=sorted(FAULTS), default="ew-kill")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--warm-tokens", type=int, default=24, help="tokens every request has before the fault")
    parser.add_argument("--plot", default="failover.png")
    parser.add_argument("--throughput-runs", type=int, default=3, help="failure-free runs each, shadows on/off")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = demo_model_dir()
    prompts, params = workload(args.requests, args.max_tokens)
    zygote = Zygote()
    try:
        zygote.wait_hello(120)
        reference = run(deployment(model, args.fault, args.requests), zygote, prompts, params, None, 0)["tokens"]
        results = {
            "resilient": run(deployment(model, args.fault, args.requests), zygote, prompts, params, args.fault,
                             args.warm_tokens),
            "restart-all baseline": run(deployment(model, args.fault, args.requests, resilience=False), zygote,
                                        prompts, params, args.fault, args.warm_tokens),
        }
        rates: dict[str, list[float]] = {"shadows on": [], "shadows off": []}
        for _ in range(args.throughput_runs):  # alternate, so drift on a noisy machine hits both alike
            for label, budget in (("shadows on", None), ("shadows off", 0)):
                r = run(deployment(model, "ew-kill", args.requests, shadow_budget_bytes=budget), zygote, prompts,
                        params, None, 0)
                rates[label].append(args.requests * args.max_tokens / (r["finished"] - r["started"]))
    finally:
        zygote.shutdown()

    print(f"fault {args.fault}: {args.requests} concurrent requests x {args.max_tokens} tokens, "
          f"fault after {args.warm_tokens} tokens each")
    print(f"{'mode':<22}{'identical':>10}{'detect ms':>11}{'steady p50 ms':>15}{'stall p50 ms':>14}"
          f"{'stall p99 ms':>14}{'stall max ms':>14}{'unaffected p99':>16}")
    stats = {}
    for label, result in results.items():
        s = stats[label] = analyse(result)
        same = result["tokens"] == reference
        print(f"{label:<22}{str(same):>10}{s['detect_ms']:>11.1f}{s['steady_p50_ms']:>15.1f}{s['stall_p50_ms']:>14.1f}"
              f"{s['stall_p99_ms']:>14.1f}{s['stall_max_ms']:>14.1f}{s['unaffected_p99_ms']:>16.1f}")
    ratio = stats["restart-all baseline"]["stall_p99_ms"] / max(stats["resilient"]["stall_p99_ms"], 1e-3)
    print(f"baseline / resilient stall p99: {ratio:.1f}x")
    on, off = statistics.median(rates["shadows on"]), statistics.median(rates["shadows off"])
    print(f"failure-free throughput, median of {args.throughput_runs}: shadows on {on:.0f} tok/s, "
          f"shadows off {off:.0f} tok/s, on/off {on / off:.3f}")
    plot(results, args.fault, args.plot)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

The same fault then runs with `--resilience off` (the fair baseline: any death fences every worker
and restarts them all at once, forked warm from the fork server as resilient mode's replacements are,
and in-flight requests resume from their token logs with one re-prefill, no KV restore), and the ratio
of the stalls is printed; --naive adds the naive baseline (fresh interpreters, one role after the other). A last pair of failure-free runs compares throughput with shadow experts loaded and
without (shadow budget 0). A PNG of throughput over time, fault marked, goes to --plot.

With --serving it measures what a served client sees instead: `serve`'s stack (2 attention + 3 expert
workers, in-process, the demo model), 16 greedy streams over HTTP from a client process of its own,
the fault injected --kills times (each after the last one's replacement is ready), the stall of
every stream at every fault (its largest inter-token gap after the fault, as its client saw it, and
the gap the fault fell in), the same figures for a fault-free control round after each fault (what
the serving path costs without any failure in that window), and where the time went: detection
(the controller's first event), the replacement's start (registered to ready).

    python benchmarks/bench_failover.py --fault ew-kill [--requests 32] [--plot failover.png]
    python benchmarks/bench_failover.py --fault ew-hang
    python benchmarks/bench_failover.py --fault aw-kill
    python benchmarks/bench_failover.py --serving --fault ew-kill --kills 10

The tier in front of the workers (bench_front_tier.py: `serve` as a process of its own, 2 frontends,
streams through the resuming client, then failure-free throughput with 2 frontends against 1):

    python benchmarks/bench_failover.py --fault frontend-kill [--kills 5]
    python benchmarks/bench_failover.py --fault supervisor-kill [--kills 3]
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

from resilient_moe.deployment import DeploymentConfig  # noqa: E402
from resilient_moe.engine.config import EngineConfig, SamplingParams  # noqa: E402
from resilient_moe.launch import make_cluster  # noqa: E402
from resilient_moe.launch.fork_server import ForkServer  # noqa: E402
from resilient_moe.model.demo import demo_model_dir  # noqa: E402
from resilient_moe.server.frontend import Frontend  # noqa: E402

FAULTS = {"ew-kill": ("ew-1", signal.SIGKILL), "ew-hang": ("ew-1", signal.SIGSTOP),
          "aw-kill": ("aw-0", signal.SIGKILL), "aw-hang": ("aw-0", signal.SIGSTOP)}
FRONT_TIER_FAULTS = ("frontend-kill", "supervisor-kill")  # bench_front_tier.py


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


def run(dep: DeploymentConfig, fork_server: ForkServer, prompts, params, fault: str | None, warm_tokens: int) -> dict:
    """One cluster run; returns tokens, arrival times, fault time and the controller's events."""
    with make_cluster(dep, fork_server=fork_server) as cluster:
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


def stalls_of(result: dict) -> tuple[float, list[float], list[float]]:
    """(steady p50 gap, stalls of the affected requests, of the others): a request's stall is its largest
    inter-token gap after the fault minus the steady p50 gap before it."""
    fault_at = result["fault_at"]
    steady = [b - a for arr in result["arrivals"] for a, b in zip(arr, arr[1:]) if b < fault_at]
    p50 = statistics.median(steady)
    stalls, others = [], []
    for arr, affected in zip(result["arrivals"], result["on_victim"]):
        after = [b - a for a, b in zip(arr, arr[1:]) if b >= fault_at]
        (stalls if affected else others).append(max(0.0, max(after, default=0.0) - p50))
    return p50, stalls, others


def analyse(result: dict) -> dict:
    p50, stalls, others = stalls_of(result)
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


def client_process(conn, url: str, prompts: list[list[int]], max_tokens: int, warm_tokens: int) -> None:
    """The HTTP clients, in a process of their own (as real clients are: their parsing must not
    compete with the server for its interpreter): one asyncio loop streams every prompt, tells the
    parent (ids) once each stream has `warm_tokens` tokens, and sends back every stream's tokens and
    arrival times (time.monotonic(), the same clock in every process of the host)."""
    import asyncio
    import json

    import httpx

    async def one(http, prompt, out, warm):
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True,
                "return_token_ids": True}
        out.update(id="", tokens=[], arrivals=[], error="")
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                    return
                out["id"] = chunk["id"]
                now = time.monotonic()
                for choice in chunk["choices"]:
                    out["tokens"] += choice.get("token_ids", [])
                    out["arrivals"] += [now] * len(choice.get("token_ids", []))
                if len(out["tokens"]) >= warm_tokens:
                    warm.set()

    async def run():
        outs = [dict() for _ in prompts]
        warms = [asyncio.Event() for _ in prompts]
        limits = httpx.Limits(max_connections=len(prompts) + 2)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            tasks = [asyncio.create_task(one(http, p, o, w)) for p, o, w in zip(prompts, outs, warms)]
            await asyncio.wait_for(asyncio.gather(*(w.wait() for w in warms)), 120)
            conn.send([o["id"] for o in outs])
            await asyncio.gather(*tasks)
        return outs

    while conn.recv() == "go":
        conn.send(asyncio.run(run()))


def serving(fault: str, kills: int, streams: int, max_tokens: int, warm_tokens: int) -> int:
    """The fault `kills` times against `serve` (2 + 3 workers), `streams` HTTP streams each time, each
    fault round followed by a fault-free control round of the same streams."""
    import multiprocessing as mp

    from resilient_moe.proto import controller_pb2 as pb
    from resilient_moe.supervisor import ServingStack

    name, sig = FAULTS[fault]
    prompts, _ = workload(streams, max_tokens)
    dep = DeploymentConfig(model=str(demo_model_dir()), attention_workers=2, expert_workers=3, micro_batches=2,
                           engine=EngineConfig(max_num_seqs=streams))
    stack = ServingStack(dep, port=0, admin_token="bench")
    measured = {"fault": ([], [], []), "control": ([], [], [])}  # (largest gap after, gap at the fault, unaffected)
    steady, detects, starts, identical = [], [], [], True
    client = None
    try:
        stack.start()
        parent, child = mp.get_context("spawn").Pipe()
        client = mp.get_context("spawn").Process(target=client_process, args=(child, stack.url, prompts, max_tokens,
                                                                                warm_tokens), daemon=True)
        client.start()
        parent.send("go")
        parent.recv()
        reference = [o["tokens"] for o in parent.recv()]
        for round_ in range(2 * kills):
            kind = "fault" if round_ % 2 == 0 else "control"
            parent.send("go")
            ids = parent.recv()  # every stream has its warm tokens
            on_victim = {i for i in ids if (h := stack.frontend.requests.get(i)) and h.worker == name}
            victim = stack.cluster.pids[name]
            fault_at, fault_wall = time.monotonic(), time.time()
            if kind == "fault":
                os.kill(victim, sig)
            outs = parent.recv()
            if kind == "fault" and sig == signal.SIGSTOP:
                os.kill(victim, signal.SIGCONT)
            identical &= [o["tokens"] for o in outs] == reference
            after, at, unaffected = measured[kind]
            for o in outs:
                arr = sorted(set(o["arrivals"]))  # tokens that came in one SSE chunk arrived together: one gap
                steady += [b - a for a, b in zip(arr, arr[1:]) if b < fault_at]
                gaps = [(a, b) for a, b in zip(arr, arr[1:]) if b >= fault_at]
                if name.startswith("ew") or o["id"] in on_victim:
                    after.append(max((b - a for a, b in gaps), default=0.0))
                    at.append(next((b - a for a, b in gaps), 0.0))  # the gap the fault fell in
                else:
                    unaffected.append(max((b - a for a, b in gaps), default=0.0))
            if kind == "control":
                continue
            for _ in range(3000):  # the replacement is ready before the next round
                state = stack.cluster.state()
                current = next((w for w in state.workers if w.name == name), None)
                if current is not None and current.state == pb.READY and current.pid != victim:
                    break
                time.sleep(0.01)
            events = [(e.time, e.kind, e.worker, e.detail) for e in state.events if e.time >= fault_wall]
            detected = [t for t, kind_, worker, _ in events if worker == name and kind_ in ("suspect", "dead", "fenced")]
            registered = [t for t, kind_, worker, _ in events if worker == name and kind_ == "registered"]
            ready = [t for t, kind_, worker, _ in events if worker == name and kind_ == "ready"]
            if detected:
                detects.append(min(detected) - fault_wall)
            if registered and ready:
                starts.append(max(ready) - min(registered))
        parent.send("stop")
    finally:
        if client is not None:
            client.join(5)
            if client.is_alive():
                client.kill()
        stack.stop()
    p50 = statistics.median(steady)
    print(f"serving path, {fault} x {kills}: {streams} HTTP streams x {max_tokens} tokens (clients in a process of "
          f"their own), 2 attention + 3 expert workers (demo model), fault after {warm_tokens} tokens; each fault "
          f"round is followed by a fault-free control round")
    print(f"  steady inter-token gap p50 {1000 * p50:.1f} ms; every stream token-identical: {identical}")
    print(f"  {'largest gap of affected streams':<40} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'max/steady':>10}")
    for kind in ("fault", "control"):
        after, at, _ = measured[kind]
        rows = [("after the fault" if kind == "fault" else "same window, no fault", after)]
        if kind == "fault":
            rows.append(("  the gap the fault fell in", at))
        for label, values in rows:
            print(f"  {label:<40} {1000 * percentile(values, 50):8.1f} {1000 * percentile(values, 99):8.1f} "
                  f"{1000 * max(values):8.1f} {max(values) / p50:10.1f}")
    unaffected = measured["fault"][2]
    if unaffected:
        print(f"  largest gap of unaffected streams: p50 {1000 * percentile(unaffected, 50):.1f} ms, max "
              f"{1000 * max(unaffected):.1f} ms ({max(unaffected) / p50:.1f}x steady p50)")
    if detects:
        print(f"  detection (fault to the controller's first event): p50 {1000 * percentile(detects, 50):.1f} ms, "
              f"max {1000 * max(detects):.1f} ms")
    if starts:
        print(f"  replacement start (registered to ready): p50 {1000 * percentile(starts, 50):.0f} ms")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", choices=sorted(FAULTS) + list(FRONT_TIER_FAULTS), default="ew-kill")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--warm-tokens", type=int, default=24, help="tokens every request has before the fault")
    parser.add_argument("--plot", default="failover.png")
    parser.add_argument("--throughput-runs", type=int, default=3, help="failure-free runs each, shadows on/off")
    parser.add_argument("--naive", action="store_true",
                        help="also run the naive baseline (cold interpreters, one role after the other)")
    parser.add_argument("--serving", action="store_true", help="over HTTP against serve's stack (see above)")
    parser.add_argument("--kills", type=int, default=10, help="faults injected with --serving")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fault in FRONT_TIER_FAULTS:
        import bench_front_tier

        return bench_front_tier.main(args.fault, args.kills, 16, args.max_tokens, args.warm_tokens,
                                     args.throughput_runs)
    if args.serving:
        return serving(args.fault, args.kills, 16, args.max_tokens, args.warm_tokens)
    model = demo_model_dir()
    prompts, params = workload(args.requests, args.max_tokens)
    fork_server = ForkServer()
    try:
        fork_server.wait_hello(120)
        reference = run(deployment(model, args.fault, args.requests), fork_server, prompts, params, None, 0)["tokens"]
        results = {
            "resilient": run(deployment(model, args.fault, args.requests), fork_server, prompts, params, args.fault,
                             args.warm_tokens),
            "restart-all (fair)": run(deployment(model, args.fault, args.requests, resilience=False), fork_server,
                                        prompts, params, args.fault, args.warm_tokens),
        }
        if args.naive:
            results["naive baseline (cold)"] = run(
                deployment(model, args.fault, args.requests, resilience=False, baseline_restart="cold"), fork_server,
                prompts, params, args.fault, args.warm_tokens)
        rates: dict[str, list[float]] = {"shadows on": [], "shadows off": []}
        for _ in range(args.throughput_runs):  # alternate, so drift on a noisy machine hits both alike
            for label, budget in (("shadows on", None), ("shadows off", 0)):
                r = run(deployment(model, "ew-kill", args.requests, shadow_budget_bytes=budget), fork_server, prompts,
                        params, None, 0)
                rates[label].append(args.requests * args.max_tokens / (r["finished"] - r["started"]))
    finally:
        fork_server.shutdown()

    print(f"fault {args.fault}: {args.requests} concurrent requests x {args.max_tokens} tokens, "
          f"fault after {args.warm_tokens} tokens each")
    print(f"{'mode':<24}{'identical':>10}{'detect ms':>11}{'steady p50 ms':>15}{'stall p50 ms':>14}"
          f"{'stall p99 ms':>14}{'stall max ms':>14}{'unaffected p99':>16}")
    stats = {}
    for label, result in results.items():
        s = stats[label] = analyse(result)
        same = result["tokens"] == reference
        print(f"{label:<24}{str(same):>10}{s['detect_ms']:>11.1f}{s['steady_p50_ms']:>15.1f}{s['stall_p50_ms']:>14.1f}"
              f"{s['stall_p99_ms']:>14.1f}{s['stall_max_ms']:>14.1f}{s['unaffected_p99_ms']:>16.1f}")
    for label in results:
        if label != "resilient":
            ratio = stats[label]["stall_p99_ms"] / max(stats["resilient"]["stall_p99_ms"], 1e-3)
            print(f"{label} / resilient stall p99: {ratio:.1f}x")
    if args.throughput_runs > 0:
        on, off = statistics.median(rates["shadows on"]), statistics.median(rates["shadows off"])
        print(f"failure-free throughput, median of {args.throughput_runs}: shadows on {on:.0f} tok/s, "
              f"shadows off {off:.0f} tok/s, on/off {on / off:.3f}")
    plot(results, args.fault, args.plot)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

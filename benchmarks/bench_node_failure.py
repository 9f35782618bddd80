"""A whole node lost under decode load, on the Ray test cluster: resilient mode vs the restart-all baseline.

A Ray cluster on loopback (head + 3 worker nodes, `launch/ray_local.py`) runs 2 attention and 3 expert
workers spread over the worker nodes (the control plane on the head). N greedy streams decode; once
each is in steady decode, the node hosting aw-0 (and, spread, ew-0) is removed with
`remove_node(allow_graceful=False)`: every process on it dies in the same instant. Every token's
arrival is recorded at the frontend.

  stall      per stream: its largest inter-token gap after the loss minus the steady p50 gap before it;
             p50 / p99 / max over the affected streams (those on the lost attention worker) and over
             the unaffected ones (the other attention worker's: they only lose ew-0's share of experts)
  identical  every stream equals a failure-free single-process run
  replaced   where the lost node's workers came back (a surviving node each)

The same loss then hits the restart-all baseline (`resilience: false`): any death restarts every
worker, streams resume from their token logs. Last, failure-free throughput with each KV
checkpoint replicated to a store on another node (kv_replicas 1, the Ray default) and without (0).

    python benchmarks/bench_node_failure.py [--requests 16] [--tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: the test cluster stays on loopback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_failover import analyse, percentile, stalls_of, workload  # noqa: E402

from resilient_moe.deployment import DeploymentConfig  # noqa: E402
from resilient_moe.engine.config import EngineConfig  # noqa: E402
from resilient_moe.engine.engine import LLMEngine  # noqa: E402
from resilient_moe.launch import make_cluster  # noqa: E402
from resilient_moe.launch.ray_local import LoopbackRayCluster  # noqa: E402
from resilient_moe.model.demo import demo_model_dir  # noqa: E402
from resilient_moe.server.frontend import Frontend  # noqa: E402


# The failure-free pair whose throughput gives the cost of replicating KV checkpoints off the node.
REPLICATION = {"kv_replicas 0": {"kv_replicas": 0}, "kv_replicas 1": {"kv_replicas": 1}}


def deployment(model: Path, n: int, **overrides) -> DeploymentConfig:
    return DeploymentConfig(model=str(model), attention_workers=2, expert_workers=3, micro_batches=2,
                            launcher="ray", engine=EngineConfig(max_num_seqs=n), **overrides)


def run(ray_nodes: LoopbackRayCluster, dep: DeploymentConfig, prompts, params, lose_node: bool,
        warm_tokens: int) -> dict:
    """One cluster run (a node lost once every stream is warm, or none); tokens, arrivals, events."""
    with make_cluster(dep) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            started = time.monotonic()
            handles = [frontend.submit(p, params) for p in prompts]
            deadline = time.monotonic() + 180
            while min(len(h.tokens) for h in handles) < warm_tokens and time.monotonic() < deadline:
                time.sleep(0.005)
            fault_at = fault_wall = None
            victim = cluster.nodes["aw-0"]
            lost = sorted(n for n, node in cluster.nodes.items() if node == victim)
            on_victim = [h.worker == "aw-0" for h in handles]
            if lose_node:
                fault_wall, fault_at = time.time(), time.monotonic()
                ray_nodes.remove_node(victim)
            for h in handles:
                h.wait(300)
            finished = time.monotonic()
            events = [(e.time, e.kind, e.worker) for e in cluster.state().events]
            replaced = [(w, node) for w, dead, node in cluster.replaced if dead == victim]
        finally:
            frontend.close()
    if lose_node:
        ray_nodes.refill()
    return {"tokens": [h.token_ids for h in handles], "arrivals": [[t.arrived for t in h.tokens] for h in handles],
            "fault_at": fault_at, "fault_wall": fault_wall, "events": events, "started": started,
            "finished": finished, "on_victim": on_victim, "lost": lost, "victim": victim, "replaced": replaced,
            "survivors": set(ray_nodes.worker_nodes)}


def throughput(result: dict) -> float:
    """Tokens per second from the first to the last token of the run."""
    arrivals = [t for arr in result["arrivals"] for t in arr]
    return len(arrivals) / (max(arrivals) - min(arrivals))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--warm", type=int, default=8, help="tokens every stream has before the node is lost")
    parser.add_argument("--repeat", type=int, default=3, help="failure-free runs per setting (throughput)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    model = demo_model_dir()
    prompts, params = workload(args.requests, args.tokens)
    reference = [r.token_ids for r in LLMEngine(model, EngineConfig()).generate(prompts, params)]
    ray_nodes = LoopbackRayCluster()
    rows, out = [], {}
    try:
        for label, overrides in (("resilient", {}), ("restart-all", {"resilience": False})):
            result = run(ray_nodes, deployment(model, args.requests, **overrides), prompts, params, True, args.warm)
            stats = analyse(result)
            _, affected, unaffected = stalls_of(result)
            stats.update(identical=result["tokens"] == reference, lost=result["lost"],
                         replaced_on_survivors=all(node in result["survivors"] for _, node in result["replaced"]),
                         affected=summary(affected), unaffected=summary(unaffected))
            out[label] = stats
            rows.append((label, stats))
        settings = REPLICATION
        rates: dict[str, list[float]] = {label: [] for label in settings}
        for _ in range(args.repeat):  # alternated, so that a slow spell of the host hits both settings
            for label, overrides in settings.items():
                rates[label].append(throughput(run(ray_nodes, deployment(model, args.requests, **overrides),
                                                   prompts, params, False, args.warm)))
        base = {label: max(values) for label, values in rates.items()}
        out["throughput_tokens_per_s"] = {label: {"best": base[label], "runs": rates[label]} for label in rates}
    finally:
        ray_nodes.shutdown()

    print(f"\nnode loss (aw-0's node: {', '.join(out['resilient']['lost'])}) under {args.requests} greedy streams, "
          f"{args.tokens} tokens each; stall = largest gap after the loss minus the steady p50 gap")
    print(f"{'mode':<12} {'streams':<13} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'detect ms':>10}  identical  "
          f"replaced on survivors")
    for label, stats in rows:
        for which in ("affected", "unaffected"):
            s = stats[which]
            print(f"{label:<12} {which + ' (' + str(s['n']) + ')':<13} {s['p50_ms']:>8.0f} {s['p99_ms']:>8.0f} "
                  f"{s['max_ms']:>8.0f} {stats['detect_ms']:>10.0f}  {str(stats['identical']):<9}  "
                  f"{stats['replaced_on_survivors']}")
    (off_label, off), (on_label, on) = base.items()
    print(f"\nfailure-free throughput (best of {args.repeat}): {off:.1f} tok/s with {off_label}, {on:.1f} tok/s with "
          f"{on_label}: cost {100 * (1 - on / off):.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=list))
    return 0


def summary(stalls: list[float]) -> dict:
    if not stalls:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan"), "n": 0}
    return {"p50_ms": 1000 * percentile(stalls, 50), "p99_ms": 1000 * percentile(stalls, 99),
            "max_ms": 1000 * max(stalls), "n": len(stalls)}


if __name__ == "__main__":
    sys.exit(main())

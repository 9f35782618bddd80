"""KV checkpoint replication: what it costs when nothing fails, and where a restore reads from.

Part 1, failure-free decode throughput with two KV stores and kv_replicas 0 vs 1 (every write also
shipped over TCP to the other store), alternating runs so machine drift hits both alike; the ratio is
what replication costs (target: >= 0.97). Next to it, the CPU seconds the cluster's processes spent per
1000 tokens, by kind: on a host whose cores are shared, the steadier measure of the same cost.

Part 2, for each context length: one long request decodes on an attention worker next to a few short
ones, and the worker is SIGKILLed. The long request's stall (its last token before the kill to its
first after) when the adopter
  - local:     restores from the dead worker's primary store (one store, no replica; the store lives);
  - replica:   restores from the replica, its primary store killed at the same instant (a node loss);
  - recompute: has no checkpoint (kv_checkpoint off) and re-prefills everything.
The survivors' restore counters are printed next to each, to show where the rows came from.

    python benchmarks/bench_kv_replication.py [--contexts 256,1024,4096] [--requests 32] [--tokens 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_checkpoint import failover_stall, throughput  # noqa: E402
from resilient_moe.launch.fork_server import ForkServer  # noqa: E402
from resilient_moe.model.demo import demo_model_dir  # noqa: E402

MODES = {  # name -> (checkpointing, node loss, deployment fields)
    "local": (True, False, {}),
    "replica": (True, True, {"kv_stores": 2, "kv_replicas": 1}),
    "recompute": (False, False, {}),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="256,1024,4096")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = demo_model_dir()
    contexts = [int(c) for c in args.contexts.split(",")]
    fork_server = ForkServer()
    try:
        fork_server.wait_hello(120)
        rates: dict[int, list[float]] = {0: [], 1: []}
        cpus: dict[int, list[dict[str, float]]] = {0: [], 1: []}
        for _ in range(args.runs):
            for replicas in rates:
                cpus[replicas].append({})
                rates[replicas].append(throughput(model, fork_server, "on", args.requests, args.tokens, kv_stores=2,
                                                  kv_replicas=replicas, cpu=cpus[replicas][-1]))
        stalls = {}
        for context in contexts:
            for mode, (checkpoint, node_loss, extra) in MODES.items():
                counters: dict[str, float] = {}
                stall, same = failover_stall(model, fork_server, checkpoint, context, node_loss=node_loss,
                                             counters=counters, **extra)
                stalls[(context, mode)] = (stall, same, counters)
    finally:
        fork_server.shutdown()
    off, on = (statistics.median(rates[r]) for r in (0, 1))
    print(f"failure-free decode, 2 KV stores, {args.requests} requests x {args.tokens} tokens, median of {args.runs}:")
    print(f"  kv_replicas=0 {off:.0f} tok/s, kv_replicas=1 {on:.0f} tok/s, ratio {on / off:.3f} "
          f"(cost {100 * (1 - on / off):.1f}%)")
    print(f"  runs: replicas=0 {', '.join(f'{r:.0f}' for r in rates[0])}; replicas=1 {', '.join(f'{r:.0f}' for r in rates[1])}")
    # CPU seconds per 1000 tokens, by kind of process: what replication costs on a host short of cores
    # (wall-clock throughput there swings with whatever else runs)
    tokens = args.requests * args.tokens / 1000
    groups = {"attention": "aw-", "kv stores": "kv-store", "redis": "redis", "expert": "ew-"}
    print(f"  CPU s per 1000 tokens, median: {'':>4}" + "".join(f"{g:>11}" for g in groups) + f"{'total':>9}")
    for replicas in (0, 1):
        per = {g: statistics.median(sum(v for k, v in run.items() if k.startswith(prefix)) / tokens
                                    for run in cpus[replicas]) for g, prefix in groups.items()}
        total = statistics.median(sum(run.values()) / tokens for run in cpus[replicas])
        print(f"    kv_replicas={replicas}{'':>23}" + "".join(f"{v:>11.3f}" for v in per.values()) + f"{total:>9.3f}")
    print(f"{'context':>8}{'source':>11}{'stall ms':>10}{'identical':>11}   survivors' restores (local/replica/recompute)")
    for context in contexts:
        for mode in MODES:
            stall, same, c = stalls[(context, mode)]
            print(f"{context:>8}{mode:>11}{1000 * stall:>10.1f}{str(same):>11}   "
                  f"{c.get('ckpt_restored_local', 0):.0f}/{c.get('ckpt_restored_replica', 0):.0f}/"
                  f"{c.get('requests_recomputed', 0):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""KV checkpointing: what it costs when nothing fails, and what it saves when an attention worker dies.

Part 1, failure-free decode throughput with checkpointing on vs off (2 attention workers, 2 expert
workers, N concurrent requests), alternating runs so machine drift hits both alike.

Part 2, for each context length: one long request (prompt of that many tokens) decodes on aw-0 next
to a few short ones; aw-0 is SIGKILLed; the long request's stall (gap between its last token before
the kill and its first after) is measured with checkpointing on (the adopter restores [0, n) from the
KV store and recomputes the rest) and off (the adopter re-prefills everything from the token log).

    python benchmarks/bench_checkpoint.py [--contexts 256,1024,4096] [--requests 32] [--runs 2]
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


def deployment(model: Path, checkpoint: bool, max_len: int = 8192) -> DeploymentConfig:
    return DeploymentConfig(model=str(model), attention_workers=2, expert_workers=2, micro_batches=2,
                            kv_checkpoint=checkpoint, heartbeat_timeout_s=5.0,
                            engine=EngineConfig(max_num_seqs=64, max_model_len=max_len, kv_cache_tokens=65536,
                                                max_num_batched_tokens=8192))


def throughput(model: Path, zygote: Zygote, checkpoint: bool, n: int, tokens: int) -> float:
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 500, (n, 24), generator=g).tolist()
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    with LocalCluster(deployment(model, checkpoint), zygote=zygote) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            start = time.monotonic()
            for h in [frontend.submit(p, params) for p in prompts]:
                h.wait(300)
            return n * tokens / (time.monotonic() - start)
        finally:
            frontend.close()


def failover_stall(model: Path, zygote: Zygote, checkpoint: bool, context: int) -> tuple[float, bool]:
    """(stall of the long request in seconds, its tokens equal to the failure-free run's)."""
    g = torch.Generator().manual_seed(context)
    long_prompt = torch.randint(3, 500, (context,), generator=g).tolist()
    short = torch.randint(3, 500, (5, 16), generator=g).tolist()
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    with LocalCluster(deployment(model, checkpoint), zygote=zygote) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            reference = frontend.submit(long_prompt, params).wait(300).token_ids
            handles = [frontend.submit(p, params) for p in short]
            victim = frontend.submit(long_prompt, params)
            deadline = time.monotonic() + 120
            while (len(victim.tokens) < 8 or not victim.worker) and time.monotonic() < deadline:
                time.sleep(0.002)
            os.kill(cluster.pids[victim.worker], signal.SIGKILL)
            killed = time.monotonic()
            victim.wait(300)
            for h in handles:
                h.wait(300)
            before = max(t.arrived for t in victim.tokens if t.arrived <= killed)
            after = min(t.arrived for t in victim.tokens if t.arrived > killed)
            return after - before, victim.token_ids == reference
        finally:
            frontend.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="256,1024,4096")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = demo_model_dir()
    zygote = Zygote()
    try:
        zygote.wait_hello(120)
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.runs):
            for checkpoint in (True, False):
                rates[checkpoint].append(throughput(model, zygote, checkpoint, args.requests, args.tokens))
        stalls = {}
        for context in [int(c) for c in args.contexts.split(",")]:
            for checkpoint in (True, False):
                stalls[(context, checkpoint)] = failover_stall(model, zygote, checkpoint, context)
    finally:
        zygote.shutdown()
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"failure-free decode, {args.requests} requests x {args.tokens} tokens, median of {args.runs}:")
    print(f"  checkpointing on {on:.0f} tok/s, off {off:.0f} tok/s, loss {100 * (1 - on / off):.1f}%")
    print(f"{'context':>8}{'restore stall ms':>18}{'re-prefill stall ms':>21}{'ratio':>8}{'identical':>11}")
    for context in [int(c) for c in args.contexts.split(",")]:
        (restore, same_a), (recompute, same_b) = stalls[(context, True)], stalls[(context, False)]
        print(f"{context:>8}{1000 * restore:>18.1f}{1000 * recompute:>21.1f}{recompute / restore:>8.1f}"
              f"{str(same_a and same_b):>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

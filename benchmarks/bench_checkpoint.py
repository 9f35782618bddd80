"""KV checkpointing: what it costs when nothing fails, and what it saves when an attention worker dies.

Part 1, failure-free decode throughput with checkpointing on vs off (2 attention workers, 2 expert
workers, N concurrent requests), and on with Redis slowed to --slow-redis-ms a round trip (a latency
proxy in front of it: every Redis call is off the decode step, so this should cost next to nothing),
alternating runs so machine drift hits all alike.

Part 2, for each context length: one long request (prompt of that many tokens) decodes on aw-0 next
to a few short ones; aw-0 is SIGKILLed; the long request's stall (gap between its last token before
the kill and its first after) is measured with checkpointing on (the adopter restores [0, n) from the
KV store and recomputes the rest) and off (the adopter re-prefills everything from the token log).

    python benchmarks/bench_checkpoint.py [--contexts 256,1024,4096] [--requests 32] [--runs 2] [--slow-redis-ms 100]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chaos.latency_proxy import LatencyProxy  # noqa: E402
from resilient_moe.deployment import DeploymentConfig  # noqa: E402
from resilient_moe.engine.config import EngineConfig, SamplingParams  # noqa: E402
from resilient_moe.launch import make_cluster  # noqa: E402
from resilient_moe.launch.launcher import Launcher  # noqa: E402
from resilient_moe.launch.fork_server import ForkServer  # noqa: E402
from resilient_moe.model.demo import demo_model_dir  # noqa: E402
from resilient_moe.server.frontend import Frontend  # noqa: E402


def deployment(model: Path, checkpoint: bool, max_len: int = 8192, redis_url: str = "", **extra) -> DeploymentConfig:
    """`extra`: more DeploymentConfig fields (bench_kv_replication.py: kv_stores, kv_replicas)."""
    return DeploymentConfig(model=str(model), attention_workers=2, expert_workers=2, micro_batches=2,
                            kv_checkpoint=checkpoint, heartbeat_timeout_s=5.0, redis_url=redis_url,
                            engine=EngineConfig(max_num_seqs=64, max_model_len=max_len, kv_cache_tokens=65536,
                                                max_num_batched_tokens=8192), **extra)


@contextlib.contextmanager
def slow_redis(delay_ms: float):
    """A private redis-server behind a proxy that adds `delay_ms` to every round trip; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="rmoe-slow-redis-") as tmp:
        sock = os.path.join(tmp, "redis.sock")
        server = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", sock, "--save", "",
                                   "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(unix_socket_path=sock)
            for _ in range(500):
                try:
                    client.ping()
                    break
                except redis.RedisError:
                    time.sleep(0.01)
            with LatencyProxy(sock, delay_ms / 2000) as proxy:  # half of it each way
                yield proxy.url
        finally:
            server.kill()
            server.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` has used (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(model: Path, fork_server: ForkServer, mode: str, n: int, tokens: int, slow_ms: float = 0.0,
               cpu: dict[str, float] | None = None, **extra) -> float:
    """Decode tok/s with checkpointing "off", "on", or on with a "slow" Redis. `cpu`: filled with the
    CPU seconds each of the cluster's processes used during the run, by name."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 500, (n, 24), generator=g).tolist()
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(slow_redis(slow_ms)) if mode == "slow" else ""
        cluster = stack.enter_context(make_cluster(deployment(model, mode != "off", redis_url=url, **extra),
                                                   fork_server=fork_server))
        frontend = Frontend(cluster.controller_address).start()
        try:
            used = {name: cpu_seconds(pid) for name, pid in cluster.pids.items()}
            start = time.monotonic()
            for h in [frontend.submit(p, params) for p in prompts]:
                h.wait(300)
            rate = n * tokens / (time.monotonic() - start)
            if cpu is not None:
                cpu.update({name: cpu_seconds(pid) - used.get(name, 0.0) for name, pid in cluster.pids.items()})
            return rate
        finally:
            frontend.close()


def failover_stall(model: Path, fork_server: ForkServer, checkpoint: bool, context: int, node_loss: bool = False,
                   counters: dict[str, float] | None = None, **extra) -> tuple[float, bool]:
    """(stall of the long request in seconds, its tokens equal to the failure-free run's). `node_loss`:
    its worker's primary KV store is killed at the same instant; `counters`: filled with the attention
    workers' restore counters (by source) afterwards; `extra`: more DeploymentConfig fields."""
    g = torch.Generator().manual_seed(context)
    long_prompt = torch.randint(3, 500, (context,), generator=g).tolist()
    short = torch.randint(3, 500, (5, 16), generator=g).tolist()
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    with make_cluster(deployment(model, checkpoint, **extra), fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            reference = frontend.submit(long_prompt, params).wait(300).token_ids
            handles = [frontend.submit(p, params) for p in short]
            victim = frontend.submit(long_prompt, params)
            deadline = time.monotonic() + 120
            while (len(victim.tokens) < 8 or not victim.worker) and time.monotonic() < deadline:
                time.sleep(0.002)
            doomed = [cluster.pids[victim.worker]]
            if node_loss:
                doomed.append(cluster.pids[primary_store(cluster, victim.worker)])
            for pid in doomed:
                os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            victim.wait(300)
            for h in handles:
                h.wait(300)
            if counters is not None:
                time.sleep(0.5)  # a heartbeat or more
                for w in cluster.state().workers:  # the victim's replacement, if it adopted any, too
                    if w.name.startswith("aw-"):
                        for key in ("ckpt_restored_local", "ckpt_restored_replica", "requests_recomputed"):
                            counters[key] = counters.get(key, 0.0) + w.load.get(key, 0.0)
            before = max(t.arrived for t in victim.tokens if t.arrived <= killed)
            after = min(t.arrived for t in victim.tokens if t.arrived > killed)
            return after - before, victim.token_ids == reference
        finally:
            frontend.close()


def primary_store(cluster: Launcher, worker: str) -> str:
    """The KV store `worker` checkpoints into (its heartbeats report the store's incarnation)."""
    workers = cluster.state().workers
    incarnation = next(w.load.get("ckpt_store", 0.0) for w in workers if w.name == worker)
    return next(w.name for w in workers if w.name.startswith("kv-store") and w.incarnation == incarnation)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="256,1024,4096")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--slow-redis-ms", type=float, default=100.0, help="round trip added to Redis calls")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = demo_model_dir()
    fork_server = ForkServer()
    try:
        fork_server.wait_hello(120)
        rates: dict[str, list[float]] = {"on": [], "off": [], "slow": []}
        for _ in range(args.runs):
            for mode in rates:
                rates[mode].append(throughput(model, fork_server, mode, args.requests, args.tokens, args.slow_redis_ms))
        stalls = {}
        for context in [int(c) for c in args.contexts.split(",")]:
            for checkpoint in (True, False):
                stalls[(context, checkpoint)] = failover_stall(model, fork_server, checkpoint, context)
    finally:
        fork_server.shutdown()
    on, off, slow = (statistics.median(rates[m]) for m in ("on", "off", "slow"))
    print(f"failure-free decode, {args.requests} requests x {args.tokens} tokens, median of {args.runs}:")
    print(f"  checkpointing on {on:.0f} tok/s, off {off:.0f} tok/s, loss {100 * (1 - on / off):.1f}%")
    print(f"  with Redis {args.slow_redis_ms:.0f} ms a round trip: {slow:.0f} tok/s, {100 * (1 - slow / on):.1f}% below "
          f"a fast Redis")
    print(f"{'context':>8}{'restore stall ms':>18}{'re-prefill stall ms':>21}{'ratio':>8}{'identical':>11}")
    for context in [int(c) for c in args.contexts.split(",")]:
        (restore, same_a), (recompute, same_b) = stalls[(context, True)], stalls[(context, False)]
        print(f"{context:>8}{1000 * restore:>18.1f}{1000 * recompute:>21.1f}{recompute / restore:>8.1f}"
              f"{str(same_a and same_b):>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""KV checkpointing: what it costs when nothing fails, and what it saves when an attention worker dies.

Part 1, failure-free decode throughput with checkpointing on vs off (2 attention workers, 2 expert
workers, N concurrent requests), and on with Redis slowed to --slow-redis-ms a round trip (a latency
proxy in front of it: every Redis call is off the decode step, so this should cost next to nothing),
alternating runs so machine drift hits all alike.

Part 2, for each context length: one long request (prompt of that many tokens) decodes on aw-0 next
to a few short ones; aw-0 is SIGKILLed; the long request's stall (gap between its last token before
the kill and its first after) is measured with checkpointing on (the adopter restores [0, n) from the
KV store and recomputes the rest) and off (the adopter re-prefills everything from the token log).

Part 3, commit records in Redis, the whole-record commit of before (every commit rewrote the request's
block list as JSON, kept here as the baseline) against the delta commit (kvstore/commit_records.py: a
commit sends the blocks it adds) side by side on one private redis-server: --requests requests each
checkpointed from 0 to each of --record-contexts tokens, a block (16 tokens) a commit, the commits of
all requests in one pipelined round trip a step as the checkpoint thread sends them. Bytes per commit
are Redis's own count (INFO total_net_input_bytes), the mean over the request's life and at its end.

    python benchmarks/bench_checkpoint.py [--contexts 256,1024,4096] [--requests 32] [--runs 2] [--slow-redis-ms 100]
    python benchmarks/bench_checkpoint.py --records-only [--record-contexts 1024,4096] [--requests 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from resilient_moe.kvstore import keys  # noqa: E402
from resilient_moe.kvstore.commit_records import COMMIT_SCRIPT, CommitDelta, gaps_field, list_fields  # noqa: E402


def deployment(model: Path, checkpoint: bool, max_len: int = 8192, redis_url: str = "", **extra) -> DeploymentConfig:
    """`extra`: more DeploymentConfig fields (bench_kv_replication.py: kv_stores, kv_replicas)."""
    return DeploymentConfig(model=str(model), attention_workers=2, expert_workers=2, micro_batches=2,
                            kv_checkpoint=checkpoint, heartbeat_timeout_s=5.0, redis_url=redis_url,
                            engine=EngineConfig(max_num_seqs=64, max_model_len=max_len, kv_cache_tokens=65536,
                                                max_num_batched_tokens=8192), **extra)


@contextlib.contextmanager
def private_redis():
    """A private redis-server on a Unix socket; yields the socket's path."""
    with tempfile.TemporaryDirectory(prefix="rmoe-bench-redis-") as tmp:
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
            client.close()
            yield sock
        finally:
            server.kill()
            server.wait()


@contextlib.contextmanager
def slow_redis(delay_ms: float):
    """A private redis-server behind a proxy that adds `delay_ms` to every round trip; yields its URL."""
    with private_redis() as sock, LatencyProxy(sock, delay_ms / 2000) as proxy:  # half of it each way
        yield proxy.url


# The whole-record commit every commit made before the delta records (commit 59c3431), the baseline of
# part 3: KEYS = commit key, tokens key; ARGV = owner, incarnation, ttl, first token position, the
# record's field/value pairs (the block list and its generations as JSON, all of them), "|", the new tokens.
WHOLE_RECORD_SCRIPT = """
local owner = redis.call('HGET', KEYS[1], 'owner')
local inc = redis.call('HGET', KEYS[1], 'incarnation')
if owner and (owner ~= ARGV[1] or inc ~= ARGV[2]) then return 0 end
local i = 5
while i <= #ARGV and ARGV[i] ~= '|' do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if i < #ARGV and redis.call('LLEN', KEYS[2]) == tonumber(ARGV[4]) then
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i + 1, #ARGV))
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""


def record_commits(sock: str, records: str, context: int, requests: int) -> tuple[float, float, float]:
    """(mean Redis bytes per commit, bytes per commit of the last step, commits/s) of `requests`
    requests checkpointed from 0 to `context` tokens, one block a commit, with `records` "whole" or "delta"."""
    db = redis.Redis(unix_socket_path=sock)
    db.flushall()
    script = db.register_script(WHOLE_RECORD_SCRIPT if records == "whole" else COMMIT_SCRIPT)
    bs, owner, incarnation, ttl = 16, "aw-0", 7, str(keys.COMMIT_TTL_S)
    lists: dict[int, tuple[list[int], list[int]]] = {r: ([], []) for r in range(requests)}
    received = lambda: db.info("stats")["total_net_input_bytes"]  # noqa: E731
    steps = context // bs
    start_bytes, last_bytes = received(), 0.0
    began = time.perf_counter()
    for step in range(steps):
        before = received() if step == steps - 1 else 0
        pipe = db.pipeline(transaction=False)
        for r in range(requests):
            blocks, gens = lists[r]
            blocks.append(r * steps + step)
            gens.append(2 * step + 2)
            n, tokens = (step + 1) * bs, list(range(step * bs, (step + 1) * bs))
            names = [keys.commit_key("bench", f"req-{r:04d}"), keys.blocks_key("bench", f"req-{r:04d}"),
                     keys.tokens_key("bench", f"req-{r:04d}")]
            if records == "whole":
                fields = ["n", str(n), "gaps", "[]", "blocks", json.dumps(blocks), "gens", json.dumps(gens),
                          "block_size", str(bs), "store", "3", "time", f"{time.time():.3f}", "owner", owner,
                          "incarnation", str(incarnation)]
                script(keys=[names[0], names[2]], args=[owner, str(incarnation), ttl, str(step * bs), *fields, "|",
                                                         *map(str, tokens)], client=pipe)
            else:  # what the checkpoint thread sends (kvstore/checkpoint.py `_queue_commits`)
                extra = list_fields(bs, 3, owner, incarnation) | gaps_field([]) if step == 0 else {}
                delta = CommitDelta(n, step, blocks[-1:], gens[-1:], step * bs, tokens, extra)
                script(keys=names, args=delta.args(owner, incarnation, keys.COMMIT_TTL_S), client=pipe)
        assert all(result == 1 for result in pipe.execute()), "every commit applies"
        if step == steps - 1:
            last_bytes = (received() - before) / requests
    elapsed = time.perf_counter() - began
    total = (received() - start_bytes) / (steps * requests)
    db.close()
    return total, last_bytes, steps * requests / elapsed


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
    parser.add_argument("--record-contexts", default="1024,4096", help="part 3: tokens each request reaches")
    parser.add_argument("--records-only", action="store_true", help="run part 3 only")
    args = parser.parse_args()
    if args.records_only:
        record_table(args)
        return 0
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
    record_table(args)
    return 0


def record_table(args) -> None:
    """Part 3: whole-record and delta commits side by side, runs alternating, medians."""
    contexts = [int(c) for c in args.record_contexts.split(",")]
    results: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    with private_redis() as sock:
        for _ in range(args.runs):
            for context in contexts:
                for records in ("whole", "delta"):
                    results.setdefault((context, records), []).append(record_commits(sock, records, context,
                                                                                     args.requests))
    print(f"commit records, {args.requests} requests, a block of 16 tokens a commit, median of {args.runs}:")
    print(f"{'context':>8}{'records':>9}{'bytes/commit':>14}{'at the end':>12}{'commits/s':>11}")
    for context in contexts:
        med = {r: [statistics.median(x[i] for x in results[(context, r)]) for i in range(3)] for r in ("whole", "delta")}
        for records in ("whole", "delta"):
            mean, last, rate = med[records]
            print(f"{context:>8}{records:>9}{mean:>14.0f}{last:>12.0f}{rate:>11.0f}")
        print(f"{'':>8}{'ratio':>9}{med['whole'][0] / med['delta'][0]:>13.1f}x{med['whole'][1] / med['delta'][1]:>11.1f}x"
              f"{med['delta'][2] / med['whole'][2]:>10.2f}x")


if __name__ == "__main__":
    sys.exit(main())

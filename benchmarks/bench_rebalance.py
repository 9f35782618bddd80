"""Load-aware placement and live capacity changes on a skewed workload.

The model is a random Mixtral (make-tiny-model, larger than the test one) whose router always picks
one expert first (a constant feature in every token's hidden state that only that expert's router
row reads), so that expert takes half of every layer's routed rows: a hot expert.

Part 1, a cluster per placement policy (spread, load_aware), both running, measured in turns:
  before     after a warm-up run (the controller has observed the load by then); both policies still
             place with spread here (load_aware needs observed load to plan)
  rebalance  one run with a rebalance asked for once every request is decoding
  after      once the new placement serves and old copies are dropped
  imbalance  max over mean of the rows each expert worker computed in a run (its counters)
  tok/s      generated tokens per second of a run (requests submitted at once, all to completion);
             before and after: medians of --repeats runs, alternating between the two clusters

Part 2, one load_aware cluster: expert workers 3 -> 4 -> 2, then attention workers 2 -> 3 -> 1,
each step taken while a fresh load is decoding.

  stall      the longest gap between two tokens of any request that overlaps the change (from asking
             for it until the controller reports it done: workers ready, routing switched, removed
             workers gone), against the steady p50 gap of the same run before the change (target:
             at most 2x)

Every run's tokens are compared with the first failure-free run of the same prompts.

    python benchmarks/bench_rebalance.py [--requests 24] [--max-tokens 64] [--json bench_rebalance.json]
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
from resilient_moe.model.config import ModelConfig  # noqa: E402
from resilient_moe.launch import make_cluster  # noqa: E402
from resilient_moe.launch.launcher import Launcher  # noqa: E402
from resilient_moe.launch.fork_server import ForkServer  # noqa: E402
from resilient_moe.model.tiny import TinySize, make_tiny_model  # noqa: E402
from resilient_moe.proto import controller_pb2 as pb  # noqa: E402
from resilient_moe.server.frontend import Frontend  # noqa: E402

HOT = 0
POLICIES = ("spread", "load_aware")


def skewed_model(out: Path, experts: int) -> Path:
    """A tiny Mixtral whose router always ranks expert HOT first (see the module docstring)."""
    from safetensors.torch import load_file, save_file

    size = TinySize(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, num_experts=experts, top_k=2,
                    intermediate_size=256, vocab_size=512, max_position_embeddings=1024)
    path = make_tiny_model(out, "mixtral", seed=11, size=size)
    cfg = ModelConfig.from_pretrained(path)
    tensors = load_file(str(path / "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]
    embed[:, -1] = 3 * embed[:, :-1].std()  # the feature nothing but expert HOT's router reads
    tensors["lm_head.weight"][:, -1] = 0.0
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            tensors[f"{prefix}.self_attn.{proj}.weight"][:, -1] = 0.0
        tensors[f"{prefix}.self_attn.o_proj.weight"][-1, :] = 0.0
        for expert in range(experts):
            base = f"{prefix}.block_sparse_moe.experts.{expert}"
            tensors[f"{base}.w1.weight"][:, -1] = 0.0
            tensors[f"{base}.w3.weight"][:, -1] = 0.0
            tensors[f"{base}.w2.weight"][-1, :] = 0.0
        gate = tensors[f"{prefix}.block_sparse_moe.gate.weight"]  # [E, D]
        gate[HOT, -1] = 20 * gate.std() * gate.shape[1] ** 0.5
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def workload(n: int, max_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 500, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)  # gently: every poll is a controller snapshot, and CPU time the workers would use
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def expert_rows(cluster: Launcher) -> dict[str, float]:
    """Rows each ready expert worker reports having computed, once the reports stop changing."""
    def read():
        return {w.name: w.load.get("rows", 0.0) for w in cluster.state().workers
                if w.role == pb.EXPERT and w.state == pb.READY}

    def stable():
        first = read()
        time.sleep(0.3)
        return first if read() == first else None
    return wait_for(stable, 30, "expert row counts to settle")


def settled(cluster: Launcher) -> bool:
    """No rebalance under way, no order outstanding, and every expert worker holds exactly its part of
    the routing table (old copies dropped)."""
    state = cluster.state()
    if state.rebalancing or state.orders:
        return False
    experts = state.ert.num_experts
    holders: dict[str, set] = {w.name: set() for w in state.workers if w.role == pb.EXPERT and w.state == pb.READY}
    for i, entry in enumerate(state.ert.entries):
        for w in entry.workers:
            holders.setdefault(w, set()).add(divmod(i, experts))
    return all({(x.layer, x.expert) for x in w.experts} == holders.get(w.name, set())
               for w in state.workers if w.role == pb.EXPERT and w.state == pb.READY)


def run(frontend: Frontend, prompts, params, change=None, warm_tokens: int = 8) -> dict:
    """Submit every prompt at once; with `change`, call it once every request has `warm_tokens`
    tokens and note how long it takes. Returns tokens, arrival times and the change's window."""
    began = time.monotonic()
    handles = [frontend.submit(p, params) for p in prompts]
    window = None
    if change is not None:
        wait_for(lambda: min(len(h.tokens) for h in handles) >= warm_tokens, 300, "every request to decode")
        t0 = time.monotonic()
        change()
        window = (t0, time.monotonic())
    for h in handles:
        h.wait(600)
    ended = time.monotonic()
    return {"tokens": [h.token_ids for h in handles], "arrivals": [[t.arrived for t in h.tokens] for h in handles],
            "window": window, "seconds": ended - began, "generated": sum(len(h.tokens) for h in handles)}


def stall(result: dict) -> dict:
    """Steady p50 gap before the change, and the longest gap overlapping it."""
    t0, t1 = result["window"]
    steady = [b - a for arr in result["arrivals"] for a, b in zip(arr, arr[1:]) if b < t0]
    during = [b - a for arr in result["arrivals"] for a, b in zip(arr, arr[1:]) if b >= t0 and a <= t1]
    p50 = statistics.median(steady)
    worst = max(during, default=0.0)
    return {"change_s": t1 - t0, "steady_p50_ms": 1000 * p50, "max_gap_ms": 1000 * worst, "ratio": worst / p50}


def imbalance(before: dict[str, float], after: dict[str, float]) -> float:
    rows = [after[w] - before.get(w, 0.0) for w in after]
    return max(rows) / (sum(rows) / len(rows)) if sum(rows) else float("nan")


def deployment(model: Path, policy: str, attention: int, experts: int, **extra) -> DeploymentConfig:
    return DeploymentConfig(model=str(model), attention_workers=attention, expert_workers=experts, micro_batches=2,
                            shadow_policy=policy, engine=EngineConfig(max_num_seqs=64, max_model_len=512),
                            heartbeat_timeout_s=5.0, **extra)


def placement_runs(model: Path, fork_server: ForkServer, args, reference: list) -> list[dict]:
    """Both policies' clusters run at once (one idles while the other is measured) and their runs
    alternate, so a machine that gets busier or quieter meanwhile weighs on both alike."""
    prompts, params = workload(args.requests, args.max_tokens, seed=1)
    rows: list[dict] = []
    clusters = {p: make_cluster(deployment(model, p, args.attention_workers, args.expert_workers), fork_server=fork_server)
                for p in POLICIES}
    frontends: dict[str, Frontend] = {}
    try:
        for policy, cluster in clusters.items():
            cluster.start()
            frontends[policy] = Frontend(cluster.controller_address).start()
            run(frontends[policy], prompts, params)  # warm-up: the controller observes the load

        def measure(phase: str) -> None:
            samples: dict[str, list[tuple[float, float, bool]]] = {p: [] for p in POLICIES}
            for _ in range(args.repeats):
                for policy, cluster in clusters.items():
                    before = expert_rows(cluster)
                    result = run(frontends[policy], prompts, params)
                    samples[policy].append((imbalance(before, expert_rows(cluster)),
                                            result["generated"] / result["seconds"], result["tokens"] == reference))
            for policy in POLICIES:
                rows.append({"policy": policy, "phase": phase,
                             "imbalance": statistics.median(x[0] for x in samples[policy]),
                             "tokens_per_s": statistics.median(x[1] for x in samples[policy]),
                             "identical": all(x[2] for x in samples[policy])})

        measure("before")
        for policy, cluster in clusters.items():
            def rebalance(cluster=cluster, policy=policy) -> None:
                reply = cluster.client.stub.Rebalance(pb.Empty(), timeout=10)
                if reply.started:
                    wait_for(lambda: settled(cluster), 120, "the new placement to serve")
                rows.append({"policy": policy, "phase": "rebalance asked", "detail": reply.detail})
            before = expert_rows(cluster)
            result = run(frontends[policy], prompts, params, change=rebalance)
            rows.append({"policy": policy, "phase": "rebalance", "imbalance": imbalance(before, expert_rows(cluster)),
                         "tokens_per_s": result["generated"] / result["seconds"],
                         "identical": result["tokens"] == reference, **stall(result)})
        measure("after")
    finally:
        for frontend in frontends.values():
            frontend.close()
        for cluster in clusters.values():
            cluster.stop()
    order = {"before": 0, "rebalance": 1, "after": 2}
    return sorted(rows, key=lambda r: (POLICIES.index(r["policy"]), order.get(r["phase"], 3)))


def scale_runs(model: Path, fork_server: ForkServer, args, reference: list) -> list[dict]:
    prompts, params = workload(args.requests, args.max_tokens, seed=1)
    steps = [("expert workers 3 -> 4", {"expert_workers": 4}), ("expert workers 4 -> 2", {"expert_workers": 2}),
             ("attention workers 2 -> 3", {"attention_workers": 3}), ("attention workers 3 -> 1", {"attention_workers": 1})]
    rows = []
    dep = deployment(model, "load_aware", 2, 3, max_attention_workers=3)
    with make_cluster(dep, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            for label, roster in steps:
                def change(roster=roster) -> None:
                    cluster.client.stub.Scale(pb.ScaleRequest(**roster), timeout=10)
                    want = roster.get("attention_workers"), roster.get("expert_workers")

                    def done():
                        state = cluster.state()
                        ready = {role: sum(1 for w in state.workers if w.role == role and w.state == pb.READY)
                                 for role in (pb.ATTENTION, pb.EXPERT)}
                        return (want[0] is None or ready[pb.ATTENTION] == want[0]) and \
                            (want[1] is None or ready[pb.EXPERT] == want[1]) and settled(cluster)
                    wait_for(done, 180, label)
                result = run(frontend, prompts, params, change=change)
                rows.append({"step": label, "identical": result["tokens"] == reference, **stall(result)})
        finally:
            frontend.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--attention-workers", type=int, default=1)
    parser.add_argument("--expert-workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per policy and phase (medians)")
    parser.add_argument("--json", help="write every row as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="bench-rebalance-"))
    model = skewed_model(out / "skewed", args.experts)
    fork_server = ForkServer()
    try:
        fork_server.wait_hello(120)
        prompts, params = workload(args.requests, args.max_tokens, seed=1)
        with make_cluster(deployment(model, "spread", args.attention_workers, args.expert_workers),
                          fork_server=fork_server) as cluster:
            frontend = Frontend(cluster.controller_address).start()
            try:
                reference = run(frontend, prompts, params)["tokens"]
            finally:
                frontend.close()
        placement = placement_runs(model, fork_server, args, reference)
        scaling = scale_runs(model, fork_server, args, reference)
    finally:
        fork_server.shutdown()

    print(f"skewed workload: expert {HOT} of {args.experts} takes half of the routed rows; {args.requests} requests x "
          f"{args.max_tokens} tokens; {args.attention_workers} attention and {args.expert_workers} expert workers")
    print(f"{'policy':<12}{'phase':<11}{'imbalance':>10}{'tok/s':>9}{'identical':>11}{'stall ms':>10}"
          f"{'steady p50 ms':>15}{'ratio':>7}")
    for r in placement:
        if "imbalance" not in r:
            continue
        extra = (f"{r['max_gap_ms']:>10.1f}{r['steady_p50_ms']:>15.1f}{r['ratio']:>7.2f}" if "ratio" in r else "")
        print(f"{r['policy']:<12}{r['phase']:<11}{r['imbalance']:>10.2f}{r['tokens_per_s']:>9.0f}"
              f"{str(r['identical']):>11}{extra}")
    for r in placement:
        if "detail" in r:
            print(f"  {r['policy']} rebalance: {r['detail']}")
    print(f"\nscale steps while {args.requests} requests decode (load_aware, stall target <= 2x steady p50)")
    print(f"{'step':<27}{'change s':>9}{'stall ms':>10}{'steady p50 ms':>15}{'ratio':>7}{'identical':>11}")
    for r in scaling:
        print(f"{r['step']:<27}{r['change_s']:>9.2f}{r['max_gap_ms']:>10.1f}{r['steady_p50_ms']:>15.1f}"
              f"{r['ratio']:>7.2f}{str(r['identical']):>11}")
    if args.json:
        Path(args.json).write_text(json.dumps({"placement": placement, "scaling": scaling}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Attention and expert workers as separate processes give exactly the colocated engine's tokens."""

from __future__ import annotations

import random

import pytest

from conftest import pid_alive, wait_until
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch import make_cluster
from resilient_moe.server.frontend import Frontend

# Every (E, m) pair, with A, transport and family alternating so each of their values appears too.
CONFIGS = [
    # A, E, m, transport, family
    (1, 1, 1, "shm", "mixtral"),
    (2, 1, 2, "tcp", "qwen2_moe"),
    (1, 1, 3, "tcp", "mixtral"),
    (2, 2, 1, "tcp", "mixtral"),
    (1, 2, 2, "shm", "qwen2_moe"),
    (2, 2, 3, "shm", "mixtral"),
    (1, 3, 1, "tcp", "qwen2_moe"),  # 8 experts over 3 workers: an uneven 3/3/2 split
    (2, 3, 2, "shm", "mixtral"),
    (1, 3, 3, "tcp", "qwen2_moe"),
]


def workload(seed: int = 0):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(2, 40))] for _ in range(10)]
    params = [SamplingParams(max_tokens=rng.randint(12, 24), ignore_eos=True) for _ in range(9)]
    params.append(SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=77, ignore_eos=True))
    return prompts, params


@pytest.fixture(scope="module")
def colocated(tiny_models):
    """family -> the colocated engine's tokens for the workload."""
    prompts, params = workload()
    out = {}
    for family in ("mixtral", "qwen2_moe"):
        engine = LLMEngine(tiny_models[family], EngineConfig())
        out[family] = [r.token_ids for r in engine.generate(prompts, params)]
    return out


def run_with_joins(frontend: Frontend, prompts, params):
    """Submit in three waves, each after earlier requests have produced tokens (joins mid-flight)."""
    handles = [frontend.submit(p, s) for p, s in zip(prompts[:5], params[:5])]
    wait_until(lambda: len(handles[0].tokens) >= 3, 60, "first wave to produce tokens")
    handles += [frontend.submit(p, s) for p, s in zip(prompts[5:8], params[5:8])]
    wait_until(lambda: len(handles[5].tokens) >= 2, 60, "second wave to produce tokens")
    handles += [frontend.submit(p, s) for p, s in zip(prompts[8:], params[8:])]
    return [h.wait(120).token_ids for h in handles]


@pytest.mark.parametrize("A,E,m,transport,family", CONFIGS, ids=[f"{a}a{e}e-m{m}-{t}-{f}" for a, e, m, t, f in CONFIGS])
def test_token_identical_to_colocated(tiny_models, colocated, fork_server, tmp_path, A, E, m, transport, family):
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_models[family]), attention_workers=A, expert_workers=E, micro_batches=m,
                           transport=transport)
    cluster = make_cluster(dep, log_dir=tmp_path, fork_server=fork_server)
    with cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            tokens = run_with_joins(frontend, prompts, params)
        finally:
            frontend.close()
        state = cluster.state()
        assert sorted(w.name for w in state.workers if w.state == 2) == sorted(
            [f"aw-{i}" for i in range(A)] + [f"ew-{i}" for i in range(E)] + ["kv-store"]
        )
        pids = list(cluster.pids.values())
    assert tokens == colocated[family]
    wait_until(lambda: not any(pid_alive(p) for p in pids), 15, "every worker to exit after stop")

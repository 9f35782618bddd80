"""CPU placement: each attention and expert worker runs on cores of its own, with one torch and one
native GEMM thread per core; the plan is a pure function; the native GEMM gives the same bits on any
number of threads."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import wait_until, worker_load
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.errors import ConfigError
from resilient_moe.launch.cpus import cpu_plan
from resilient_moe.launch import make_cluster


def test_cpu_plan_gives_each_worker_its_own_cores_or_deals_them_round_robin():
    workers = ["aw-0", "ew-0", "ew-1"]
    assert cpu_plan(list(range(8)), workers) == {"aw-0": (0, 1), "ew-0": (2, 3), "ew-1": (4, 5)}
    assert cpu_plan([3, 1, 2, 0], ["aw-0", "ew-0"]) == {"aw-0": (0, 1), "ew-0": (2, 3)}
    assert cpu_plan([0, 1], ["aw-0", "aw-1", "ew-0", "ew-1", "ew-2"]) == {
        "aw-0": (0,), "aw-1": (1,), "ew-0": (0,), "ew-1": (1,), "ew-2": (0,)}
    assert cpu_plan([], workers) == {} and cpu_plan([0], []) == {}
    with pytest.raises(ConfigError, match="cpu_affinity must be auto or none"):
        DeploymentConfig(cpu_affinity="all")


@pytest.mark.parametrize("affinity", ["auto", "none"])
def test_workers_run_pinned_with_one_thread_per_core(tiny_model, fork_server, tmp_path, affinity):
    cores = sorted(os.sched_getaffinity(0))
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=2, cpu_affinity=affinity)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        plan = cpu_plan(cores, ["aw-0", "ew-0", "ew-1"])
        for name in ("aw-0", "ew-0", "ew-1"):
            pinned = sorted(os.sched_getaffinity(cluster.pids[name]))
            expected = list(plan[name]) if affinity == "auto" else cores
            assert pinned == expected, (name, pinned)
            threads = len(plan[name]) if affinity == "auto" else dep.engine.threads
            wait_until(lambda: worker_load(cluster, name, "threads") == threads, 10, f"{name} to report its threads")
        assert sorted(os.sched_getaffinity(cluster.pids["controller"])) == cores, "the controller is not pinned"


def test_native_gemm_gives_the_same_bits_on_any_number_of_threads():
    """Threads split a product by output columns, never by K, a group of products by product and columns,
    and attention by (row, kv head), never inside a row (csrc/kernels.c): run in a child process,
    since the helper threads stay for the life of the process."""
    import subprocess
    import sys

    code = """
import torch
from resilient_moe.model import ops
torch.manual_seed(0)
lin = ops.Linear(torch.randn(1000, 700), torch.randn(1000))
xs = [torch.randn(m, 700) for m in (1, 5, 64, 300)]
single = [lin(x) for x in xs]
experts = [(ops.Linear(torch.randn(300, 700)), torch.randn(m, 700)) for m in (3, 9, 1, 40)]
expert_single = [e(x) for e, x in experts]
G, R, d, slots = 2, 4, 64, 4096
k, v = torch.randn(G, slots, d), torch.randn(G, slots, d)
blocks = torch.randperm(slots // 16)
lengths = [1, 900, 2000, 33]
start = torch.tensor([0, 1, 60, 190])
q = torch.randn(len(lengths), G * R, d)
args = (blocks, start, torch.arange(4), torch.tensor(lengths) - 1, 16, 0.125, None, None)
attention_single = ops.paged_attention(q, k, v, *args)
ops.configure_threads(3, "float32", "cpu")
outs = [torch.empty(x.shape[0], 300) for _, x in experts]
ops.linear_group([(e, x, y) for (e, x), y in zip(experts, outs)])
print(all(torch.equal(lin(x), y) for x, y in zip(xs, single)),
      torch.equal(lin(xs[3])[7], lin(xs[3][7:8])[0]),
      all(torch.equal(a, b) for a, b in zip(outs, expert_single)),
      torch.equal(ops.paged_attention(q, k, v, *args), attention_single))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.stdout.split() == ["True"] * 4, done.stderr
    assert torch.get_num_threads() >= 1

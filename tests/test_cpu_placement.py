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
            threads = len(plan[name]) if affinity == "auto" else dep.engine.torch_threads
            wait_until(lambda: worker_load(cluster, name, "threads") == threads, 10, f"{name} to report its threads")
        assert sorted(os.sched_getaffinity(cluster.pids["controller"])) == cores, "the controller is not pinned"


def test_native_gemm_gives_the_same_bits_on_any_number_of_threads():
    """Threads split a product by output columns, never by K (csrc/kernels.c): run in a child process,
    since the helper threads stay for the life of the process."""
    import subprocess
    import sys

    code = """
import torch
from resilient_moe.model.ops import Linear, set_threads
torch.manual_seed(0)
lin = Linear(torch.randn(1000, 700), torch.randn(1000))
xs = [torch.randn(m, 700) for m in (1, 5, 64, 300)]
single = [lin(x) for x in xs]
set_threads(3)
print(all(torch.equal(lin(x), y) for x, y in zip(xs, single)),
      torch.equal(lin(xs[3])[7], lin(xs[3][7:8])[0]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.stdout.split() == ["True", "True"], done.stderr
    assert torch.get_num_threads() >= 1

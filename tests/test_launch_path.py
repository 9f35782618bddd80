"""The launch path never leaves a wedged cluster: a worker that leaves on its own is replaced and its
requests finish token-identical; a dead fork server takes every worker down, and the cluster comes
back by itself; nothing is left behind afterwards (child processes, memfd descriptors)."""

from __future__ import annotations

import os
import random
import signal

import grpc
import pytest

from conftest import pid_alive, wait_until, worker_load
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch import make_cluster
from resilient_moe.launch.launcher import Launcher
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend import Frontend


def workload(n: int = 8, max_tokens: int = 48):
    rng = random.Random(13)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(4, 30))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model):
    prompts, params = workload()
    return [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]


def descendants(pid: int) -> list[int]:
    """Live processes below `pid`, from /proc (children of children too)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X"):
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def memfd_holders(cluster_id: str) -> list[int]:
    """Processes holding a memfd of this cluster (KV store, shm links): memfds never appear in /dev/shm,
    so this looks at every process's descriptors."""
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(f"rmoe-{cluster_id}" in os.readlink(f"/proc/{entry}/fd/{fd}") for fd in fds):
                holders.append(int(entry))
        except OSError:
            continue
    return holders


def ready_again(cluster: Launcher, names: list[str], old: dict[str, int]) -> bool:
    try:
        state = cluster.state()
    except grpc.RpcError:
        return False  # the controller is being started again
    ready = {w.name: w.pid for w in state.workers if w.state == pb.READY}
    return all(ready.get(n, old[n]) != old[n] for n in names)


def test_sigterm_to_an_attention_worker_replaces_it_and_its_requests_finish(tiny_model, reference, fork_server, tmp_path):
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=2)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 5 for h in handles), 60, "requests to be mid-generation")
            on_victim = [h for h in handles if h.worker == "aw-0"]
            assert on_victim
            old = cluster.pids["aw-0"]
            os.kill(old, signal.SIGTERM)
            assert [h.wait(120).token_ids for h in handles] == reference
            assert all(h.moves >= 1 for h in on_victim)
            # A planned drain, not a failure: its requests moved with their KV (each adopter computed only
            # each request's newest position again) and no death was declared.
            wait_until(lambda: worker_load(cluster, "aw-1", "ckpt_restored") >= len(on_victim), 10, "restores")
            assert worker_load(cluster, "aw-1", "recomputed_tokens") == len(on_victim)
            assert ("dead", "aw-0") not in [(e.kind, e.worker) for e in cluster.state().events]
            wait_until(lambda: not pid_alive(old), 15, "the old aw-0 to exit")
            wait_until(lambda: ready_again(cluster, ["aw-0"], {"aw-0": old}), 30, "a replacement aw-0")
            later = [frontend.submit(p, params) for p in prompts[:4]]
            assert [h.wait(60).token_ids for h in later] == reference[:4]
        finally:
            frontend.close()


def test_a_killed_fork_server_brings_the_cluster_back_by_itself(tiny_model, reference, tmp_path):
    """SIGKILL the fork server: every worker it forked dies with it. The launcher starts a new one, a new
    controller (from Redis) and every worker; the requests in flight finish token-identical."""
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=2)
    cluster = make_cluster(dep, log_dir=tmp_path)  # its own fork server: this test kills it
    with cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 5 for h in handles), 60, "requests to be mid-generation")
            old_fork_server = cluster.fork_server.proc.pid
            old = dict(cluster.pids)
            os.kill(old_fork_server, signal.SIGKILL)
            workers = ["aw-0", "aw-1", "ew-0", "ew-1", "kv-store"]
            wait_until(lambda: cluster.fork_server.proc.pid != old_fork_server, 30, "a new fork server")
            wait_until(lambda: ready_again(cluster, workers, old), 120, "every worker to be back")
            assert cluster.fatal is None
            assert [h.wait(120).token_ids for h in handles] == reference
            assert not [p for n, p in old.items() if n != "redis" and pid_alive(p)], "the old workers are gone"
        finally:
            frontend.close()
    assert cluster.fatal is None


def test_nothing_is_left_behind_after_stop(tiny_model, fork_server, tmp_path):
    prompts, params = workload(n=4, max_tokens=8)
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=2)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        assert len(descendants(fork_server.proc.pid)) >= 6, "the check sees the workers while they run"
        assert len(memfd_holders(cluster.cluster_id)) >= 3, "and their memfds (KV store, shm links)"
        frontend = Frontend(cluster.controller_address).start()
        try:
            frontend.generate(prompts, params, timeout_s=60)
        finally:
            frontend.close()
    wait_until(lambda: not descendants(fork_server.proc.pid), 15, "every worker to be gone")
    assert memfd_holders(cluster.cluster_id) == []


def ignores_sigpipe(pid: int) -> bool:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(mask & (1 << (signal.SIGPIPE - 1)))


def test_every_forked_process_ignores_sigpipe(tiny_model, fork_server, tmp_path):
    """A write to a socket whose peer is gone must raise EPIPE (a closed link), not kill the writer:
    an attention worker woken after a fence, or one sending tokens to a frontend that just left, died
    silently by SIGPIPE when forked workers ran with its default action."""
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=1, expert_workers=1)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        forked = {name: pid for name, pid in cluster.pids.items() if name != "redis"}
        assert {"controller", "kv-store", "ew-0", "aw-0"} <= set(forked)
        assert {name for name, pid in forked.items() if not ignores_sigpipe(pid)} == set()

"""The KV store's ownership rules at work, on real processes: a fenced attention worker that wakes up
never writes into blocks its successor owns, and a KV store that dies is replaced and mapped again,
after which restores come from the new store, not from recompute."""

from __future__ import annotations

import os
import random
import re
import signal

import pytest

from conftest import wait_until, worker_load
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.launch import make_cluster
from resilient_moe.launch.launcher import Launcher
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.frontend import Frontend


def workload(n: int = 8, max_tokens: int = 160):
    rng = random.Random(8)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(20, 40))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model):
    prompts, params = workload()
    return [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]


def replaced(cluster: Launcher, name: str, old_pid: int) -> bool:
    return any(w.name == name and w.state == pb.READY and w.pid != old_pid for w in cluster.state().workers)


def kv_store_mappings(pid: int) -> set[str]:
    """The distinct KV store memfds process `pid` maps (by inode)."""
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[4] for line in f if "kv-store" in line and "memfd" in line}


def test_a_woken_fenced_worker_cannot_write_into_its_successors_blocks(tiny_model, reference, fork_server, tmp_path):
    """Redis hangs for a moment so that aw-0 has checkpoint writes waiting; aw-0 is SIGSTOPped, fenced
    and replaced, and its successor checkpoints new requests into the same store region; then the old
    one is woken: its writes are refused. Killing the successor then restores its requests from the
    store, every block's stamp as its record says, token-identical."""
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=2)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            first = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 20 for h in first), 60, "requests to be mid-generation")
            old = cluster.pids["aw-0"]
            incarnation = next(w.incarnation for w in cluster.state().workers if w.name == "aw-0")
            os.kill(cluster.pids["redis"], signal.SIGSTOP)  # commits wait: snapshots pile up in aw-0
            try:
                # Its checkpoint thread waits in a commit (not in the middle of copying rows into the
                # store, where a stop would let one late write through to be caught by the stamps).
                wait_until(lambda: worker_load(cluster, "aw-0", "ckpt_pending") > 0
                           and worker_load(cluster, "aw-0", "ckpt_commit_wait_s") > 0.2, 10,
                           "aw-0 to have writes waiting behind a commit")
                os.kill(old, signal.SIGSTOP)
            finally:
                os.kill(cluster.pids["redis"], signal.SIGCONT)
            try:
                wait_until(lambda: replaced(cluster, "aw-0", old), 60, "a new aw-0")
                wait_until(lambda: "aw-0" in frontend.links, 10, "the frontend to link to it")
                second = [frontend.submit(p, params) for p in prompts]
                wait_until(lambda: all(h.worker for h in second), 10, "the new requests to be sent")
                on_successor = [h for h in second if h.worker == "aw-0"]
                assert on_successor, "new requests go to the least loaded worker: the successor"
                wait_until(lambda: all(len(h.tokens) >= 20 for h in on_successor)
                           and worker_load(cluster, "aw-0", "ckpt_commits") >= len(on_successor), 60,
                           "the successor to checkpoint blocks of its requests")
            finally:
                os.kill(old, signal.SIGCONT)
            [exit_code] = wait_until(lambda: [e["code"] for e in fork_server.exits if e["pid"] == old], 20,
                                     "the woken incarnation to exit")
            assert exit_code == 3, f"the woken incarnation leaves as a fenced one does, not with code {exit_code}"
            refused = re.search(rf"KV checkpoint writes refused: .*incarnation {incarnation} stops",
                                (tmp_path / "aw-0.log").read_text())
            assert refused, "the woken incarnation's writes were refused"
            os.kill(cluster.pids["aw-0"], signal.SIGKILL)
            assert [h.wait(120).token_ids for h in first] == reference
            assert [h.wait(120).token_ids for h in second] == reference
            wait_until(lambda: worker_load(cluster, "aw-1", "ckpt_restored") >= len(on_successor), 10,
                       "aw-1 to restore the successor's requests from the store")
            assert worker_load(cluster, "aw-1", "ckpt_restore_stamp_mismatches") == 0
        finally:
            frontend.close()


def test_a_dead_kv_store_is_replaced_mapped_again_and_restores_come_from_it(tiny_model, reference, fork_server, tmp_path):
    prompts, params = workload()
    dep = DeploymentConfig(model=str(tiny_model), attention_workers=2, expert_workers=2)
    with make_cluster(dep, log_dir=tmp_path, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, params) for p in prompts]
            wait_until(lambda: all(len(h.tokens) >= 8 for h in handles), 60, "requests to be mid-generation")
            old_store = cluster.pids["kv-store"]
            os.kill(old_store, signal.SIGKILL)
            wait_until(lambda: replaced(cluster, "kv-store", old_store), 30, "a new KV store")
            for aw in ("aw-0", "aw-1"):
                wait_until(lambda: worker_load(cluster, aw, "ckpt_store_attaches") == 2, 10, f"{aw} to map the new store")
                assert len(kv_store_mappings(cluster.pids[aw])) == 1, "the dead store's memory was let go"
            commits = worker_load(cluster, "aw-0", "ckpt_commits")
            wait_until(lambda: worker_load(cluster, "aw-0", "ckpt_commits") > commits, 20,
                       "aw-0 to checkpoint into the new store")
            on_victim = [h for h in handles if h.worker == "aw-0" and not h.done]
            assert on_victim, "the frontend spread requests over both attention workers"
            os.kill(cluster.pids["aw-0"], signal.SIGKILL)
            assert [h.wait(120).token_ids for h in handles] == reference
            wait_until(lambda: worker_load(cluster, "aw-1", "ckpt_restored") >= 1, 10, "aw-1 to report restores")
            assert worker_load(cluster, "aw-1", "ckpt_restored_tokens") > 0, "restored from the new store"
        finally:
            frontend.close()

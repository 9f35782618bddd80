"""A supervisor that may die: `resilient-moe serve` killed with SIGKILL leaves its frontends and workers
serving; the same command again adopts the cluster (no process restarts, no request is lost) and
supervises it from then on; a supervisor that never comes back lets the cluster stop by itself once its
lease lapses. Real processes, real HTTP, token-identical to the colocated engine."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import pid_alive, wait_until
from resilient_moe.client import ResumingClient
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine

ADMIN = "supervisor-test-token"
STREAMS = 16
MAX_TOKENS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts() -> list[list[int]]:
    rng = random.Random(17)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(3, 20))] for _ in range(STREAMS)]


class Serve:
    """`resilient-moe serve` as its own process; its output read on a thread."""

    def __init__(self, model, port: int, state_dir, lease_s: float, log_dir) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resilient_moe.cli", "serve", "--model", str(model), "--port", str(port),
             "--attention-workers", "1", "--expert-workers", "2", "--admin-token", ADMIN, "--state-dir", str(state_dir),
             "--supervisor-lease", str(lease_s), "--log-dir", str(log_dir), "--max-model-len", "512"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_serving(self, timeout_s: float = 180) -> None:
        wait_until(lambda: any("press Ctrl-C to stop" in line for line in self.lines) or self.proc.poll() is not None,
                   timeout_s, "serve to print its banner")
        assert self.proc.poll() is None, "".join(self.lines[-40:])


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if parent_of(int(entry)) == pid:
                    out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def with_fork_server(pids: dict[str, int]) -> dict[str, int]:
    """The cluster's processes and their fork server's other children (redis-server), and it."""
    fork_server = parent_of(pids["aw-0"])
    extra = {f"child-{p}": p for p in children_of(fork_server) if p not in pids.values()}
    return {**pids, **extra, "fork-server": fork_server}


def cluster_pids(url: str) -> dict[str, int]:
    workers = httpx.get(f"{url}/admin/cluster", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()["workers"]
    return {w["id"]: w["pid"] for w in workers if w["pid"] and w.get("state") in ("ready", "loading")}


@pytest.fixture
def reference(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(max_model_len=512))
    return [r.token_ids for r in engine.generate(prompts(), SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]


def stream_all(url: str, tokens: list[list[int]], errors: list) -> list[threading.Thread]:
    client = ResumingClient(url, backoff_s=0.05, max_backoff_s=1.0, max_retries=30)

    def one(i: int, prompt: list[int]) -> None:
        try:
            for chunk in client.stream("/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                                                           "temperature": 0, "return_token_ids": True},
                                       key=f"sup-{i}"):
                tokens[i].extend(chunk["choices"][0].get("token_ids") or [])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, p), daemon=True) for i, p in enumerate(prompts())]
    for t in threads:
        t.start()
    return threads


def test_a_killed_supervisor_is_adopted_by_the_same_command_and_nothing_restarts(tiny_model, tmp_path, reference):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = Serve(tiny_model, port, tmp_path / "state", 20, tmp_path / "logs")
    second = None
    pids: dict[str, int] = {}
    try:
        first.wait_serving()
        tokens: list[list[int]] = [[] for _ in range(STREAMS)]
        errors: list = []
        threads = stream_all(url, tokens, errors)
        wait_until(lambda: all(len(t) >= 3 for t in tokens) or errors, 120, "every stream to be under way")
        pids = cluster_pids(url)
        assert {"aw-0", "ew-0", "ew-1", "fe-0", "fe-1"} <= set(pids), pids
        assert pids.pop("supervisor") == first.proc.pid, "the cluster view names its supervisor"
        pids = with_fork_server(pids)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        time.sleep(1.0)  # serving without a supervisor
        assert all(pid_alive(p) for p in pids.values()), "a process died with its supervisor"
        # A second supervisor while this one is alive is refused; once it is gone the same command adopts.
        second = Serve(tiny_model, port, tmp_path / "state", 20, tmp_path / "logs")
        second.wait_serving()
        assert any("adopting the running cluster" in line for line in second.lines), "".join(second.lines)
        for t in threads:
            t.join(300)
        assert not errors, errors[:3]
        assert tokens == reference
        after = cluster_pids(url)
        assert after.pop("supervisor") == second.proc.pid, "the cluster view names the adopting supervisor"
        assert with_fork_server(after) == pids, "the adoption restarted a process"
        faults = wait_until(lambda: [f for f in httpx.get(f"{url}/admin/recovery", headers={"Authorization": f"Bearer {ADMIN}"},
                                                          timeout=10).json()["faults"] if f["worker"] == "supervisor"],
                            30, "a fault record of the supervisor that was killed")
        assert [(f["pid"], f["cause"], f["replaced_at"] is not None) for f in faults] == \
            [(first.proc.pid, "process gone", True)]  # replaced by the adopter
        third = subprocess.run([sys.executable, "-m", "resilient_moe.cli", "serve", "--model", str(tiny_model), "--port",
                                str(port), "--state-dir", str(tmp_path / "state"), "--admin-token", ADMIN],
                               capture_output=True, text=True, timeout=120)
        assert third.returncode != 0 and f"pid {second.proc.pid}" in third.stdout + third.stderr, third.stdout[-800:]
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": prompts()[0], "max_tokens": 8, "temperature": 0,
                                                           "ignore_eos": True, "return_token_ids": True}, timeout=60)
        assert answer.json()["choices"][0]["token_ids"] == reference[0][:8]
        second.proc.send_signal(signal.SIGINT)  # Ctrl-C: everything stops
        assert second.proc.wait(90) == 0, "".join(second.lines[-30:])
        wait_until(lambda: not any(pid_alive(p) for p in pids.values()), 30, "every process to stop after Ctrl-C")
    finally:
        for serve in (first, second):
            if serve is not None and serve.proc.poll() is None:
                serve.proc.kill()
                serve.proc.wait()
        for pid in pids.values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_supervisor_that_never_comes_back_lets_the_cluster_stop_by_itself(tiny_model, tmp_path):
    port = free_port()
    serve = Serve(tiny_model, port, tmp_path / "state", 3, tmp_path / "logs")
    pids: dict[str, int] = {}
    try:
        serve.wait_serving()
        pids = cluster_pids(f"http://127.0.0.1:{port}")
        assert pids.pop("supervisor") == serve.proc.pid, pids
        pids = with_fork_server(pids)
        assert len(pids) > 8, pids  # the roles, redis-server and the fork server
        os.kill(serve.proc.pid, signal.SIGKILL)
        serve.proc.wait(10)
        # The lease (3 s) lapses, the fork server sees it within a second and stops its processes: SIGTERM,
        # then SIGKILL after 5 s. A hang bound, generous for a loaded machine.
        wait_until(lambda: not any(pid_alive(p) for p in pids.values()), 3 + 1 + 5 + 20,
                   "every process to stop once no supervisor renewed the lease")
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
        for pid in pids.values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_lent_fork_server_goes_back_without_the_lease(tiny_model, tmp_path):
    """A stack that runs on a fork server it did not start (the test suite's, a host's) holds its lease
    there while it serves; stopped, it hands the fork server back tied to its owner again, so the lease's
    lapse does not end it (it did: every later cluster of the session failed with a broken pipe)."""
    from serving import serving_stack

    from resilient_moe.launch.fork_server import ForkServer

    lent = ForkServer()
    try:
        lent.wait_hello(120)
        with serving_stack(tiny_model, lent, tmp_path / "logs", attention_workers=1, expert_workers=1,
                           frontends=1, deployment_options={"supervisor_lease_s": 2.0}) as stack:
            assert stack.cluster.deployment.redis_url, "the lease needs the cluster's Redis"
        time.sleep(2.0 + 1.5)  # past the lease and the fork server's next look at it
        assert lent.alive, "the lent fork server stopped when the lease of a stopped stack lapsed"
        pid = lent.run("probe", [sys.executable, "-c", "pass"], b"", str(tmp_path / "probe.log"))
        assert pid > 0
    finally:
        lent.shutdown()

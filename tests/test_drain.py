"""Planned removal is a drain, not a failure: SIGTERM to `resilient-moe serve` (a real process) stops
admitting (/ready and new requests get 503), every request in flight completes token-identical, and
every process has exited within the drain timeout. (SIGTERM to one attention worker, which hands its
requests over with their KV: tests/test_launch_path.py.)
"""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import pid_alive, wait_until
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from serving import StreamResult, stream_completion
from test_launch_path import descendants

DRAIN_TIMEOUT_S = 20.0
TOKEN = "drain-test-token"


def workload(n: int, max_tokens: int, seed: int = 5):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(2, 24))] for _ in range(n)]
    return prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def start_serve(model_dir, log_dir) -> tuple[subprocess.Popen, str]:
    """`resilient-moe serve` on a free port; returns the process and its URL once it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "resilient_moe.cli", "serve", "--model", str(model_dir), "--port", "0",
         "--attention-workers", "2", "--expert-workers", "2", "--max-model-len", "128", "--admin-token", TOKEN,
         "--drain-timeout", str(DRAIN_TIMEOUT_S), "--log-dir", str(log_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        match = re.search(r"OpenAI API\s+(http://\S+)/v1", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    proc.wait()
    raise AssertionError("serve did not start:\n" + "".join(seen[-30:]))


def test_sigterm_to_serve_finishes_requests_in_flight_and_refuses_new_ones(tiny_model, tmp_path):
    prompts, params = workload(8, 96)
    reference = [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts, params)]
    proc, url = start_serve(tiny_model, tmp_path)
    processes: list[int] = []
    try:
        results = [StreamResult() for _ in prompts]
        progress = [0] * len(prompts)
        errors: list[BaseException] = []

        def stream(i: int) -> None:
            def on_chunk(result: StreamResult) -> None:
                progress[i] = len(result.token_ids)
            try:
                results[i] = stream_completion(url, prompts[i], 96, timeout_s=120, on_chunk=on_chunk, ignore_eos=True)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(prompts))]
        for t in threads:
            t.start()
        wait_until(lambda: min(progress) >= 3, 60, "every stream to be generating")
        processes = [proc.pid, *descendants(proc.pid)]
        assert len(processes) >= 7, "serve, the fork server, redis, controller, KV store and the workers"
        began = time.monotonic()
        at_signal = list(progress)
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 503, 10, "/ready to answer 503")
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining", refused.text
        assert any(p < 96 for p in at_signal), "the drain began with requests in flight"
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert [r.token_ids for r in results] == reference
        assert all(r.done and r.finish_reason == "length" for r in results)
        assert proc.wait(DRAIN_TIMEOUT_S + 30) == 0
        wait_until(lambda: not any(pid_alive(p) for p in processes), 15, "every process of the cluster to exit")
        assert time.monotonic() - began < DRAIN_TIMEOUT_S + 15, "everything stopped within the drain timeout"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in processes:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("timeout", ["0", "-1", "soon"])
def test_serve_rejects_a_bad_drain_timeout(timeout):
    out = subprocess.run([sys.executable, "-m", "resilient_moe.cli", "serve", "--drain-timeout", timeout],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--drain-timeout" in out.stderr

"""Elastic scaling while serving, through POST /admin/scale, with real processes and HTTP.

During 16 greedy streams the expert workers go 3 -> 4 -> 2 (new ones load their experts before the
routing table names them; removed ones drain), then the attention workers 2 -> 3 -> 1 (a new one takes
new requests; removed ones hand theirs over with their KV, restored by the one that is left). Every
stream is token-identical to the colocated engine, none is lost, and /admin/cluster shows the new
counts of ready workers after each step.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading

import httpx
import pytest

from conftest import wait_until, worker_load
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.proto import controller_pb2 as pb
from serving import ADMIN_TOKEN, StreamResult, admin_headers, serving_stack, stream_completion

MAX_TOKENS = 120


def prompts_for_scaling():
    rng = random.Random(29)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(2, 24))] for _ in range(16)]


@pytest.fixture(scope="module")
def reference(tiny_model):
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    return [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(prompts_for_scaling(), params)]


def ready_counts(url: str) -> dict[str, int]:
    cluster = httpx.get(f"{url}/admin/cluster", headers=admin_headers(), timeout=10).json()
    counts = {"attention": 0, "expert": 0}
    for w in cluster["workers"]:
        if w["role"] in counts and w["state"] == "ready":
            counts[w["role"]] += 1
    return counts


def test_scaling_expert_and_attention_workers_while_16_streams_run(tiny_model, reference, fork_server, tmp_path):
    prompts = prompts_for_scaling()
    results = [StreamResult() for _ in prompts]
    progress = [0] * len(prompts)  # tokens each client has received so far
    errors: list[BaseException] = []
    threads: list[threading.Thread] = []

    def stream(i: int) -> None:
        def on_chunk(result: StreamResult) -> None:
            progress[i] = len(result.token_ids)

        try:
            results[i] = stream_completion(stack.url, prompts[i], MAX_TOKENS, timeout_s=120.0, on_chunk=on_chunk,
                                           ignore_eos=True)
        except BaseException as e:  # reported below
            errors.append(e)

    def launch(indices) -> None:
        for i in indices:
            thread = threading.Thread(target=stream, args=(i,), daemon=True)
            thread.start()
            threads.append(thread)

    def scale(**roster) -> None:
        assert stack.frontend.unfinished() > 0, "streams are running while the cluster scales"
        answer = httpx.post(f"{stack.url}/admin/scale", json=roster, headers=admin_headers(), timeout=10)
        assert answer.status_code == 200, answer.text
        assert {k: answer.json()["desired"][k] for k in roster} == roster

    def settled(attention: int, expert: int):
        def check():
            state = stack.cluster.state()
            return not state.rebalancing and not state.orders and \
                ready_counts(stack.url) == {"attention": attention, "expert": expert}
        return check

    def cli(*args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "resilient_moe.cli", "admin", *args, "--url", stack.url,
                              "--token", ADMIN_TOKEN], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    with serving_stack(tiny_model, fork_server, tmp_path, attention_workers=2, expert_workers=3, max_model_len=160,
                       deployment_options={"max_attention_workers": 3}) as stack:
        for body, status, words in [({"attention_workers": 4}, 400, "max_attention_workers"),
                                    ({"expert_workers": 9}, 400, "the model's 8 experts"),
                                    ({}, 400, "give attention_workers, expert_workers or both"),
                                    ({"expert_workers": 0}, 400, "expert_workers"),
                                    ({"expert_workers": "many"}, 400, "expert_workers"),
                                    ({"workers": 2}, 400, "workers")]:
            bad = httpx.post(f"{stack.url}/admin/scale", json=body, headers=admin_headers(), timeout=10)
            assert bad.status_code == status and words in bad.json()["error"]["message"], (body, bad.text)
        assert httpx.post(f"{stack.url}/admin/scale", json={"expert_workers": 2}, timeout=10).status_code == 401
        spread = cli("rebalance")
        assert not spread["started"] and "spread" in spread["detail"], "nothing to rebalance under spread"
        assert cli("scale", "--attention-workers", "2")["desired"] == {"attention_workers": 2, "expert_workers": 3}
        launch(range(8))
        wait_until(lambda: min(progress[:8]) >= 3, 60, "the first streams to be generating")
        scale(expert_workers=4)
        wait_until(settled(2, 4), 60, "4 expert workers serving the new placement")
        scale(expert_workers=2)
        wait_until(settled(2, 2), 60, "2 expert workers serving, the removed ones gone")
        scale(attention_workers=3)
        wait_until(settled(3, 2), 60, "3 attention workers")
        launch(range(8, 16))  # the new attention worker takes new requests
        wait_until(lambda: min(progress[8:]) >= 3, 60, "the later streams to be generating")
        assert worker_load(stack.cluster, "aw-2", "steps") > 0, "aw-2 runs some of them"
        scale(attention_workers=1)
        wait_until(settled(1, 2), 60, "1 attention worker, the others drained")
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        assert [r.token_ids for r in results] == reference
        assert all(r.done and r.finish_reason == "length" for r in results)
        # The removed attention workers handed their requests over with KV: aw-0 restored every one.
        assert worker_load(stack.cluster, "aw-0", "ckpt_restored") >= 1
        assert worker_load(stack.cluster, "aw-0", "ckpt_restored_tokens") > 0
        assert worker_load(stack.cluster, "aw-0", "requests_recomputed") == 0
        state = stack.cluster.state()
        assert state.counters["scale_events"] == 4 and state.counters["drains"] >= 4
        assert sorted(w.name for w in state.workers if w.state == pb.READY) == ["aw-0", "ew-0", "ew-1", "kv-store"]

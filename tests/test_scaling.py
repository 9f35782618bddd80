"""Elastic scaling while serving, through POST /admin/scale, with real processes and HTTP.

During 16 greedy streams the expert workers go 3 -> 4 -> 2 (new ones load their experts before the
routing table names them; removed ones drain), then the attention workers 2 -> 3 -> 1 (a new one takes
new requests; removed ones hand theirs over with their KV, restored by the one that is left). Every
stream is token-identical to the colocated engine, none is lost, and /admin/cluster shows the new
counts of ready workers after each step.
"""

from __future__ import annotations

import json
import os
import random
import signal
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


class Streams:
    """Greedy streaming clients, one thread each: tokens each has received so far (`progress`), what
    each got in the end (`results`), and whatever went wrong (`errors`: a 429 fails stream_completion's
    status check)."""

    def __init__(self, prompts: list[list[int]], lengths: list[int], timeout_s: float) -> None:
        self.prompts, self.lengths, self.timeout_s = prompts, lengths, timeout_s
        self.results = [StreamResult() for _ in prompts]
        self.progress = [0] * len(prompts)
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def _stream(self, url: str, i: int) -> None:
        def on_chunk(result: StreamResult) -> None:
            self.progress[i] = len(result.token_ids)

        try:
            self.results[i] = stream_completion(url, self.prompts[i], self.lengths[i], timeout_s=self.timeout_s,
                                                on_chunk=on_chunk, ignore_eos=True)
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def launch(self, url: str, indices) -> None:
        for i in indices:
            thread = threading.Thread(target=self._stream, args=(url, i), daemon=True)
            thread.start()
            self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(self.timeout_s)


def test_scaling_expert_and_attention_workers_while_16_streams_run(tiny_model, reference, fork_server, tmp_path):
    prompts = prompts_for_scaling()
    streams = Streams(prompts, [MAX_TOKENS] * len(prompts), 120.0)
    progress, errors, results = streams.progress, streams.errors, streams.results

    def launch(indices) -> None:
        streams.launch(stack.url, indices)

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
        streams.join()
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


SEQS = 8  # engine.max_num_seqs: a small capacity per attention worker, so that 3 x SEQS streams are cheap
LONG = 2500  # tokens of the first streams: they must still run when the later ones are admitted (decode is fast)


def prompts_past_the_start_count():
    rng = random.Random(31)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(2, 24))] for _ in range(3 * SEQS)]


def test_attention_workers_scale_past_the_start_count_and_capacity_follows(tiny_model, fork_server, tmp_path):
    """`serve --attention-workers 2` (no cap): 16 greedy streams, then 2 -> 3 attention workers, and
    3 x max_num_seqs requests run at once without a 429 (one more gets one: the bound is real); the
    new aw-2 (a KV region the store made for it) is SIGKILLed and its requests are restored from that
    region by the others; then 3 -> 1. Every stream is token-identical to a failure-free run."""
    prompts = prompts_past_the_start_count()
    lengths = [LONG] * (2 * SEQS) + [MAX_TOKENS] * SEQS
    reference = [r.token_ids for r in LLMEngine(tiny_model, EngineConfig()).generate(
        prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths])]
    streams = Streams(prompts, lengths, 180.0)
    progress, errors, results = streams.progress, streams.errors, streams.results

    def launch(indices) -> None:
        streams.launch(stack.url, indices)

    def one_more() -> httpx.Response:
        return httpx.post(f"{stack.url}/v1/completions", json={"prompt": [1, 5, 7], "max_tokens": 1}, timeout=30)

    def scale(attention: int) -> None:
        answer = httpx.post(f"{stack.url}/admin/scale", json={"attention_workers": attention}, headers=admin_headers(),
                            timeout=10)
        assert answer.status_code == 200, answer.text

    def settled(attention: int):
        return lambda: not stack.cluster.state().orders and ready_counts(stack.url) == {"attention": attention, "expert": 2}

    def capacity() -> tuple[int, int]:
        """(the frontend's bound, the API admission's): one computation, read by both."""
        return stack.frontend.capacity(), stack.app.state.server.admission.max_running

    with serving_stack(tiny_model, fork_server, tmp_path, attention_workers=2, expert_workers=2, max_model_len=LONG + 64,
                       engine_options={"max_num_seqs": SEQS}, max_waiting=0) as stack:
        assert capacity() == (2 * SEQS, 2 * SEQS)
        launch(range(2 * SEQS))
        wait_until(lambda: min(progress[:2 * SEQS]) >= 3, 60, "the first 16 streams to be generating")
        refused = one_more()
        assert refused.status_code == 429 and f"running (of {2 * SEQS}" in refused.text, refused.text

        scale(3)  # above the start count, with no max_attention_workers
        wait_until(settled(3), 60, "3 attention workers")
        wait_until(lambda: capacity() == (3 * SEQS, 3 * SEQS), 10, "capacity to follow the new worker")
        launch(range(2 * SEQS, 3 * SEQS))
        wait_until(lambda: min(progress[2 * SEQS:]) >= 3 or errors, 60, "the later streams to be generating")
        assert not errors, errors  # none of the 3 x max_num_seqs got a 429
        assert sum(not r.done for r in results) == 3 * SEQS, "all 24 ran at once"
        refused = one_more()
        assert refused.status_code == 429 and f"running (of {3 * SEQS}" in refused.text, refused.text

        # aw-2 exists only since the scale-up; its requests restore from its region of the KV store.
        handles = stack.frontend._handles()
        wait_until(lambda: all(len(h.tokens) >= 20 for h in handles if h.worker == "aw-2" and not h.done)
                   and worker_load(stack.cluster, "aw-2", "ckpt_commits") >= 1, 60, "aw-2 to checkpoint its requests")
        victims = [h for h in handles if h.worker == "aw-2" and not h.done]
        assert victims, "the new attention worker took some of the later requests"
        os.kill(stack.cluster.pids["aw-2"], signal.SIGKILL)

        def restored(key: str) -> float:
            return sum(worker_load(stack.cluster, aw, key) for aw in ("aw-0", "aw-1"))

        wait_until(lambda: restored("ckpt_restored") + restored("requests_recomputed") >= len(victims), 60,
                   "aw-2's requests to move")
        assert restored("ckpt_restored_local") == len(victims), "read from aw-2's region of the store, mapped"
        assert restored("ckpt_restored_replica") == 0 and restored("requests_recomputed") == 0
        wait_until(settled(3), 60, "a replacement aw-2")

        scale(1)
        wait_until(settled(1), 90, "1 attention worker, the others drained")
        wait_until(lambda: capacity() == (SEQS, SEQS), 10, "capacity to follow the scale-down")
        streams.join()
        assert not errors, errors
        assert [r.token_ids for r in results] == reference
        assert all(r.done and r.finish_reason == "length" for r in results)


def test_an_expert_worker_scaled_away_leaves_the_live_views_and_stays_in_the_events(tiny_model, fork_server,
                                                                                     tmp_path):
    """3 -> 2 expert workers on an idle cluster: once ew-2 has left, /admin/cluster no longer lists it
    (its draining and its exit stay in the events), `status` counts every worker that should run as
    ready (N/N), and /metrics has no worker_up or worker_state series for it."""
    from rich.console import Console

    from resilient_moe.server.status import fetch, render

    with serving_stack(tiny_model, fork_server, tmp_path, attention_workers=1, expert_workers=3) as stack:
        answer = httpx.post(f"{stack.url}/admin/scale", json={"expert_workers": 2}, headers=admin_headers(), timeout=10)
        assert answer.status_code == 200, answer.text

        def cluster() -> dict:
            return httpx.get(f"{stack.url}/admin/cluster", headers=admin_headers(), timeout=10).json()

        wait_until(lambda: "ew-2" not in {w["id"] for w in cluster()["workers"]} and not stack.cluster.state().orders,
                   60, "ew-2 to drain, leave and retire")
        doc = cluster()
        assert {(w["role"], w["state"]) for w in doc["workers"] if w["role"] in ("attention", "expert")} == {
            ("attention", "ready"), ("expert", "ready")}
        assert sorted(w["id"] for w in doc["workers"] if w["role"] == "expert") == ["ew-0", "ew-1"]
        assert {"draining", "stopped"} <= {e["kind"] for e in doc["events"] if e["worker"] == "ew-2"}
        assert "ew-2" in {w.name for w in stack.cluster.state().workers}, "the controller still keeps its record"
        console = Console(width=200, record=True)
        console.print(render(fetch(stack.url, ADMIN_TOKEN)))
        out = console.export_text()
        shown = len(doc["workers"])
        assert f"{shown}/{shown} ready" in out, out
        assert " ew-2 " not in out.split("Recent events")[0], out
        metrics = httpx.get(f"{stack.url}/metrics", timeout=10).text
        assert 'worker="ew-1"' in metrics
        assert not [line for line in metrics.splitlines() if line.startswith("resilient_moe_worker_")
                    and 'worker="ew-2"' in line], "no up, state or heartbeat series for a retired worker"

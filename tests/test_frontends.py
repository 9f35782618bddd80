"""No single frontend is fatal: several frontend processes serve one port, a keyed request outlives the
frontend it started on, and every position of a stream reaches the client once, in order.

Each test runs a real `serve` stack (2 frontend processes over SO_REUSEPORT, real HTTP) and compares what
clients received with the colocated engine's tokens for the same requests.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time

import httpx
import pytest

from conftest import pid_alive, wait_until
from resilient_moe.client import ResumingClient
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.proto import controller_pb2 as pb
from serving import admin_headers, serving_stack

STREAMS = 16
MAX_TOKENS = 120


def prompts(n: int = STREAMS, seed: int = 71) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(3, 20))] for _ in range(n)]


SAMPLING = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 0.8, "top_p": 0.95, "seed": 1234}}


def references(model, sampling: str) -> list[list[int]]:
    engine = LLMEngine(model, EngineConfig(max_model_len=512))
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **SAMPLING[sampling])
    return [r.token_ids for r in engine.generate(prompts(), params)]


@pytest.fixture(scope="module")
def reference(tiny_model):
    return references(tiny_model, "greedy")


def body(prompt: list[int], stream: bool = True, sampling: str = "greedy") -> dict:
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": stream, "return_token_ids": True,
            **SAMPLING[sampling]}


def ready_frontend(stack, name: str, not_pid: int = 0):
    try:
        state = stack.cluster.state()
    except Exception:  # noqa: BLE001 (a controller being replaced)
        return None
    w = next((w for w in state.workers if w.name == name), None)
    return w if w is not None and w.state == pb.READY and w.pid != not_pid else None


def aw_total(stack, key: str) -> float:
    return sum(w.load.get(key, 0.0) for w in stack.cluster.state().workers if w.role == pb.ATTENTION)


class Streams:
    """STREAMS keyed streams through the resuming client, each on a thread; what each received."""

    def __init__(self, url: str, prompts: list[list[int]], sampling: str = "greedy") -> None:
        self.sampling = sampling
        self.client = ResumingClient(url, backoff_s=0.02, max_backoff_s=0.5)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._one, args=(i, p), daemon=True) for i, p in enumerate(prompts)]

    def _one(self, i: int, prompt: list[int]) -> None:
        try:
            for chunk in self.client.stream("/v1/completions", body(prompt, sampling=self.sampling),
                                            key=f"stream-{i}-{os.getpid()}"):
                self.tokens[i].extend(chunk["choices"][0].get("token_ids") or [])
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            self.errors.append(e)

    def start(self) -> "Streams":
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout_s: float) -> None:
        for t in self.threads:
            t.join(timeout_s)
        self.client.close()


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_a_killed_frontend_loses_no_stream_and_repeats_no_token(tiny_model, fork_server, tmp_path, sampling):
    reference = references(tiny_model, sampling)
    with serving_stack(tiny_model, fork_server, tmp_path, frontends=2, max_model_len=512) as stack:
        streams = Streams(stack.url, prompts(), sampling).start()
        wait_until(lambda: all(len(t) >= 3 for t in streams.tokens) or streams.errors, 120,
                   "every stream to be under way")
        victim = stack.cluster.pids["fe-0"]
        os.kill(victim, signal.SIGKILL)
        streams.join(240)
        assert not streams.errors, streams.errors[:3]
        # Every position once, in order, with the tokens of a failure-free run.
        assert streams.tokens == reference
        assert streams.client.retries > 0, "no stream was on the killed frontend"
        replacement = wait_until(lambda: ready_frontend(stack, "fe-0", victim), 60, "a replacement frontend")
        assert replacement.pid == stack.cluster.pids["fe-0"] != victim and pid_alive(replacement.pid)
        assert aw_total(stack, "requests_started") == STREAMS, "a resumed stream started a second generation"
        # They went on decoding while their frontend was gone, and were picked up where they ran.
        assert aw_total(stack, "requests_attached") >= 1 and aw_total(stack, "requests_recomputed") == 0


def test_keyed_non_streaming_requests_are_answered_once_across_a_frontend_kill(tiny_model, fork_server, tmp_path,
                                                                               reference):
    with serving_stack(tiny_model, fork_server, tmp_path, frontends=2, max_model_len=512) as stack:
        client = ResumingClient(stack.url, backoff_s=0.02, max_backoff_s=0.5)
        answers: list = [None] * STREAMS
        errors: list = []

        def one(i: int, prompt: list[int]) -> None:
            try:
                answers[i] = client.post("/v1/completions", body(prompt, stream=False), key=f"once-{i}")
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i, p), daemon=True) for i, p in enumerate(prompts())]
        for t in threads:
            t.start()
        wait_until(lambda: aw_total(stack, "requests_started") >= STREAMS, 60, "every request to start")
        os.kill(stack.cluster.pids["fe-1"], signal.SIGKILL)
        for t in threads:
            t.join(240)
        client.close()
        assert not errors, errors[:3]
        assert [a["choices"][0]["token_ids"] for a in answers] == reference
        assert aw_total(stack, "requests_started") == STREAMS, "a request was generated twice"
        # The same key again: the stored answer, computed by nobody.
        again = httpx.post(f"{stack.url}/v1/completions", json=body(prompts()[0], stream=False),
                           headers={"Idempotency-Key": "once-0"}, timeout=30).json()
        assert again == answers[0] and aw_total(stack, "requests_started") == STREAMS


def test_the_openai_client_with_a_key_survives_a_frontend_kill(tiny_model, fork_server, tmp_path, reference):
    from openai import OpenAI

    with serving_stack(tiny_model, fork_server, tmp_path, frontends=2, max_model_len=512) as stack:
        client = OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=6)
        texts: list = [None] * 8
        errors: list = []

        def one(i: int) -> None:
            try:
                texts[i] = client.completions.create(
                    model=stack.model_name, prompt=prompts()[i], max_tokens=MAX_TOKENS, temperature=0.0,
                    extra_body={"ignore_eos": True, "return_token_ids": True},
                    extra_headers={"Idempotency-Key": f"openai-{i}"}).model_dump()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        wait_until(lambda: aw_total(stack, "requests_started") >= 8, 60, "every request to start")
        os.kill(stack.cluster.pids["fe-0"], signal.SIGKILL)
        for t in threads:
            t.join(240)
        assert not errors, errors[:3]
        assert [t["choices"][0]["token_ids"] for t in texts] == reference[:8]
        assert aw_total(stack, "requests_started") == 8


def test_keys_and_event_ids_that_name_nothing_or_something_else_get_clear_errors(tiny_model, fork_server, tmp_path):
    with serving_stack(tiny_model, fork_server, tmp_path, frontends=2, max_model_len=512,
                       idempotency_ttl_s=2.0) as stack:
        url = f"{stack.url}/v1/completions"
        short = {"prompt": [1, 5, 9], "max_tokens": 4, "ignore_eos": True}
        first = httpx.post(url, json=short, headers={"Idempotency-Key": "k-a"}, timeout=30)
        other = httpx.post(url, json={**short, "prompt": [1, 7]}, headers={"Idempotency-Key": "k-b"}, timeout=30)
        assert first.status_code == other.status_code == 200
        cases = [
            ({**short, "max_tokens": 5}, {"Idempotency-Key": "k-a"}, 409, "another request body"),
            (short, {"Idempotency-Key": "never-sent", "Last-Event-ID": "cmpl-x:3"}, 404, "no request under"),
            (short, {"Idempotency-Key": "k-a", "Last-Event-ID": f"{other.json()['id']}:1"}, 400, "names request"),
            (short, {"Last-Event-ID": f"{first.json()['id']}:1"}, 400, "only together with the Idempotency-Key"),
            (short, {"Idempotency-Key": "k-a", "Last-Event-ID": "not an id"}, 400, "Last-Event-ID"),
            (short, {"Idempotency-Key": "x" * 300}, 400, "Idempotency-Key must be"),
            (short, {"Idempotency-Key": "bad key!"}, 400, "Idempotency-Key must be"),
        ]
        for payload, headers, status, words in cases:
            answer = httpx.post(url, json=payload, headers=headers, timeout=30)
            assert answer.status_code == status and words in answer.json()["error"]["message"], (headers, answer.text)
        time.sleep(3)  # past idempotency_ttl_s: the key is forgotten
        gone = httpx.post(url, json=short, headers={"Idempotency-Key": "k-a", "Last-Event-ID": f"{first.json()['id']}:1"},
                          timeout=30)
        assert gone.status_code == 404, gone.text


def test_slow_header_connections_cannot_pin_a_frontend(tiny_model, fork_server, tmp_path):
    """1000 connections that send a header line every 2 s for 30 s: each frontend closes them past its
    head deadline, its descriptors stay bounded, and real requests are answered meanwhile."""
    with serving_stack(tiny_model, fork_server, tmp_path, frontends=2, max_model_len=512,
                       header_timeout_s=3.0, max_connections=256) as stack:
        frontends = [stack.cluster.pids["fe-0"], stack.cluster.pids["fe-1"]]
        fds_before = [len(os.listdir(f"/proc/{p}/fd")) for p in frontends]
        slow: list[socket.socket] = []
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", stack.port), timeout=5)
            s.setblocking(False)
            slow.append(s)
        latencies = []
        most_fds = 0
        try:
            deadline = time.monotonic() + 30
            sent = 0
            while time.monotonic() < deadline:
                for s in slow:
                    try:
                        s.send(b"GET / HTTP/1.1\r\n" if sent == 0 else f"X-Slow-{sent}: 1\r\n".encode())
                    except OSError:
                        pass  # closed by the frontend: what the limit is for
                sent += 1
                began = time.monotonic()
                answer = httpx.post(f"{stack.url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4},
                                    timeout=30)
                latencies.append(time.monotonic() - began)
                assert answer.status_code == 200, answer.text
                most_fds = max(most_fds, *(len(os.listdir(f"/proc/{p}/fd")) for p in frontends))
                time.sleep(max(0.0, 2.0 - (time.monotonic() - began)))
        finally:
            for s in slow:
                s.close()
        assert most_fds < max(fds_before) + 256 + 64, (most_fds, fds_before)
        assert max(latencies) < 10, latencies  # a hang bound: real requests are served through it all


def test_metrics_and_admin_views_cover_every_frontend(tiny_model, fork_server, tmp_path):
    """A scrape reaches one frontend at random (one shared port): each answers for all of them."""
    with serving_stack(tiny_model, fork_server, tmp_path, frontends=2, max_model_len=512) as stack:
        for i in range(12):  # new connections: the kernel spreads them over both frontends
            answer = httpx.post(f"{stack.url}/v1/completions", json={"prompt": [1, 2 + i], "max_tokens": 5,
                                                                     "ignore_eos": True}, timeout=30)
            assert answer.status_code == 200

        def generated() -> set[float]:
            seen = set()
            for _ in range(8):
                text = httpx.get(f"{stack.url}/metrics", timeout=10).text
                line = next(l for l in text.splitlines() if l.startswith("resilient_moe_generation_tokens_total "))
                seen.add(float(line.split()[1]))
            return seen

        wait_until(lambda: generated() == {60.0}, 30, "every frontend's scrape to count all 60 tokens")
        for _ in range(4):  # the alerts' series: responses summed like the tokens; the lease seen from each
            text = httpx.get(f"{stack.url}/metrics", timeout=10).text
            assert 'resilient_moe_http_responses_total{code="200",handler="/v1/completions"} 12.0' in text
            assert "resilient_moe_supervisor_up 1.0" in text and "resilient_moe_redis_up 1.0" in text
        workers = httpx.get(f"{stack.url}/admin/cluster", headers=admin_headers(), timeout=10).json()["workers"]
        frontends = {w["id"]: w for w in workers if w["role"] == "frontend"}
        assert set(frontends) == {"fe-0", "fe-1"} and all(w["pid"] == stack.cluster.pids[n] for n, w in frontends.items())

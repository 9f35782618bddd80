"""`resilient-moe serve` in a subprocess (so its memory is measured alone), attacked and used over HTTP:
API keys guard /v1 only; a 64 MB chunked upload is refused while the server stays small and /health
keeps answering; a non-streaming request whose client leaves is aborted; `resilient-moe status` shows
every worker."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

from conftest import pid_alive, wait_until

ADMIN = "admin-secret"
KEY_FLAG, ENV_KEYS = "key-one", ("key-two", "key-three")
MEMORY_LIMIT = 1 << 30


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    port: int
    output: list[str]

    def cluster(self) -> dict:
        return httpx.get(f"{self.url}/admin/cluster", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        match = re.search(rf"^{name}(?:\{{{want}\}})? (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        try:
            children = {int(c) for t in os.listdir(f"/proc/{current}/task")
                        for c in open(f"/proc/{current}/task/{t}/children").read().split()}
        except OSError:
            continue
        todo.extend(children - found)
        found |= children
    return found


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-http")
    config = tmp / "deployment.yaml"  # generous heartbeats: CI machines are shared
    config.write_text("attention_workers: 1\nexpert_workers: 2\n")
    env = {**os.environ, "RESILIENT_MOE_ADMIN_TOKEN": ADMIN, "RESILIENT_MOE_API_KEYS": " , ".join(ENV_KEYS)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "resilient_moe.cli", "serve", "--model", str(tiny_model), "--port", "0", "--config",
         str(config), "--max-model-len", "4096", "--api-key", KEY_FLAG, "--log-dir", str(tmp)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    children: set[int] = set()
    try:
        wait_until(lambda: any(line.startswith("press Ctrl-C") for line in lines) or proc.poll() is not None, 180,
                   "serve to print its banner")
        text = "".join(lines)
        assert proc.poll() is None, text
        url = re.search(r"OpenAI API\s+(http://127\.0\.0\.1:(\d+))/v1", text)
        children = descendants(proc.pid)
        yield Served(proc, url.group(1), int(url.group(2)), lines)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    wait_until(lambda: not any(pid_alive(p) for p in children), 15, "every process of serve to exit")


def test_serve_reports_each_worker_ready(served):
    text = "".join(served.output)
    for name in ("aw-0", "ew-0", "ew-1"):
        assert re.search(rf"^\s+[\d.]+s\s+{name}\s+ready", text, re.M), text
    assert "API keys      3" in text


def test_api_keys_guard_v1_only(served):
    url = served.url
    missing = httpx.get(f"{url}/v1/models", timeout=10)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer key-four"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    for key in (KEY_FLAG, *ENV_KEYS):
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
    refused = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}, timeout=10)
    assert refused.status_code == 401
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=ENV_KEYS[1], max_retries=0, timeout=60)
    out = client.completions.create(model=client.models.list().data[0].id, prompt=[1, 2, 3], max_tokens=3,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
    assert httpx.get(f"{url}/admin/cluster", headers={"Authorization": f"Bearer {KEY_FLAG}"}).status_code == 403
    assert httpx.get(f"{url}/admin/cluster", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


def upload_chunked(port: int, total_bytes: int, chunk_bytes: int = 1 << 20) -> bytes:
    """POST a chunked body of `total_bytes` (never valid JSON), reading the answer as soon as one comes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_FLAG}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n%s\r\n" % (chunk_bytes, b"7" * chunk_bytes)
        answer = b""
        try:
            for _ in range(total_bytes // chunk_bytes):
                sock.sendall(chunk)
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered before the end of the body
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
    return answer


def test_huge_uploads_are_refused_and_the_control_plane_keeps_going(served):
    """A 64 MB chunked body (no Content-Length) and three 4 MB text prompts at once: all refused; the
    serve process stays under 1 GB, /health answers throughout, and no worker is declared dead."""
    pid = served.proc.pid
    health: list[int] = []
    peak = [rss_bytes(pid)]
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client(timeout=5) as http:
            while not stop.is_set():
                try:
                    health.append(http.get(f"{served.url}/health").status_code)
                except httpx.HTTPError:
                    health.append(0)
                peak[0] = max(peak[0], rss_bytes(pid))
                stop.wait(0.1)

    def big_prompt(out: list) -> None:
        body = json.dumps({"prompt": "experts " * ((1 << 19) - 64), "max_tokens": 2})  # just under 4 MB of text
        response = httpx.post(f"{served.url}/v1/completions", content=body, timeout=60,
                              headers={"Authorization": f"Bearer {KEY_FLAG}", "Content-Type": "application/json"})
        out.append((response.status_code, response.json()["error"]))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        answer = upload_chunked(served.port, 64 << 20)
        refused: list = []
        prompts = [threading.Thread(target=big_prompt, args=(refused,)) for _ in range(3)]
        for t in prompts:
            t.start()
        for t in prompts:
            t.join(60)
        time.sleep(0.5)
    finally:
        stop.set()
        watcher.join(10)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"request body exceeds" in answer
    assert [status for status, _ in refused] == [400] * 3, refused
    assert all(e["code"] == "context_length_exceeded" and e["param"] == "prompt" for _, e in refused)
    assert len(health) >= 3 and set(health) == {200}, health
    assert peak[0] < MEMORY_LIMIT, f"serve grew to {peak[0] >> 20} MB"
    assert not [e for e in served.cluster()["events"] if e["kind"] in ("dead", "suspect")]


def test_non_streaming_request_is_aborted_when_its_client_leaves(served):
    def frontend_unfinished() -> float:
        return sum(w["load"].get("unfinished", 0) for w in served.cluster()["workers"] if w["role"] == "frontend")

    aborted = served.metric("resilient_moe_request_success_total", finished_reason="abort")
    completed = served.metric("resilient_moe_request_success_total", finished_reason="length")
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 4000, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_FLAG}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: frontend_unfinished() == 1, 30, "the request to run")
        time.sleep(0.5)  # well into its 4000 tokens
    wait_until(lambda: frontend_unfinished() == 0, 15, "the request to be aborted after its client left")
    wait_until(lambda: served.metric("resilient_moe_request_success_total", finished_reason="abort") == aborted + 1,
               10, "the abort to be counted")
    assert served.metric("resilient_moe_request_success_total", finished_reason="length") == completed
    wait_until(lambda: all(w["load"].get("running", 0) == 0 for w in served.cluster()["workers"]
                           if w["role"] == "attention"), 10, "the attention worker to drop the request")


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resilient_moe.cli", "status", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "220", "RESILIENT_MOE_ADMIN_TOKEN": ""})


def test_status_command_shows_every_worker(served):
    result = status("--url", served.url, "--token", ADMIN)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    cluster = served.cluster()
    assert f"routing epoch {cluster['ert']['epoch']}" in out
    for w in cluster["workers"]:
        row = next((line for line in out.splitlines() if f" {w['id']} " in line), None)
        assert row is not None, (w["id"], out)
        assert w["role"] in row and w["state"] in row and str(w["pid"]) in row, row
    assert "Recent events" in out and "Recovery" in out
    refused = status("--url", served.url, "--token", "wrong")
    assert refused.returncode == 1 and "refused the admin token (HTTP 403)" in refused.stderr
    missing = status("--url", served.url)
    assert missing.returncode == 2 and "--token" in missing.stderr and "Traceback" not in missing.stderr

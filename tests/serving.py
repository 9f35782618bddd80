"""Helpers for tests that talk HTTP to a real serving stack (cluster processes + frontend + uvicorn).

`serving_stack` starts one in-process on a free port and stops it even when the test fails, then
checks that no worker survived; `serve_command` does the same for `resilient-moe serve` in a subprocess. `stream_completion` reads one SSE completion; `streams_through`
runs an action (a scale step, a rebalance) while several completions stream and returns what each
client received; `streams_through_kill` SIGKILLs a worker that way, so a failover test (an expert
worker here, an attention worker later) is a few lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from conftest import pid_alive, wait_until
from resilient_moe.deployment import DeploymentConfig
from resilient_moe.engine.config import EngineConfig
from resilient_moe.supervisor import ServingStack

ADMIN_TOKEN = "test-admin-token"


@contextmanager
def serving_stack(model_dir, fork_server, log_dir, attention_workers: int = 2, expert_workers: int = 2,
                  max_model_len: int = 128, deployment_options: dict | None = None,
                  engine_options: dict | None = None, frontends: int = 0, **stack_options):
    """A started ServingStack on 127.0.0.1:<free port>; every process it started is gone afterwards.
    Detection runs on its defaults: a starved machine must not make healthy workers look dead (the
    second path of detection, procs.py, sees they still run). `deployment_options`: more
    DeploymentConfig settings; `engine_options`: more EngineConfig settings. `frontends`: 0 (the default
    here) serves the API in this process, where a test can look inside it; N: N frontend processes, as
    `serve` runs by default."""
    dep = DeploymentConfig(model=str(model_dir), attention_workers=attention_workers, expert_workers=expert_workers,
                           engine=EngineConfig(max_model_len=max_model_len, **(engine_options or {})),
                           frontends=frontends, **(deployment_options or {}))
    stack = ServingStack(dep, port=0, admin_token=ADMIN_TOKEN, fork_server=fork_server, log_dir=log_dir, **stack_options)
    pids: list[int] = []
    try:
        stack.start()
        pids = list(stack.cluster.pids.values())
        yield stack
    finally:
        if stack.cluster is not None:
            pids = sorted(set(pids) | set(stack.cluster.pids.values()) | set(stack.cluster.retired))
        stack.stop()
    wait_until(lambda: not any(pid_alive(p) for p in pids), 15, "every worker to exit after stop")


@dataclass
class ServeProcess:
    """`resilient-moe serve` running in a subprocess: its banner's API URL and what it printed so far."""

    proc: subprocess.Popen
    url: str
    output: list[str]
    children: set[int]


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, alive now."""
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


@contextmanager
def serve_command(args: list[str], env: dict[str, str] | None = None, start_timeout_s: float = 180):
    """`resilient-moe serve ARGS` (give --port 0) until its banner; afterwards SIGINT, and every process it
    started is gone."""
    proc = subprocess.Popen([sys.executable, "-m", "resilient_moe.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    children: set[int] = set()
    try:
        wait_until(lambda: any(line.startswith("press Ctrl-C") for line in lines) or proc.poll() is not None,
                   start_timeout_s, "serve to print its banner")
        text = "".join(lines)
        assert proc.poll() is None, text
        children = descendants(proc.pid)
        yield ServeProcess(proc, re.search(r"OpenAI API\s+(http://127\.0\.0\.1:\d+)/v1", text).group(1), lines, children)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    wait_until(lambda: not any(pid_alive(p) for p in children), 15, "every process of serve to exit")


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class StreamResult:
    """What one streaming client saw."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    error: dict | None = None
    done: bool = False  # saw `data: [DONE]`
    chunks: list[dict] = field(default_factory=list)


def read_sse(response: httpx.Response, result: StreamResult, on_chunk=None) -> StreamResult:
    """Parse an OpenAI SSE stream into `result` (token ids need "return_token_ids": true)."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            result.done = True
            break
        chunk = json.loads(payload)
        result.chunks.append(chunk)
        if "error" in chunk:
            result.error = chunk["error"]
            continue
        if chunk.get("usage"):
            result.usage = chunk["usage"]
        for choice in chunk["choices"]:
            result.token_ids += choice.get("token_ids", [])
            result.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            result.finish_reason = choice.get("finish_reason") or result.finish_reason
        if on_chunk is not None:
            on_chunk(result)
    return result


def stream_completion(base_url: str, prompt, max_tokens: int, timeout_s: float = 60.0, on_chunk=None,
                      **extra) -> StreamResult:
    """One streaming /v1/completions call (greedy unless `extra` says otherwise)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "return_token_ids": True, **extra}
    result = StreamResult()
    with httpx.Client(timeout=timeout_s) as client:
        with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
            assert response.status_code == 200, response.read()
            read_sse(response, result, on_chunk)
    return result


def streams_through_kill(stack: ServingStack, victim: str, prompts: list[list[int]], max_tokens: int,
                         kill_after_tokens: int = 3, timeout_s: float = 60.0, **extra) -> list[StreamResult]:
    """Stream one completion per prompt; SIGKILL worker `victim` once every stream has received at
    least `kill_after_tokens` tokens; return what each client got (ignore_eos, so lengths are known)."""
    return streams_through(stack, lambda: os.kill(stack.cluster.pids[victim], signal.SIGKILL), prompts, max_tokens,
                           kill_after_tokens, timeout_s, **extra)


def streams_through(stack: ServingStack, action, prompts: list[list[int]], max_tokens: int,
                    after_tokens: int = 3, timeout_s: float = 60.0, **extra) -> list[StreamResult]:
    """Stream one completion per prompt; call `action()` once every stream has received at least
    `after_tokens` tokens (and none has finished); return what each client got (ignore_eos, so
    lengths are known)."""
    results = [StreamResult() for _ in prompts]
    started = [threading.Event() for _ in prompts]
    errors: list[BaseException] = []

    def client(i: int) -> None:
        def on_chunk(result: StreamResult) -> None:
            if len(result.token_ids) >= after_tokens:
                started[i].set()

        try:
            body = {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                    "return_token_ids": True, "ignore_eos": True, **extra}
            with httpx.Client(timeout=timeout_s) as http:
                with http.stream("POST", f"{stack.url}/v1/completions", json=body) as response:
                    assert response.status_code == 200, response.read()
                    read_sse(response, results[i], on_chunk)
        except BaseException as e:  # reported by the caller
            errors.append(e)
        finally:
            started[i].set()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for event in started:
        assert event.wait(max(0.1, deadline - time.monotonic())), "streams did not start"
    assert not errors, errors
    assert all(not r.done for r in results), "a stream finished before the action: raise max_tokens"
    action()
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a stream did not finish after the action"
    assert not errors, errors
    return results


def wait_for_restores(stack: ServingStack, worker: str, timeout_s: float = 10.0) -> None:
    """Wait until attention worker `worker` reports a request it adopted by restoring its KV from the store
    (the load map's `ckpt_restored`, read through /admin/cluster as an operator would)."""
    def restored():
        cluster = httpx.get(f"{stack.url}/admin/cluster", headers=admin_headers()).json()
        entry = next(w for w in cluster["workers"] if w["id"] == worker)
        return entry["load"].get("ckpt_restored", 0) >= 1

    wait_until(restored, timeout_s, f"{worker} to report requests restored from the KV store")

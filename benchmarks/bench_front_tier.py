"""The tier in front of the workers failing under load, as a served client sees it: a frontend or the
supervisor SIGKILLed while streams run (`bench_failover.py --fault frontend-kill|supervisor-kill`).

`resilient-moe serve` runs as a process of its own (the demo model, 2 attention + 3 expert workers, 2
frontends, a free port, a state directory of its own); this process is the client: `--streams` greedy
streams at once, each through `AsyncResumingClient` (an Idempotency-Key; after a broken connection it
resends with Last-Event-ID and resumes after the last event it read). Each round waits until every
stream has `--warm-tokens` tokens, then injects the fault:

  frontend-kill    SIGKILL fe-0 (its streams break; the kernel gives their reconnects to fe-1; the
                   supervisor starts a new fe-0)
  supervisor-kill  SIGKILL `serve`, then run the same command again after --restart-after-s (it adopts
                   the running cluster: no worker restarts)

and records, per stream, the largest gap between two tokens around the fault (what the client waited,
its reconnect included), whether it had to resume, and whether its tokens are those of the failure-free
first round. Rounds repeat --kills times, each once the cluster is whole again.

Then the failure-free throughput with 2 frontends against 1: two servers run side by side, rounds of
the same streams alternate between them (drift on a noisy machine hits both alike), output tokens/s.

    python benchmarks/bench_failover.py --fault frontend-kill [--kills 5]
    python benchmarks/bench_failover.py --fault supervisor-kill [--kills 3]
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resilient_moe.client import AsyncResumingClient  # noqa: E402

TOKEN = secrets.token_urlsafe(16)
MODEL: dict[str, str] = {}  # url -> the model it serves
_URL = re.compile(r"OpenAI API\s+(http://\S+)/v1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`resilient-moe serve` as a child process; `restart` runs the same command again (adoption)."""

    def __init__(self, frontends: int, state_dir: str, log_dir: str) -> None:
        self.port = free_port()
        self.command = [sys.executable, "-m", "resilient_moe.cli", "serve", "--port", str(self.port),
                        "--frontends", str(frontends), "--state-dir", state_dir, "--log-dir", log_dir,
                        "--admin-token", TOKEN]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.adopted = False
        self.start()

    def start(self, timeout_s: float = 300.0) -> None:
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL)
        found, lines = threading.Event(), []

        def read(proc=self.proc) -> None:
            for line in proc.stdout:
                lines.append(line)
                if "adopting the running cluster" in line:
                    self.adopted = True
                if _URL.search(line):
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout_s) or self.proc.poll() is not None:
            self.stop()
            raise SystemExit("serve did not start:\n" + "".join(lines[-30:]))

    def cluster(self) -> list[dict]:
        answer = httpx.get(f"{self.url}/admin/cluster", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        return answer.json()["workers"]

    def wait_whole(self, frontends: int, timeout_s: float = 120.0) -> None:
        """Until every role is ready and `frontends` frontends and a supervisor are listed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                workers = self.cluster()
                ready = [w for w in workers if w["state"] == "ready"]
                fronts = [w for w in ready if w["id"].startswith("fe-")]
                if len(fronts) == frontends and len(ready) == len([w for w in workers if w["state"] != "gone"]) \
                        and any(w["id"] == "supervisor" for w in ready):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise SystemExit(f"the cluster at {self.url} was not whole again within {timeout_s:g}s")

    def pid_of(self, name: str) -> int:
        return next(w["pid"] for w in self.cluster() if w["id"] == name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def prompts(n: int) -> list[list[int]]:
    import random

    rng = random.Random(5)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randint(4, 24))] for _ in range(n)]


def model_name(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


async def one_stream(url: str, prompt: list[int], max_tokens: int, arrivals: list[float], tokens: list[int]) -> int:
    """One greedy stream through the resuming client; returns how often it resumed."""
    async with AsyncResumingClient(url, timeout_s=300.0) as client:
        body = {"model": MODEL[url], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        async for chunk in client.stream("/v1/completions", body):
            now = time.monotonic()
            for choice in chunk.get("choices") or []:
                for token in choice.get("token_ids") or []:
                    tokens.append(int(token))
                    arrivals.append(now)
        return client.retries


def round_of(url: str, streams: list[list[int]], max_tokens: int, warm_tokens: int, inject=None) -> dict:
    """Run the streams at once; `inject` (called in a thread once every stream has warm_tokens) faults."""
    arrivals = [[] for _ in streams]
    tokens = [[] for _ in streams]
    fault_at: list[float] = []

    def injector() -> None:
        deadline = time.monotonic() + 300
        while min(len(t) for t in tokens) < warm_tokens and time.monotonic() < deadline:
            time.sleep(0.005)
        fault_at.append(time.monotonic())
        inject()

    async def main() -> list:
        return await asyncio.gather(*(one_stream(url, p, max_tokens, arrivals[i], tokens[i])
                                      for i, p in enumerate(streams)), return_exceptions=True)

    if url not in MODEL:
        MODEL[url] = model_name(url)
    thread = threading.Thread(target=injector, daemon=True) if inject else None
    started = time.monotonic()
    if thread:
        thread.start()
    outcomes = asyncio.run(main())
    finished = time.monotonic()
    if thread:
        thread.join(120)
    return {"arrivals": arrivals, "tokens": tokens, "fault_at": fault_at[0] if fault_at else None,
            "outcomes": outcomes, "seconds": finished - started}


def stall_around(arrivals: list[float], at: float, window_s: float = 10.0) -> float:
    """The largest gap between two tokens of a stream that ends after `at` and begins before at + window."""
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > at and a < at + window_s]
    return max(gaps, default=0.0)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def faults(fault: str, kills: int, n: int, max_tokens: int, warm_tokens: int, restart_after_s: float) -> dict:
    streams = prompts(n)
    with tempfile.TemporaryDirectory(prefix="rmoe-bench-front-") as tmp:
        serve = Serve(2, os.path.join(tmp, "state"), os.path.join(tmp, "logs"))
        try:
            serve.wait_whole(2)
            first = round_of(serve.url, streams, max_tokens, 0)
            failed = [o for o in first["outcomes"] if isinstance(o, BaseException)]
            if failed:
                raise SystemExit(f"the failure-free round failed: {failed[0]}")
            reference = first["tokens"]
            resumed, others, lost, identical, adoptions = [], [], 0, True, 0
            for _ in range(kills):
                if fault == "frontend-kill":
                    victim = serve.pid_of("fe-0")

                    def inject(victim=victim) -> None:
                        os.kill(victim, signal.SIGKILL)
                else:
                    def inject() -> None:
                        serve.proc.kill()
                        serve.proc.wait(30)
                        time.sleep(restart_after_s)
                        serve.adopted = False
                        serve.start()

                r = round_of(serve.url, streams, max_tokens, warm_tokens, inject)
                for arrivals, outcome in zip(r["arrivals"], r["outcomes"]):
                    if isinstance(outcome, BaseException):
                        lost += 1
                        print(f"lost: {outcome}")
                        continue
                    (resumed if outcome else others).append(stall_around(arrivals, r["fault_at"]))
                identical &= r["tokens"] == reference
                adoptions += serve.adopted
                serve.wait_whole(2)
        finally:
            serve.stop()
    return {"resumed": resumed, "others": others, "lost": lost, "identical": identical, "adoptions": adoptions}


def throughput(rounds: int, n: int, max_tokens: int) -> dict[int, list[float]]:
    streams = prompts(n)
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="rmoe-bench-front-") as tmp:
        servers = {}
        try:
            for count in (1, 2):
                servers[count] = Serve(count, os.path.join(tmp, f"state{count}"), os.path.join(tmp, f"logs{count}"))
                servers[count].wait_whole(count)
                round_of(servers[count].url, streams, 8, 0)  # warm: first requests pay one-time costs
            for _ in range(rounds):
                for count, serve in servers.items():
                    r = round_of(serve.url, streams, max_tokens, 0)
                    rates[count].append(sum(len(t) for t in r["tokens"]) / r["seconds"])
        finally:
            for serve in servers.values():
                serve.stop()
    return rates


def main(fault: str, kills: int, streams: int, max_tokens: int, warm_tokens: int, throughput_runs: int,
         restart_after_s: float = 1.0) -> int:
    result = faults(fault, kills, streams, max_tokens, warm_tokens, restart_after_s)
    ms = lambda v: f"{v * 1000:.0f}"  # noqa: E731
    print(f"{fault}: serve (demo model, 2 attention + 3 expert workers, 2 frontends), {streams} greedy streams x "
          f"{max_tokens} tokens through AsyncResumingClient, the fault after {warm_tokens} tokens each, {kills} times")
    print(f"{'streams':<28}{'count':>7}{'stall p50 ms':>14}{'stall p99 ms':>14}{'stall max ms':>14}")
    for label, values in (("resumed (their frontend died)" if fault == "frontend-kill" else "resumed", result["resumed"]),
                          ("not resumed", result["others"])):
        if values:
            print(f"{label:<28}{len(values):>7}{ms(percentile(values, 50)):>14}{ms(percentile(values, 99)):>14}"
                  f"{ms(max(values)):>14}")
        else:
            print(f"{label:<28}{0:>7}{'-':>14}{'-':>14}{'-':>14}")
    print(f"lost requests: {result['lost']} (target 0); every token identical to the failure-free round: "
          f"{result['identical']}" + (f"; adoptions: {result['adoptions']}/{kills}" if fault == "supervisor-kill" else ""))
    if throughput_runs > 0:
        rates = throughput(throughput_runs, streams, max_tokens)
        one, two = statistics.median(rates[1]), statistics.median(rates[2])
        print(f"failure-free output tokens/s, median of {throughput_runs} alternating rounds: 1 frontend {one:.1f}, "
              f"2 frontends {two:.1f}, 2/1 {two / one:.3f} (target >= 0.98)")
    return 0 if result["lost"] == 0 and result["identical"] else 1

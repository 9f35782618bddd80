"""The load generator: streaming completions over HTTP, recording when each token arrived. Each stream
is sent as a resilient client sends it (an Idempotency-Key, resumed with Last-Event-ID after a break),
so a fault of the tier in front of the workers (a frontend) loses nothing the server can keep.

Requests are token-id prompts with `return_token_ids` (the server's extension), so what the client
received can be compared token by token with a failure-free replay. Request i of a workload is the
same on every run (prompt, length, seed all derive from the workload seed and i).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import secrets
import time
from dataclasses import dataclass, field

from chaos.scenario import Workload

ERROR_BACKOFF_S = 0.5  # closed loop: pause after a failed request, as a real client would


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    ignore_eos: bool

    def body(self) -> dict:
        return {"prompt": list(self.prompt_ids), "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "ignore_eos": self.ignore_eos, "stream": True,
                "return_token_ids": True}


@dataclass
class RequestResult:
    """One request as the client saw it; times are unix seconds."""

    spec: RequestSpec
    start: float = 0.0
    end: float = 0.0  # last token, or the error
    tokens: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # one per token
    finish_reason: str | None = None
    error: str | None = None
    resumes: int = 0  # times its stream broke and was resumed (a frontend died under it)
    last_event_id: str | None = None  # the `id:` of the last event whose tokens were taken (Last-Event-ID)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"index": self.spec.index, "start": self.start, "end": self.end, "tokens": self.tokens,
                "arrivals": self.arrivals, "finish_reason": self.finish_reason, "error": self.error,
                "resumes": self.resumes,
                "prompt_tokens": len(self.spec.prompt_ids), "max_tokens": self.spec.max_tokens}


def request_spec(workload: Workload, index: int) -> RequestSpec:
    rng = random.Random(f"{workload.seed}/{index}")
    prompt_len = rng.randint(*workload.prompt_tokens)
    lo, hi = workload.token_ids
    return RequestSpec(
        index=index,
        prompt_ids=tuple(rng.randrange(lo, hi) for _ in range(prompt_len)),
        max_tokens=rng.randint(*workload.output_tokens),
        temperature=workload.temperature,
        top_p=workload.top_p,
        seed=rng.randrange(2**31),
        ignore_eos=workload.ignore_eos,
    )


RESUMES = 20  # a stream broken by a fault is resumed at most this often (Idempotency-Key + Last-Event-ID)


async def _one(client, url: str, spec: RequestSpec, timeout_s: float) -> RequestResult:
    result = RequestResult(spec, start=time.time())
    try:
        await asyncio.wait_for(_stream(client, url, spec, result), timeout_s)
    except asyncio.TimeoutError:
        result.error = f"no complete answer within {timeout_s:g}s ({len(result.tokens)} tokens received)"
    except (ValueError, KeyError, TypeError, IndexError) as e:
        result.error = f"malformed stream: {type(e).__name__}: {e}"
    result.end = result.arrivals[-1] if result.arrivals and result.error is None else time.time()
    return result


class _Broken(Exception):
    """The stream broke in a way a resume may mend (a lost connection, a frontend that died)."""


async def _stream(client, url: str, spec: RequestSpec, result: RequestResult) -> None:
    """One streaming request as a resilient client sends it: with an Idempotency-Key, resumed after a
    break from the last event it read (Last-Event-ID), so each token arrives once."""
    import httpx

    key = secrets.token_urlsafe(12)
    for attempt in range(RESUMES + 1):
        last = result.last_event_id
        headers = {"Idempotency-Key": key, **({"Last-Event-ID": last} if last else {})}
        try:
            await _attempt(client, url, spec, result, headers)
            return
        except (httpx.TransportError, _Broken) as e:
            if attempt == RESUMES:
                result.error = f"{type(e).__name__}: {e or 'connection failed'} (after {attempt} resumes)"
                return
            result.resumes += 1
            await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt))


async def _attempt(client, url: str, spec: RequestSpec, result: RequestResult, headers: dict) -> None:
    """One try; each event's tokens are taken together with its id, so a resume after a break (raised
    as _Broken or a transport error) starts right after the last token taken."""
    async with client.stream("POST", f"{url}/v1/completions", json=spec.body(), headers=headers) as response:
        if response.status_code in (502, 503, 504):
            await response.aread()
            raise _Broken(f"HTTP {response.status_code}")
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            try:
                text = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            result.error = f"HTTP {response.status_code}: {text[:300]}"
            return
        done = False
        event_id = None
        async for line in response.aiter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
                continue
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"]
                if isinstance(error, dict) and error.get("code") in ("unavailable", "timeout", "detached"):
                    raise _Broken(error.get("message", ""))
                result.error = f"stream error: {error.get('message') if isinstance(error, dict) else error}"
                return
            now = time.time()
            for choice in chunk.get("choices") or []:
                ids = choice.get("token_ids")
                if ids is None and choice.get("text"):
                    raise ValueError("the server sent no token_ids (it needs the return_token_ids extension)")
                for token in ids or []:
                    result.tokens.append(int(token))
                    result.arrivals.append(now)
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
            result.last_event_id = event_id or result.last_event_id
        if not done or result.finish_reason is None:
            raise _Broken(f"the stream ended early ({len(result.tokens)} tokens, no finish_reason or [DONE])")


def _client(concurrency: int):
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=10.0))


async def drive(url: str, workload: Workload, stop_at: float, on_done=None) -> list[RequestResult]:
    """Start requests until `stop_at` (unix time), closed or open loop, and wait for all to finish."""
    results: list[RequestResult] = []
    counter = itertools.count()

    async def run(index: int) -> RequestResult:
        result = await _one(client, url, request_spec(workload, index), workload.request_timeout_s)
        results.append(result)
        if on_done is not None:
            on_done(result)
        return result

    async with _client(workload.concurrency or 256) as client:
        if workload.concurrency is not None:
            async def loop() -> None:
                while time.time() < stop_at:
                    if (await run(next(counter))).error is not None:  # a client that got an error waits
                        await asyncio.sleep(ERROR_BACKOFF_S)

            await asyncio.gather(*(loop() for _ in range(workload.concurrency)))
        else:
            rng = random.Random(workload.seed * 31 + 1)
            tasks = set()
            next_start = time.time()
            while next_start < stop_at:
                await asyncio.sleep(max(0.0, next_start - time.time()))
                task = asyncio.ensure_future(run(next(counter)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_start += rng.expovariate(workload.rate)
            if tasks:
                await asyncio.gather(*tasks)
    return sorted(results, key=lambda r: r.spec.index)


async def replay(url: str, specs: list[RequestSpec], concurrency: int, timeout_s: float) -> list[RequestResult]:
    """Run the same requests again (the failure-free reference), `concurrency` at a time."""
    queue = list(specs)
    results: list[RequestResult] = []

    async with _client(concurrency) as client:
        async def loop() -> None:
            while queue:
                results.append(await _one(client, url, queue.pop(0), timeout_s))

        await asyncio.gather(*(loop() for _ in range(max(1, min(concurrency, len(specs))))))
    return sorted(results, key=lambda r: r.spec.index)


def peak_in_flight(results: list[RequestResult]) -> int:
    """Most requests that were in flight at once."""
    edges = sorted([(r.start, 1) for r in results] + [(r.end, -1) for r in results])
    peak = level = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return max(1, peak)


def replay_concurrency(workload: Workload, results: list[RequestResult]) -> int:
    """At least the run's own concurrency, and 16: tokens do not depend on the batch (batch-invariant
    kernels), so a wider replay only finishes sooner."""
    own = workload.concurrency if workload.concurrency is not None else peak_in_flight(results)
    return min(64, max(16, own))

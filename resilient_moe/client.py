"""A resuming client for resilient-moe's OpenAI-compatible API: a request survives a broken connection
or a frontend that died, and a stream shows every token exactly once.

Each request gets an `Idempotency-Key` (a random one unless given). On a connection error, a 502/503/
504, a 429, or a stream that ends without `[DONE]`, the client sends the same request again with the
same key, after a growing pause (`backoff_s` doubling up to `max_backoff_s`, at most `max_retries`
times): the server attaches it to the request already running or finished under that key, never a
second one. A stream is resumed with `Last-Event-ID` set to the `id:` of the last event read, so it
continues after that event; the chunks yielded are each the server's once.

    from resilient_moe.client import ResumingClient
    client = ResumingClient("http://127.0.0.1:8000", api_key="...")
    for chunk in client.stream("/v1/completions", {"model": "m", "prompt": "Hello", "max_tokens": 32}):
        print(chunk["choices"][0]["text"], end="")
    answer = client.post("/v1/chat/completions", {"model": "m", "messages": [...]})

`AsyncResumingClient` is the same over asyncio. The official `openai` client does the non-streaming half
by itself: give it a key (`extra_headers={"Idempotency-Key": key}`) and it retries connection errors
with the same headers; see README.md ("Streams that outlive their frontend") for curl.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

RETRY_STATUS = frozenset({429, 502, 503, 504})
RETRY_CODES = frozenset({"unavailable", "timeout", "detached", "overloaded"})  # error events worth a resend


class RequestError(RuntimeError):
    """The server refused the request (a 4xx other than 429), or it did not succeed in `max_retries`."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status, self.body = status, body


class _Retry(Exception):
    """One attempt failed in a way that a resend with the same key may fix."""


def _headers(api_key: str | None, key: str, last_event_id: str | None) -> dict[str, str]:
    headers = {"Idempotency-Key": key}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return headers


def _check(response: httpx.Response) -> None:
    """Raise _Retry for what a resend may fix, RequestError for a refusal."""
    if response.status_code in RETRY_STATUS:
        raise _Retry(f"HTTP {response.status_code}")
    if response.status_code != 200:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        message = body.get("error", {}).get("message") if isinstance(body, dict) else str(body)
        raise RequestError(f"HTTP {response.status_code}: {message}", response.status_code, body)


def _error_event(chunk: dict[str, Any]) -> None:
    """An error event in a stream: resend for what may pass, else raise RequestError."""
    error = chunk["error"]
    if error.get("code") in RETRY_CODES:
        raise _Retry(error.get("message", "an error event"))
    raise RequestError(error.get("message", "the request failed"), None, chunk)


class _Events:
    """Parses SSE lines into (event id, data) pairs."""

    def __init__(self) -> None:
        self.event_id: str | None = None
        self._pending: str | None = None

    def feed(self, line: str):
        if line.startswith("id:"):
            self._pending = line[3:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            event_id, self._pending = self._pending, None
            return event_id, data
        return None


class ResumingClient:
    """See the module docstring."""

    def __init__(self, base_url: str, api_key: str | None = None, max_retries: int = 10, backoff_s: float = 0.05,
                 max_backoff_s: float = 2.0, timeout_s: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_retries = max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.retries = 0  # resends so far, over all requests (what a test or a dashboard may look at)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ResumingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pause(self, attempt: int, error: Exception) -> None:
        if attempt >= self.max_retries:
            raise RequestError(f"gave up after {attempt} resends: {error}") from error
        self.retries += 1
        time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** attempt))

    def post(self, path: str, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        """A non-streaming request; its answer once, whatever broke on the way."""
        key = key or secrets.token_urlsafe(16)
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.post(path, json=body, headers=_headers(self.api_key, key, None))
                _check(response)
                return response.json()
            except (httpx.TransportError, _Retry) as e:
                self._pause(attempt, e)
        raise AssertionError("unreachable")

    def stream(self, path: str, body: dict[str, Any], key: str | None = None) -> Iterator[dict[str, Any]]:
        """A streaming request's chunks, each once and in order, resumed after any break."""
        key = key or secrets.token_urlsafe(16)
        body = {**body, "stream": True}
        last: str | None = None
        for attempt in range(self.max_retries + 1):
            try:
                with self._http.stream("POST", path, json=body, headers=_headers(self.api_key, key, last)) as response:
                    if response.status_code != 200:
                        response.read()
                    _check(response)
                    events = _Events()
                    for line in response.iter_lines():
                        parsed = events.feed(line)
                        if parsed is None:
                            continue
                        event_id, data = parsed
                        if data == "[DONE]":
                            return
                        chunk = json.loads(data)
                        if "error" in chunk and "choices" not in chunk:
                            _error_event(chunk)
                        if event_id is not None:
                            last = event_id
                        yield chunk
                raise _Retry("the stream ended without [DONE]")
            except (httpx.TransportError, _Retry) as e:
                self._pause(attempt, e)


class AsyncResumingClient:
    """`ResumingClient` over asyncio."""

    def __init__(self, base_url: str, api_key: str | None = None, max_retries: int = 10, backoff_s: float = 0.05,
                 max_backoff_s: float = 2.0, timeout_s: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_retries = max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.retries = 0
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncResumingClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _pause(self, attempt: int, error: Exception) -> None:
        if attempt >= self.max_retries:
            raise RequestError(f"gave up after {attempt} resends: {error}") from error
        self.retries += 1
        await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** attempt))

    async def post(self, path: str, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        key = key or secrets.token_urlsafe(16)
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._http.post(path, json=body, headers=_headers(self.api_key, key, None))
                _check(response)
                return response.json()
            except (httpx.TransportError, _Retry) as e:
                await self._pause(attempt, e)
        raise AssertionError("unreachable")

    async def stream(self, path: str, body: dict[str, Any], key: str | None = None) -> AsyncIterator[dict[str, Any]]:
        key = key or secrets.token_urlsafe(16)
        body = {**body, "stream": True}
        last: str | None = None
        for attempt in range(self.max_retries + 1):
            try:
                async with self._http.stream("POST", path, json=body,
                                             headers=_headers(self.api_key, key, last)) as response:
                    if response.status_code != 200:
                        await response.aread()
                    _check(response)
                    events = _Events()
                    async for line in response.aiter_lines():
                        parsed = events.feed(line)
                        if parsed is None:
                            continue
                        event_id, data = parsed
                        if data == "[DONE]":
                            return
                        chunk = json.loads(data)
                        if "error" in chunk and "choices" not in chunk:
                            _error_event(chunk)
                        if event_id is not None:
                            last = event_id
                        yield chunk
                raise _Retry("the stream ended without [DONE]")
            except (httpx.TransportError, _Retry) as e:
                await self._pause(attempt, e)

"""The request-body limits, enforced while the body is read: its size, and how long reading it may take.

A Content-Length over the limit is refused before any byte of the body is read; a chunked upload
(no Content-Length) is read up to the limit and refused the moment it passes it. Either way the
answer is 413 in OpenAI's error shape, sent at once. The rest of the body is then read and thrown
away for a little while (at most LINGER_S seconds and LINGER_BYTES bytes, never kept): a client that
is still sending would otherwise meet a reset connection that can destroy the answer before it reads
it (the "lingering close" of nginx). Past that, uvicorn closes the connection. Memory stays bounded
by the limit whatever the client sends.

A body that has not arrived whole within `timeout_s` of the request head gets 408 and the connection
is closed: a client that trickles its body cannot hold a frontend's connection (and memory) for long.

A pure ASGI middleware, so the app receives the body it allowed, followed by the connection's later
messages (an `http.disconnect` when the client goes away).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable

from resilient_moe.server.protocol import error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LINGER_S = 2.0
LINGER_BYTES = 64 << 20


class BodyLimit:
    """Refuses (413) any request whose body is longer than `max_bytes`, and (408) one whose body takes
    longer than `timeout_s` to arrive (None: no bound)."""

    def __init__(self, app, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            try:
                message = await (receive() if deadline is None else
                                 asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                await self._too_slow(send)
                return
            if message["type"] != "http.request":  # the client went away before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                del chunks
                await self._refuse(receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay() -> Message:
            nonlocal replayed, body
            if not replayed:
                replayed = True
                message, body = {"type": "http.request", "body": body, "more_body": False}, b""
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _too_slow(self, send: Send) -> None:
        payload = json.dumps(error_body(408, f"the request body did not arrive within {self.timeout_s:g}s",
                                        code="request_timeout")).encode()
        await send({"type": "http.response.start", "status": 408,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})

    async def _refuse(self, receive: Receive, send: Send) -> None:
        """Answer 413 now, then drain (and drop) what the client still sends, for a bounded while."""
        payload = json.dumps(error_body(413, f"request body exceeds {self.max_bytes} bytes",
                                        code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload, "more_body": True})  # complete for the client
        deadline, drained = time.monotonic() + LINGER_S, 0
        while drained < LINGER_BYTES:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
            drained += len(message.get("body", b""))
        await send({"type": "http.response.body", "body": b""})

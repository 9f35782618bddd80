"""One request as the API sees it: admission, submission, token deltas, metrics, clean-up.

Requests go through a bounded admission queue (`max_running` submitted: as many as the attention
workers serving now take, `Frontend.capacity`; `max_waiting` queued; 429 beyond) to the `Frontend`,
whose token log numbers tokens by position, so a stream that survives a failover shows each token
exactly once. The event loop never blocks on a request: the frontend's I/O
thread wakes the request's coroutine through `on_event`. A request whose client goes away is aborted
at its attention worker, streaming or not, busy or idle (`ClientWatch`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

from resilient_moe.engine.config import SamplingParams
from resilient_moe.server.frontend import Frontend, Overloaded, RequestFailed, TokenRecord
from resilient_moe.server.logprobs import Top
from resilient_moe.server.metrics import ServingMetrics
from resilient_moe.server.protocol import ApiError
from resilient_moe.server.textstream import TextStream

# RequestFailed.kind -> HTTP status when the failure comes before the response starts.
FAILURE_STATUS = {"invalid_request": 400, "overloaded": 429, "expert_unavailable": 503, "unavailable": 503}
T = TypeVar("T")


class Admission:
    """At most `max_running` requests in flight (a number, or a function read at every admission: the
    frontend's `capacity`, which follows the attention workers serving now); up to `max_waiting` more
    wait in FIFO order; the rest are refused at once (429), so memory stays bounded under any load.
    When the limit rises (a scale-up) call `capacity_changed`, from any thread, to admit the waiting."""

    def __init__(self, max_running: int | Callable[[], int], max_waiting: int) -> None:
        self._limit = max_running if callable(max_running) else (lambda: max_running)
        self.max_waiting = max_waiting
        self.running = 0
        self.closed: str | None = None  # why new requests are refused (the server drains), None while open
        self._queue: deque[asyncio.Future] = deque()  # waiting requests, oldest first
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, seen on first use

    @property
    def max_running(self) -> int:
        return self._limit()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._queue if not f.done())

    def close(self, reason: str) -> None:
        """Refuse new requests from now on (503 with `reason`); those admitted or queued go on."""
        self.closed = reason

    async def enter(self) -> float:
        """Wait for a slot; returns the seconds waited. Raises ApiError 429 when the queue is full, 503
        once admission is closed."""
        if self.closed is not None:
            raise ApiError(503, f"{self.closed}; not taking new requests", code="draining")
        self._loop = asyncio.get_running_loop()
        self._admit()
        if not self.waiting and self.running < self.max_running:
            self.running += 1
            return 0.0
        if self.waiting >= self.max_waiting:
            raise ApiError(429, f"server is at capacity: {self.running} requests running (of {self.max_running} "
                                f"the attention workers take now) and {self.waiting} waiting; retry later",
                           code="overloaded")
        began = time.monotonic()
        slot = self._loop.create_future()
        self._queue.append(slot)
        try:
            await slot  # `_admit` took the slot for it
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():  # admitted as it was cancelled: give the slot back
                self.leave()
            raise
        return time.monotonic() - began

    def leave(self) -> None:
        self.running -= 1
        self._admit()

    def capacity_changed(self) -> None:
        """The limit may have changed: admit whom it now allows (thread-safe)."""
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._admit)
            except RuntimeError:
                pass  # the event loop is gone (server shutting down)

    def _admit(self) -> None:
        """Hand free slots to the oldest waiting requests (on the event loop)."""
        limit = self.max_running
        while self._queue and self.running < limit:
            slot = self._queue.popleft()
            if not slot.done():  # not cancelled meanwhile
                self.running += 1
                slot.set_result(None)
        while self._queue and self._queue[0].done():
            self._queue.popleft()


@dataclass
class Delta:
    """What one wake-up of a request produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[Top] = field(default_factory=list)
    finish_reason: str | None = None


class ClientGone(Exception):
    """The HTTP client disconnected while its request ran."""


async def until_disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Returns once the client has gone (call after the request body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientWatch:
    """Watches one request's connection, once its body was read, for the client leaving."""

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._receive = receive
        self._task: asyncio.Future | None = None

    def _watcher(self) -> asyncio.Future:
        if self._task is None:
            self._task = asyncio.ensure_future(until_disconnected(self._receive))
        return self._task

    @property
    def gone(self) -> bool:
        return self._task is not None and self._task.done()

    def on_gone(self, callback: Callable[[], None]) -> None:
        self._watcher().add_done_callback(lambda _: callback())

    async def guard(self, work: Awaitable[T]) -> T:
        """`work`'s result; raises ClientGone (and cancels `work`) if the client leaves first."""
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({task, self._watcher()}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        raise ClientGone()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


class Generation:
    """One request: admitted, submitted to the frontend, read as deltas, closed."""

    def __init__(self, frontend: Frontend, admission: Admission, metrics: ServingMetrics, tokenizer,
                 request_timeout_s: float, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 stops: list[str], watch: ClientWatch) -> None:
        self.frontend = frontend
        self.watch = watch
        self.admission = admission
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.text = TextStream(tokenizer, stops, prompt_tail=prompt_ids[-4:], min_tokens=params.min_tokens)
        self.token_ids: list[int] = []
        self.logprobs: list[float | None] = []
        self.top_logprobs: list[Top] = []
        self.finish_reason: str | None = None
        self.arrival = time.monotonic()
        self.started = time.time()
        self.arrivals: list[float] = []  # unix times of deliveries (failover stall metric)
        self.handle = None
        self.seed: int | None = params.seed  # its random stream (a keyed request's is fixed before it is claimed)
        self.keyed = None  # resume.Keyed: sent with an Idempotency-Key (server/resume.py)
        self.skip = 0  # tokens the client has already (Last-Event-ID): read, not sent again
        self.echo = ""  # completions' echo: the prompt's text, which the choice's text starts with
        self.tools: list[dict[str, Any]] = []  # a chat's tools (server/tool_calls.py): its text may be a call
        self._wake = asyncio.Event()
        self._admitted = False
        self._closed = False
        self._last_arrived: float | None = None

    async def start(self) -> None:
        """Admission, then submission to an attention worker. Raises ApiError (429, 503), ClientGone."""
        queue_s = await self.watch.guard(self.admission.enter())
        self._admitted = True
        loop = asyncio.get_running_loop()
        self.watch.on_gone(self._wake.set)

        def wake() -> None:  # on the frontend's I/O thread
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                pass  # the event loop is gone (server shutting down)

        try:
            keyed = self.keyed
            if keyed is not None and not keyed.created:  # the request runs (or ran) already: attach to it
                record = keyed.record
                complete = record.state == "finished" and len(keyed.delivered) >= record.length
                self.handle = self.frontend.attach(
                    record.request_id, record.prompt_ids, self.params, record.seed, record.worker,
                    keyed.delivered[:record.length] if complete else keyed.delivered, keyed.keep_s,
                    (keyed.scope, keyed.key), finish_reason=record.finish_reason if complete else None, on_event=wake)
            else:
                self.handle = self.frontend.submit(
                    self.prompt_ids, self.params, self.request_id, on_event=wake, seed=self.seed,
                    keep_s=keyed.keep_s if keyed is not None else 0.0,
                    key=(keyed.scope, keyed.key) if keyed is not None else None)
        except Overloaded as e:
            raise ApiError(429, str(e), code="overloaded") from None
        self.metrics.admitted(queue_s, len(self.prompt_ids))

    async def next(self) -> Delta | None:
        """The next delta (None once finished). Raises ClientGone when the client left meanwhile."""
        if self.finish_reason is not None:
            return None
        idle_since = time.monotonic()
        while True:
            self._wake.clear()
            if self.watch.gone:
                raise ClientGone()
            delta = self._apply(self.handle.poll_events())
            if delta is not None:
                return delta
            if time.monotonic() - idle_since > self.request_timeout_s:
                self.metrics.failed("timeout", self.started, self.arrivals)
                self.finish_reason = "error"
                raise ApiError(503, f"request {self.request_id} produced no token for "
                                    f"{self.request_timeout_s:.0f}s", code="timeout")
            try:
                await asyncio.wait_for(self._wake.wait(), 0.5)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    async def rest(self) -> None:
        """Read to the end (a response that is not streamed)."""
        while await self.next() is not None:
            pass

    def _apply(self, events: list[tuple[str, object]]) -> Delta | None:
        if not events:
            return None
        delta = Delta()
        for kind, value in events:
            if kind == "token":
                if self.text.stopped:
                    continue  # produced after the stop string completed: not the client's
                self._token(value, delta)  # type: ignore[arg-type]
            elif kind == "finish":
                if not self.text.stopped:
                    delta.text += self.text.flush()
                    self.finish_reason = delta.finish_reason = "stop" if self.text.stopped else str(value)
            elif kind == "error":
                if self.text.stopped:
                    continue  # our own abort after a stop string
                error: RequestFailed = value  # type: ignore[assignment]
                self.finish_reason = "error"
                self.metrics.failed(error.kind, self.started, self.arrivals)
                status = FAILURE_STATUS.get(error.kind, 503)
                raise ApiError(status, str(error), param="prompt" if error.kind == "invalid_request" else None,
                               code=error.kind)
        if self.finish_reason not in (None, "error"):
            self.metrics.finished(time.monotonic() - self.arrival, self.finish_reason, self.started, self.arrivals)
        if not delta.token_ids and not delta.text and delta.finish_reason is None:
            return None  # only tokens the client has already (a resumed stream)
        return delta

    def _token(self, record: TokenRecord, delta: Delta) -> None:
        if self._last_arrived is None:
            self.metrics.token(ttft_s=record.arrived - self.arrival)
        else:
            self.metrics.token(gap_s=max(0.0, record.arrived - self._last_arrived))
        self._last_arrived = record.arrived
        self.arrivals.append(time.time() - (time.monotonic() - record.arrived))
        resent = len(self.token_ids) < self.skip  # the client has it (Last-Event-ID): its text state only
        for out in (self,) if resent else (self, delta):
            out.token_ids.append(record.token_id)
            out.logprobs.append(record.logprob)
            out.top_logprobs.append(record.top_logprobs)
        text = self.text.add(record.token_id)
        if not resent:
            delta.text += text
        if self.text.stopped:
            self.finish_reason = delta.finish_reason = "stop"
            self.frontend.abort(self.request_id)  # frees its KV now

    def close(self, watch: bool = True) -> None:
        """Abort if unfinished (client gone), forget the handle, free the admission slot; stop watching
        the client too, unless `watch` is False (other choices of the same HTTP request go on)."""
        if self._closed:
            return
        self._closed = True
        if watch:
            self.watch.close()
        if self.handle is not None:
            if self.finish_reason is None:
                self.metrics.finished(time.monotonic() - self.arrival, "abort", self.started, self.arrivals)
            if self.keyed is not None and self.finish_reason is None:
                self.frontend.orphan(self.request_id, self.keyed.keep_s)  # its client may come back
            else:
                self.frontend.release(self.request_id)
        if self._admitted:
            self.admission.leave()

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.token_ids),
                "total_tokens": len(self.prompt_ids) + len(self.token_ids)}

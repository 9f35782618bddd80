"""The HTTP API of the frontend role: OpenAI-compatible endpoints, probes, metrics, admin, dashboard.

    POST /v1/completions, /v1/chat/completions   (SSE when "stream": true, ending with `data: [DONE]`)
    GET  /v1/models, /health, /ready, /metrics, /openapi.json, /dashboard
    GET  /admin/cluster, /admin/timeseries      (Authorization: Bearer <admin token>)
    GET, POST /admin/faults                      (injected datapath faults; admin_faults.py)

Requests go through a bounded admission queue (`max_running` submitted, `max_waiting` queued, 429
beyond) to the `Frontend`, whose token log numbers tokens by position, so a stream that survives a
failover shows each token exactly once. The event loop never blocks on a request: the frontend's I/O
thread wakes the request's coroutine through `on_event`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from resilient_moe.config import SamplingParams
from resilient_moe.engine.tokenizer import TextTokenizer
from resilient_moe.errors import ConfigError, RequestError
from resilient_moe.server.admin_faults import faults_router
from resilient_moe.server.cluster_view import ClusterMonitor, ClusterSource, cluster_json, readiness
from resilient_moe.server.frontend import Frontend, Overloaded, RequestFailed, TokenRecord
from resilient_moe.server.metrics import ServingMetrics
from resilient_moe.server.protocol import (
    ERROR_RESPONSES,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
)

log = logging.getLogger("resilient_moe.server")

DASHBOARD = Path(__file__).parent / "static" / "dashboard.html"
MAX_STOP_SEQUENCES = 16

# RequestFailed.kind -> HTTP status when the failure comes before the response starts.
FAILURE_STATUS = {"invalid_request": 400, "overloaded": 429, "expert_unavailable": 503, "unavailable": 503}


@dataclass(frozen=True)
class ServerSettings:
    """Limits and names of one API server."""

    model_name: str
    max_model_len: int
    vocab_size: int
    max_running: int = 128  # requests submitted to attention workers at once
    max_waiting: int = 256  # requests queued for admission; more get 429
    request_timeout_s: float = 120.0  # longest wait for a request's next token before it fails
    max_body_bytes: int = 4 << 20
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name in ("max_model_len", "vocab_size", "max_running", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ConfigError(f"max_waiting must be an integer >= 0, got {self.max_waiting!r}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")


class Admission:
    """At most `max_running` requests in flight; up to `max_waiting` more wait in FIFO order; the
    rest are refused at once (429), so memory stays bounded under any load."""

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self.waiting = 0
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the server's loop

    async def enter(self) -> float:
        """Wait for a slot; returns the seconds waited. Raises ApiError 429 when the queue is full."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_running)
        if self._slots.locked() and self.waiting >= self.max_waiting:
            raise ApiError(429, f"server is at capacity: {self.running} requests running and {self.waiting} "
                                "waiting; retry later", code="overloaded")
        began = time.monotonic()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        return time.monotonic() - began

    def leave(self) -> None:
        assert self._slots is not None
        self.running -= 1
        self._slots.release()


class TextStream:
    """Detokenizes a request's output incrementally and applies its stop strings.

    Each step decodes only a short window (the tokens since the last emitted character, plus the one
    step before them for context), so a long output costs linear time, and characters split across
    tokens wait until complete. Text that might be the start of a stop string is held back until it
    is known not to be, so a client never sees part of a stop string; the stop string itself is never
    emitted. `prompt_tail` gives the first output token its context (a leading space survives)."""

    def __init__(self, tokenizer: TextTokenizer | None, stops: list[str], prompt_tail: list[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = list(prompt_tail)
        self._prefix = 0  # ids[_prefix:_read]: the window's context, already part of `text`
        self._read = len(self.ids)
        self.text = ""  # decoded output so far (complete characters)
        self.emitted = 0  # characters of `text` sent so far
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _advance(self, final: bool = False) -> None:
        context = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if len(window) > len(context) and (final or not window.endswith("\ufffd")):
            self.text += window[len(context):]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token_id: int) -> str:
        """Text newly safe to send after `token_id`; sets `stopped` when a stop string completed."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self._advance()
        full = self.text
        safe = len(full)
        if self.stops:
            hits = [i for s in self.stops if (i := full.find(s, self.emitted)) >= 0]
            if hits:
                cut = min(hits)
                out, self.emitted, self.stopped = full[self.emitted:cut], cut, True
                return out
            safe -= self._held_back(full)
        if safe <= self.emitted:
            return ""
        out, self.emitted = full[self.emitted:safe], safe
        return out

    def _held_back(self, full: str) -> int:
        """Length of the longest suffix of `full` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(full) - self.emitted), longest, -1):
                if full.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        """The held-back rest (incomplete characters included), once the request finished otherwise."""
        if self.stopped:
            return ""
        self._advance(final=True)
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out

    @property
    def sent(self) -> str:
        return self.text[:self.emitted]


@dataclass
class Delta:
    """What one wake-up of a request produced."""

    text: str
    token_ids: list[int]
    logprobs: list[float | None]
    finish_reason: str | None = None


class ClientGone(Exception):
    """The HTTP client disconnected while its request ran."""


class _Server:
    """Everything the routes share."""

    def __init__(self, frontend: Frontend, cluster: ClusterSource, tokenizer: TextTokenizer | None,
                 settings: ServerSettings, admin_token: str, metrics: ServingMetrics) -> None:
        self.frontend = frontend
        self.cluster = cluster
        self.tokenizer = tokenizer
        self.settings = settings
        self.admin_token = admin_token
        self.metrics = metrics
        self.admission = Admission(settings.max_running, settings.max_waiting)
        self.monitor = ClusterMonitor(cluster, self._on_cluster)
        self.created = int(time.time())

    def _on_cluster(self, state) -> None:
        workers = cluster_json(state, dict(self.cluster.pids), self.frontend_entry())["workers"]
        self.metrics.update_cluster(state, workers, self.admission.waiting)

    def frontend_entry(self) -> dict[str, Any]:
        load = {**self.frontend.stats(), "api_running": float(self.admission.running),
                "api_waiting": float(self.admission.waiting)}
        return {"id": self.frontend.name, "pid": os.getpid(), "host": self.settings.host, "load": load}


class Generation:
    """One request as the API sees it: admission, submission, token deltas, metrics, clean-up."""

    def __init__(self, server: _Server, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 stops: list[str]) -> None:
        self.server = server
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.text = TextStream(server.tokenizer, stops, prompt_tail=prompt_ids[-4:])
        self.token_ids: list[int] = []
        self.logprobs: list[float | None] = []
        self.finish_reason: str | None = None
        self.arrival = time.monotonic()
        self.arrivals: list[float] = []  # unix times of deliveries (failover stall metric)
        self.handle = None
        self._wake = asyncio.Event()
        self._admission: Admission | None = None
        self._admitted = False
        self._closed = False
        self._last_arrived: float | None = None

    async def start(self) -> None:
        """Admission, then submission to an attention worker. Raises ApiError (429, 503)."""
        self._admission = self.server.admission
        queue_s = await self._admission.enter()
        self._admitted = True
        loop = asyncio.get_running_loop()

        def wake() -> None:  # on the frontend's I/O thread
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                pass  # the event loop is gone (server shutting down)

        try:
            self.handle = self.server.frontend.submit(self.prompt_ids, self.params, self.request_id, on_event=wake)
        except Overloaded as e:
            raise ApiError(429, str(e), code="overloaded") from None
        self.server.metrics.admitted(queue_s, len(self.prompt_ids))

    async def next(self, request: Request | None = None) -> Delta | None:
        """The next delta (None once finished). `request`: check it for a disconnected client while idle."""
        if self.finish_reason is not None:
            return None
        idle_since = time.monotonic()
        checked = time.monotonic()
        while True:
            self._wake.clear()
            delta = self._apply(self.handle.poll_events())
            if delta is not None:
                return delta
            now = time.monotonic()
            if request is not None and now - checked > 0.5:
                checked = now
                if await request.is_disconnected():
                    raise ClientGone()
            if now - idle_since > self.server.settings.request_timeout_s:
                self.server.metrics.failed("timeout", self.arrivals)
                self.finish_reason = "error"
                raise ApiError(503, f"request {self.request_id} produced no token for "
                                    f"{self.server.settings.request_timeout_s:.0f}s", code="timeout")
            try:
                await asyncio.wait_for(self._wake.wait(), 0.5)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    def _apply(self, events: list[tuple[str, object]]) -> Delta | None:
        if not events:
            return None
        delta = Delta("", [], [])
        metrics = self.server.metrics
        for kind, value in events:
            if kind == "token":
                if self.text.stopped:
                    continue  # produced after the stop string completed: not the client's
                record: TokenRecord = value  # type: ignore[assignment]
                if self._last_arrived is None:
                    metrics.token(ttft_s=record.arrived - self.arrival)
                else:
                    metrics.token(gap_s=max(0.0, record.arrived - self._last_arrived))
                self._last_arrived = record.arrived
                self.arrivals.append(time.time() - (time.monotonic() - record.arrived))
                self.token_ids.append(record.token_id)
                self.logprobs.append(record.logprob)
                delta.token_ids.append(record.token_id)
                delta.logprobs.append(record.logprob)
                delta.text += self.text.add(record.token_id)
                if self.text.stopped:
                    self.finish_reason = delta.finish_reason = "stop"
                    self.server.frontend.abort(self.request_id)  # frees its KV now
            elif kind == "finish":
                if not self.text.stopped:
                    delta.text += self.text.flush()
                    self.finish_reason = delta.finish_reason = str(value)
            elif kind == "error":
                if self.text.stopped:
                    continue  # our own abort after a stop string
                error: RequestFailed = value  # type: ignore[assignment]
                self.finish_reason = "error"
                metrics.failed(error.kind, self.arrivals)
                status = FAILURE_STATUS.get(error.kind, 503)
                raise ApiError(status, str(error), param="prompt" if error.kind == "invalid_request" else None,
                               code=error.kind)
        if self.finish_reason not in (None, "error"):
            metrics.finished(time.monotonic() - self.arrival, self.finish_reason, self.arrivals)
        return delta

    def close(self) -> None:
        """Abort if unfinished (client gone), forget the handle, free the admission slot."""
        if self._closed:
            return
        self._closed = True
        if self.handle is not None:
            if self.finish_reason is None:
                self.server.metrics.finished(time.monotonic() - self.arrival, "abort", self.arrivals)
            self.server.frontend.release(self.request_id)
        if self._admitted:
            self._admission.leave()

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.token_ids),
                "total_tokens": len(self.prompt_ids) + len(self.token_ids)}


# ---- request checks --------------------------------------------------------------------------


def _unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    if body.n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {body.n}", param="n")
    if body.presence_penalty or body.frequency_penalty:
        param = "presence_penalty" if body.presence_penalty else "frequency_penalty"
        raise ApiError(400, f"{param} is not supported (must be 0)", param=param)
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, 1):
            raise ApiError(400, f"best_of must be 1, got {body.best_of}", param="best_of")


def _check_ids(ids: list[int], vocab: int, param: str) -> None:
    for token in ids:
        if not 0 <= token < vocab:
            raise ApiError(400, f"{param}: token id {token} is outside the vocabulary [0, {vocab})", param=param)


def _stops(body, vocab: int) -> tuple[list[str], list[int]]:
    raw = [] if body.stop is None else [body.stop] if isinstance(body.stop, str) else list(body.stop)
    strings = [s for s in raw if isinstance(s, str) and s]
    ids = [s for s in raw if isinstance(s, int)] + list(body.stop_token_ids or [])
    if len(strings) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"stop: at most {MAX_STOP_SEQUENCES} stop strings, got {len(strings)}", param="stop")
    _check_ids(ids, vocab, "stop_token_ids" if body.stop_token_ids else "stop")
    return strings, ids


def _sampling(body, prompt_len: int, max_tokens: int | None, stop_ids: list[int], settings: ServerSettings,
              logprobs: bool, prompt_param: str) -> SamplingParams:
    limit = settings.max_model_len
    if prompt_len >= limit:
        raise ApiError(400, f"this model's maximum context length is {limit} tokens; the prompt has {prompt_len} "
                            "(at least one token must remain for the output)", param=prompt_param,
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = limit - prompt_len
    elif prompt_len + max_tokens > limit:
        raise ApiError(400, f"this model's maximum context length is {limit} tokens; you requested "
                            f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} for the output): "
                            "lower max_tokens", param="max_tokens", code="context_length_exceeded")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=float(body.temperature), top_p=float(body.top_p),
            top_k=max(0, body.top_k), seed=body.seed, stop_token_ids=tuple(stop_ids), ignore_eos=body.ignore_eos,
            logprobs=0 if logprobs else None,
        )
    except ConfigError as e:
        raise ApiError(400, str(e), param=str(e).split(" ", 1)[0]) from None


def _completion_prompt(body: CompletionRequest, tokenizer: TextTokenizer | None, vocab: int) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: batches of prompts are not supported (got {len(prompt)}); send one "
                                "prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as a list of token ids",
                           param="prompt")
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
    if not ids:
        raise ApiError(400, "prompt is empty", param="prompt")
    _check_ids(ids, vocab, "prompt")
    return ids


def _chat_prompt(body: ChatCompletionRequest, tokenizer: TextTokenizer | None, vocab: int) -> list[int]:
    if tokenizer is None:
        raise ApiError(400, "this model has no tokenizer, so chat messages cannot be encoded; use /v1/completions "
                            "with token ids", param="messages")
    messages = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        messages.append({"role": m.role, "content": content})
    try:
        text = tokenizer.apply_chat_template(messages)
    except RequestError as e:
        raise ApiError(400, str(e), param="messages") from None
    bos = tokenizer.special.get("bos_token")
    ids = tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))
    if not ids:
        raise ApiError(400, "messages render to an empty prompt", param="messages")
    _check_ids(ids, vocab, "messages")
    return ids


def _token_text(tokenizer: TextTokenizer | None, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer is not None else f"<{token_id}>"


def _completion_logprobs(tokenizer, ids: list[int], lps: list[float | None], offset: int) -> dict[str, Any]:
    tokens = [_token_text(tokenizer, t) for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": offsets}


def _chat_logprobs(tokenizer, ids: list[int], lps: list[float | None]) -> dict[str, Any]:
    content = []
    for t, lp in zip(ids, lps):
        text = _token_text(tokenizer, t)
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []})
    return {"content": content}


def _sse(data: dict[str, Any] | str) -> str:
    import json

    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


# ---- the app ---------------------------------------------------------------------------------


def create_app(
    frontend: Frontend,
    cluster_info_provider: ClusterSource,
    tokenizer: TextTokenizer | None,
    model_name: str,
    admin_token: str,
    settings: ServerSettings | None = None,
    metrics: ServingMetrics | None = None,
) -> FastAPI:
    """The API over a started `frontend` and the cluster it serves (`cluster_info_provider`: a
    `LocalCluster`, or anything with `.state()` and `.pids`). `settings` default to a 4096-token
    context and the tokenizer's vocabulary; the admin endpoints need `admin_token`."""
    if not admin_token:
        raise ConfigError("admin_token must be a non-empty string")
    if settings is None:
        settings = ServerSettings(model_name=model_name, max_model_len=4096,
                                  vocab_size=tokenizer.vocab_size if tokenizer else 1 << 30)
    server = _Server(frontend, cluster_info_provider, tokenizer, settings, admin_token, metrics or ServingMetrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.monitor.start()
        try:
            yield
        finally:
            server.monitor.stop()

    app = FastAPI(
        title="resilient-moe", version="0.1.0", lifespan=lifespan,
        description="OpenAI-compatible serving of Mixture-of-Experts models that keep answering while their "
                    "workers fail. Admin endpoints need `Authorization: Bearer <admin token>`.",
    )
    app.state.server = server
    bearer = HTTPBearer(auto_error=False, description="the admin token printed by `resilient-moe serve`")

    # ---- errors -------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"request body is not valid JSON: {first.get('msg', '')}", None
        else:
            param = loc[0] if loc else None
            where = ".".join(loc) or "body"
            message = f"{where}: {first.get('msg', 'invalid value')}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(error_body(400, message, param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__}); see the server log"),
                            status_code=500)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return JSONResponse(error_body(413, f"request body exceeds {settings.max_body_bytes} bytes"),
                                status_code=413)
        return await call_next(request)

    def require_admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None:
            raise ApiError(401, "admin endpoints need 'Authorization: Bearer <admin token>'", code="missing_token")
        if not secrets.compare_digest(credentials.credentials.encode(), server.admin_token.encode()):
            raise ApiError(403, "the admin token is not valid", code="invalid_token")

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")

    # ---- OpenAI endpoints ---------------------------------------------------------------------

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": server.created, "owned_by": "resilient-moe",
            "root": settings.model_name, "max_model_len": settings.max_model_len,
        }]}

    @app.post("/v1/completions", tags=["openai"], responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        _unsupported(body)
        prompt_ids = await run_in_threadpool(_completion_prompt, body, tokenizer, settings.vocab_size)
        stops, stop_ids = _stops(body, settings.vocab_size)
        params = _sampling(body, len(prompt_ids), body.max_tokens, stop_ids, settings,
                           logprobs=body.logprobs is not None, prompt_param="prompt")
        gen = Generation(server, f"cmpl-{secrets.token_hex(12)}", prompt_ids, params, stops)
        return await _respond(gen, body, request, chat=False)

    @app.post("/v1/chat/completions", tags=["openai"], responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        _unsupported(body)
        prompt_ids = await run_in_threadpool(_chat_prompt, body, tokenizer, settings.vocab_size)
        stops, stop_ids = _stops(body, settings.vocab_size)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = _sampling(body, len(prompt_ids), max_tokens, stop_ids, settings,
                           logprobs=body.logprobs, prompt_param="messages")
        gen = Generation(server, f"chatcmpl-{secrets.token_hex(12)}", prompt_ids, params, stops)
        return await _respond(gen, body, request, chat=True)

    async def _respond(gen: Generation, body, request: Request, chat: bool):
        try:
            await gen.start()
            first = await gen.next(request)  # errors before the first token still get a proper status
        except ClientGone:
            gen.close()
            return Response(status_code=499)
        except BaseException:
            gen.close()
            raise
        if body.stream:
            return StreamingResponse(_stream(gen, first, body, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while await gen.next(request) is not None:
                pass
        except ClientGone:
            return Response(status_code=499)
        finally:
            gen.close()
        return _final(gen, body, chat)

    def _final(gen: Generation, body, chat: bool) -> dict[str, Any]:
        text = gen.text.sent
        choice: dict[str, Any] = {"index": 0, "finish_reason": gen.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            if body.logprobs:
                choice["logprobs"] = _chat_logprobs(tokenizer, gen.token_ids, gen.logprobs)
        else:
            choice["text"] = text
            if body.logprobs is not None:
                choice["logprobs"] = _completion_logprobs(tokenizer, gen.token_ids, gen.logprobs, 0)
        if body.return_token_ids:
            choice["prompt_token_ids"] = gen.prompt_ids
            choice["token_ids"] = gen.token_ids
        return {"id": gen.request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": settings.model_name, "choices": [choice], "usage": gen.usage}

    async def _stream(gen: Generation, first: Delta | None, body, chat: bool) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        offset = 0

        def chunk(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
            data = {"id": gen.request_id, "object": kind, "created": created, "model": settings.model_name,
                    "choices": [] if choice is None else [choice]}
            if usage is not None or include_usage:
                data["usage"] = usage
            return _sse(data)

        try:
            if chat:
                opening: dict[str, Any] = {"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}
                if body.return_token_ids:
                    opening["prompt_token_ids"] = gen.prompt_ids
                yield chunk(opening)
            delta, first_chunk = first, True
            while delta is not None:
                choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": delta.finish_reason}
                if chat:
                    choice["delta"] = {"content": delta.text} if delta.text or not delta.finish_reason else {}
                    if body.logprobs:
                        choice["logprobs"] = _chat_logprobs(tokenizer, delta.token_ids, delta.logprobs)
                else:
                    choice["text"] = delta.text
                    if body.logprobs is not None:
                        choice["logprobs"] = _completion_logprobs(tokenizer, delta.token_ids, delta.logprobs, offset)
                    if body.return_token_ids and first_chunk:
                        choice["prompt_token_ids"] = gen.prompt_ids
                offset += len(delta.text)
                if body.return_token_ids:
                    choice["token_ids"] = delta.token_ids
                # the last chunk carries the usage (also without stream_options: many clients read it there)
                yield chunk(choice, gen.usage if delta.finish_reason else None)
                first_chunk = False
                delta = await gen.next()
            if include_usage:
                yield chunk(None, gen.usage)
        except ApiError as e:
            yield _sse(e.body())
        finally:
            gen.close()
        yield _sse("[DONE]")

    # ---- probes, metrics ----------------------------------------------------------------------

    @app.get("/health", tags=["operations"])
    async def health():
        """200 while this process serves and the controller answers."""
        alive = frontend.alive
        if alive and server.monitor.reachable:
            return {"status": "ok"}
        reason = "the frontend's I/O thread stopped" if not alive else \
            f"the controller is unreachable ({server.monitor.error or 'no answer'})"
        return JSONResponse(error_body(503, reason, code="unhealthy"), status_code=503)

    @app.get("/ready", tags=["operations"])
    async def ready():
        """200 only when every worker of the cluster is up (and this frontend reaches an attention worker)."""
        state = await run_in_threadpool(server.monitor.poll)
        problems = readiness(state, dict(cluster_info_provider.pids))
        if not frontend.links:
            problems.append("this frontend has no link to an attention worker")
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---- admin, dashboard ---------------------------------------------------------------------

    @app.get("/admin/cluster", tags=["admin"], dependencies=[Depends(require_admin)])
    async def admin_cluster() -> dict[str, Any]:
        """Workers (with pids), the expert routing table, recent failure/recovery events."""
        state = await run_in_threadpool(server.monitor.poll)
        return cluster_json(state, dict(cluster_info_provider.pids), server.frontend_entry())

    @app.get("/admin/timeseries", tags=["admin"], dependencies=[Depends(require_admin)])
    async def admin_timeseries() -> dict[str, Any]:
        """One sample per monitor pass: tokens/s, mean inter-token latency, running and waiting requests."""
        return {"series": list(server.metrics.series)}

    controller = getattr(cluster_info_provider, "client", None) or getattr(cluster_info_provider,
                                                                           "controller_address", None)
    if controller is not None:  # datapath fault injection for chaos tests (admin_faults.py)
        app.include_router(faults_router(controller, [Depends(require_admin)]))

    @app.get("/dashboard", tags=["admin"], response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """The SRE page. It holds no data itself: it reads the admin token from the URL fragment
        (#token=...), which browsers never send to the server, and polls the admin endpoints."""
        return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"))

    return app

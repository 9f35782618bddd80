"""The HTTP API of the frontend role: OpenAI-compatible endpoints, probes, metrics, admin, dashboard.

    POST /v1/completions, /v1/chat/completions   (SSE when "stream": true, ending with `data: [DONE]`)
    GET  /v1/models                              (/v1/*: Authorization: Bearer <API key>, when keys are set)
    GET  /health, /ready, /metrics, /openapi.json, /dashboard
    GET  /admin/cluster, /admin/timeseries, /admin/recovery   (Authorization: Bearer <admin token>)
    GET, POST /admin/faults                      (injected datapath faults; admin_faults.py)
    POST /admin/scale, /admin/rebalance          (roster and expert placement; admin_cluster.py)

The pieces a request goes through each have a module: limits.py (body size), prompts.py (text to
token ids, bounded and off the event loop), validation.py (checks against the model and deployment),
generation.py (admission, the request's life, disconnects), textstream.py (detokenization and stop
strings), logprobs.py (OpenAI's logprob shapes), tool_calls.py (tools, forced calls and their parse;
structured outputs compile in engine/guided.py). This file wires them to routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from resilient_moe.engine.config import SamplingParams
from resilient_moe.engine.sampler import choice_seed
from resilient_moe.engine.tokenizer import TextTokenizer
from resilient_moe.errors import ConfigError, ResilientMoeError
from resilient_moe.server import tool_calls, validation
from resilient_moe.server.admin_cluster import NodeKillRequest, cluster_router
from resilient_moe.server.admin_faults import faults_router
from resilient_moe.server.cluster_monitor import ClusterMonitor, ClusterSource, cluster_json, readiness
from resilient_moe.server.frontend import Frontend
from resilient_moe.server.idempotency import RequestStore
from resilient_moe.server.resume import keyed_request, record_end
from resilient_moe.server.generation import Admission, ClientGone, ClientWatch, Delta, Generation
from resilient_moe.server.limits import BodyLimit
from resilient_moe.server.logprobs import chat_logprobs, completion_logprobs
from resilient_moe.server.metrics import ResponseCounter, ServingMetrics
from resilient_moe.server.prompts import PromptEncoder
from resilient_moe.server.protocol import (
    ERROR_RESPONSES,
    MAX_CHOICES,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
)

log = logging.getLogger("resilient_moe.server")

DASHBOARD = Path(__file__).parent / "static" / "dashboard.html"
API_KEYS_ENV = "RESILIENT_MOE_API_KEYS"  # comma-separated; `serve --api-key` adds to them
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CHARS_PER_TOKEN_BOUND = 16  # default max_prompt_chars: this many characters per token of context


@dataclass(frozen=True)
class ServerSettings:
    """Limits and names of one API server."""

    model_name: str
    max_model_len: int
    vocab_size: int
    # Requests submitted to attention workers at once; None: the frontend's capacity, which follows the
    # attention workers serving (Frontend.capacity: live attention workers x engine.max_num_seqs).
    max_running: int | None = 128
    max_waiting: int = 256  # requests queued for admission; more get 429
    request_timeout_s: float = 120.0  # longest wait for a request's next token before it fails
    max_body_bytes: int = 4 << 20  # longer request bodies get 413 (chunked ones too, while they are read)
    max_prompt_chars: int | None = None  # longer text prompts get 400 before tokenization; None: 16 x max_model_len
    tokenize_concurrency: int = 2  # prompts tokenized at once (on threads, off the event loop)
    host: str = "127.0.0.1"
    body_timeout_s: float | None = None  # a body not read whole by then gets 408 (limits.py); None: no bound

    def __post_init__(self) -> None:
        for name in ("max_model_len", "vocab_size", "max_running", "max_body_bytes", "tokenize_concurrency"):
            value = getattr(self, name)
            if name == "max_running" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_prompt_chars is not None and (not isinstance(self.max_prompt_chars, int)
                                                  or self.max_prompt_chars < 1):
            raise ConfigError(f"max_prompt_chars must be a positive integer or None, got {self.max_prompt_chars!r}")
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ConfigError(f"max_waiting must be an integer >= 0, got {self.max_waiting!r}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")

    @property
    def prompt_chars(self) -> int:
        return self.max_prompt_chars or CHARS_PER_TOKEN_BOUND * self.max_model_len


def api_keys_from(flags: Sequence[str], environ: dict[str, str] = os.environ) -> tuple[str, ...]:
    """The API keys of `serve`: each --api-key, plus the comma-separated RESILIENT_MOE_API_KEYS."""
    keys = [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",")] + [k.strip() for k in flags]
    for key in flags:
        if not key.strip():
            raise ConfigError("--api-key must not be empty")
    return tuple(dict.fromkeys(k for k in keys if k))


class _Server:
    """Everything the routes share."""

    def __init__(self, frontend: Frontend, cluster: ClusterSource, tokenizer: TextTokenizer | None,
                 settings: ServerSettings, admin_token: str, api_keys: tuple[str, ...],
                 metrics: ServingMetrics, requests: RequestStore | None = None, resume_grace_s: float = 30.0) -> None:
        self.frontend = frontend
        self.requests = requests  # keyed requests' records (Idempotency-Key), when the cluster has Redis
        self.resume_grace_s = resume_grace_s
        self.cluster = cluster
        self.tokenizer = tokenizer
        self.settings = settings
        self.admin_token = admin_token
        self.api_keys = api_keys
        self.metrics = metrics
        self.admission = Admission(frontend.capacity if settings.max_running is None else settings.max_running,
                                   settings.max_waiting)
        frontend.on_capacity(self.admission.capacity_changed)  # a scale-up admits the waiting at once
        self.prompts = PromptEncoder(tokenizer, settings.vocab_size, settings.prompt_chars,
                                     settings.tokenize_concurrency)
        self.monitor = ClusterMonitor(cluster, self._on_cluster, on_pushed=self._on_pushed)
        self.created = int(time.time())
        self.draining: str | None = None  # why the server drains (SIGTERM), None while it serves

    def start_draining(self, reason: str) -> None:
        """New requests get 503 and /ready answers 503; requests in flight go on."""
        self.draining = reason
        self.admission.close(reason)

    def in_flight(self) -> int:
        """Requests admitted or waiting for admission."""
        return self.admission.running + self.admission.waiting

    def _on_cluster(self, state) -> None:
        workers = cluster_json(state, dict(self.cluster.pids), self.frontend_entry(),
                               nodes=getattr(self.cluster, "nodes", None))["workers"]
        self.metrics.update_cluster(state, workers, self.admission.waiting)

    def _on_pushed(self, state) -> None:
        self.metrics.update_cluster(state, None, self.admission.waiting, now=time.time())

    def frontend_entry(self) -> dict[str, Any]:
        load = {**self.frontend.stats(), "api_running": float(self.admission.running),
                "api_waiting": float(self.admission.waiting)}
        return {"id": self.frontend.name, "pid": os.getpid(), "host": self.settings.host, "load": load}

    def generation(self, prefix: str, prompt_ids: list[int], params, stops: list[str],
                   watch: ClientWatch) -> Generation:
        return Generation(self.frontend, self.admission, self.metrics, self.tokenizer,
                          self.settings.request_timeout_s, f"{prefix}-{secrets.token_hex(12)}", prompt_ids, params,
                          stops, watch)


def _sse(data: dict[str, Any] | str, event_id: str | None = None) -> str:
    """One SSE event; `event_id` ("REQUEST_ID:POSITION", the tokens delivered so far) is what a client
    sends back as Last-Event-ID to resume after it (server/resume.py)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence for pydantic's errors, and the request field at fault. Of a union's
    alternatives, a value error (our own checks) says more than "should be a list"."""
    errors = exc.errors()
    first = next((e for e in errors if e.get("type") == "extra_forbidden"), None) or \
        next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('msg', '')}", None
    # pydantic names union alternatives in the location ("function-after[...]", "list[int]", "str"): drop them
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and (isinstance(p, int) or (
        str(p).isidentifier() and p not in ("str", "int", "float", "bool")))]
    where = ".".join(loc) or "body"
    message = f"{where}: {first.get('msg', 'invalid value')}"
    if first.get("type") == "extra_forbidden":  # nothing is accepted and ignored
        message = f"{where}: unknown parameter; this server does not implement it"
    if len(errors) > 1 and first is errors[0]:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message, (loc[0] if loc else None)


def _bearer(request: Request) -> str | None:
    """The API key a request authenticated with (its Idempotency-Keys are scoped by it)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def create_app(
    frontend: Frontend,
    cluster_info_provider: ClusterSource,
    tokenizer: TextTokenizer | None,
    model_name: str,
    admin_token: str,
    settings: ServerSettings | None = None,
    metrics: ServingMetrics | None = None,
    api_keys: Sequence[str] = (),
    requests: RequestStore | None = None,
    resume_grace_s: float = 30.0,
) -> FastAPI:
    """The API over a started `frontend` and the cluster it serves (`cluster_info_provider`: a
    a `Launcher`, or anything with `.state()` and `.pids`). `settings` default to a 4096-token
    context and the tokenizer's vocabulary; the admin endpoints need `admin_token`; with `api_keys`,
    /v1/* needs one of them."""
    if not admin_token:
        raise ConfigError("admin_token must be a non-empty string")
    if any(not isinstance(k, str) or not k for k in api_keys):
        raise ConfigError("api_keys must be non-empty strings")
    if settings is None:
        settings = ServerSettings(model_name=model_name, max_model_len=4096,
                                  vocab_size=tokenizer.vocab_size if tokenizer else 1 << 30)
    server = _Server(frontend, cluster_info_provider, tokenizer, settings, admin_token, tuple(api_keys),
                     metrics or ServingMetrics(), requests, resume_grace_s)

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
                    "workers fail. /v1 endpoints need `Authorization: Bearer <API key>` when the server has "
                    "API keys; admin endpoints need `Authorization: Bearer <admin token>`.",
    )
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(ResponseCounter, counter=server.metrics.responses)  # added last: outside BodyLimit
    admin_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken",
                              description="the admin token printed by `resilient-moe serve`")
    key_bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                            description="an API key given to `resilient-moe serve --api-key` (when it has any)")

    # ---- errors -------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": no one reads it

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param, None if param is None else "invalid_value"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__}); see the server log"),
                            status_code=500)

    def require_admin(credentials: HTTPAuthorizationCredentials | None = Depends(admin_bearer)) -> None:
        if credentials is None:
            raise ApiError(401, "admin endpoints need 'Authorization: Bearer <admin token>'", code="missing_token")
        if not secrets.compare_digest(credentials.credentials.encode(), server.admin_token.encode()):
            raise ApiError(403, "the admin token is not valid", code="invalid_token")

    def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(key_bearer)) -> None:
        if not server.api_keys:
            return
        if credentials is None:
            raise ApiError(401, "this server needs an API key: send 'Authorization: Bearer <API key>'",
                           code="missing_api_key")
        given = credentials.credentials.encode()
        # compare with every key (no early exit), so the time taken says nothing about which one matched
        if not sum(secrets.compare_digest(given, key.encode()) for key in server.api_keys):
            raise ApiError(401, "the API key is not valid", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")

    # ---- OpenAI endpoints ---------------------------------------------------------------------

    v1 = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": server.created, "owned_by": "resilient-moe",
            "root": settings.model_name, "max_model_len": settings.max_model_len,
        }]}

    @v1.post("/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        validation.reject_unsupported(body)
        stops, stop_ids = validation.stops(body, settings.vocab_size)
        watch = ClientWatch(request.receive)
        prompts = await watch.guard(server.prompts.completion(body))
        width = body.best_of or body.n  # choices generated per prompt
        check_choices(len(prompts), width)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt if isinstance(body.prompt[0], str) \
            else [None] * len(prompts)
        gens = []
        guide = await run_in_threadpool(validation.guide, body)  # a large schema compiles for a while
        for ids, text in zip(prompts, texts):
            params = validation.sampling(body, len(ids), body.max_tokens, stop_ids, settings.max_model_len,
                                         prompt_param="prompt", vocab=settings.vocab_size, guide=guide)
            echo = (text if text is not None else tokenizer.decode(ids) if tokenizer else "") if body.echo else ""
            if width > body.n and params.logprobs is None:
                params = replace(params, logprobs=0)  # ranked by them (and not shown)
            gens += choices("cmpl", ids, params, width, stops, watch, echo)
        return await _respond(gens, body, chat=False, request=request, width=width)

    @v1.post("/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        validation.reject_unsupported(body)
        stops, stop_ids = validation.stops(body, settings.vocab_size)
        check_choices(1, body.n)
        tools = tool_calls.checked_tools(body.tools)
        tool_choice = tool_calls.choice_of(body.tool_choice, tools)
        forced = None  # the schema of the call that tool_choice forces
        if tool_choice not in (None, "none", "auto"):
            forced = tool_calls.call_schema(tools, None if tool_choice == "required" else tool_choice)
        if tool_choice not in (None, "none"):
            if body.logprobs:
                _refuse_with_tools("logprobs")
            for header in ("Idempotency-Key", "Last-Event-ID"):  # a resumed stream would lose its call's parse
                if request.headers.get(header) is not None:
                    _refuse_with_tools(header)
        guide = await run_in_threadpool(validation.guide, body, forced)
        watch = ClientWatch(request.receive)
        prompt_ids = await watch.guard(server.prompts.chat(body, tool_calls.template_tools(tools) or None))
        params = validation.sampling(body, len(prompt_ids), body.max_completion_tokens or body.max_tokens, stop_ids,
                                     settings.max_model_len, prompt_param="messages", vocab=settings.vocab_size,
                                     guide=guide)
        gens = choices("chatcmpl", prompt_ids, params, body.n, stops, watch)
        if tool_choice not in (None, "none"):
            for gen in gens:
                gen.tools = tools
        return await _respond(gens, body, chat=True, request=request)

    def _refuse_with_tools(param: str) -> None:
        raise ApiError(400, f"{param} is not supported with tools (unless tool_choice is \"none\")", param=param,
                       code="unsupported_parameter")

    def check_choices(prompts: int, n: int) -> None:
        if prompts * n > MAX_CHOICES:
            raise ApiError(400, f"n: at most {MAX_CHOICES} choices per request, and {prompts} prompt(s) x n (or "
                                f"best_of) = {n} ask for {prompts * n}", param="n")

    def choices(prefix: str, prompt_ids: list[int], params: SamplingParams, n: int, stops: list[str],
                watch: ClientWatch, echo: str = "") -> list[Generation]:
        """The n choices of one prompt, each a request of its own; with a seed, choice j's is derived
        from it (choice_seed), so the same request gives the same choices."""
        gens = []
        for j in range(n):
            own = params if params.seed is None else replace(params, seed=choice_seed(params.seed, j))
            gen = server.generation(prefix, prompt_ids, own, stops, watch)
            gen.echo = echo
            gens.append(gen)
        return gens

    async def _respond(gens: list[Generation], body, chat: bool, request: Request, width: int | None = None):
        """Errors before the first token still get a proper status; a client that leaves before the
        response is complete has its request aborted (ClientGone), unless it carries an Idempotency-Key
        (then it is kept for the client to resume: server/resume.py)."""
        if len(gens) > 1:
            return await _respond_many(gens, body, chat, request, width or body.n)
        gen = gens[0]
        try:
            gen.keyed = keyed = await keyed_request(server.requests, request, body, gen, _bearer(request),
                                                    server.resume_grace_s, frontend.name)
            if keyed is not None and not keyed.created and not body.stream and keyed.record.result is not None:
                gen.close()
                return keyed.record.result  # answered once already: the same answer, nothing computed again
            await gen.start()
            delta = await gen.next()
            if body.stream:
                return StreamingResponse(_stream(gen, delta, body, chat), media_type="text/event-stream",
                                         headers=SSE_HEADERS)
            await gen.rest()
        except BaseException:
            gen.close()
            raise
        gen.close()
        final = _final([gen], body, chat)
        if keyed is not None and frontend.delivery is not None:
            record_end(frontend.delivery, keyed, gen.finish_reason, len(gen.token_ids), final)
        return final

    async def _respond_many(gens: list[Generation], body, chat: bool, request: Request, width: int):
        """Several choices (n > 1, best_of, several prompts) run at once, each admitted on its own (so a
        request with more choices than slots still finishes); their deltas merge in arrival order.
        `width`: choices generated per prompt (best_of), of which the n best are returned."""
        if request.headers.get("idempotency-key") is not None or request.headers.get("last-event-id") is not None:
            raise ApiError(400, "Idempotency-Key is not supported for several choices (n > 1 or several prompts) "
                                "yet: send one request per choice to resume it", param="Idempotency-Key",
                           code="unsupported_parameter")
        queue: asyncio.Queue = asyncio.Queue()

        async def run(index: int, gen: Generation) -> None:
            try:
                await gen.start()
                while (delta := await gen.next()) is not None:
                    queue.put_nowait((index, delta))
                queue.put_nowait((index, None))
            except Exception as e:  # noqa: BLE001 - handed to the response, which answers it
                queue.put_nowait((index, e))
            finally:
                gen.close(watch=False)

        tasks = [asyncio.ensure_future(run(i, g)) for i, g in enumerate(gens)]

        def stop() -> None:
            for task in tasks:
                task.cancel()
            for gen in gens:
                gen.close(watch=False)
            gens[0].watch.close()

        async def deltas() -> AsyncIterator[tuple[int, Delta]]:
            left = len(gens)
            while left:
                index, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item

        merged = deltas()
        try:
            if body.stream:
                first = await anext(merged, None)
                return StreamingResponse(_stream_many(gens, merged, first, body, chat, stop),
                                         media_type="text/event-stream", headers=SSE_HEADERS)
            async for _ in merged:
                pass
        except BaseException:
            stop()
            raise
        stop()
        return _final(_best(gens, width, body.n), body, chat, _usage(gens, width))

    def _best(gens: list[Generation], width: int, n: int) -> list[Generation]:
        """Of each prompt's `width` choices, the n with the highest cumulative log probability (the
        earlier choice on a tie), in that order; all of them when width == n."""
        if width == n:
            return gens
        best = []
        for start in range(0, len(gens), width):
            group = gens[start:start + width]
            ranked = sorted(range(width), key=lambda j: (-sum(lp or 0.0 for lp in group[j].logprobs), j))
            best += [group[j] for j in ranked[:n]]
        return best

    def _logprobs(gen_or_delta, body, chat: bool, offset: int = 0) -> dict[str, Any] | None:
        g = gen_or_delta
        if chat:
            return chat_logprobs(tokenizer, g.token_ids, g.logprobs, g.top_logprobs) if body.logprobs else None
        if body.logprobs is None:
            return None
        return completion_logprobs(tokenizer, g.token_ids, g.logprobs, g.top_logprobs, offset, body.logprobs)

    def _usage(gens: list[Generation], n: int) -> dict[str, int]:
        """Each prompt counted once (its n choices, consecutive in `gens`, share it), every choice's output
        (with best_of, the ones not returned too: they were generated)."""
        prompt = sum(len(g.prompt_ids) for g in gens[::n])
        completion = sum(len(g.token_ids) for g in gens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _final(gens: list[Generation], body, chat: bool, usage: dict[str, int] | None = None) -> dict[str, Any]:
        out = []
        for index, gen in enumerate(gens):
            choice: dict[str, Any] = {"index": index, "finish_reason": gen.finish_reason,
                                      "logprobs": _logprobs(gen, body, chat)}
            call = tool_calls.parse_call(gen.text.sent, gen.tools) if chat and gen.tools else None
            if call is not None:
                choice["message"] = {"role": "assistant", "content": None,
                                     "tool_calls": [call.to_openai(tool_calls.call_id(gen.request_id))]}
                choice["finish_reason"] = "tool_calls"
            elif chat:
                choice["message"] = {"role": "assistant", "content": gen.text.sent}
            else:
                choice["text"] = gen.echo + gen.text.sent
            if body.return_token_ids:
                choice["prompt_token_ids"] = gen.prompt_ids
                choice["token_ids"] = gen.token_ids
            out.append(choice)
        return {"id": gens[0].request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": settings.model_name, "choices": out,
                "usage": usage or _usage(gens, body.n)}

    class _Chunks:
        """The SSE chunks of one response: openings, one choice's delta, the usage."""

        def __init__(self, gens: list[Generation], body, chat: bool) -> None:
            self.gens, self.body, self.chat = gens, body, chat
            self.created = int(time.time())
            self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
            self.offsets = [0] * len(gens)
            self.sent_first = [False] * len(gens)
            self.tool_streams = [tool_calls.CallStream(g.tools, tool_calls.call_id(g.request_id)) for g in gens]
            self.held_ids: list[list[int]] = [[] for _ in gens]  # token ids of text held back (tool calls)

        def event(self, choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
            gen = self.gens[0]
            data = {"id": gen.request_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                    "created": self.created, "model": settings.model_name,
                    "choices": [] if choice is None else [choice]}
            if self.include_usage:  # OpenAI's shape: null on every chunk but the last, which has no choices
                data["usage"] = usage
            # "REQUEST_ID:POSITION" resumes a single choice (server/resume.py); several have no resume yet
            return _sse(data, f"{gen.request_id}:{len(gen.token_ids)}" if len(self.gens) == 1 else None)

        def openings(self) -> list[str]:
            """Chat: each choice's role; completions with echo: each prompt's text."""
            events = []
            for index, gen in enumerate(self.gens):
                if gen.skip:  # a resumed stream's client has its opening already
                    continue
                if self.chat:
                    opening: dict[str, Any] = {"index": index, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}
                    if self.body.return_token_ids:
                        opening["prompt_token_ids"] = gen.prompt_ids
                    events.append(self.event(opening))
                elif gen.echo:
                    events.append(self.event({"index": index, "text": gen.echo, "logprobs": None,
                                              "finish_reason": None}))
            return events

        def delta(self, index: int, delta: Delta) -> str:
            gen, body = self.gens[index], self.body
            choice: dict[str, Any] = {"index": index, "logprobs": _logprobs(delta, body, self.chat, self.offsets[index]),
                                      "finish_reason": delta.finish_reason}
            if self.chat and gen.tools:
                choice["delta"], reason = self.tool_streams[index].feed(delta.text, delta.finish_reason)
                choice["finish_reason"] = reason
                if not choice["delta"] and reason is None:
                    self.held_ids[index] += delta.token_ids
                    return ""  # held back: it may be part of a call
            elif self.chat:
                choice["delta"] = {"content": delta.text} if delta.text or not delta.finish_reason else {}
            else:
                choice["text"] = delta.text
                if body.return_token_ids and not self.sent_first[index]:
                    choice["prompt_token_ids"] = gen.prompt_ids
            self.offsets[index] += len(delta.text)
            self.sent_first[index] = True
            if body.return_token_ids:
                choice["token_ids"] = self.held_ids[index] + delta.token_ids
            self.held_ids[index] = []
            return self.event(choice)

        def usage(self) -> list[str]:
            return [self.event(None, _usage(self.gens, self.body.n))] if self.include_usage else []

    async def _stream(gen: Generation, first: Delta | None, body, chat: bool) -> AsyncIterator[str]:
        chunks = _Chunks([gen], body, chat)
        try:
            for event in chunks.openings():
                yield event
            delta = first
            while delta is not None:
                if event := chunks.delta(0, delta):  # empty: held back (a tool call's start)
                    yield event
                delta = await gen.next()
            for event in chunks.usage():
                yield event
            if gen.keyed is not None and frontend.delivery is not None:
                record_end(frontend.delivery, gen.keyed, gen.finish_reason, len(gen.token_ids))
        except ApiError as e:
            yield _sse(e.body())
        except ClientGone:
            return  # no one to tell (`finally` aborts the request)
        finally:
            gen.close()
        yield _sse("[DONE]")

    async def _stream_many(gens: list[Generation], merged: AsyncIterator[tuple[int, Delta]],
                           first: tuple[int, Delta] | None, body, chat: bool, stop) -> AsyncIterator[str]:
        chunks = _Chunks(gens, body, chat)
        try:
            for event in chunks.openings():
                yield event
            item = first
            while item is not None:
                if event := chunks.delta(*item):
                    yield event
                item = await anext(merged, None)
            for event in chunks.usage():
                yield event
        except ApiError as e:
            yield _sse(e.body())
        except ClientGone:
            return
        finally:
            stop()
        yield _sse("[DONE]")

    app.include_router(v1)

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
        if server.draining is not None:
            return JSONResponse({"status": "draining", "problems": [f"{server.draining}: draining"]},
                                status_code=503)
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
        return cluster_json(state, dict(cluster_info_provider.pids), server.frontend_entry(),
                            nodes=getattr(cluster_info_provider, "nodes", None))

    @app.get("/admin/recovery", tags=["admin"], dependencies=[Depends(require_admin)])
    async def admin_recovery() -> dict[str, Any]:
        """Per fault record (any component: a worker declared dead, a Redis, controller, fork server or
        supervisor that exited), newest first: its cause as observed, detection time, time until a
        replacement served and until redundancy was restored, and the stall of the requests in flight
        (see server/recovery.py for the definitions)."""
        return {"faults": server.metrics.recovery.table()}

    @app.get("/admin/timeseries", tags=["admin"], dependencies=[Depends(require_admin)])
    async def admin_timeseries() -> dict[str, Any]:
        """One sample per monitor pass: tokens/s, mean inter-token latency, running and waiting requests."""
        return {"model": settings.model_name, "series": list(server.metrics.series)}

    controller = getattr(cluster_info_provider, "client", None) or getattr(cluster_info_provider,
                                                                           "controller_address", None)
    if controller is not None:  # datapath fault injection for chaos tests (admin_faults.py); scale, rebalance
        app.include_router(faults_router(controller, [Depends(require_admin)]))
        app.include_router(cluster_router(controller, [Depends(require_admin)]))

    if hasattr(cluster_info_provider, "kill_node"):
        @app.post("/admin/node-kill", tags=["admin"], dependencies=[Depends(require_admin)], responses=ERROR_RESPONSES)
        async def admin_node_kill(body: NodeKillRequest) -> dict[str, Any]:
            """Chaos: take one node down at once, through the launcher's backend (under Ray its raylet
            is killed, so this works across real hosts); what it ran is replaced like any death."""
            try:
                await run_in_threadpool(cluster_info_provider.kill_node, body.node)
            except ResilientMoeError as e:
                raise ApiError(400, str(e), param="node") from None
            return {"node": body.node, "killed": True}

    @app.get("/dashboard", tags=["admin"], response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """The SRE page. It holds no data itself: it reads the admin token from the URL fragment
        (#token=...), which browsers never send to the server, and polls the admin endpoints."""
        return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"))

    return app

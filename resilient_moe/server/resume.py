"""Idempotency-Key and Last-Event-ID at the API: which request an HTTP request names, and its errors.

    Idempotency-Key: K     send the same request again (same body) after a broken connection, to any
                           frontend: it attaches to the request running or finished under K (a second
                           one is never started); a non-streaming one that finished is answered from
                           its stored result, without recomputation.
    Last-Event-ID: R:P     with K, a stream resumes after position P (the `id:` of the last event the
                           client read); without it, it starts from the first token.

Errors, all OpenAI-style, never a 5xx: a malformed key or event id (400), Last-Event-ID without a key
(400), an event id of another request than the key's (400), an unknown key with Last-Event-ID (404:
nothing to resume, perhaps expired), the key used with another body (409), and a server without the
cluster's Redis (400: keys need it). Records are kept by server/idempotency.py.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from resilient_moe.server.idempotency import (
    IdempotencyError,
    RequestRecord,
    RequestStore,
    body_hash,
    check_key,
    parse_last_event_id,
    scope_of,
)
from resilient_moe.server.protocol import ApiError


@dataclass
class Keyed:
    """A request sent with an Idempotency-Key, once its record was claimed or found."""

    scope: str
    key: str
    record: RequestRecord
    created: bool  # this request claimed the key (it runs here); else it attaches
    keep_s: float  # how long it outlives its frontend or its client (resume_grace_s)
    delivered: list[tuple[int, float | None, list | None]] = field(default_factory=list)


def _api_error(e: IdempotencyError) -> ApiError:
    return ApiError(e.status, str(e), param=e.param, code=e.code)


async def keyed_request(store: RequestStore | None, request: Request, body, gen, api_key: str | None,
                        keep_s: float, frontend_name: str) -> Keyed | None:
    """The Keyed of an HTTP request that carries an Idempotency-Key (None without one); fixes `gen`'s
    request id, seed and skip to the request the key names. Raises ApiError (see the module doc)."""
    key = request.headers.get("idempotency-key")
    last = request.headers.get("last-event-id")
    if key is None:
        if last is not None:
            raise ApiError(400, "Last-Event-ID resumes a stream only together with the Idempotency-Key it was "
                                "sent with", param="Last-Event-ID", code="missing_idempotency_key")
        return None
    if store is None:
        raise ApiError(400, "Idempotency-Key needs the cluster's Redis, and this server runs without one "
                            "(kv_checkpoint off)", param="Idempotency-Key", code="idempotency_unavailable")
    try:
        check_key(key)
        resumed_id, position = parse_last_event_id(last) if last is not None else ("", 0)
    except IdempotencyError as e:
        raise _api_error(e) from None
    scope = scope_of(api_key)
    digest = body_hash(body.model_dump(mode="json", exclude_unset=True))
    if gen.seed is None:
        gen.seed = secrets.randbits(63)  # one stream of random numbers, whichever frontend runs it
    if last is not None and await run_in_threadpool(store.get, scope, key) is None:
        raise ApiError(404, f"no request under Idempotency-Key {key!r} to resume (never sent here, or expired)",
                       param="Idempotency-Key", code="idempotency_key_not_found")
    mine = RequestRecord(gen.request_id, digest, gen.prompt_ids, gen.params.to_dict(), gen.seed,
                         bool(getattr(body, "stream", False)), frontend=frontend_name, created=time.time())
    try:
        record, created = await run_in_threadpool(store.claim, scope, key, mine)
    except ValueError as e:
        raise ApiError(400, f"Idempotency-Key {key!r}: {e}", param="Idempotency-Key") from None
    keyed = Keyed(scope, key, record, created, keep_s)
    if created:
        return keyed
    if record.body != digest:
        raise ApiError(409, f"Idempotency-Key {key!r} was sent with another request body; a key names one request "
                            "(use a new key for a new request)", param="Idempotency-Key", code="idempotency_conflict")
    if last is not None and resumed_id != record.request_id:
        raise ApiError(400, f"Last-Event-ID names request {resumed_id!r}, but Idempotency-Key {key!r} names "
                            f"{record.request_id!r}", param="Last-Event-ID", code="last_event_id_mismatch")
    gen.request_id, gen.seed, gen.skip = record.request_id, record.seed, position
    keyed.delivered = await run_in_threadpool(store.delivered, record.request_id)
    return keyed


def record_end(delivery, keyed: Keyed, finish_reason: str | None, length: int,
               result: dict[str, Any] | None = None) -> None:
    """A keyed request ended here: its record says so (with its `length` in tokens, and a non-streaming
    one's result), and its key and delivered log are kept for idempotency_ttl_s. Written through the
    delivery log (a DeliveryLog), after the request's last tokens."""
    state = "failed" if finish_reason in (None, "error") else "finished"
    fields: dict[str, Any] = {"state": state, "finish_reason": finish_reason or "", "length": length,
                              "request_id": keyed.record.request_id}
    if result is not None:
        fields["result"] = result
    delivery.update(keyed.scope, keyed.key, finished=True, **fields)

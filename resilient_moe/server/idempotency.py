"""Requests that outlive their frontend: records of requests sent with an `Idempotency-Key`, and the log
of the tokens each one delivered, in Redis (kvstore/keys.py has the schema), so that any frontend can
resume any stream.

A client that sends `Idempotency-Key: K` may send the same request again (same body, same key) to any
frontend after a broken connection: it is attached to the request already running or finished under K,
never a second one. The first frontend to see K claims it atomically (`claim`, a Lua script) and runs
the request; every later one reads the record and attaches. The same key with another body is a
conflict (409). Keys are scoped per API key (a hash of it: one client's keys never name another's),
at most MAX_KEY_CHARS long, and expire: resume_grace_s + request_timeout_s after the last change while
the request runs, idempotency_ttl_s after it finished.

The delivered-token log is appended by the frontend that delivers the request, in batches, on a thread
of its own (`DeliveryLog`), never on the request path; an append lands only where the log ends (a
second writer, or a retry, changes nothing). A resuming frontend replays what it needs from it, or,
when the attention worker that ran the request is gone too, resubmits the request from it: decoding is
deterministic, so whatever the log lacks is produced again token-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from resilient_moe.kvstore import keys

log = logging.getLogger("resilient_moe.server")

MAX_KEY_CHARS = 256
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:~+/=")

# KEYS: the record. ARGV: ttl, then field/value pairs. Creates the record unless it exists; returns
# {1} when it created it, else {0, field, value, ...} of the existing one.
CLAIM_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local out = redis.call('HGETALL', KEYS[1])
  table.insert(out, 1, 0)
  return out
end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return {1}
"""

# KEYS: the delivered log. ARGV: ttl, the first new position, then the entries. Appends only where the
# log ends; returns the log's length.
APPEND_SCRIPT = """
local n = redis.call('LLEN', KEYS[1])
if n == tonumber(ARGV[2]) then
  redis.call('RPUSH', KEYS[1], unpack(ARGV, 3, #ARGV))
  n = n + #ARGV - 2
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return n
"""


class IdempotencyError(ValueError):
    """A bad key or a key that names another request: `status` is the HTTP answer."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_CHARS or not set(key) <= _KEY_CHARS:
        raise IdempotencyError(400, f"Idempotency-Key must be 1-{MAX_KEY_CHARS} characters of letters, digits and "
                                    "-_.:~+/=", param="Idempotency-Key", code="invalid_idempotency_key")
    return key


def scope_of(api_key: str | None) -> str:
    """The namespace of a client's keys: a hash of the API key it authenticated with ("" when open)."""
    return hashlib.sha256((api_key or "").encode()).hexdigest()[:16]


def body_hash(body: dict[str, Any]) -> str:
    """What makes two sends "the same request": the request body, canonically encoded."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_last_event_id(value: str) -> tuple[str, int]:
    """`REQUEST_ID:POSITION` (what every SSE event's `id:` line carries) -> (request id, tokens delivered)."""
    request_id, sep, position = value.rpartition(":")
    if not sep or not request_id or not position.isdigit() or len(value) > 512:
        raise IdempotencyError(400, f"Last-Event-ID {value[:80]!r} is not an event id of this server "
                                    "(REQUEST_ID:POSITION)", param="Last-Event-ID", code="invalid_last_event_id")
    return request_id, int(position)


@dataclass
class RequestRecord:
    """A keyed request as the cluster knows it."""

    request_id: str
    body: str  # body_hash of the request
    prompt_ids: list[int]
    params: dict[str, Any]
    seed: int
    stream: bool
    worker: str = ""  # the attention worker it runs on
    frontend: str = ""  # the frontend that runs (or ran) it
    state: str = "running"  # "running", "finished", "failed"
    finish_reason: str = ""  # once finished
    length: int = 0  # once finished: its tokens (the delivered log holds them all once it is this long)
    result: dict[str, Any] | None = None  # the finished non-streaming response
    created: float = 0.0

    def fields(self) -> dict[str, str]:
        out = {}
        for name, value in asdict(self).items():
            out[name] = value if isinstance(value, str) else json.dumps(value)
        return out

    @classmethod
    def from_fields(cls, raw: dict) -> "RequestRecord":
        """From Redis; raises ValueError naming a malformed field (a record we did not write)."""
        fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                  for k, v in raw.items()}
        try:
            return cls(request_id=fields["request_id"], body=fields["body"],
                       prompt_ids=[int(t) for t in json.loads(fields["prompt_ids"])],
                       params=dict(json.loads(fields["params"])), seed=int(json.loads(fields["seed"])),
                       stream=bool(json.loads(fields["stream"])), worker=fields.get("worker", ""),
                       frontend=fields.get("frontend", ""), state=fields.get("state", "running"),
                       finish_reason=fields.get("finish_reason", ""), length=int(json.loads(fields.get("length", "0"))),
                       result=json.loads(fields["result"]) if fields.get("result") not in (None, "null") else None,
                       created=float(json.loads(fields.get("created", "0"))))
        except KeyError as e:
            raise ValueError(f"request record: field {e.args[0]!r} is missing") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"request record: {e}") from None


class RequestStore:
    """Request records and delivered-token logs of one cluster (see the module docstring)."""

    def __init__(self, redis_client, cluster_id: str, running_ttl_s: float, finished_ttl_s: float) -> None:
        self.redis = redis_client
        self.cluster_id = cluster_id
        self.running_ttl = max(1, int(running_ttl_s))
        self.finished_ttl = max(1, int(finished_ttl_s))
        self._claim = redis_client.register_script(CLAIM_SCRIPT)
        self._append = redis_client.register_script(APPEND_SCRIPT)

    def _key(self, scope: str, key: str) -> str:
        return keys.request_key(self.cluster_id, scope, key)

    def claim(self, scope: str, key: str, record: RequestRecord) -> tuple[RequestRecord, bool]:
        """(the record under the key, whether this call created it)."""
        args = [self.running_ttl]
        for name, value in record.fields().items():
            args += [name, value]
        answer = self._claim(keys=[self._key(scope, key)], args=args)
        if int(answer[0]) == 1:
            return record, True
        raw = dict(zip(answer[1::2], answer[2::2]))
        return RequestRecord.from_fields(raw), False

    def get(self, scope: str, key: str) -> RequestRecord | None:
        raw = self.redis.hgetall(self._key(scope, key))
        return RequestRecord.from_fields(raw) if raw else None

    def update(self, scope: str, key: str, finished: bool = False, **fields: Any) -> None:
        """Change fields of a record (worker, frontend, state, result); a finished one keeps its key for
        idempotency_ttl_s, with its delivered log."""
        name = self._key(scope, key)
        values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        ttl = self.finished_ttl if finished else self.running_ttl
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(name, mapping=values)
        pipe.expire(name, ttl)
        if finished and "request_id" in fields:
            pipe.expire(keys.delivered_key(self.cluster_id, fields["request_id"]), ttl)
        pipe.execute()

    def append(self, request_id: str, first: int, entries: list[str], finished: bool = False, client=None) -> None:
        """Append delivered tokens (JSON [token, logprob, top] each) at position `first`."""
        self._append(keys=[keys.delivered_key(self.cluster_id, request_id)],
                     args=[self.finished_ttl if finished else self.running_ttl, first, *entries], client=client)

    def delivered(self, request_id: str) -> list[tuple[int, float | None, list | None]]:
        """The delivered log: (token, logprob, top logprobs) per position."""
        out = []
        for raw in self.redis.lrange(keys.delivered_key(self.cluster_id, request_id), 0, -1):
            token, logprob, top = json.loads(raw)
            out.append((int(token), logprob, [tuple(p) for p in top] if top else None))
        return out


def entry(token_id: int, logprob: float | None, top: list | None) -> str:
    """One delivered-log entry."""
    return json.dumps([token_id, logprob, [list(p) for p in top] if top else None], separators=(",", ":"))


class DeliveryLog:
    """Writes keyed requests' delivered tokens and record changes (its attention worker, its end) to the
    store on a thread of its own, batched: the frontend's I/O thread only puts them on a queue. Failures
    are counted and logged (the log then lags; a resume regenerates what it lacks), never raised into
    the request path."""

    def __init__(self, store: RequestStore) -> None:
        self.store = store
        self.errors = 0
        self.written = 0
        self._queue: "queue.SimpleQueue[tuple | None]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="delivery-log", daemon=True)
        self._thread.start()

    def put(self, request_id: str, position: int, token_entry: str, finished: bool = False) -> None:
        """The token at `position` was delivered (any thread)."""
        self._queue.put(("token", request_id, position, token_entry, finished))

    def update(self, scope: str, key: str, finished: bool = False, **fields: Any) -> None:
        """Change fields of a request record (any thread)."""
        self._queue.put(("record", scope, key, finished, fields))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + 0.005  # gather a step's worth of tokens
            while time.monotonic() < deadline and len(batch) < 4096:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self._flush(batch)
                    return
                batch.append(more)
            self._flush(batch)

    def _flush(self, batch: list[tuple]) -> None:
        tokens: dict[str, tuple[int, list[str], bool]] = {}
        records = []
        for item in batch:
            if item[0] == "record":
                records.append(item[1:])
                continue
            _, request_id, position, token_entry, finished = item
            first, entries, done = tokens.get(request_id, (position, [], False))
            if position == first + len(entries):
                entries.append(token_entry)
            tokens[request_id] = (first, entries, done or finished)
        try:
            pipe = self.store.redis.pipeline(transaction=False)
            for request_id, (first, entries, finished) in tokens.items():
                self.store.append(request_id, first, entries, finished, client=pipe)
            pipe.execute()
            for scope, key, finished, fields in records:
                self.store.update(scope, key, finished, **fields)
            self.written += sum(len(e) for _, e, _ in tokens.values())
        except Exception as e:  # noqa: BLE001 (Redis down or slow: the log lags, nothing else)
            self.errors += 1
            if self.errors in (1, 10, 100, 1000):
                log.warning("cannot write delivered tokens to Redis (%d failures): %s", self.errors, e)

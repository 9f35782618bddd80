"""Every message between a frontend and an attention worker, and its wire form.

They travel as the JSON body of CONTROL frames (frames.py) — never pickled. Token events, one frame
per step per frontend, travel as binary TOKENS frames instead (datapath/token_frames.py). `decode` checks each
field's type and names the first bad one, so a malformed message is rejected, not half-applied.

    submit     frontend -> AW   run a request (resume=True: continue one that produced tokens elsewhere)
    abort      frontend -> AW   drop a request and free its KV
    failed     AW -> frontend   a request cannot complete here (bad input, no live expert replica...)
    started    AW -> frontend   these requests are in the step about to run, their first one here
                                (sent before it runs: if the worker dies in it, they are suspects)
    handover   AW -> frontend   this worker is draining: move these requests to another worker; their
                                KV is committed in the KV store, where the adopter restores it from
    attach     frontend -> AW   a client resumed this request here: deliver it to me from `position` on
                                (its previous frontend died, or the client reconnected elsewhere)
    attached   AW -> frontend   the answer: tokens from position `first` follow, the request's own
                                from now on (a `failed` of kind "not_here" when it does not have it)

A request submitted with `keep_s` > 0 (a client's Idempotency-Key) outlives its frontend: when that
frontend's link breaks the AW keeps decoding it for `keep_s` (unowned) and keeps its token events, and
those of a finished one for as long, for whoever attaches; after that it is aborted. A previous owner
that is still alive hears `failed` of kind "detached".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class MessageError(ValueError):
    """A message body is not valid JSON or breaks the schema; the text names the field."""


@dataclass(frozen=True)
class Submit:
    request_id: str
    prompt_ids: list[int]
    params: dict[str, Any]
    seed: int
    output_ids: list[int] = field(default_factory=list)  # tokens already delivered (resume)
    resume: bool = False  # moved here from a failed attention worker: restore its checkpointed KV if any
    suspect: bool = False  # a worker failed in this request's first step there: admit it alone, one a step
    keep_s: float = 0.0  # > 0: keep it this long when its frontend is gone (see the module docstring)
    type: str = "submit"


@dataclass(frozen=True)
class Abort:
    request_id: str
    type: str = "abort"


@dataclass(frozen=True)
class Failed:
    request_id: str
    message: str
    kind: str = "error"  # "invalid_request", "expert_unavailable", "error"
    type: str = "failed"


@dataclass(frozen=True)
class Started:
    request_ids: list[str]
    type: str = "started"


@dataclass(frozen=True)
class Handover:
    request_ids: list[str]
    type: str = "handover"


@dataclass(frozen=True)
class Attach:
    request_id: str
    position: int = 0
    type: str = "attach"


@dataclass(frozen=True)
class Attached:
    request_id: str
    first: int
    type: str = "attached"


Message = Submit | Abort | Failed | Started | Handover | Attach | Attached
_TYPES = {"submit": Submit, "abort": Abort, "failed": Failed, "started": Started, "handover": Handover,
          "attach": Attach, "attached": Attached}


def encode(message: Message) -> bytes:
    return json.dumps(message.__dict__, separators=(",", ":")).encode()


def decode(body: bytes | memoryview) -> Message:
    try:
        raw = json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MessageError(f"message is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise MessageError("message must be a JSON object")
    kind = raw.get("type")
    cls = _TYPES.get(kind)
    if cls is None:
        raise MessageError(f"unknown message type {kind!r} (known: {', '.join(_TYPES)})")
    fields = set(cls.__dataclass_fields__)
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise MessageError(f"{kind}: unknown field {unknown[0]!r}")
    _check(kind, raw)
    try:
        return cls(**raw)
    except TypeError as e:
        raise MessageError(f"{kind}: {e}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(kind: str, raw: dict[str, Any]) -> None:
    def need(name: str, ok: bool, what: str) -> None:
        if not ok:
            raise MessageError(f"{kind}: field {name!r} must be {what}, got {raw.get(name)!r}")

    if kind in ("submit", "abort", "failed", "attach", "attached"):
        need("request_id", isinstance(raw.get("request_id"), str) and 0 < len(raw["request_id"]) <= 256,
             "a string of 1-256 characters")
    if kind == "submit":
        need("prompt_ids", isinstance(raw.get("prompt_ids"), list) and all(_is_int(t) for t in raw["prompt_ids"]),
             "a list of integers")
        need("params", isinstance(raw.get("params"), dict), "an object")
        need("seed", _is_int(raw.get("seed")), "an integer")
        out = raw.get("output_ids", [])
        need("output_ids", isinstance(out, list) and all(_is_int(t) for t in out), "a list of integers")
        need("resume", isinstance(raw.get("resume", False), bool), "true or false")
        need("suspect", isinstance(raw.get("suspect", False), bool), "true or false")
        keep = raw.get("keep_s", 0.0)
        need("keep_s", isinstance(keep, (int, float)) and not isinstance(keep, bool) and 0 <= keep <= 86400,
             "a number of seconds in [0, 86400]")
    elif kind == "attach":
        need("position", _is_int(raw.get("position", 0)) and raw.get("position", 0) >= 0, "an integer >= 0")
    elif kind == "attached":
        need("first", _is_int(raw.get("first")) and raw["first"] >= 0, "an integer >= 0")
    elif kind == "failed":
        need("message", isinstance(raw.get("message"), str), "a string")
    elif kind in ("started", "handover"):
        ids = raw.get("request_ids")
        need("request_ids", isinstance(ids, list) and all(isinstance(r, str) and 0 < len(r) <= 256 for r in ids),
             "a list of request ids")

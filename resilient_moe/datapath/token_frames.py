"""Token events (attention worker -> frontend) as the binary body of a TOKENS frame (frames.py).

Once per step an attention worker sends each frontend one TOKENS frame with the events of its
requests: the token sampled at a position, its log probability and the most likely tokens when the
request asked for them, and the finish reason on a request's last token. The body, little-endian:

    offset          size      field
    0               4         n            events in the frame (at most MAX_EVENTS)
    4               4         id_bytes     bytes of the request-id section
    8               24 * n    event records, in order:
                                0   4  position     u32  position in the request's output
                                4   4  token_id     i32  >= 0
                                8   8  logprob      f64  (flags bit 0; zero and ignored without it)
                                16  2  id_len       u16  1..256 bytes of this event's request id
                                18  1  finish       u8   0 none, 1 stop, 2 length, 3 abort, 4 error
                                19  1  flags        u8   bit 0: logprob present; bit 1: top list present
                                20  1  top_count    u8   0..20 (0 unless flags bit 1)
                                21  3  (zero)
    8 + 24 n        id_bytes  request ids, UTF-8, concatenated in event order (sum of id_len)
    ...             12 * m    top lists, event by event: top_count x (token i32 >= 0, logprob f64)

and nothing after (m is the sum of top_count). `decode_tokens` checks every field (lengths add up,
ids are valid UTF-8 of 1 to 256 bytes, codes and flags are known, padding is zero, no NaN, no
negative token) and raises `TokenFrameError` naming the first bad one: a frontend counts and drops
a malformed frame, never acts on part of it. The frame's own checksum guards against corruption on
the link; these checks guard against a peer that writes nonsense.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple, Protocol

MAX_EVENTS = 1 << 16
MAX_TOP = 20  # SamplingParams.logprobs allows 0..20
MAX_ID_BYTES = 256
FINISH_REASONS = (None, "stop", "length", "abort", "error")
_FINISH_CODE = {reason: code for code, reason in enumerate(FINISH_REASONS)}
HAS_LOGPROB, HAS_TOP = 1, 2

_COUNTS = struct.Struct("<II")
_EVENT = struct.Struct("<IidHBBB3s")
_TOP = struct.Struct("<id")
_NO_PAD = bytes(3)
assert _EVENT.size == 24 and _TOP.size == 12


class TokenFrameError(ValueError):
    """A TOKENS body breaks the layout; the message names the first bad field."""


class TokenEventLike(Protocol):
    request_id: str
    position: int
    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...] | None
    finish_reason: str | None


class TokenEventRecord(NamedTuple):
    """One decoded event."""

    request_id: str
    position: int
    token_id: int
    logprob: float | None
    finish_reason: str | None
    top_logprobs: list[tuple[int, float]] | None


def encode_tokens(events: list[TokenEventLike]) -> bytes:
    """The TOKENS body of `events` (engine TokenEvents, or anything with their fields)."""
    if len(events) > MAX_EVENTS:
        raise ValueError(f"{len(events)} token events in one frame (at most {MAX_EVENTS})")
    ids = [e.request_id.encode() for e in events]
    records, tops = [], []
    for e, rid in zip(events, ids):
        flags = 0
        if e.logprob is not None:
            flags |= HAS_LOGPROB
        top = e.top_logprobs
        if top is not None:
            flags |= HAS_TOP
            tops.extend(_TOP.pack(t, lp) for t, lp in top)
        records.append(_EVENT.pack(e.position, e.token_id, 0.0 if e.logprob is None else e.logprob, len(rid),
                                   _FINISH_CODE[e.finish_reason], flags, 0 if top is None else len(top), _NO_PAD))
    return b"".join([_COUNTS.pack(len(events), sum(len(r) for r in ids)), *records, *ids, *tops])


def decode_tokens(body: bytes | memoryview) -> list[TokenEventRecord]:
    """The events of a TOKENS body; raises TokenFrameError on anything that breaks the layout."""
    body = memoryview(body).cast("B")
    size = len(body)
    if size < _COUNTS.size:
        raise TokenFrameError(f"body of {size} bytes is shorter than its {_COUNTS.size}-byte counts")
    n, id_bytes = _COUNTS.unpack_from(body, 0)
    if n > MAX_EVENTS:
        raise TokenFrameError(f"n = {n} events (at most {MAX_EVENTS})")
    ids_at = _COUNTS.size + _EVENT.size * n
    if ids_at + id_bytes > size:
        raise TokenFrameError(f"{n} events and {id_bytes} bytes of request ids need {ids_at + id_bytes} bytes, "
                              f"the body has {size}")
    records = list(_EVENT.iter_unpack(body[_COUNTS.size:ids_at]))
    tops_at = ids_at + id_bytes
    top_total = sum(r[6] for r in records)
    if tops_at + _TOP.size * top_total != size:
        raise TokenFrameError(f"body is {size} bytes; its counts make it {tops_at + _TOP.size * top_total}")
    if sum(r[3] for r in records) != id_bytes:
        raise TokenFrameError(f"request ids add up to {sum(r[3] for r in records)} bytes, id_bytes says {id_bytes}")
    events = []
    at, top_at = ids_at, tops_at
    for i, (position, token, logprob, id_len, finish, flags, top_count, pad) in enumerate(records):
        if not 0 < id_len <= MAX_ID_BYTES:
            raise TokenFrameError(f"event {i}: id_len {id_len} (1..{MAX_ID_BYTES})")
        if token < 0:
            raise TokenFrameError(f"event {i}: token_id {token} is negative")
        if finish >= len(FINISH_REASONS):
            raise TokenFrameError(f"event {i}: unknown finish code {finish}")
        if flags & ~(HAS_LOGPROB | HAS_TOP) or pad != _NO_PAD:
            raise TokenFrameError(f"event {i}: unknown flags {flags:#x} or padding not zero")
        if top_count > MAX_TOP or (top_count and not flags & HAS_TOP):
            raise TokenFrameError(f"event {i}: top_count {top_count} (at most {MAX_TOP}, and only with a top list)")
        if math.isnan(logprob) or (not flags & HAS_LOGPROB and logprob != 0.0):
            raise TokenFrameError(f"event {i}: logprob {logprob} (not NaN; zero when absent)")
        try:
            request_id = bytes(body[at:at + id_len]).decode()
        except UnicodeDecodeError as e:
            raise TokenFrameError(f"event {i}: request id is not UTF-8 ({e.reason})") from None
        at += id_len
        top = None
        if flags & HAS_TOP:
            top = list(_TOP.iter_unpack(body[top_at:top_at + _TOP.size * top_count]))
            top_at += _TOP.size * top_count
            if any(t < 0 or math.isnan(lp) for t, lp in top):
                raise TokenFrameError(f"event {i}: a top-list token is negative or its logprob NaN")
        events.append(TokenEventRecord(request_id, position, token, logprob if flags & HAS_LOGPROB else None,
                                       FINISH_REASONS[finish], top))
    return events

"""Token events travel as binary TOKENS frames (datapath/token_frames.py): every field survives the
round trip exactly, every malformed body is rejected with the field it breaks named, no input makes
the decoder fail any other way, and a frontend counts and drops a bad frame and keeps serving."""

from __future__ import annotations

import concurrent.futures
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import wait_until
from resilient_moe.datapath.dial import connect, listen
from resilient_moe.datapath.frames import FrameHeader, FrameKind
from resilient_moe.datapath.link import Outbox, PeerInfo
from resilient_moe.datapath.poller import Poller
from resilient_moe.datapath.token_frames import (
    FINISH_REASONS,
    MAX_TOP,
    TokenFrameError,
    decode_tokens,
    encode_tokens,
)
from resilient_moe.engine.config import SamplingParams
from resilient_moe.engine.sequence import TokenEvent
from resilient_moe.server.frontend import Frontend, RequestHandle, _AttentionLink

ids = st.text(min_size=1, max_size=64).filter(lambda s: 0 < len(s.encode()) <= 256)
logprobs = st.one_of(st.none(), st.floats(max_value=0.0, allow_nan=False))
tops = st.one_of(st.none(), st.lists(st.tuples(st.integers(0, 2**31 - 1), st.floats(max_value=0.0, allow_nan=False)),
                                     max_size=MAX_TOP).map(tuple))
events = st.lists(st.builds(TokenEvent, ids, st.integers(0, 2**32 - 1), st.integers(0, 2**31 - 1), logprobs, tops,
                            st.sampled_from(FINISH_REASONS)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(events)
def test_every_field_round_trips(batch):
    decoded = decode_tokens(encode_tokens(batch))
    assert len(decoded) == len(batch)
    for got, sent in zip(decoded, batch):
        assert (got.request_id, got.position, got.token_id, got.logprob, got.finish_reason) == \
            (sent.request_id, sent.position, sent.token_id, sent.logprob, sent.finish_reason)
        assert got.top_logprobs == (None if sent.top_logprobs is None else list(sent.top_logprobs))


@settings(max_examples=300, deadline=None)
@given(events.filter(bool), st.data())
def test_no_corruption_escapes_as_anything_but_a_named_rejection(batch, data):
    wire = bytearray(encode_tokens(batch))
    at = data.draw(st.integers(0, len(wire) - 1))
    wire[at] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(wire)))
    for body in (bytes(wire), bytes(wire[:cut]), bytes(wire) + b"\0"):
        try:
            decode_tokens(body)
        except TokenFrameError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_rejected_or_decoded(body):
    try:
        decode_tokens(body)
    except TokenFrameError:
        pass


def one(**fields) -> bytes:
    event = dict(request_id="req-1", position=3, token_id=7, logprob=-0.5, top_logprobs=((1, -0.1),),
                 finish_reason=None) | fields
    return encode_tokens([TokenEvent(**event)])


def patched(body: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(body)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


EVENT = 8  # the first event record
BAD = {
    "shorter than its": b"\1\0",
    "events (at most": patched(one(), 0, "<I", 1 << 20),
    "need": patched(one(), 0, "<I", 2),
    "body is": one() + b"x",
    "add up to": patched(one(), EVENT + 16, "<H", 4),
    "id_len 0": patched(patched(one()[:EVENT + 24] + one()[EVENT + 24 + 5:], EVENT + 16, "<H", 0), 4, "<I", 0),
    "not UTF-8": one(request_id="\u00e9").replace("\u00e9".encode(), b"\xff\xfe"),
    "negative": patched(one(), EVENT + 4, "<i", -1),
    "unknown finish code": patched(one(), EVENT + 18, "<B", len(FINISH_REASONS)),
    "unknown flags": patched(one(), EVENT + 19, "<B", 7),
    "padding": patched(one(), EVENT + 21, "<B", 1),
    "top_count": patched(one(top_logprobs=None), EVENT + 20, "<B", 1) + bytes(12),  # a top entry without the flag
    "NaN": patched(one(), EVENT + 8, "<d", float("nan")),
    "zero when absent": patched(one(logprob=None), EVENT + 8, "<d", -1.0),
}


@pytest.mark.parametrize("words", list(BAD))
def test_malformed_bodies_name_the_field(words):
    with pytest.raises(TokenFrameError, match=re.escape(words)):
        decode_tokens(BAD[words])


def test_a_frontend_counts_and_drops_a_malformed_tokens_frame_and_keeps_serving():
    """An 'attention worker' sends a frontend a bad TOKENS frame, then a good one: the bad one is
    counted and dropped, the good one's tokens reach the request."""
    frontend = Frontend("127.0.0.1:1", name="frontend-test")
    aw_id = PeerInfo("aw-0", 0x01000000, 1, 1)
    listener = listen("tcp:127.0.0.1:0", aw_id, Poller())
    connecting = concurrent.futures.ThreadPoolExecutor(1).submit(connect, listener.address, frontend.identity,
                                                                 frontend.poller, to="aw-0")
    aw_end = wait_until(listener.accept, 5, "the link")
    link = connecting.result(5)
    try:
        entry = frontend.links["aw-0"] = _AttentionLink(1, Outbox(link))
        handle = RequestHandle("req-1", [1, 2], SamplingParams(max_tokens=2), seed=0, worker="aw-0")
        frontend.requests["req-1"] = handle
        aw_end.send(FrameHeader(FrameKind.TOKENS), body=BAD["unknown finish code"])
        aw_end.send(FrameHeader(FrameKind.TOKENS), body=encode_tokens([TokenEvent("req-1", 0, 42, None, None, None),
                                                                       TokenEvent("req-1", 1, 43, None, None, "length")]))
        wait_until(lambda: frontend._drain("aw-0", entry) or handle.done, 5, "the good frame")
        assert frontend.token_frames_rejected == 1 and frontend.stats()["token_frames_rejected"] == 1.0
        assert handle.token_ids == [42, 43] and handle.finish_reason == "length"
    finally:
        link.close()
        aw_end.close()
        listener.close()
        frontend.client.close()

"""Frames: the byte layout, its checks, the checksum, and the native codec's agreement with frames.py."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_moe import _native
from resilient_moe.datapath.frames import (
    FRAME_VERSION,
    HEADER_SIZE,
    MAX_DIMS,
    DType,
    FrameError,
    FrameFlags,
    FrameHeader,
    FrameKind,
    decode,
    encode,
    frame_from_fields,
    frame_size,
    native_args,
    tensor_offset,
)

# ---------------------------------------------------------------------------------------- CRC-32C


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """Bit at a time, straight from the definition (reflected 0x82F63B78, init/final xor ~0)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


CRC_PATHS = [0, 1, 2, 3, 4, 5]  # auto, software, one hw stream, 3 streams (tables / PCLMUL), hybrid


@pytest.mark.parametrize("impl", CRC_PATHS)
def test_crc32c_known_vectors(impl: int) -> None:
    # RFC 3720 (iSCSI) appendix B.4 and the usual check value.
    vectors = {
        b"": 0,
        b"123456789": 0xE3069283,
        bytes(32): 0x8A9136AA,
        b"\xff" * 32: 0x62A8AB43,
        bytes(range(32)): 0x46DD794E,
        bytes(range(31, -1, -1)): 0x113FDB5C,
    }
    for data, expected in vectors.items():
        assert _native.crc32c(data, 0, impl) == expected, (impl, data[:8])


@pytest.mark.parametrize("impl", CRC_PATHS)
def test_crc32c_matches_reference_on_random_data(impl: int) -> None:
    rng = random.Random(impl)
    blob = rng.randbytes(40_000)
    # Lengths around every block and chunk boundary of the fast paths, at odd alignments.
    lengths = [0, 1, 7, 8, 63, 64, 65, 191, 192, 193, 767, 768, 3071, 3072, 3584, 7167, 7168, 12288, 20000, 39_000]
    for n in lengths:
        start = rng.randrange(0, 64)
        data = blob[start : start + n]
        seed = rng.randrange(0, 1 << 32)
        assert _native.crc32c(data, seed, impl) == crc32c_reference(data, seed), (impl, n)


def test_crc32c_paths_agree_on_large_buffers_and_chain() -> None:
    rng = random.Random(7)
    blob = rng.randbytes(3 << 20)
    for n in (65_536, 1 << 20, (3 << 20) - 5):
        values = {_native.crc32c(blob[:n], 0, impl) for impl in CRC_PATHS}
        assert len(values) == 1, n
    a, b = blob[:100_000], blob[100_000:250_001]
    assert _native.crc32c(b, _native.crc32c(a)) == _native.crc32c(a + b)


# ---------------------------------------------------------------------------------------- strategies

TORCH_DTYPES = {
    DType.FLOAT32: torch.float32,
    DType.BFLOAT16: torch.bfloat16,
    DType.FLOAT16: torch.float16,
    DType.INT32: torch.int32,
    DType.INT64: torch.int64,
    DType.UINT8: torch.uint8,
}

u64 = st.integers(0, (1 << 64) - 1)


@st.composite
def headers(draw) -> FrameHeader:
    return FrameHeader(
        kind=draw(st.sampled_from(list(FrameKind))),
        sender=draw(st.integers(0, (1 << 32) - 1)),
        incarnation=draw(u64),
        epoch=draw(u64),
        step=draw(u64),
        seq=draw(u64),
        layer=draw(st.integers(0, 65535)),
        micro_batch=draw(st.integers(0, 65535)),
        flags=draw(st.sampled_from([FrameFlags.NONE, FrameFlags.REPLAY, FrameFlags.ERROR,
                                    FrameFlags.REPLAY | FrameFlags.ERROR])),
    )


@st.composite
def payloads(draw) -> dict:
    """Arguments of encode(): a tensor and/or aux, or a JSON body."""
    choice = draw(st.sampled_from(["tensor", "aux_only", "nothing", "body"]))
    if choice == "body":
        obj = draw(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=16), max_size=5))
        return {"body": json.dumps(obj).encode()}
    aux = None
    if choice == "aux_only" or draw(st.booleans()):
        aux = torch.tensor(draw(st.lists(st.integers(-(1 << 31), (1 << 31) - 1), min_size=1, max_size=40)),
                           dtype=torch.int32)
    if choice != "tensor":
        return {"aux": aux}
    code = draw(st.sampled_from(list(TORCH_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=MAX_DIMS)))
    count = 1
    for d in shape:
        count *= d
    raw = draw(st.binary(min_size=count * TORCH_DTYPES[code].itemsize, max_size=count * TORCH_DTYPES[code].itemsize))
    tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(TORCH_DTYPES[code]).reshape(shape) if count else torch.empty(shape, dtype=TORCH_DTYPES[code])
    return {"aux": aux, "tensor": tensor}


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Bitwise equality (NaN payloads included)."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(b.contiguous().reshape(-1).view(torch.uint8).numpy())


def native_encode(header: FrameHeader, **payload) -> bytes:
    """The native codec's bytes for a frame: sealed prefix + tensor bytes."""
    args, keep = native_args(header, header.sender, header.incarnation, **payload)
    prefix = _native.frame_prefix(*args)
    data = args[13]
    if data is None or args[14] == 0 and not isinstance(data, bytes):
        return prefix
    if isinstance(data, bytes):
        return prefix + data
    return prefix + bytes(_native.wrap(keep, data, args[14]))


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------- round trips


@SETTINGS
@given(headers(), payloads())
def test_round_trip_python_and_native_agree(header: FrameHeader, payload: dict) -> None:
    wire = encode(header, **payload)
    assert bytes(native_encode(header, **payload)) == bytes(wire)  # same bytes from both encoders

    frame = decode(memoryview(wire))
    fields = _native.frame_parse(memoryview(wire))
    assert not isinstance(fields, str), fields
    native = frame_from_fields(fields)
    for got in (frame, native):
        h = got.header
        assert (h.kind, h.sender, h.incarnation, h.epoch, h.step, h.seq, h.layer, h.micro_batch, h.flags) == (
            header.kind, header.sender, header.incarnation, header.epoch, header.step, header.seq, header.layer,
            header.micro_batch, header.flags,
        )
        assert h.checksum == header.checksum
        if "body" in payload:
            assert bytes(got.body) == payload["body"]
            assert h.dtype is DType.UINT8
        else:
            assert same_bits(got.aux, payload.get("aux"))
            assert same_bits(got.tensor, payload.get("tensor"))
    assert frame.header == native.header
    assert len(wire) == HEADER_SIZE + header.payload_len


@SETTINGS
@given(headers(), payloads(), st.data())
def test_any_single_corrupted_byte_is_rejected(header: FrameHeader, payload: dict, data) -> None:
    wire = bytearray(encode(header, **payload))
    at = data.draw(st.integers(0, len(wire) - 1))
    wire[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(FrameError):
        decode(memoryview(wire))
    assert isinstance(_native.frame_parse(memoryview(wire)), str)


@SETTINGS
@given(headers(), payloads(), st.data())
def test_truncated_frames_are_rejected(header: FrameHeader, payload: dict, data) -> None:
    wire = bytes(encode(header, **payload))
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(FrameError):
        decode(memoryview(wire[:cut]))
    assert isinstance(_native.frame_parse(wire[:cut]), str)


def test_frame_size_counts_an_empty_tensor_after_aux() -> None:
    header = FrameHeader(FrameKind.DISPATCH)
    aux = torch.arange(3, dtype=torch.int32)
    wire = encode(header, aux=aux, tensor=torch.empty(0, 7))
    assert len(wire) == tensor_offset(12) == frame_size(12, 0)
    frame = decode(memoryview(wire))
    assert frame.tensor.shape == (0, 7) and frame.aux.tolist() == [0, 1, 2]
    assert frame_size(12, None) == HEADER_SIZE + 12


# ---------------------------------------------------------------------------------------- named checks


def good_frame() -> bytearray:
    return encode(FrameHeader(FrameKind.DISPATCH, seq=3), aux=torch.arange(4, dtype=torch.int32),
                  tensor=torch.ones(2, 3))


def reseal(wire: bytearray) -> bytearray:
    """Recompute the checksum so that only the field checks can catch what was changed."""
    struct.pack_into("<I", wire, 80, 0)
    struct.pack_into("<I", wire, 80, _native.crc32c(bytes(wire)))
    return wire


def patch(offset: int, fmt: str, value: int, seal: bool = False) -> bytearray:
    wire = good_frame()
    struct.pack_into(fmt, wire, offset, value)
    return reseal(wire) if seal else wire


@pytest.mark.parametrize(
    "wire, words",
    [
        (patch(0, "<I", 0x46454F52), "magic"),
        (patch(4, "<H", FRAME_VERSION - 1), "version"),  # an older build's frames (DISPATCH laid out otherwise)
        (patch(4, "<H", FRAME_VERSION + 1), "version"),
        (patch(6, "<B", 0), "FrameKind"),
        (patch(6, "<B", max(FrameKind) + 1), "FrameKind"),
        (patch(52, "<B", 7), "DType"),
        (patch(7, "<B", 4), "flags"),
        (patch(53, "<B", 5), "dims"),
        (patch(72, "<I", 6), "lengths"),  # aux not a whole number of int32
        (patch(72, "<I", 1 << 20), "lengths"),  # aux longer than the payload
        (patch(76, "<I", (1 << 31) + 4), "lengths"),
        (patch(76, "<I", 4), "length"),  # header and buffer disagree
        (patch(56, "<I", 5, seal=True), "tensor of shape"),  # shape needs more bytes than sent
        (patch(52, "<B", int(DType.INT64), seal=True), "tensor of shape"),
        (patch(100, "<B", 1), "checksum"),
        (good_frame()[:50], "truncated"),
    ],
)
def test_bad_fields_are_named(wire: bytearray, words: str) -> None:
    with pytest.raises(FrameError, match=words):
        decode(memoryview(wire))
    message = _native.frame_parse(bytes(wire))
    assert isinstance(message, str) and words.split()[0].lower() in message.lower(), message


def test_frame_without_tensor_must_not_carry_one() -> None:
    wire = encode(FrameHeader(FrameKind.PROBE), aux=torch.arange(2, dtype=torch.int32))
    wire = bytearray(wire) + bytes(8)
    struct.pack_into("<I", wire, 76, 16)
    reseal(wire)
    with pytest.raises(FrameError, match="without a tensor"):
        decode(memoryview(wire))
    assert "without a tensor" in _native.frame_parse(bytes(wire))


def test_native_codec_accepts_exactly_the_enum_values() -> None:
    for kind in range(256):
        wire = bytearray(encode(FrameHeader(FrameKind.PROBE)))
        wire[6] = kind
        reseal(wire)
        ok = not isinstance(_native.frame_parse(bytes(wire)), str)
        assert ok == (kind in {int(k) for k in FrameKind}), kind
    for code in range(256):
        wire = bytearray(encode(FrameHeader(FrameKind.DISPATCH), tensor=torch.zeros(0, dtype=torch.uint8)))
        wire[52] = code
        reseal(wire)
        ok = not isinstance(_native.frame_parse(bytes(wire)), str)
        assert ok == (code in {int(d) for d in DType} and code != 0), code


def test_native_encoder_refuses_inconsistent_arguments() -> None:
    header = FrameHeader(FrameKind.DISPATCH)
    args, _ = native_args(header, 1, 2, tensor=torch.ones(4))
    with pytest.raises(ValueError, match="does not match"):
        _native.frame_prefix(*args[:14], args[14] - 4)  # 12 bytes for a shape of 4 float32
    with pytest.raises(ValueError, match="layer"):
        _native.frame_prefix(*args[:7], 1 << 16, *args[8:])
    with pytest.raises(ValueError, match="int32"):
        _native.frame_prefix(*args[:11], b"abc", 0, None, 0)
    with pytest.raises(ValueError):
        native_args(header, 1, 2, tensor=torch.ones(1, 1, 1, 1, 1))
    with pytest.raises(FrameError, match="cannot travel"):
        native_args(header, 1, 2, tensor=torch.ones(2, dtype=torch.complex64))


def test_cached_views_give_fresh_tensors_over_the_same_bytes() -> None:
    wire = encode(FrameHeader(FrameKind.RESULT), aux=torch.arange(3, dtype=torch.int32), tensor=torch.ones(4, 8))
    fields = _native.frame_parse(memoryview(wire))
    views: dict = {}
    first = frame_from_fields(fields, views, at=0)
    second = frame_from_fields(fields, views, at=0)
    assert first.tensor is not second.tensor and first.tensor.data_ptr() == second.tensor.data_ptr()
    second.tensor.resize_(2)  # metadata changes stay with that tensor object
    assert frame_from_fields(fields, views, at=0).tensor.shape == (4, 8)
    assert same_bits(first.aux, torch.arange(3, dtype=torch.int32))


def test_random_bytes_never_crash_the_codecs() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        blob = bytearray(rng.randbytes(rng.randrange(0, 400)))
        if len(blob) >= 4 and rng.random() < 0.5:
            blob[:6] = b"RMOE\x01\x00"
        result = _native.frame_parse(bytes(blob))
        try:
            decode(memoryview(blob))
            python_ok = True
        except FrameError:
            python_ok = False
        assert python_ok == (not isinstance(result, str))


def test_native_header_check_gives_the_frame_size() -> None:
    wire = good_frame()
    assert _native.frame_header(wire[:HEADER_SIZE]) == len(wire)
    assert "magic" in _native.frame_header(bytes(HEADER_SIZE))
    assert isinstance(_native.frame_header(b"RMOE"), str)

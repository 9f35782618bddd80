"""Datapath frames: the one binary format every link carries. Its byte layout is defined here only.

A frame is a fixed 128-byte header, then an optional aux section (a small int32 array, e.g. the
expert id of each row), zero padding up to a 64-byte boundary, then an optional tensor.

    offset size  field
    0      4     magic          b"RMOE"
    4      2     version        FRAME_VERSION
    6      1     kind           FrameKind
    7      1     flags          FrameFlags (REPLAY, ERROR)
    8      4     sender         numeric id of the sending worker (see worker_number)
    12     4     (zero)
    16     8     incarnation    sender's incarnation; a fenced incarnation's frames are dropped
    24     8     epoch          ERT epoch the sender acted on
    32     8     step           engine step of the sender
    40     8     seq            per-link sequence number; a reply echoes the request's
    48     2     layer
    50     2     micro_batch
    52     1     dtype          DType code of the tensor (NONE without one)
    53     1     ndim           0..4
    54     2     (zero)
    56     16    shape          4 x u32, unused dims zero
    72     4     aux_len        bytes of the aux section
    76     4     payload_len    bytes after the header (aux + padding + tensor)
    80     4     checksum       CRC-32C of the header (this field zero) and the payload
    84     44    (zero)

Everything is little-endian. A frame without a tensor (dtype NONE) has ndim 0 and no payload
beyond its aux section; a frame with one is `tensor_offset(aux_len) + tensor bytes` long, even when
the tensor is empty. Receivers check magic, version, kind, dtype, shape against lengths, and the
checksum, and reject a frame that fails any of them with a `FrameError` naming the check; they
never act on part of a frame. Frames carry no pickled data: tensors travel as raw bytes.

DISPATCH (attention worker -> expert worker) carries one hidden row per token, however many of that
token's experts the receiving worker holds; the token's expert ids travel in the aux section:

    tensor   [n, D]      one hidden row per token with at least one expert on this worker
    aux      int32 [n + P]
      [0, n)             counts: how many of the row's experts are asked of this worker (each >= 1)
      [n, n + P)         expert ids, row by row, each row's in gate order; P = the sum of counts

Its RESULT (expert worker -> attention worker) carries one row per (token, expert) pair, [P, D], in
the order of aux[n:]: the attention worker combines pairs in gate order whatever the placement, so
where experts live never changes a bit. A RESULT too big for its link is split by the expert worker
into pieces whose aux is [first pair row] (part_rules.check_result).

TOKENS frames (attention worker -> frontend) carry a step's token events as a binary body laid out
in token_frames.py.

This module is the reference codec. The links use the native twin in csrc/native.c (one C call
packs, copies and checksums a frame; one checks a frame and returns its fields), and
`frame_from_fields` turns those fields into a `Frame`; tests/test_frames.py checks that both
codecs produce and accept the same bytes.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass

import torch

from resilient_moe._native import crc32c

MAGIC = b"RMOE"
FRAME_VERSION = 2  # 2: DISPATCH carries a row per token and its expert list (above)
HEADER_SIZE = 128
ALIGN = 64
MAX_DIMS = 4
MAX_PAYLOAD = 1 << 31

_HEADER = struct.Struct("<4sHBBI4xQQQQHHBB2x4I3I44x")
assert _HEADER.size == HEADER_SIZE
_CHECKSUM_OFFSET = 80


class FrameKind(enum.IntEnum):
    DISPATCH = 1  # AW -> EW: a row per token, aux: counts then expert ids (the layout above)
    RESULT = 2  # EW -> AW: one row per (token, expert) pair of its DISPATCH; ERROR flag: a UTF-8 message
    PROBE = 3  # "are you alive and answering?" (sent on a silent link with work outstanding)
    PROBE_ACK = 4
    HELLO = 5  # link set-up, JSON body
    HELLO_ACK = 6
    CONTROL = 7  # JSON body: messages between frontend and attention workers, admin hooks
    GOODBYE = 8  # orderly close
    TOKENS = 9  # AW -> frontend: a step's token events, binary body (token_frames.py gives the layout)


class FrameFlags(enum.IntFlag):
    NONE = 0
    REPLAY = 1  # re-sent after a failure: served before fresh work
    ERROR = 2


class DType(enum.IntEnum):
    NONE = 0
    FLOAT32 = 1
    BFLOAT16 = 2
    FLOAT16 = 3
    INT32 = 4
    INT64 = 5
    UINT8 = 6


_TORCH_OF = {
    DType.FLOAT32: torch.float32,
    DType.BFLOAT16: torch.bfloat16,
    DType.FLOAT16: torch.float16,
    DType.INT32: torch.int32,
    DType.INT64: torch.int64,
    DType.UINT8: torch.uint8,
}
DTYPE_CODES = {v: k for k, v in _TORCH_OF.items()}  # torch dtype -> DType


class FrameError(ValueError):
    """A received frame is malformed or corrupt; the message names the failed check."""


@dataclass(slots=True)
class FrameHeader:
    kind: FrameKind
    sender: int = 0
    incarnation: int = 0
    epoch: int = 0
    step: int = 0
    seq: int = 0
    layer: int = 0
    micro_batch: int = 0
    flags: FrameFlags = FrameFlags.NONE
    dtype: DType = DType.NONE
    shape: tuple[int, ...] = ()
    aux_len: int = 0
    payload_len: int = 0
    checksum: int = 0


@dataclass(slots=True)
class Frame:
    """A decoded frame. `aux` and `tensor` may be views into the receive buffer (see Link.release)."""

    header: FrameHeader
    aux: torch.Tensor | None  # int32 [n]
    tensor: torch.Tensor | None
    body: memoryview  # the whole payload (aux + padding + tensor), e.g. JSON for CONTROL frames


def dispatch_aux(counts: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The aux section of a DISPATCH: counts [n] (experts asked per row) then expert ids [P], as int32."""
    return torch.cat((counts.to(torch.int32), experts.to(torch.int32)))


def tensor_offset(aux_len: int) -> int:
    """Offset of the tensor from the start of the frame."""
    return -(-(HEADER_SIZE + aux_len) // ALIGN) * ALIGN


def frame_size(aux_len: int, tensor_nbytes: int | None) -> int:
    """Bytes of a whole frame; `tensor_nbytes` is None for a frame without a tensor."""
    if tensor_nbytes is not None:
        return tensor_offset(aux_len) + tensor_nbytes
    return HEADER_SIZE + aux_len


def dtype_code(dtype: torch.dtype) -> DType:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise FrameError(f"dtype {dtype} cannot travel in a frame") from None


def write_frame(
    buf: memoryview,
    header: FrameHeader,
    aux: torch.Tensor | None = None,
    tensor: torch.Tensor | None = None,
    body: bytes | None = None,
) -> int:
    """Encode a frame into `buf` (at least `frame_size` bytes); returns the bytes written.

    Pass the tensor (and aux) or a raw body, not both; a body travels as a uint8 tensor right
    after the header. The checksum is computed here.
    """
    if body is not None:
        if aux is not None or tensor is not None:
            raise ValueError("a frame carries either tensors or a raw body")
        payload = len(body)
        header.dtype, header.shape, header.aux_len = DType.UINT8, (payload,), 0
        header.payload_len = payload
        buf[HEADER_SIZE : HEADER_SIZE + payload] = body
        return _seal(buf, header, HEADER_SIZE + payload)
    aux_len = 0 if aux is None else aux.numel() * 4
    header.aux_len = aux_len
    if aux is not None:
        view = torch.frombuffer(buf, dtype=torch.int32, count=aux.numel(), offset=HEADER_SIZE)
        view.copy_(aux.reshape(-1))
    if tensor is None:
        header.dtype, header.shape = DType.NONE, ()
        header.payload_len = aux_len
        return _seal(buf, header, HEADER_SIZE + aux_len)
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"tensors travel with at most {MAX_DIMS} dims, got {tensor.dim()}")
    offset = tensor_offset(aux_len)
    nbytes = tensor.numel() * tensor.element_size()
    if offset > HEADER_SIZE + aux_len:
        buf[HEADER_SIZE + aux_len : offset] = bytes(offset - HEADER_SIZE - aux_len)
    if nbytes:
        dst = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
        dst.copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    header.dtype = dtype_code(tensor.dtype)
    header.shape = tuple(tensor.shape)
    header.payload_len = offset - HEADER_SIZE + nbytes
    return _seal(buf, header, offset + nbytes)


def encode(header: FrameHeader, aux: torch.Tensor | None = None, tensor: torch.Tensor | None = None, body: bytes | None = None) -> bytearray:
    """Encode a frame into a new buffer (TCP transport, tests)."""
    if body is not None:
        size = HEADER_SIZE + len(body)
    else:
        size = frame_size(0 if aux is None else aux.numel() * 4, None if tensor is None else tensor.numel() * tensor.element_size())
    out = bytearray(size)
    write_frame(memoryview(out), header, aux, tensor, body)
    return out


def native_args(
    header: FrameHeader,
    sender: int,
    incarnation: int,
    aux: torch.Tensor | None = None,
    tensor: torch.Tensor | None = None,
    body: bytes | None = None,
) -> tuple[tuple, object]:
    """Arguments of the native encoders (`ShmRing.send_frame`, `_native.frame_prefix`) for a frame.

    Same inputs and rules as `write_frame`, with sender and incarnation given by the link. Returns
    (args, keep): tensors travel by address, so the caller holds `keep` until the call returns.
    This is on every send's path, hence the cheap torch accessors (is_cpu, nbytes, shape).
    """
    if body is not None:
        if aux is not None or tensor is not None:
            raise ValueError("a frame carries either tensors or a raw body")
        return (
            header.kind, header.flags, sender, incarnation, header.epoch, header.step, header.seq, header.layer,
            header.micro_batch, DType.UINT8, (len(body),), None, 0, body, 0,
        ), body
    aux_ptr = None
    aux_len = 0
    if aux is not None:
        if not aux.is_cpu:
            raise ValueError(f"aux must be a CPU tensor, got one on {aux.device}")
        if aux.dtype != torch.int32 or not aux.is_contiguous():
            aux = aux.to(torch.int32).contiguous()
        aux_ptr = aux.data_ptr()
        aux_len = aux.nbytes
    if tensor is None:
        return (
            header.kind, header.flags, sender, incarnation, header.epoch, header.step, header.seq, header.layer,
            header.micro_batch, DType.NONE, (), aux_ptr, aux_len, None, 0,
        ), aux
    if not tensor.is_cpu:
        raise ValueError(f"links carry CPU tensors, got one on {tensor.device}")
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    shape = tensor.shape
    if len(shape) > MAX_DIMS:
        raise ValueError(f"tensors travel with at most {MAX_DIMS} dims, got {len(shape)}")
    code = DTYPE_CODES.get(tensor.dtype)
    if code is None:
        raise FrameError(f"dtype {tensor.dtype} cannot travel in a frame")
    return (
        header.kind, header.flags, sender, incarnation, header.epoch, header.step, header.seq, header.layer,
        header.micro_batch, code, shape, aux_ptr, aux_len, tensor.data_ptr(), tensor.nbytes,
    ), (aux, tensor)


def _seal(buf: memoryview, header: FrameHeader, size: int) -> int:
    shape = tuple(header.shape) + (0,) * (MAX_DIMS - len(header.shape))
    _HEADER.pack_into(
        buf, 0, MAGIC, FRAME_VERSION, int(header.kind), int(header.flags), header.sender, header.incarnation,
        header.epoch, header.step, header.seq, header.layer, header.micro_batch, int(header.dtype),
        len(header.shape), *shape, header.aux_len, header.payload_len, 0,
    )
    header.checksum = crc32c(buf[:size])
    struct.pack_into("<I", buf, _CHECKSUM_OFFSET, header.checksum)
    return size


def parse_header(buf: memoryview) -> FrameHeader:
    """Decode and check the fixed header (not the checksum, which needs the payload)."""
    if len(buf) < HEADER_SIZE:
        raise FrameError(f"truncated frame: {len(buf)} bytes, a header needs {HEADER_SIZE}")
    (magic, version, kind, flags, sender, incarnation, epoch, step, seq, layer, micro_batch, dtype, ndim,
     d0, d1, d2, d3, aux_len, payload_len, checksum) = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != FRAME_VERSION:
        raise FrameError(f"unsupported frame version {version} (this build speaks {FRAME_VERSION})")
    try:
        kind = FrameKind(kind)
        dtype = DType(dtype)
    except ValueError as e:
        raise FrameError(f"bad frame field: {e}") from None
    if flags & ~int(FrameFlags.REPLAY | FrameFlags.ERROR):
        raise FrameError(f"unknown frame flags {flags:#x}")
    if ndim > MAX_DIMS:
        raise FrameError(f"frame has {ndim} dims (at most {MAX_DIMS})")
    if payload_len > MAX_PAYLOAD or aux_len > payload_len or aux_len % 4:
        raise FrameError(f"inconsistent lengths: aux {aux_len}, payload {payload_len}")
    if dtype is DType.NONE and (ndim or payload_len != aux_len):
        raise FrameError(
            f"frame without a tensor has {ndim} dims and {payload_len - aux_len} payload bytes beyond aux"
        )
    return FrameHeader(
        kind=kind, sender=sender, incarnation=incarnation, epoch=epoch, step=step, seq=seq, layer=layer,
        micro_batch=micro_batch, flags=FrameFlags(flags), dtype=dtype, shape=(d0, d1, d2, d3)[:ndim],
        aux_len=aux_len, payload_len=payload_len, checksum=checksum,
    )


def decode(buf: memoryview) -> Frame:
    """Decode a whole frame from `buf` (exactly header + payload bytes). Tensors are views into `buf`."""
    header = parse_header(buf)
    size = HEADER_SIZE + header.payload_len
    if len(buf) != size:
        raise FrameError(f"frame length {len(buf)} does not match its header ({size})")
    expected = crc32c(buf[:_CHECKSUM_OFFSET])
    expected = crc32c(b"\0\0\0\0", expected)
    expected = crc32c(buf[_CHECKSUM_OFFSET + 4 : size], expected)
    if expected != header.checksum:
        raise FrameError(f"checksum mismatch (header says {header.checksum:#010x}, payload gives {expected:#010x})")
    return _frame_views(header, buf)


_KIND_OF = {int(k): k for k in FrameKind}
_FLAGS_OF = tuple(FrameFlags(i) for i in range(4))
_DTYPE_OF = tuple(DType)
_TORCH_BY_CODE = tuple(_TORCH_OF.get(code) for code in DType)


def frame_from_fields(fields: tuple, views: dict | None = None, at: int = 0) -> Frame:
    """The Frame for a frame the native codec has already checked (lengths, shape, checksum).

    `fields` is what `_native.frame_parse` / `ShmRing.recv_frame` return: (kind, flags, sender,
    incarnation, epoch, step, seq, layer, micro_batch, dtype, shape, aux_len, payload_len, checksum,
    buf), buf being exactly the whole frame. Tensors are views into buf. This runs for every
    received frame, so it skips the checks `decode` makes (the native codec made them).

    `views`, for a receive buffer that is reused (a ring), caches tensor views by the frame's
    position `at` in it: a frame of the same dtype and shape at the same place gets a fresh tensor
    object (`detach()`) over the same memory instead of a new `frombuffer` + `view`, which costs
    several times more. Request/reply traffic lands at the same places over and over.
    """
    kind, flags, sender, incarnation, epoch, step, seq, layer, micro_batch, dtype, shape, aux_len, payload_len, checksum, buf = fields
    header = FrameHeader(
        _KIND_OF[kind], sender, incarnation, epoch, step, seq, layer, micro_batch, _FLAGS_OF[flags],
        _DTYPE_OF[dtype], shape, aux_len, payload_len, checksum,
    )
    aux = None
    offset = HEADER_SIZE
    if aux_len:
        offset = tensor_offset(aux_len)
        if views is None:
            aux = torch.frombuffer(buf, dtype=torch.int32, count=aux_len >> 2, offset=HEADER_SIZE)
        else:
            key = (at, 0, aux_len)
            base = views.get(key)
            if base is None:
                base = _cache_view(views, key, torch.frombuffer(buf, dtype=torch.int32, count=aux_len >> 2, offset=HEADER_SIZE))
            aux = base.detach()
    tensor = None
    if dtype:
        torch_dtype = _TORCH_BY_CODE[dtype]
        count = (HEADER_SIZE + payload_len - offset) // torch_dtype.itemsize
        if not count:
            tensor = torch.empty(shape, dtype=torch_dtype)
        elif views is None:
            tensor = torch.frombuffer(buf, dtype=torch_dtype, count=count, offset=offset)
            if len(shape) != 1:
                tensor = tensor.view(shape)
        else:
            key = (at + offset, dtype, shape)
            base = views.get(key)
            if base is None:
                base = torch.frombuffer(buf, dtype=torch_dtype, count=count, offset=offset)
                base = _cache_view(views, key, base.view(shape) if len(shape) != 1 else base)
            tensor = base.detach()
    return Frame(header, aux, tensor, buf[HEADER_SIZE:])


_MAX_CACHED_VIEWS = 64


def _cache_view(views: dict, key: tuple, view: torch.Tensor) -> torch.Tensor:
    if len(views) >= _MAX_CACHED_VIEWS:
        views.clear()  # traffic changed shape; start over rather than track recency
    views[key] = view
    return view


def _frame_views(header: FrameHeader, buf: memoryview) -> Frame:
    """Aux, tensor and body of a checked frame, as views into buf (no copies)."""
    size = HEADER_SIZE + header.payload_len
    aux = None
    if header.aux_len:
        aux = torch.frombuffer(buf, dtype=torch.int32, count=header.aux_len // 4, offset=HEADER_SIZE)
    tensor = None
    if header.dtype is not DType.NONE:
        offset = tensor_offset(header.aux_len)
        dtype = _TORCH_OF[header.dtype]
        shape = header.shape
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if offset + nbytes != size:
            raise FrameError(
                f"tensor of shape {list(shape)} and dtype {header.dtype.name.lower()} needs "
                f"{nbytes} bytes at offset {offset}, frame has {size - offset}"
            )
        if count:
            tensor = torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)
            if len(shape) != 1:
                tensor = tensor.view(shape)
        else:
            tensor = torch.empty(shape, dtype=dtype)
    return Frame(header, aux, tensor, buf[HEADER_SIZE:size])


def worker_number(role: str, index: int) -> int:
    """Numeric sender id of a worker: role in the high byte, index below (e.g. ew-2 -> 0x02000002)."""
    roles = {"frontend": 0, "attention": 1, "expert": 2, "controller": 3, "kv_store": 4}
    return (roles[role] << 24) | index

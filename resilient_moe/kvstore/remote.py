"""A KV store's memory over TCP: the protocol, the server (in the store process) and the client.

Attention workers on the store's node map its memory and write one-sided (store.py). Everyone else
reaches it here: an attention worker that keeps a replica of its checkpoints in this store (another
node's), and a restore that reads a replica. The server applies exactly the rules of the local path
(memory_layout.py: `claim_region`, `write_blocks`, `read_stamped`): a fenced writer is refused, and a
reader gets each block's stamp as it was before and after the copy. A CLAIM, WRITE or READ of a region
the store has not made yet makes it (memory_layout.py `StoreMemory`: an attention worker added by
scaling ships its first replica write, or a restore reads a region no one wrote); one past the store's
`max_regions` is refused.

Frames, both directions, little-endian; nothing is pickled:

    header (16 bytes)  magic b"RKV1" | op uint8 | status uint8 (0 ok, 1 error) | reserved uint16 | body length uint64
    body               as the op says; an error's body is the reason, UTF-8

    HELLO  (first frame of every connection)
      request  JSON {"credential": auth.Credential (purpose "kv-store", context = client), "client": name,
                     "layout": StoreLayout.key = [num_layers, row_width, dtype, block_size, region_blocks]}
      reply    JSON {"answer": auth.answer(...), "store": name, "incarnation": n}
    CLAIM  request  region uint32 | incarnation uint64                          reply  empty
    WRITE  request  region uint32 | incarnation uint64 | k uint32 | parts uint32
                    | blocks int64[k] | gens int64[k] (even: the generation once written)
                    | per part: layers uint32 | m uint32 | layer ids int32[layers] | store rows int64[m]
                      | rows dtype[layers, m, row_width]                           reply  empty
    READ   request  k uint32 | blocks int64[k] (store-wide numbers, all in one region)
           reply    stamps int64[k, 2] ((-1, -1): the block changed during the copy) | rows dtype[L, k * block_size, W]

A connection that does not prove the cluster secret in its HELLO is answered with an error and closed
(logged and counted). A frame whose header is bad (magic, op, length over MAX_BODY) is answered with an
error and the connection closed: the stream cannot be trusted after it. A body that fails validation
(a block outside the writer's region, a region past the store's last, a wrong length, an odd
generation) is answered with an error and
the connection stays usable. Nothing a peer sends can raise out of the server.
"""

from __future__ import annotations

import enum
import json
import logging
import socket
import struct
import threading
from collections import Counter

import torch

from resilient_moe import auth
from resilient_moe.errors import ResilientMoeError
from resilient_moe.kvstore.memory_layout import StoreLayout, StoreMemory, claim_region, read_stamped, write_blocks

log = logging.getLogger("resilient_moe.kv_remote")

MAGIC = b"RKV1"
HEADER = struct.Struct("<4sBBHQ")
MAX_BODY = 1 << 30
MAX_CONNECTIONS = 64
MAX_HELLO = 64 << 10
READ_BYTES = 64 << 20  # rows in one READ reply (a long request's restore takes several)
MAX_PARTS = 4096  # (layers, rows) parts in one WRITE (a replica batch joins many writes)
HANDSHAKE_TIMEOUT_S = 5.0
PURPOSE = "kv-store"
_WRITE_HEAD = struct.Struct("<IQII")
_PART_HEAD = struct.Struct("<II")
_CLAIM = struct.Struct("<IQ")
_COUNT = struct.Struct("<I")


class Op(enum.IntEnum):
    HELLO = 1
    CLAIM = 2
    WRITE = 3
    READ = 4


OK, ERROR = 0, 1


class ProtocolError(ResilientMoeError):
    """A frame or body that does not follow the protocol; the message says what is wrong."""


class RemoteStoreError(ResilientMoeError):
    """A remote store refused a request, or could not be reached; the message says which and why."""


# ---- codec ---------------------------------------------------------------------------------------

def frame(op: int, body: bytes | bytearray | memoryview = b"", status: int = OK) -> bytes:
    return HEADER.pack(MAGIC, op, status, 0, len(body)) + bytes(body)


def send(sock: socket.socket, data) -> None:
    """sendall that never raises SIGPIPE, whatever the process's disposition for it: a peer that died
    must cost an error, not the process."""
    sock.sendall(data, socket.MSG_NOSIGNAL)


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by the peer")
        got += k
    return buf


def read_frame(sock: socket.socket, max_body: int = MAX_BODY) -> tuple[int, int, bytearray]:
    """(op, status, body) of the next frame; ProtocolError on a bad header (a body over `max_body`
    too: nothing is allocated for it), ConnectionError on EOF."""
    magic, op, status, _, length = HEADER.unpack(recv_exact(sock, HEADER.size))
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r} (not a KV store frame)")
    if op not in Op.__members__.values():
        raise ProtocolError(f"unknown op {op}")
    if status not in (OK, ERROR):
        raise ProtocolError(f"unknown status {status}")
    if length > max_body:
        raise ProtocolError(f"body of {length} bytes is over the limit of {max_body}")
    return op, status, recv_exact(sock, length)


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


class _Reader:
    """Reads typed fields off a body in order, naming what is missing."""

    def __init__(self, body: bytearray) -> None:
        self.body = body
        self.at = 0

    def struct(self, s: struct.Struct, what: str) -> tuple:
        self.need(s.size, what)
        out = s.unpack_from(self.body, self.at)
        self.at += s.size
        return out

    def tensor(self, dtype: torch.dtype, count: int, what: str) -> torch.Tensor:
        size = count * dtype.itemsize
        self.need(size, what)
        out = torch.frombuffer(self.body, dtype=dtype, count=count, offset=self.at) if count else torch.empty(0, dtype=dtype)
        self.at += size
        return out

    def need(self, size: int, what: str) -> None:
        if self.at + size > len(self.body):
            raise ProtocolError(f"body too short: {what} needs {size} bytes at offset {self.at}, "
                                f"the body has {len(self.body)}")

    def end(self) -> None:
        if self.at != len(self.body):
            raise ProtocolError(f"body has {len(self.body) - self.at} bytes left over")


def encode_write(region: int, incarnation: int, blocks: torch.Tensor, gens: torch.Tensor,
                 parts: list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]) -> list:
    """The WRITE body as a list of buffers (sent without joining the rows)."""
    out: list = [_WRITE_HEAD.pack(region, incarnation, blocks.numel(), len(parts)),
                 _raw(blocks.to(torch.int64)), _raw(gens.to(torch.int64))]
    for layers, rows, data in parts:
        out += [_PART_HEAD.pack(len(layers), rows.numel()) + struct.pack(f"<{len(layers)}i", *layers),
                _raw(rows.to(torch.int64)), _raw(data)]
    return out


def decode_write(body: bytearray, layout: StoreLayout):
    """(region, incarnation, blocks, gens, parts) of a WRITE body, checked against `layout`."""
    r = _Reader(body)
    region, incarnation, k, nparts = r.struct(_WRITE_HEAD, "the write header")
    _check_region(layout, region)
    if incarnation <= 0:
        raise ProtocolError("incarnation must be positive")
    if not 0 < k <= layout.region_blocks:
        raise ProtocolError(f"{k} blocks in one write (a region has {layout.region_blocks})")
    blocks = r.tensor(torch.int64, k, "blocks")
    gens = r.tensor(torch.int64, k, "gens")
    own = layout.region(region)
    listed = blocks.tolist()
    if min(listed) < own.start or max(listed) >= own.stop:
        raise ProtocolError(f"a block outside region {region} [{own.start}, {own.stop})")
    if len(set(listed)) != k:
        raise ProtocolError("a block appears twice in one write")
    if any(g <= 0 or g % 2 for g in gens.tolist()):
        raise ProtocolError("generations must be even and positive")
    if nparts > MAX_PARTS:
        raise ProtocolError(f"{nparts} parts in one write (at most {MAX_PARTS})")
    stamped = torch.zeros(layout.region_blocks + 1, dtype=torch.bool)  # the last: rows out of the region
    stamped[blocks - own.start] = True
    parts = []
    for _ in range(nparts):
        nl, m = r.struct(_PART_HEAD, "a part header")
        if not 0 < nl <= layout.num_layers or m > k * layout.block_size:
            raise ProtocolError(f"a part of {nl} layers and {m} rows (at most {layout.num_layers} and "
                                f"{k * layout.block_size})")
        layers = r.tensor(torch.int32, nl, "layer ids").tolist()
        if min(layers) < 0 or max(layers) >= layout.num_layers or len(set(layers)) != nl:
            raise ProtocolError(f"layer ids must be distinct and in [0, {layout.num_layers})")
        rows = r.tensor(torch.int64, m, "store rows")
        local = rows // layout.block_size - own.start  # [m] the rows' blocks in the region
        local[(local < 0) | (local >= layout.region_blocks)] = layout.region_blocks
        if m and not bool(stamped[local].all()):
            raise ProtocolError("a row outside the blocks the write stamps")
        data = r.tensor(layout.dtype, nl * m * layout.row_width, "rows").view(nl, m, layout.row_width)
        parts.append((tuple(layers), rows, data))
    r.end()
    return region, incarnation, blocks, gens, parts


def _check_region(layout: StoreLayout, region: int) -> None:
    try:
        layout.check_region(region)
    except ValueError as e:
        raise ProtocolError(str(e)) from None


def decode_blocks(body: bytearray, layout: StoreLayout) -> tuple[int, torch.Tensor]:
    """(region, blocks) of a READ body: blocks of one region, store-wide numbers."""
    r = _Reader(body)
    (k,) = r.struct(_COUNT, "the block count")
    if not 0 < k <= layout.region_blocks:
        raise ProtocolError(f"{k} blocks in one read (a region has {layout.region_blocks})")
    blocks = r.tensor(torch.int64, k, "blocks")
    r.end()
    if bool((blocks < 0).any()):
        raise ProtocolError("a negative block number")
    region = layout.region_of(int(blocks[0]))
    _check_region(layout, region)
    own = layout.region(region)
    if bool(((blocks < own.start) | (blocks >= own.stop)).any()):
        raise ProtocolError(f"blocks of more than one region in one read (region {region} is [{own.start}, {own.stop}))")
    return region, blocks


def decode_read_reply(body: bytearray, layout: StoreLayout, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = _Reader(body)
    stamps = r.tensor(torch.int64, 2 * k, "stamps").view(k, 2)
    rows = r.tensor(layout.dtype, layout.num_layers * k * layout.block_size * layout.row_width, "rows")
    r.end()
    return stamps, rows.view(layout.num_layers, k * layout.block_size, layout.row_width)


# ---- server --------------------------------------------------------------------------------------

class StoreServer:
    """Serves one store's memory over TCP; one thread per connection."""

    def __init__(self, memory: StoreMemory, name: str, incarnation: int, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.memory = memory
        self.layout = memory.layout
        self.name = name
        self.incarnation = incarnation
        self.verifier = auth.Verifier(PURPOSE)
        self.sock = socket.create_server((host, port))
        self.address = f"tcp:{host}:{self.sock.getsockname()[1]}"
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()  # a claim and a write are atomic with respect to each other
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="kv-remote-accept", daemon=True)

    def start(self) -> "StoreServer":
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            if len(self._conns) >= MAX_CONNECTIONS:
                self.counters["connections_refused"] += 1
                conn.close()
                continue
            self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, f"{peer[0]}:{peer[1]}"), name="kv-remote",
                             daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            client = self._handshake(conn, peer)
            if client is None:
                return
            conn.settimeout(None)
            self.counters["connections"] += 1
            while not self._stop.is_set():
                try:
                    op, _, body = read_frame(conn)
                except ProtocolError as e:
                    self._error(conn, f"bad frame from {client} ({peer}): {e}; closing the connection")
                    return
                try:
                    reply = self._handle(op, body)
                except ProtocolError as e:
                    self._error(conn, f"bad {Op(op).name} from {client}: {e}")
                    continue
                except _Refused as e:
                    self.counters["writes_refused"] += 1
                    send(conn, frame(op, str(e).encode(), ERROR))
                    continue
                send(conn, frame(op, reply))
        except (ConnectionError, OSError):
            pass  # the peer went away
        except Exception:  # noqa: BLE001 (never let a peer take the store down)
            log.exception("KV store connection from %s failed", peer)
        finally:
            self._conns.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket, peer: str) -> str | None:
        """The client's name once it proved the cluster secret; None (answered and counted) otherwise."""
        try:
            op, _, body = read_frame(conn, MAX_HELLO)  # a peer not yet authenticated gets no big buffer
            if op != Op.HELLO:
                raise auth.AuthError(f"{PURPOSE}: the first frame must be HELLO with a credential, got {Op(op).name}")
            try:
                hello = json.loads(bytes(body))
            except ValueError:
                raise auth.AuthError(f"{PURPOSE}: HELLO is not JSON") from None
            if not isinstance(hello, dict) or not isinstance(hello.get("client"), str):
                raise auth.AuthError(f"{PURPOSE}: HELLO needs a client name and a credential")
            credential = auth.Credential.from_json(hello.get("credential"))
            self.verifier.verify(credential, context=hello["client"])
        except (auth.AuthError, ProtocolError) as e:
            self.counters["auth_refused"] += 1
            log.warning("refused an unauthenticated KV store connection from %s: %s", peer, e)
            self._error(conn, f"authentication failed: {e}", count=False)
            return None
        if hello.get("layout") != self.layout.key:
            self._error(conn, f"layout mismatch: the store has {self.layout.key}, the client expects "
                        f"{hello.get('layout')}")
            return None
        reply = {"answer": auth.answer(credential, PURPOSE, hello["client"]), "store": self.name,
                 "incarnation": self.incarnation}
        send(conn, frame(Op.HELLO, json.dumps(reply).encode()))
        return hello["client"]

    def _error(self, conn: socket.socket, message: str, count: bool = True) -> None:
        if count:
            self.counters["bad_frames"] += 1
            log.warning("%s", message)
        try:
            send(conn, frame(Op.HELLO, message.encode(), ERROR))
        except OSError:
            pass

    def _handle(self, op: int, body: bytearray) -> bytes | list:
        layout = self.layout
        if op == Op.CLAIM:
            if len(body) != _CLAIM.size:
                raise ProtocolError(f"CLAIM body is {len(body)} bytes, expected {_CLAIM.size}")
            region, incarnation = _CLAIM.unpack(body)
            _check_region(layout, region)
            if incarnation <= 0:
                raise ProtocolError(f"incarnation {incarnation} is not positive")
            memory = self._region(region)
            with self._lock:
                refusal = claim_region(memory, incarnation)
            if refusal:
                raise _Refused(f"fenced: {refusal}, not {incarnation}")
            return b""
        if op == Op.WRITE:
            region, incarnation, blocks, gens, parts = decode_write(body, layout)
            memory = self._region(region)
            with self._lock:
                refusal = write_blocks(memory, incarnation, blocks, gens, parts)
            if refusal:
                raise _Refused(f"fenced: {refusal}, not {incarnation}")
            self.counters["writes"] += 1
            self.counters["blocks_written"] += blocks.numel()
            return b""
        if op == Op.READ:
            region, blocks = decode_blocks(body, layout)
            stamps, rows = read_stamped(self._region(region), blocks)
            self.counters["reads"] += 1
            return bytes(_raw(stamps)) + bytes(_raw(rows))
        raise ProtocolError(f"{Op(op).name} is only valid as the first frame")

    def _region(self, index: int):
        try:
            return self.memory.region(index)  # made now if it is new
        except (ValueError, OSError) as e:  # no memory left to grow into
            raise _Refused(f"region {index} cannot be made: {e}") from None

    def stats(self) -> dict[str, float]:
        return {f"tcp_{k}": float(v) for k, v in self.counters.items()}

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Refused(Exception):
    """The store's ownership rules refuse the request (the writer was fenced)."""


# ---- client --------------------------------------------------------------------------------------

class RemoteStore:
    """One authenticated connection to a store's TCP server. Not thread-safe: one user at a time."""

    def __init__(self, address: str, layout: StoreLayout, client: str, timeout_s: float = 2.0) -> None:
        if not address.startswith("tcp:") or address.count(":") != 2:
            raise RemoteStoreError(f"not a KV store TCP address (tcp:HOST:PORT): {address!r}")
        _, host, port = address.split(":")
        self.address = address
        self.layout = layout
        self.client = client
        self.store = ""
        self.incarnation = 0
        try:
            self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, ValueError) as e:
            raise RemoteStoreError(f"KV store at {address} unreachable: {e}") from None
        try:
            self._hello()
        except BaseException:
            self.close()
            raise

    def _hello(self) -> None:
        credential = auth.Credential.make(PURPOSE, context=self.client)
        hello = {"credential": credential.to_json(), "client": self.client, "layout": self.layout.key}
        reply = json.loads(bytes(self._call(Op.HELLO, [json.dumps(hello).encode()])))
        auth.check_answer(credential, reply.get("answer"), PURPOSE, self.client)
        self.store, self.incarnation = reply.get("store", ""), int(reply.get("incarnation", 0))

    def _call(self, op: int, body: list) -> bytearray:
        try:
            send(self.sock, HEADER.pack(MAGIC, op, OK, 0, sum(len(b) for b in body)))
            for part in body:
                send(self.sock, part)
            rop, status, reply = read_frame(self.sock)
        except (OSError, ProtocolError) as e:
            raise RemoteStoreError(f"KV store at {self.address}: {type(e).__name__}: {e}") from None
        if status == ERROR:
            raise RemoteStoreError(f"KV store at {self.address} refused {Op(op).name}: {bytes(reply).decode(errors='replace')}")
        return reply

    def claim(self, region: int, incarnation: int) -> None:
        self._call(Op.CLAIM, [_CLAIM.pack(region, incarnation)])

    def write(self, region: int, incarnation: int, blocks: torch.Tensor, gens: torch.Tensor, parts) -> None:
        self._call(Op.WRITE, encode_write(region, incarnation, blocks, gens, parts))

    def read(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stamps [k, 2], rows [L, k * block_size, W]) of `blocks` (of one region; see `read_stamped`),
        in replies of about READ_BYTES each."""
        layout = self.layout
        block_bytes = layout.num_layers * layout.block_size * layout.row_width * layout.dtype.itemsize
        stamps, rows = [], []
        for chunk in blocks.to(torch.int64).split(max(1, READ_BYTES // block_bytes)):
            reply = self._call(Op.READ, [_COUNT.pack(chunk.numel()), _raw(chunk)])
            try:
                s, r = decode_read_reply(reply, layout, chunk.numel())
            except ProtocolError as e:
                raise RemoteStoreError(f"KV store at {self.address} sent a bad READ reply: {e}") from None
            stamps.append(s)
            rows.append(r)
        return (stamps[0], rows[0]) if len(rows) == 1 else (torch.cat(stamps), torch.cat(rows, dim=1))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

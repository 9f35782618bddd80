"""TCP links: the transport between workers on different hosts (and a same-host fallback).

A frame goes out as one `sendmsg` of its header (+ aux + padding, sealed by the native codec with
the checksum of the whole frame) and the tensor bytes where they lie, so the tensor is not copied
in user space. The receiver reads the stream without blocking and reassembles whole frames from
partial reads: small frames land in a staging buffer and are copied out into an arena; a big frame
gets a 64-byte aligned buffer as soon as its header is known and the rest is read straight into it.
Received frames are valid until `release()` (as on shm), which hands their memory back: arena and
big buffers are reused, so a link in steady use allocates nothing per frame.

A frame whose checksum or fields are wrong but whose header still gives its length is rejected and
skipped, like on shm. A header that cannot be parsed leaves no way to find the next frame in the
stream, so the link is closed with the reason logged. EOF or a reset means the peer is gone.
"""

from __future__ import annotations

import collections
import errno
import logging
import select
import socket
import time
from typing import TYPE_CHECKING

import torch

from resilient_moe import _native
from resilient_moe.datapath.frames import (
    ALIGN,
    HEADER_SIZE,
    DType,
    Frame,
    FrameHeader,
    frame_from_fields,
    frame_size,
    native_args,
)
from resilient_moe.datapath.handshake import Greeting, Listener
from resilient_moe.datapath.link import DEFAULT_HANDSHAKE_TIMEOUT, FrameTooLarge, Link, LinkClosed, LinkTimeout, PeerInfo

if TYPE_CHECKING:
    from resilient_moe.datapath.poller import Poller

log = logging.getLogger(__name__)

DEFAULT_MAX_FRAME = 256 << 20  # bytes; a header announcing more closes the link
_STAGING = 256 << 10
_OWN_BUFFER = 16 << 10  # frames at least this big are read straight into their own buffer
_ARENA = 256 << 10  # bytes per chunk of the arena small frames are copied into
_BIG_ROUND = 64 << 10  # big receive buffers are sized in these steps, so similar frames reuse them
_MAX_KEPT = 64 << 20  # bytes of big receive buffers kept for reuse
_MAX_CHUNKS = 4  # arena chunks kept for reuse
_MAX_BACKLOG = 64 << 20  # bytes of received frames a blocked send may set aside
_OUT_LIMIT = 16 << 20  # bytes try_send may queue in user space before it answers "no room"
_MAX_SKIPPED = 64
_GONE_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN, errno.ETIMEDOUT, errno.EHOSTUNREACH}


class StreamCorrupt(Exception):
    """The byte stream cannot be parsed into frames any more."""


class FrameReader:
    """Reassembles whole frames from a non-blocking byte stream into receive memory it reuses.

    `fill(sock)` reads what is there; `next_frame()` returns the next whole frame (a memoryview,
    64-byte aligned) or None until one is complete. Frames stay valid until `release()`, which
    hands their memory back for the next frames: small frames are copied out of the staging buffer
    into a bump arena, big ones are read straight into buffers kept for reuse, so steady traffic
    allocates nothing per frame.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._staging = memoryview(_native.alloc(_STAGING))
        self._start = self._end = 0
        self._big: memoryview | None = None  # a frame being read straight into its own buffer
        self._big_buffer: memoryview | None = None  # the reusable buffer `_big` is a slice of
        self._big_fill = 0
        self._arena = [memoryview(_native.alloc(_ARENA))]  # chunks small frames are copied into
        self._chunk = self._used = 0  # where the next small frame goes
        self._free: list[memoryview] = []  # big buffers back from release(), for reuse
        self._lent: list[memoryview] = []  # big buffers of frames returned since the last release()
        self.allocations = 2  # buffers allocated so far (staging and the first arena chunk)

    def fill(self, sock: socket.socket) -> int:
        """One recv into the free space; returns the bytes read (0: EOF). Raises BlockingIOError."""
        if self._big is not None:
            n = sock.recv_into(self._big[self._big_fill :])
            self._big_fill += n
            return n
        if self._end == _STAGING:
            self._compact()
            if self._end == _STAGING:
                return -1  # full of whole frames: the caller takes them first
        n = sock.recv_into(self._staging[self._end :])
        self._end += n
        return n

    def next_frame(self) -> memoryview | None:
        """The next whole frame, or None. Raises StreamCorrupt if the stream cannot be parsed."""
        if self._big is not None:
            if self._big_fill < len(self._big):
                return None
            frame, self._big = self._big, None
            self._lent.append(self._big_buffer)
            self._big_buffer = None
            return frame
        have = self._end - self._start
        if have < HEADER_SIZE:
            if self._start + HEADER_SIZE > _STAGING:
                self._compact()
            return None
        size = _native.frame_header(self._staging[self._start : self._start + HEADER_SIZE])
        if size.__class__ is str:
            raise StreamCorrupt(f"bad frame header in the stream: {size}")
        if size > self.max_frame:
            raise StreamCorrupt(f"frame of {size} bytes exceeds this link's limit of {self.max_frame}")
        if size >= _OWN_BUFFER and have < size:
            # Read the rest straight into a buffer of its own (one kept from earlier frames if any fits).
            self._big_buffer = self._big_buffer_for(size)
            self._big = self._big_buffer[:size]
            self._big[:have] = self._staging[self._start : self._end]
            self._big_fill = have
            self._start = self._end = 0
            return None
        if have < size:
            if self._start + size > _STAGING:
                self._compact()
            return None
        frame = self._arena_slot(size)
        frame[:] = self._staging[self._start : self._start + size]
        self._start += size
        if self._start == self._end:
            self._start = self._end = 0
        return frame

    def release(self) -> None:
        """Every frame returned so far is done with: its memory holds the next frames."""
        self._chunk = self._used = 0
        del self._arena[_MAX_CHUNKS:]  # a burst between two releases is not kept for ever
        if self._lent:
            self._free.extend(self._lent)
            self._lent.clear()
            self._free.sort(key=len)
            while sum(len(b) for b in self._free) > _MAX_KEPT:
                self._free.pop()  # the biggest go first: a rare huge frame is not kept for ever

    def _arena_slot(self, size: int) -> memoryview:
        """`size` bytes of the arena, 64-byte aligned; a new chunk when frames outnumber the arena
        between two releases (kept for next time)."""
        at = -(-self._used // ALIGN) * ALIGN
        if at + size > _ARENA:
            self._chunk += 1
            if self._chunk == len(self._arena):
                self._arena.append(memoryview(_native.alloc(_ARENA)))
                self.allocations += 1
            at = 0
        self._used = at + size
        return self._arena[self._chunk][at : at + size]

    def _big_buffer_for(self, size: int) -> memoryview:
        for i, buffer in enumerate(self._free):  # smallest first
            if len(buffer) >= size:
                return self._free.pop(i)
        self.allocations += 1
        return memoryview(_native.alloc(-(-size // _BIG_ROUND) * _BIG_ROUND))

    def has_frame(self) -> bool:
        """A whole frame is buffered (cheap; may say False for a frame next_frame would assemble)."""
        if self._big is not None:
            return self._big_fill == len(self._big)
        have = self._end - self._start
        if have < HEADER_SIZE:
            return False
        size = _native.frame_header(self._staging[self._start : self._start + HEADER_SIZE])
        return size.__class__ is str or have >= size  # a bad header is news too

    def _compact(self) -> None:
        have = self._end - self._start
        if self._start:
            self._staging[:have] = self._staging[self._start : self._end]
            self._start, self._end = 0, have


class TcpLink(Link):
    """A link over one TCP connection; made by `connect_tcp` or `TcpListener.accept`."""

    transport = "tcp"

    def __init__(
        self, sock: socket.socket, identity: PeerInfo, peer: PeerInfo, reader: FrameReader, peer_max_frame: int
    ) -> None:
        self.peer = peer
        self.identity = identity
        self.max_frame = peer_max_frame  # the most the peer accepts; bigger frames are refused here
        self.max_recv_frame = reader.max_frame
        self.window_bytes = 2 * _OUT_LIMIT
        self.rejected = 0
        self._out: collections.deque[memoryview] = collections.deque()  # bytes try_send queued, in order
        self._out_bytes = 0
        self._sock = sock
        self._fd = sock.fileno()
        self._reader = reader
        self._backlog: collections.deque[memoryview] = collections.deque()  # frames read during a blocked send
        self._backlog_bytes = 0
        self._gone: str | None = None
        self._closed = False
        reader.release()  # the handshake's frame was read into it and is done with
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ------------------------------------------------------------------ sending
    def send(
        self,
        header: FrameHeader,
        aux: torch.Tensor | None = None,
        tensor: torch.Tensor | None = None,
        body: bytes | None = None,
        timeout: float = 5.0,
    ) -> None:
        """sendmsg of the sealed header and the tensor bytes in place (see Link.send)."""
        self._check_sendable()
        parts, keep = self._frame_parts(header, aux, tensor, body)
        self._send_parts(parts, timeout)
        del keep
        self._count(parts)

    def try_send(
        self,
        header: FrameHeader,
        aux: torch.Tensor | None = None,
        tensor: torch.Tensor | None = None,
        body: bytes | None = None,
    ) -> bool:
        """Send what the socket takes now and queue the rest of the frame (see Link.try_send).

        A frame is never cut short on the wire: once any byte of it went out, the rest is copied into
        the link's queue and goes out with later `flush` calls. No room means the queue already holds
        `_OUT_LIMIT` bytes."""
        self._check_sendable()
        if not self.flush() and self._out_bytes >= _OUT_LIMIT:
            return False
        parts, keep = self._frame_parts(header, aux, tensor, body)
        views = [memoryview(p).cast("B") for p in parts]
        done = 0 if self._out else self._sendmsg(views)
        for view in _advance(views, done):
            self._out.append(memoryview(bytes(view)))  # our own copy: the caller may reuse its tensors
            self._out_bytes += len(view)
        del keep
        self._count(views)
        return True

    def _count(self, parts: list) -> None:
        self.bytes_sent += sum(memoryview(p).nbytes for p in parts)
        self.frames_sent += 1

    def flush(self) -> bool:
        """sendmsg of the queued bytes, as far as the socket takes them; True when none are left."""
        if not self._out:
            return True
        if self._gone is not None or self._closed:
            return False
        done = self._sendmsg(list(self._out))
        self._out_bytes -= done
        while done and self._out:
            head = self._out[0]
            if done >= len(head):
                done -= len(head)
                self._out.popleft()
            else:
                self._out[0] = head[done:]
                done = 0
        return not self._out

    @property
    def backlogged(self) -> bool:
        return bool(self._out)

    def _frame_parts(self, header, aux, tensor, body) -> tuple[list, object]:
        """The frame as buffers for sendmsg (the tensor bytes where they lie), and what must stay alive."""
        args, keep = native_args(header, self.identity.number, self.identity.incarnation, aux, tensor, body)
        data = args[13]  # tensor bytes: None (no tensor), an address (int, with its length in args[14]) or a buffer
        nbytes = 0 if data is None else args[14] if data.__class__ is int else len(data)
        size = frame_size(args[12], None if args[9] == DType.NONE else nbytes)
        if size > self.max_frame:
            raise FrameTooLarge(f"link to {self.peer.name}: frame of {size} bytes exceeds the peer's limit of "
                                f"{self.max_frame}")
        prefix = _native.frame_prefix(*args)
        if not nbytes:
            return [prefix], keep
        if args[13].__class__ is int:
            return [prefix, _native.wrap(keep, args[13], nbytes)], keep
        return [prefix, args[13]], keep

    def send_raw(self, data: bytes | memoryview, timeout: float = 5.0) -> None:
        """Write bytes that are already one frame, unchanged (see Link.send_raw)."""
        self._check_sendable()
        self._send_parts([data], timeout)
        self._count([data])

    def _check_sendable(self) -> None:
        if self._closed:
            raise LinkClosed(f"link to {self.peer.name} was closed by this end")
        if self._gone is not None:
            raise LinkClosed(f"link to {self.peer.name}: {self._gone}")

    def _send_parts(self, parts: list, timeout: float) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        if self._out:  # what try_send queued goes first: frames keep their order
            views = [*self._out, *views]
            self._out.clear()
            self._out_bytes = 0
        total = sum(len(v) for v in views)
        done = self._sendmsg(views)
        if done == total:
            return
        deadline = time.monotonic() + timeout
        poll = select.poll()
        poll.register(self._fd, select.POLLOUT | select.POLLIN)
        for _ in range(10_000_000):  # each pass waits in poll(); the deadline ends it first
            left = deadline - time.monotonic()
            if left <= 0:
                break
            events = poll.poll(max(1, int(left * 1000)))
            if any(ev & select.POLLIN for _, ev in events):
                self._read_aside()  # the peer may be blocked sending to us: keep its frames moving
            if self._gone is not None:
                raise LinkClosed(f"link to {self.peer.name}: {self._gone}")
            done += self._sendmsg(_advance(views, done))
            if done == total:
                return
        if done:
            self._fail(f"send timed out after {timeout:.3g}s in the middle of a frame")
            self.close()
        raise LinkTimeout(f"link to {self.peer.name}: socket stayed full for {timeout:.3g}s (peer not draining)")

    def _sendmsg(self, views: list[memoryview]) -> int:
        try:
            return self._sock.sendmsg(views, (), socket.MSG_NOSIGNAL)  # a gone peer is EPIPE, never SIGPIPE
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                self._fail(f"peer reset the connection ({e.strerror})")
                raise LinkClosed(f"link to {self.peer.name}: {self._gone}") from None
            raise

    def _read_aside(self) -> None:
        """Move whole incoming frames to the backlog while a send waits (bounded)."""
        for _ in range(64):
            if self._backlog_bytes >= _MAX_BACKLOG or self._gone is not None:
                return
            try:
                frame = self._reader.next_frame()
            except StreamCorrupt:
                return  # recv() reports it
            if frame is not None:
                own = memoryview(_native.alloc(len(frame)))  # outlives release(): a copy of its own
                own[:] = frame
                self._backlog.append(own)
                self._backlog_bytes += len(frame)
                continue
            if not self._fill():
                return

    # ------------------------------------------------------------------ receiving
    def recv(self) -> Frame | None:
        """The next whole frame, in receive memory that is reused after release()."""
        if self._closed:
            raise LinkClosed(f"link to {self.peer.name} was closed by this end")
        for _ in range(_MAX_SKIPPED):
            if self._backlog:
                buf = self._backlog.popleft()
                self._backlog_bytes -= len(buf)
            else:
                try:
                    buf = self._reader.next_frame()
                except StreamCorrupt as e:
                    self._fail(f"stream is corrupt, closing: {e}")
                    log.error("link from %s: %s", self.peer.name, self._gone)
                    self.close()
                    raise LinkClosed(f"link to {self.peer.name}: {self._gone}") from None
                if buf is None:
                    if self._gone is None and self._fill():
                        continue
                    if self._gone is not None and not self._reader.has_frame():
                        raise LinkClosed(f"link to {self.peer.name}: {self._gone}")
                    return None
            fields = _native.frame_parse(buf)
            if fields.__class__ is str:
                self.rejected += 1
                log.error("link from %s: rejected a frame: %s", self.peer.name, fields)
                continue
            return frame_from_fields(fields)
        return None

    def _fill(self) -> bool:
        """Read once from the socket; True if bytes arrived."""
        try:
            n = self._reader.fill(self._sock)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                self._fail(f"peer reset the connection ({e.strerror})")
                return False
            raise
        if n == 0:
            self._fail("peer closed the connection (EOF)")
            return False
        return n > 0

    def release(self) -> None:
        """The frames recv() returned so far are done with: their memory takes the next ones."""
        self._reader.release()

    # ------------------------------------------------------------------ liveness and teardown
    def fileno(self) -> int:
        return self._fd

    @property
    def alive(self) -> bool:
        return not self._closed and self._gone is None

    def close(self) -> None:
        """Close the connection; the peer sees EOF."""
        if self._closed:
            return
        self._closed = True
        if self.poller is not None:
            self.poller.remove(self)
        self._sock.close()

    def _fail(self, reason: str) -> None:
        if self._gone is None:
            self._gone = reason
            log.warning("link to %s (pid %d): %s", self.peer.name, self.peer.pid, reason)

    # Poller hooks (see Link).
    def holds_frames(self) -> bool:
        return bool(self._backlog) or self._reader.has_frame()


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The views left after n bytes of them were sent."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out


def _split_host_port(rest: str) -> tuple[str, int]:
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"tcp address {rest!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def _peer_max_frame(body: dict) -> int:
    value = body.get("max_frame")
    if not isinstance(value, int) or value < HEADER_SIZE:
        raise ValueError(f"handshake max_frame {value!r} is not a frame size")
    return value


def _blocking_read_frame(sock: socket.socket, reader: FrameReader, deadline: float) -> memoryview:
    """Read one whole frame during a handshake, at most until the deadline."""
    for _ in range(100_000):  # each pass reads or waits; the deadline ends it first
        frame = reader.next_frame()
        if frame is not None:
            return frame
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if not select.select([sock], [], [], left)[0]:
            continue
        if reader.fill(sock) == 0:
            raise LinkClosed("peer closed the connection during the handshake")
    raise TimeoutError("handshake timed out")


def connect_tcp(
    rest: str,
    identity: PeerInfo,
    poller: Poller | None = None,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    to: str = "",
    max_frame: int = DEFAULT_MAX_FRAME,
) -> TcpLink:
    """Connect to the TcpListener at 'host:port'; see dial.connect."""
    host, port = _split_host_port(rest)
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        greeting = Greeting(identity, to, "tcp", max_frame=max_frame)
        sock.sendall(greeting.frame)
        sock.setblocking(False)
        reader = FrameReader(max_frame)
        peer, body = greeting.accept(_blocking_read_frame(sock, reader, deadline), rest)
        link = TcpLink(sock, identity, peer, reader, _peer_max_frame(body))
    except BaseException:
        sock.close()
        raise
    if poller is not None:
        poller.add(link)
    return link


class TcpListener(Listener):
    """Accepts TCP links; binds 127.0.0.1 unless given another host ('tcp:0.0.0.0:5555')."""

    def __init__(
        self,
        rest: str,
        identity: PeerInfo,
        poller: Poller | None = None,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        host, port = _split_host_port(rest)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        bound_host, bound_port = sock.getsockname()[:2]
        self.address = f"tcp:{bound_host}:{bound_port}"
        self.max_frame = max_frame
        super().__init__(sock, identity, poller, handshake_timeout)

    def _new_state(self) -> FrameReader:
        # The HELLO is small; the link keeps this reader, so nothing read early is lost.
        return FrameReader(self.max_frame)

    def _handshake(self, conn: socket.socket, state: object) -> TcpLink | None:
        reader = state
        assert isinstance(reader, FrameReader)
        for _ in range(16):
            frame = reader.next_frame()
            if frame is not None:
                break
            try:
                if reader.fill(conn) == 0:
                    raise LinkClosed("peer hung up during the handshake")
            except (BlockingIOError, InterruptedError):
                return None
        else:
            return None
        peer, body, proof = self._check_hello(conn, frame, "tcp")
        conn.settimeout(self.handshake_timeout)
        conn.sendall(self._ack(proof, max_frame=self.max_frame))
        return TcpLink(conn, self.identity, peer, reader, _peer_max_frame(body))

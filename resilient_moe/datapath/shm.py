"""Shared-memory links: the transport between workers on one host.

Each link has its own memfd segment with two single-producer/single-consumer rings (csrc/shmring.c,
which documents the ring layout and the wake-up protocol) and keeps its Unix socket open for life:

- set-up: the connector creates the segment and sends it, with its doorbell eventfd, in the HELLO
  (SCM_RIGHTS); the listener answers with its own doorbell. Nothing is named in /dev/shm, so
  nothing is left behind, even after SIGKILL.
- data: `send` packs, copies and checksums a frame straight into the outgoing ring in one native
  call (the only copy); `recv` checks the next frame in place and returns tensors that are views of
  the ring (valid until `release`).
- liveness: the socket reports EOF when the peer exits or is killed; an orderly close sends a
  goodbye byte first. The socket also carries "space freed" tokens to a producer blocked on a full
  ring, so a blocked send wakes on space or on the peer's death, whichever comes first.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

import torch

from resilient_moe import _native
from resilient_moe.datapath.frames import Frame, FrameHeader, frame_from_fields, native_args
from resilient_moe.datapath.handshake import Greeting, Listener
from resilient_moe.datapath.link import DEFAULT_HANDSHAKE_TIMEOUT, FrameTooLarge, Link, LinkClosed, LinkTimeout, PeerInfo

if TYPE_CHECKING:
    from resilient_moe.datapath.poller import Poller

log = logging.getLogger(__name__)

DEFAULT_RING_SIZE = 8 << 20  # bytes per direction: frames up to half of it
MAX_RING_SIZE = 256 << 20  # the most a listener maps for one direction (by default)
DEFAULT_SEND_SPIN_US = 20.0  # a blocked producer spins this long before sleeping
_PAGE = 4096
_MAX_SKIPPED = 64  # rejected frames one recv() call skips before returning
_LIVENESS_CHECK_S = 0.001  # recv/send look at the control socket at most this often
_GOODBYE = b"G"
_PEER_GONE, _PEER_GOODBYE = 1, 2  # _native.drain_control bits


def _unix_address(name: str) -> str:
    """'@name' is an abstract socket (no file); anything else is a socket file path."""
    return "\0" + name[1:] if name.startswith("@") else name


def _round_ring_size(ring_size: int) -> int:
    if ring_size < _native.RING_MIN_CAPACITY or ring_size > MAX_RING_SIZE:
        raise ValueError(f"ring_size {ring_size} is outside [{_native.RING_MIN_CAPACITY}, {MAX_RING_SIZE}]")
    return -(-ring_size // _PAGE) * _PAGE


class ShmLink(Link):
    """A link over a pair of shared-memory rings; made by `connect_shm` or `ShmListener.accept`."""

    transport = "shm"

    def __init__(
        self,
        sock: socket.socket,
        identity: PeerInfo,
        peer: PeerInfo,
        segment_fd: int,
        ring_size: int,
        tx_index: int,
        peer_doorbell: int,
        poller: Poller | None,
        private_doorbell: int | None,
        spin_us: float = DEFAULT_SEND_SPIN_US,
    ) -> None:
        # Owns sock, peer_doorbell and private_doorbell once built (the caller closes them if this
        # raises); segment_fd stays the caller's, the mappings keep the memory.
        self.peer = peer
        self.identity = identity
        self.spin_us = spin_us
        self.rejected = 0
        self._sock = sock
        self._fd = sock.fileno()
        self._peer_doorbell = peer_doorbell
        self._private = private_doorbell
        self._owner = poller
        self._gone: str | None = None
        self._goodbye = False
        self._closed = False
        self._next_check = 0.0
        self._views: dict = {}  # tensor views of the incoming ring by position (frames.frame_from_fields)
        self.tx = _native.ShmRing(segment_fd, tx_index, ring_size, True, peer_doorbell)
        self.rx = _native.ShmRing(segment_fd, 1 - tx_index, ring_size, False, self._fd)
        self.max_frame = self.tx.max_message
        self.max_recv_frame = self.rx.max_message
        self.window_bytes = self.tx.capacity

    # ------------------------------------------------------------------ sending
    def send(
        self,
        header: FrameHeader,
        aux: torch.Tensor | None = None,
        tensor: torch.Tensor | None = None,
        body: bytes | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Encode the frame straight into the ring (see Link.send)."""
        self._check_sendable()
        args, keep = native_args(header, self.identity.number, self.identity.incarnation, aux, tensor, body)
        try:
            if not self._count(self.tx.send_frame(*args)):
                self._send_when_room(lambda: self._count(self.tx.send_frame(*args)), self.tx.want, timeout)
        except _native.MessageTooLarge as e:
            raise FrameTooLarge(f"link to {self.peer.name}: {e}") from None
        del keep  # the tensors must outlive the native call, which took them by address

    def try_send(
        self,
        header: FrameHeader,
        aux: torch.Tensor | None = None,
        tensor: torch.Tensor | None = None,
        body: bytes | None = None,
    ) -> bool:
        """Encode the frame into the ring if it has room now (see Link.try_send)."""
        self._check_sendable()
        args, keep = native_args(header, self.identity.number, self.identity.incarnation, aux, tensor, body)
        try:
            sent = self.tx.send_frame(*args)
        except _native.MessageTooLarge as e:
            raise FrameTooLarge(f"link to {self.peer.name}: {e}") from None
        del keep
        return bool(self._count(sent))

    def _count(self, sent: int) -> int:
        """Count a frame of `sent` bytes that went out (0: none did); returns `sent`."""
        if sent:
            self.bytes_sent += sent
            self.frames_sent += 1
        return sent

    def send_raw(self, data: bytes | memoryview, timeout: float = 5.0) -> None:
        """Publish bytes that are already one frame, unchanged (see Link.send_raw)."""
        self._check_sendable()
        try:
            if not self.tx.push(data):
                self._send_when_room(lambda: self.tx.push(data), len(data), timeout)
            self._count(len(data))
        except _native.MessageTooLarge as e:
            raise FrameTooLarge(f"link to {self.peer.name}: {e}") from None

    def _check_sendable(self) -> None:
        if self._closed:
            raise LinkClosed(f"link to {self.peer.name} was closed by this end")
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + _LIVENESS_CHECK_S
            self._poll_control()
        if self._gone is not None:
            raise LinkClosed(f"link to {self.peer.name}: {self._gone}")

    def _send_when_room(self, attempt, nbytes: int, timeout: float) -> None:
        """The ring was full: wait for room (or the peer's death) at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):  # each pass sleeps or finds room; the deadline ends it first
            left = deadline - time.monotonic()
            if left <= 0:
                break
            woke = self.tx.wait_space(nbytes, self._fd, self.spin_us, left)
            if woke == 1:
                self._poll_control()
                if self._gone is not None:
                    raise LinkClosed(f"link to {self.peer.name}: {self._gone}")
            if attempt():
                return
        raise LinkTimeout(f"link to {self.peer.name}: ring stayed full for {timeout:.3g}s (peer not draining)")

    # ------------------------------------------------------------------ receiving
    def recv(self) -> Frame | None:
        """The next frame, checked in place; tensors are views of the ring until release()."""
        if self._closed:
            raise LinkClosed(f"link to {self.peer.name} was closed by this end")
        try:
            fields = self.rx.recv_frame()
        except _native.RingCorrupt as e:
            self._fail(f"incoming ring is corrupt: {e}")
            raise LinkClosed(f"link to {self.peer.name}: {self._gone}") from None
        if fields.__class__ is tuple:
            return frame_from_fields(fields, self._views, self.rx.last_offset)
        return self._recv_slow(fields)

    def _recv_slow(self, fields: str | None) -> Frame | None:
        """recv() after a rejected frame or an empty ring: skip rejects, notice a dead peer."""
        for _ in range(_MAX_SKIPPED):
            if fields is None:
                if self._gone is None:
                    now = time.monotonic()
                    if now >= self._next_check:
                        self._next_check = now + _LIVENESS_CHECK_S
                        self._poll_control()
                if self._gone is not None and not self.rx.pending():
                    raise LinkClosed(f"link to {self.peer.name}: {self._gone}")
                return None
            if fields.__class__ is str:
                self.rejected += 1
                log.error("link from %s: rejected a frame: %s", self.peer.name, fields)
            else:
                return frame_from_fields(fields, self._views, self.rx.last_offset)
            try:
                fields = self.rx.recv_frame()
            except _native.RingCorrupt as e:
                self._fail(f"incoming ring is corrupt: {e}")
                raise LinkClosed(f"link to {self.peer.name}: {self._gone}") from None
        return None

    def release(self) -> None:
        """Free the ring space of every frame recv() returned so far (their views go stale)."""
        if not self._closed:
            self.rx.release()

    # ------------------------------------------------------------------ liveness and teardown
    def fileno(self) -> int:
        return self._fd

    @property
    def alive(self) -> bool:
        return not self._closed and self._gone is None

    def close(self) -> None:
        """Send a goodbye, close the socket (the peer sees EOF) and let go of the rings."""
        if self._closed:
            return
        self._closed = True
        if self.poller is not None:
            self.poller.remove(self)
        try:
            self._sock.send(_GOODBYE, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            pass
        # The rings stop first: they write to the fds closed next.
        self.tx.close()
        self.rx.close()
        self._views.clear()
        self._close_fds()

    def _close_fds(self) -> None:
        self._sock.close()
        os.close(self._peer_doorbell)
        if self._private is not None:
            os.close(self._private)
            self._private = None

    def _poll_control(self) -> None:
        if self._gone is not None or self._closed:
            return
        state = _native.drain_control(self._fd)
        self._goodbye |= bool(state & _PEER_GOODBYE)  # it may come a drain before the EOF
        if state & _PEER_GONE:
            self._fail("peer closed the link" if self._goodbye else "peer exited or was killed (socket EOF)")

    def _fail(self, reason: str) -> None:
        if self._gone is None:
            self._gone = reason
            log.warning("link to %s (pid %d): %s", self.peer.name, self.peer.pid, reason)

    # Poller hooks (see Link).
    def poll_ring(self):
        return None if self._closed else self.rx

    def on_readable(self, fd: int, mask: int) -> bool:
        if fd == self._private:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
        else:
            self._poll_control()
        return self._gone is not None or self.rx.pending()

    def doorbell_owner(self) -> Poller | None:
        return self._owner

    def private_doorbell(self) -> int | None:
        return self._private


def _doorbell_for(poller: Poller | None) -> tuple[int, int | None]:
    """(fd to hand to the peer, private fd this link owns or None)."""
    if poller is not None:
        return poller.doorbell_fd, None
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    return fd, fd


def connect_shm(
    name: str,
    identity: PeerInfo,
    poller: Poller | None = None,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    to: str = "",
    ring_size: int = DEFAULT_RING_SIZE,
    spin_us: float = DEFAULT_SEND_SPIN_US,
) -> ShmLink:
    """Connect to the ShmListener `name` ('@abstract' or a socket path); see dial.connect."""
    ring_size = _round_ring_size(ring_size)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    segment = peer_doorbell = private = None
    try:  # until the link exists, every fd here is ours to close
        sock.settimeout(timeout)
        sock.connect(_unix_address(name))
        segment = _native.shm_segment(ring_size)
        doorbell, private = _doorbell_for(poller)
        greeting = Greeting(identity, to, "shm", ring_size=ring_size)
        socket.send_fds(sock, [greeting.frame], [segment, doorbell])
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1, socket.MSG_CMSG_CLOEXEC)
        peer_doorbell = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        if not data:
            raise LinkClosed(f"listener {name} closed the connection during the handshake")
        peer, _ = greeting.accept(data, name)
        if peer_doorbell is None:
            raise ValueError("HELLO_ACK carried no doorbell fd")
        sock.setblocking(False)
        link = ShmLink(sock, identity, peer, segment, ring_size, 0, peer_doorbell, poller, private, spin_us)
    except BaseException:
        sock.close()
        for fd in (peer_doorbell, private):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        if segment is not None:
            os.close(segment)  # the mappings keep the memory
    if poller is not None:
        poller.add(link)
    return link


class ShmListener(Listener):
    """Accepts shm links on a Unix SEQPACKET socket ('@name': abstract namespace, no file)."""

    def __init__(
        self,
        name: str,
        identity: PeerInfo,
        poller: Poller | None = None,
        *,
        max_ring_size: int = MAX_RING_SIZE,
        spin_us: float = DEFAULT_SEND_SPIN_US,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.bind(_unix_address(name))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self.address = f"shm:{name}"
        self._path = None if name.startswith("@") else name
        self.max_ring_size = max_ring_size
        self.spin_us = spin_us
        super().__init__(sock, identity, poller, handshake_timeout)

    def _handshake(self, conn: socket.socket, state: object) -> ShmLink | None:
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        link = private = None
        try:
            if not data:
                raise LinkClosed("peer hung up during the handshake")
            peer, body, proof = self._check_hello(conn, data, "shm")
            ring_size = body.get("ring_size")
            if len(fds) != 2:
                raise ValueError(f"HELLO from {peer.name} carried {len(fds)} fds, not the ring memory and a doorbell")
            if not isinstance(ring_size, int) or not 0 < ring_size <= self.max_ring_size or ring_size % _PAGE:
                reason = f"ring_size {ring_size!r} not accepted (whole pages, at most {self.max_ring_size})"
                self._refuse(conn, reason)
                raise ValueError(f"HELLO from {peer.name}: {reason}")
            segment, peer_doorbell = fds
            doorbell, private = _doorbell_for(self.poller)
            link = ShmLink(conn, self.identity, peer, segment, ring_size, 1, peer_doorbell, self.poller, private,
                           self.spin_us)
            fds, private = [segment], None  # the link owns the doorbells now
            socket.send_fds(conn, [self._ack(proof)], [doorbell])
            return link
        except BaseException:
            if link is not None:
                link.close()
            if private is not None:
                os.close(private)
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def _cleanup(self) -> None:
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

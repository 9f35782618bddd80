"""Point-to-point links between workers, and how they are set up.

DESIGN.md: no collectives. Every attention-worker/expert-worker pair has its own `Link`, with one
channel per direction. A link is created and torn down without involving any other worker. Two
transports implement it: shared memory (`shm.py`, native rings in csrc/) for peers on one host, and
TCP (`tcp.py`) for peers anywhere. Both carry the frames of `frames.py` whole.

A link notices a dead peer at once when it can (the peer process exited, the socket was reset):
`recv` and `send` then raise `LinkClosed`, and the link's fd becomes readable so a waiting poller
wakes up. Deciding what a dead peer means is left to the caller (resilience logic).

Set-up. One side listens (`listen(address, identity, poller)`), the other connects
(`connect(address, identity, poller)`). A worker that peers on other nodes may reach listens on
both transports and publishes both addresses, space-separated; `choose_address` picks one per pair.
Addresses are strings: `shm:@rmoe-c1-ew-2` (an abstract
Unix socket name; `shm:/path` for a socket file) or `tcp:127.0.0.1:5555` (port 0 picks one; the
listener's `address` says which). The connector sends HELLO and the listener answers HELLO_ACK,
both frames with a JSON body:

    HELLO      {"protocol": 1, "transport": "shm"|"tcp", "peer": PeerInfo, "ring_size": n (shm),
                "to": listener name or "", "auth": Credential}
    HELLO_ACK  {"protocol": 1, "peer": PeerInfo, "auth_answer": str}
               (ERROR flag: the body is the reason, UTF-8)

Authentication (DESIGN.md: every connection proves the cluster secret). "auth" is an
`auth.Credential` for purpose "link", bound to the connector's name and incarnation and to "to", the
worker the connector means to reach (`connect(..., to=name)`; a listener refuses a HELLO meant for
another name, so a HELLO recorded on the wire cannot be replayed to another worker); each listener
checks it with its own `auth.Verifier` (so it cannot be replayed to the same one) and refuses a
connector without the secret with an ERROR HELLO_ACK "authentication failed: ...", logged
(rate-limited) and counted in `auth.REFUSED["link"]`. "auth_answer" is the listener's half of the
mutual proof (`auth.answer`): the connector drops a listener that cannot give it.

The shm HELLO also carries, as SCM_RIGHTS, the memfd holding both rings and the connector's
doorbell eventfd; the HELLO_ACK carries the listener's doorbell. After the handshake both ends know
the other's `PeerInfo` (`link.peer`).
"""

from __future__ import annotations

import abc
import collections
import json
import logging
import select
import socket
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from resilient_moe import auth
from resilient_moe.datapath.frames import Frame, FrameFlags, FrameHeader, FrameKind, decode, encode

if TYPE_CHECKING:
    from resilient_moe.datapath.poller import Poller

log = logging.getLogger(__name__)

PROTOCOL = 1
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
_MAX_NEW_PER_ACCEPT = 16  # connections taken from the backlog per accept() call


class LinkClosed(ConnectionError):
    """The peer closed the link, exited or reset it; `reason` says which."""


class LinkTimeout(TimeoutError):
    """A send could not complete in time (the peer stopped draining its channel)."""


class FrameTooLarge(ValueError):
    """A frame can never fit the link (for shm: more than half a ring); nothing was sent."""


@dataclass(frozen=True)
class PeerInfo:
    """Who is at the other end, as it introduced itself in the link handshake."""

    name: str  # e.g. "ew-2"
    number: int  # frames.worker_number
    incarnation: int
    pid: int
    host: str = "127.0.0.1"

    def to_json(self) -> dict:
        """The JSON object the handshake carries."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> PeerInfo:
        """Checks every field: this comes from the network."""
        if not isinstance(data, dict):
            raise ValueError(f"peer info must be an object, got {type(data).__name__}")
        types = {"name": str, "number": int, "incarnation": int, "pid": int, "host": str}
        for key, kind in types.items():
            value = data.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"peer info field {key!r} must be {kind.__name__}, got {value!r}")
        if not 0 <= data["number"] < 1 << 32 or not 0 <= data["incarnation"] < 1 << 64:
            raise ValueError(f"peer info number/incarnation out of range: {data['number']}, {data['incarnation']}")
        if len(data["name"]) > 256 or len(data["host"]) > 256:
            raise ValueError("peer info name/host longer than 256 characters")
        return cls(**{key: data[key] for key in types})


class Link(abc.ABC):
    """A bidirectional frame link to one peer."""

    peer: PeerInfo
    transport: str = ""  # "shm" or "tcp"
    max_frame: int = 0  # bytes of the largest frame send() takes (half a ring; the peer's TCP limit)
    max_recv_frame: int = 0  # bytes of the largest frame this end accepts (what the peer may send us)
    window_bytes: int = 0  # bytes of frames that can wait in the channel before a sender must hold back
    rejected: int = 0  # malformed or corrupt frames dropped so far
    _poller: Poller | None = None

    @abc.abstractmethod
    def send(
        self,
        header: FrameHeader,
        aux: torch.Tensor | None = None,
        tensor: torch.Tensor | None = None,
        body: bytes | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Send one frame. Sender id and incarnation are filled in from this end's identity.

        Blocks only while the outgoing channel is full, at most `timeout` seconds (LinkTimeout).
        Raises LinkClosed if the peer is gone, FrameTooLarge if the frame can never fit.
        """

    @abc.abstractmethod
    def try_send(
        self,
        header: FrameHeader,
        aux: torch.Tensor | None = None,
        tensor: torch.Tensor | None = None,
        body: bytes | None = None,
    ) -> bool:
        """Send one frame if the channel has room now, never blocking: True when it was sent (or
        taken whole into the link's own queue, see `flush`), False when nothing was sent.

        Raises LinkClosed if the peer is gone, FrameTooLarge if the frame can never fit.
        """

    def flush(self) -> bool:
        """Push out what `try_send` queued inside the link, without blocking; True when nothing is left."""
        return True

    @property
    def backlogged(self) -> bool:
        """Frames wait inside the link for the channel (the owner should call `flush` soon)."""
        return False

    @abc.abstractmethod
    def send_raw(self, data: bytes | memoryview, timeout: float = 5.0) -> None:
        """Send bytes that are already one encoded frame, unchanged (relaying; fault-injection tests)."""

    @abc.abstractmethod
    def recv(self) -> Frame | None:
        """The next received frame, or None if none is waiting. Never blocks.

        Tensors in the frame may be views into the channel's memory: they stay valid until
        `release()`. A malformed or corrupt frame is logged, counted in `rejected` and skipped.
        Raises LinkClosed once the peer is gone and every frame it sent has been received.
        """

    @abc.abstractmethod
    def release(self) -> None:
        """Free the channel space of every frame returned by `recv` so far."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """An fd that becomes readable when the peer dies or closes (used by the Poller)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close this end (idempotent). The peer sees LinkClosed."""

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """False once the peer is known to be gone or the link was closed."""

    # Hooks for the Poller (poller.py); transports override what applies to them.
    def _rx_ring(self):
        """The consuming end of the incoming shm ring, spun on by the poller (shm only)."""
        return None

    def _buffered(self) -> bool:
        """Whole frames wait in user space, so the poller must not sleep (stream transports)."""
        return False

    def _on_readable(self, fd: int, mask: int) -> bool:
        """One of this link's fds is ready; True if the owner should call recv()."""
        return True

    def _doorbell_owner(self) -> Poller | None:
        """The poller whose doorbell this link's peer rings, if any."""
        return None

    def _private_doorbell(self) -> int | None:
        """The link's own doorbell eventfd, when it was made without a poller."""
        return None

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        peer = getattr(self, "peer", None)
        return f"<{type(self).__name__} to {peer.name if peer else '?'} {'alive' if self.alive else 'closed'}>"


class Listener(abc.ABC):
    """Accepts links on one address without blocking, driven by the owner's poll loop.

    `fileno()` is an epoll fd holding the listening socket and every connection whose handshake is
    under way, so it becomes readable whenever accept() can make progress; give it to
    `Poller.add_fd` and call `accept()` until it returns None. Accepted links are added to the
    poller passed to `listen`. A handshake that does not finish within `handshake_timeout` is
    dropped (checked on accept() calls).
    """

    address: str

    def __init__(self, sock: socket.socket, identity: PeerInfo, poller: Poller | None, handshake_timeout: float):
        self.identity = identity
        self.poller = poller
        self.handshake_timeout = handshake_timeout
        self._sock = sock
        self._epoll = select.epoll()
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        self._pending: dict[int, tuple[socket.socket, float, object]] = {}  # fd -> (sock, deadline, state)
        self._closed = False
        self._verifier = auth.Verifier(LINK_PURPOSE)

    def fileno(self) -> int:
        """Readable when accept() can make progress (a new connection or handshake data)."""
        return self._epoll.fileno()

    def accept(self) -> Link | None:
        """The next link whose handshake completed, or None. Never blocks."""
        if self._closed:
            raise ValueError(f"listener {self.address} is closed")
        # Step 1: drop handshakes that took too long.
        now = time.monotonic()
        for fd, (conn, deadline, _) in list(self._pending.items()):
            if now > deadline:
                log.warning("listener %s: dropped a connection whose handshake took over %.1fs", self.address,
                            self.handshake_timeout)
                self._drop(fd)
        # Step 2: take new connections and advance handshakes that have data. A new connection's
        # HELLO is usually there already, so its handshake is tried at once.
        for fd, _mask in self._epoll.poll(0, 64):
            if fd != self._sock.fileno():
                link = self._advance(fd)
                if link is not None:
                    return link
                continue
            for _ in range(_MAX_NEW_PER_ACCEPT):
                try:
                    conn, _ = self._sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                conn.setblocking(False)
                self._epoll.register(conn.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
                self._pending[conn.fileno()] = (conn, now + self.handshake_timeout, self._new_state())
                link = self._advance(conn.fileno())
                if link is not None:
                    return link
        return None

    def _advance(self, fd: int) -> Link | None:
        entry = self._pending.get(fd)
        if entry is None:
            return None
        conn, _, state = entry
        try:
            link = self._handshake(conn, state)
        except auth.AuthError as e:
            auth.log_refusal(log, LINK_PURPOSE, f"listener {self.address}: refused a link: {e}")
            self._drop(fd)
            return None
        except Exception as e:  # whatever a peer sends, the owner's loop goes on
            log.error("listener %s: handshake failed: %s: %s", self.address, type(e).__name__, e)
            self._drop(fd)
            return None
        if link is None:
            return None
        self._epoll.unregister(fd)
        del self._pending[fd]
        if self.poller is not None:
            self.poller.add(link)
        log.info("listener %s: link from %s (pid %d) up", self.address, link.peer.name, link.peer.pid)
        return link

    def close(self) -> None:
        """Stop listening and drop unfinished handshakes (links already accepted stay up)."""
        if self._closed:
            return
        self._closed = True
        for fd in list(self._pending):
            self._drop(fd)
        self._epoll.close()
        self._sock.close()
        self._cleanup()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drop(self, fd: int) -> None:
        conn, _, state = self._pending.pop(fd)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        self._discard(state)
        conn.close()

    def _authenticate(self, conn: socket.socket, peer: PeerInfo, body: dict) -> str:
        """Check the connector's proof in its HELLO; the answer its HELLO_ACK carries. Raises AuthError
        (counted) after telling the connector why, with a refusal frame."""
        to = body.get("to", "")
        try:
            if not isinstance(to, str) or to not in ("", self.identity.name):
                auth.refused(LINK_PURPOSE)
                raise auth.AuthError(f"link: the HELLO is meant for {to!r}, this is {self.identity.name!r}")
            credential = self._verifier.verify_json(body.get("auth"), link_context(peer, to))
        except auth.AuthError as e:
            try:
                conn.send(bytes(refusal_frame(self.identity, f"authentication failed: {e}")))
            except OSError:
                pass
            raise auth.AuthError(f"{peer.name} (pid {peer.pid}): {e}") from None
        return auth.answer(credential, LINK_PURPOSE, link_context(peer, to))

    def _new_state(self) -> object:
        """Per-connection handshake state (e.g. a partial-frame reader)."""
        return None

    def _discard(self, state: object) -> None:
        """Free what an abandoned handshake holds."""

    def _cleanup(self) -> None:
        """Transport-specific teardown after close (e.g. unlink a socket file)."""

    @abc.abstractmethod
    def _handshake(self, conn: socket.socket, state: object) -> Link | None:
        """Advance one connection's handshake: the Link once it completes, None while it waits.
        Raises when it fails; accept() logs why and drops the connection."""


LINK_PURPOSE = "link"


def link_context(peer: PeerInfo, to: str) -> str:
    """What a link credential is bound to: the connector as it introduces itself, and whom it dials."""
    return f"{peer.name}/{peer.incarnation}>{to}"


def link_credential(identity: PeerInfo, to: str) -> auth.Credential:
    """The connector's proof for its HELLO (`"to": to, "auth": credential.to_json()`)."""
    return auth.Credential.make(LINK_PURPOSE, link_context(identity, to))


def check_listener(credential: auth.Credential, identity: PeerInfo, to: str, body: dict, listener: str) -> None:
    """The connector's check of the HELLO_ACK's answer: the listener holds the secret too."""
    try:
        auth.check_answer(credential, body.get("auth_answer"), LINK_PURPOSE, link_context(identity, to))
    except auth.AuthError as e:
        raise auth.AuthError(f"listener {listener}: {e}") from None


def hello_frame(kind: FrameKind, identity: PeerInfo, **extra) -> bytearray:
    """An encoded HELLO / HELLO_ACK frame introducing `identity`."""
    body = json.dumps({"protocol": PROTOCOL, "peer": identity.to_json(), **extra}).encode()
    return encode(FrameHeader(kind, sender=identity.number, incarnation=identity.incarnation), body=body)


def refusal_frame(identity: PeerInfo, reason: str) -> bytearray:
    """A HELLO_ACK with the ERROR flag: the listener refuses the link and says why."""
    header = FrameHeader(FrameKind.HELLO_ACK, sender=identity.number, incarnation=identity.incarnation,
                         flags=FrameFlags.ERROR)
    return encode(header, body=reason.encode()[:4096])


def parse_hello(data: bytes | memoryview, expect: FrameKind) -> tuple[PeerInfo, dict]:
    """Checks a handshake frame; returns the peer and the whole JSON body. Raises on anything odd."""
    frame = decode(memoryview(bytearray(data)))  # a private, writable copy: tensors may view it
    if frame.header.kind is not expect:
        raise ValueError(f"expected {expect.name}, got {frame.header.kind.name}")
    if frame.header.flags & FrameFlags.ERROR:
        raise LinkClosed(f"peer refused the link: {bytes(frame.body).decode(errors='replace')}")
    try:
        body = json.loads(bytes(frame.body))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{expect.name} body is not JSON: {e}") from None
    if not isinstance(body, dict) or body.get("protocol") != PROTOCOL:
        raise ValueError(f"{expect.name} speaks protocol {body.get('protocol') if isinstance(body, dict) else '?'}, "
                         f"this build speaks {PROTOCOL}")
    return PeerInfo.from_json(body.get("peer")), body


def split_address(address: str) -> tuple[str, str]:
    """'shm:@name' -> ('shm', '@name'); 'tcp:host:port' -> ('tcp', 'host:port')."""
    scheme, sep, rest = address.partition(":")
    if not sep or scheme not in ("shm", "tcp") or not rest:
        raise ValueError(f"link address {address!r} is not 'shm:@name', 'shm:/path' or 'tcp:host:port'")
    return scheme, rest


def choose_address(addresses: str, same_node: bool) -> str:
    """The address to connect to among a listener's published ones (space-separated): shared memory
    when both ends share a node and the listener offers it, else TCP (shm cannot cross nodes); a
    single address is taken as it is."""
    options = addresses.split()
    if not options:
        raise ValueError("the peer publishes no link address")
    by_scheme = {address.partition(":")[0]: address for address in options}
    if same_node and "shm" in by_scheme:
        return by_scheme["shm"]
    return by_scheme.get("tcp", options[0])


def connect(address: str, identity: PeerInfo, poller: Poller | None = None, *,
            timeout: float = DEFAULT_HANDSHAKE_TIMEOUT, to: str = "", **options) -> Link:
    """Open a link to the listener at `address`, blocking at most `timeout` for the handshake.

    The link is added to `poller` (whose doorbell the peer will ring). `to`: the name of the worker
    expected at `address`, which the credential is bound to (see the module docstring). Options: shm `ring_size`
    (bytes per direction) and `spin_us` (spin before sleeping while the ring is full); tcp
    `max_frame`.
    """
    scheme, rest = split_address(address)
    if scheme == "shm":
        from resilient_moe.datapath.shm import connect_shm

        return connect_shm(rest, identity, poller, timeout=timeout, to=to, **options)
    from resilient_moe.datapath.tcp import connect_tcp

    return connect_tcp(rest, identity, poller, timeout=timeout, to=to, **options)


def listen(address: str, identity: PeerInfo, poller: Poller | None = None, **options) -> Listener:
    """Listen for links at `address`; accepted links join `poller`. See ShmListener / TcpListener."""
    scheme, rest = split_address(address)
    if scheme == "shm":
        from resilient_moe.datapath.shm import ShmListener

        return ShmListener(rest, identity, poller, **options)
    from resilient_moe.datapath.tcp import TcpListener

    return TcpListener(rest, identity, poller, **options)


class Outbox:
    """Frames for one link, sent in order without ever blocking: what finds no room waits here and
    goes out with later `flush` calls. The owner decides what a long queue means (`len`)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self._queue: collections.deque[tuple] = collections.deque()

    def send(self, header: FrameHeader, aux: torch.Tensor | None = None, tensor: torch.Tensor | None = None,
             body: bytes | None = None) -> None:
        """Send now if the link has room and nothing waits before it, else queue. Raises LinkClosed and
        FrameTooLarge as Link.try_send does."""
        if not self._queue and self.link.try_send(header, aux, tensor, body):
            return
        self._queue.append((header, aux, tensor, body))

    def flush(self) -> bool:
        """Send what the link takes now; True when nothing waits."""
        self.link.flush()
        while self._queue and self.link.try_send(*self._queue[0]):
            self._queue.popleft()
        return not self._queue

    def __len__(self) -> int:
        return len(self._queue)

"""How two workers meet: the listener that accepts links, the HELLO / HELLO_ACK exchange and its
authentication, one path for both transports (shm and tcp differ only in how the frames and fds
travel).

One side listens (`dial.listen`), the other connects (`dial.connect`). The connector sends HELLO and
the listener answers HELLO_ACK, both frames with a JSON body:

    HELLO      {"protocol": 1, "transport": "shm"|"tcp", "peer": PeerInfo, "ring_size": n (shm),
                "max_frame": n (tcp), "to": listener name or "", "auth": Credential}
    HELLO_ACK  {"protocol": 1, "peer": PeerInfo, "auth_answer": str, "max_frame": n (tcp)}
               (ERROR flag: the body is the reason, UTF-8)

Authentication (DESIGN.md: every connection proves the cluster secret). "auth" is an
`auth.Credential` for purpose "link", bound to the connector's name and incarnation and to "to", the
worker the connector means to reach (a listener refuses a HELLO meant for another name, so a HELLO
recorded on the wire cannot be replayed to another worker); each listener checks it with its own
`auth.Verifier` (so it cannot be replayed to the same one) and refuses a connector without the
secret with an ERROR HELLO_ACK "authentication failed: ...", logged (rate-limited) and counted in
`auth.REFUSED["link"]`. "auth_answer" is the listener's half of the mutual proof (`auth.answer`):
the connector drops a listener that cannot give it.

The shm HELLO also carries, as SCM_RIGHTS, the memfd holding both rings and the connector's
doorbell eventfd; the HELLO_ACK carries the listener's doorbell. After the handshake both ends know
the other's `PeerInfo` (`link.peer`).
"""

from __future__ import annotations

import abc
import json
import logging
import select
import socket
import time
from typing import TYPE_CHECKING

from resilient_moe import auth
from resilient_moe.datapath.frames import FrameFlags, FrameHeader, FrameKind, decode, encode
from resilient_moe.datapath.link import Link, LinkClosed, PeerInfo

if TYPE_CHECKING:
    from resilient_moe.datapath.poller import Poller

log = logging.getLogger(__name__)

PROTOCOL = 1
_MAX_NEW_PER_ACCEPT = 16  # connections taken from the backlog per accept() call


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


class Greeting:
    """The connector's half of a handshake: its HELLO (`frame`), and the check of the listener's
    HELLO_ACK (`accept`), for either transport."""

    def __init__(self, identity: PeerInfo, to: str, transport: str, **extra) -> None:
        self.identity, self.to = identity, to
        self.credential = link_credential(identity, to)
        self.frame = hello_frame(FrameKind.HELLO, identity, transport=transport, to=to,
                                 auth=self.credential.to_json(), **extra)

    def accept(self, data: bytes | memoryview, listener: str) -> tuple[PeerInfo, dict]:
        """The listener and its HELLO_ACK body, once it proved the secret. Raises LinkClosed on a
        refusal, AuthError on a listener without the secret, ValueError on anything malformed."""
        peer, body = parse_hello(data, FrameKind.HELLO_ACK)
        check_listener(self.credential, self.identity, self.to, body, listener)
        return peer, body


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

    def _check_hello(self, conn: socket.socket, data: bytes | memoryview, transport: str) -> tuple[PeerInfo, dict, str]:
        """Check a connector's HELLO: well-formed, of this transport, meant for this worker, with a
        proof of the secret. Returns (peer, body, the answer its HELLO_ACK carries). Raises AuthError
        (counted) after telling the connector why with a refusal frame, ValueError on a malformed one."""
        peer, body = parse_hello(data, FrameKind.HELLO)
        to = body.get("to", "")
        try:
            if not isinstance(to, str) or to not in ("", self.identity.name):
                auth.refused(LINK_PURPOSE)
                raise auth.AuthError(f"link: the HELLO is meant for {to!r}, this is {self.identity.name!r}")
            credential = self._verifier.verify_json(body.get("auth"), link_context(peer, to))
        except auth.AuthError as e:
            self._refuse(conn, f"authentication failed: {e}")
            raise auth.AuthError(f"{peer.name} (pid {peer.pid}): {e}") from None
        if body.get("transport") != transport:
            raise ValueError(f"HELLO from {peer.name} is not a {transport} HELLO")
        return peer, body, auth.answer(credential, LINK_PURPOSE, link_context(peer, to))

    def _ack(self, proof: str, **extra) -> bytearray:
        """The HELLO_ACK that completes a handshake whose HELLO `_check_hello` passed."""
        return hello_frame(FrameKind.HELLO_ACK, self.identity, auth_answer=proof, **extra)

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        """Tell the connector why its link is refused (best effort: it may have gone)."""
        try:
            conn.send(bytes(refusal_frame(self.identity, reason)))
        except OSError:
            pass

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

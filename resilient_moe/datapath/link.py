"""The link interface: a point-to-point frame channel between two workers, its errors, who is at the
other end (`PeerInfo`), and a non-blocking send queue (`Outbox`).

DESIGN.md: no collectives. Every attention-worker/expert-worker pair has its own `Link`, with one
channel per direction. A link is created and torn down without involving any other worker. Two
transports implement it: shared memory (`shm.py`, native rings in csrc/) for peers on one host, and
TCP (`tcp.py`) for peers anywhere. Both carry the frames of `frames.py` whole. How two workers meet
(listener, HELLO, authentication) is `handshake.py`; which transport a pair uses and how it dials is
`dial.py`. This module imports neither: an interface knows nothing of its implementations.

A link notices a dead peer at once when it can (the peer process exited, the socket was reset):
`recv` and `send` then raise `LinkClosed`, and the link's fd becomes readable so a waiting poller
wakes up. Deciding what a dead peer means is left to the caller (resilience logic).

The poller (`poller.py`) drives links through the public hooks at the end of `Link` (`poll_ring`,
`holds_frames`, `on_readable`, `doorbell_owner`, `private_doorbell`); a transport overrides what
applies to it.
"""

from __future__ import annotations

import abc
import collections
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from resilient_moe.datapath.frames import Frame, FrameHeader

if TYPE_CHECKING:
    from resilient_moe.datapath.poller import Poller

DEFAULT_HANDSHAKE_TIMEOUT = 5.0


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
    bytes_sent: int = 0  # bytes of whole frames sent (or taken whole into the link's queue) so far
    frames_sent: int = 0
    poller: Poller | None = None  # the poller watching this link (set by Poller.add)

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

    # ---- hooks the poller drives (poller.py); a transport overrides what applies to it --------

    def poll_ring(self):
        """The consuming end of the incoming shm ring, which the poller spins on; None: no ring (the
        link's fd alone says when it is readable)."""
        return None

    def holds_frames(self) -> bool:
        """Whole frames wait in user space, so the poller must not sleep (stream transports)."""
        return False

    def on_readable(self, fd: int, mask: int) -> bool:
        """One of this link's fds is ready; True if the owner should call recv()."""
        return True

    def doorbell_owner(self) -> Poller | None:
        """The poller whose doorbell this link's peer rings, if any."""
        return None

    def private_doorbell(self) -> int | None:
        """The link's own doorbell eventfd, when it was made without a poller."""
        return None

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        peer = getattr(self, "peer", None)
        return f"<{type(self).__name__} to {peer.name if peer else '?'} {'alive' if self.alive else 'closed'}>"


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

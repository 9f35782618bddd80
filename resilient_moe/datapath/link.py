"""Point-to-point links between workers, and the poller a worker waits on.

DESIGN.md: no collectives. Every attention-worker/expert-worker pair has its own `Link`, with one
channel per direction. A link is created and torn down without involving any other worker. Two
transports implement it: shared memory (`shm.py`, native rings in csrc/) for peers on one host, and
TCP (`tcp.py`) for peers anywhere. Both carry the frames of `frames.py` whole.

A link notices a dead peer at once when it can (the peer process exited, the socket was reset):
`recv` and `send` then raise `LinkClosed`, and the link's fd becomes readable so a waiting poller
wakes up. Deciding what a dead peer means is left to the caller (resilience logic).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from resilient_moe.datapath.frames import Frame, FrameHeader


class LinkClosed(ConnectionError):
    """The peer closed the link, exited or reset it; `reason` says which."""


class LinkTimeout(TimeoutError):
    """A send could not complete in time (the peer stopped draining its channel)."""


@dataclass(frozen=True)
class PeerInfo:
    """Who is at the other end, as it introduced itself in the link handshake."""

    name: str  # e.g. "ew-2"
    number: int  # frames.worker_number
    incarnation: int
    pid: int
    host: str = "127.0.0.1"


class Link(abc.ABC):
    """A bidirectional frame link to one peer."""

    peer: PeerInfo

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
        Raises LinkClosed if the peer is gone.
        """

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

    rejected: int = 0  # malformed or corrupt frames dropped so far

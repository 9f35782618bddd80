"""An attention worker's view of its expert workers: one `ExpertPeer` per worker (its link, the parts it
owes, what its silence means so far), and the `LinkOpener` that opens links off the step thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from resilient_moe.datapath.dial import connect
from resilient_moe.datapath.expert_calls import Part
from resilient_moe.datapath.link import Link, PeerInfo
from resilient_moe.procs import background_thread

log = logging.getLogger("resilient_moe.forwarding")


@dataclass
class ExpertPeer:
    """An expert worker as this attention worker sees it."""

    name: str
    incarnation: int
    link: Link
    outstanding: dict[int, Part] = field(default_factory=dict)  # seq -> part sent, not yet answered
    outbox: deque[Part] = field(default_factory=deque)  # parts waiting for room on the link
    inflight_bytes: int = 0
    inflight_rows: int = 0
    next_seq: int = 1
    newest_answered: int = 0  # highest seq answered: an older part still unanswered was skipped (lost)
    last_heard: float = field(default_factory=time.monotonic)
    probes_sent: int = 0  # unanswered probes since it was last heard from
    suspect: bool = False  # silent, late or malformed: routed around until it answers again
    busy: bool = False  # its process was runnable when last looked at (busy_checked_at)
    busy_checked_at: float = 0.0
    fenced: bool = False  # declared dead by the controller: never routed to again

    @property
    def routable(self) -> bool:
        return not (self.suspect or self.fenced)

    def take_parts(self) -> list[Part]:
        """Every part not answered yet (sent or waiting to be), which this peer no longer owes."""
        parts = [*self.outstanding.values(), *self.outbox]
        self.outstanding.clear()
        self.outbox.clear()
        self.inflight_bytes = self.inflight_rows = 0
        return parts

    def forget(self, part: Part) -> None:
        """An outstanding part is answered (or given up on here)."""
        del self.outstanding[part.seq]
        self.inflight_bytes -= part.nbytes
        self.inflight_rows -= part.pairs


class LinkOpener:
    """Opens links to expert workers, checked to reach the incarnation asked for: at once (`open`, any
    thread) or on a thread of its own (`open_soon`: setting up a link takes tens of milliseconds, which
    a step must not wait for), collected by the thread that owns the poller (`opened`)."""

    def __init__(self, identity: PeerInfo, ring_bytes: int) -> None:
        self.identity = identity
        self.ring_bytes = ring_bytes
        self._connecting: set[tuple[str, int]] = set()
        self._opened: "queue.SimpleQueue[tuple[str, int, Link | None]]" = queue.SimpleQueue()

    @property
    def busy(self) -> bool:
        """Links are being opened in the background."""
        return bool(self._connecting)

    def open(self, name: str, address: str, incarnation: int) -> Link:
        """A link to `name` at `address`, checked to be `incarnation` (no poller yet)."""
        options = {"ring_size": self.ring_bytes} if address.startswith("shm:") else {}
        link = connect(address, self.identity, None, to=name, **options)
        if link.peer.incarnation != incarnation:
            link.close()
            raise ConnectionError(f"{address} answered as {link.peer.name} incarnation {link.peer.incarnation}, "
                                  f"expected {name} incarnation {incarnation}")
        return link

    def open_soon(self, name: str, address: str, incarnation: int) -> None:
        """Open in the background (once per incarnation at a time); failures are logged and reported
        by `opened` as None, so the next cluster view asks again."""
        if (name, incarnation) in self._connecting:
            return
        self._connecting.add((name, incarnation))

        def open_link() -> None:
            background_thread()
            try:
                self._opened.put((name, incarnation, self.open(name, address, incarnation)))
            except Exception as e:  # noqa: BLE001 (refused, gone, a bad handshake: asked again by the next view)
                log.warning("cannot link to %s at %s: %s", name, address, e)
                self._opened.put((name, incarnation, None))

        threading.Thread(target=open_link, name=f"link-{name}", daemon=True).start()

    def opened(self) -> Iterator[tuple[str, int, Link | None]]:
        """(name, incarnation, link or None if it failed) of each background open finished since the last call."""
        while not self._opened.empty():
            name, incarnation, link = self._opened.get()
            self._connecting.discard((name, incarnation))
            yield name, incarnation, link

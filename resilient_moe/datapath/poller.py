"""The poller: the one place a worker process waits for its links.

Every process that receives frames owns one `Poller`. It holds the process's doorbell (an eventfd
that every incoming shared-memory ring rings when this process sleeps; it travels to each peer in
the link handshake) and an epoll set with the links' sockets and any other fds the owner cares about
(listeners, control sockets). `wait()` first looks at the shared-memory rings, spins over them for a
few tens of microseconds with the GIL released (a reply usually lands within that time, and a sleep
and wake-up would cost several microseconds more), then sleeps in epoll_wait, so an idle worker uses
no CPU. It wakes on a frame on any link, a dead peer (its socket reports EOF), or a ready fd. While
it spins it also checksums big frames that are still being copied in (cut-through, shmring.c), so
little of that work is left once they arrive.

One thread owns a poller and the links in it (the rings are single-consumer).
"""

from __future__ import annotations

import os
import select

from resilient_moe import _native
from resilient_moe.datapath.link import Link

DEFAULT_SPIN_US = 50.0
_LINK_EVENTS = select.EPOLLIN | select.EPOLLRDHUP


class Poller:
    """Waits on a process's links and fds; see the module docstring."""

    def __init__(self, spin_us: float = DEFAULT_SPIN_US) -> None:
        if spin_us < 0:
            raise ValueError(f"spin_us must be >= 0, got {spin_us}")
        self.spin_us = spin_us
        self._epoll = select.epoll()
        self._epoll_fd = self._epoll.fileno()
        self._calls = 0
        self._doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._doorbell, select.EPOLLIN)
        self._links: dict[int, Link] = {}  # fd (control socket or private doorbell) -> link
        self._members: set[Link] = set()
        self._fds: set[int] = set()
        self._rings: tuple = ()  # consuming ends of the shm links' incoming rings
        self._ring_links: list[Link] = []
        self._streams: list[Link] = []  # links that may hold whole frames in user space (TCP)
        self._closed = False

    @property
    def doorbell_fd(self) -> int:
        """The eventfd peers ring; links made with this poller hand it to their peer."""
        return self._doorbell

    def add(self, link: Link) -> None:
        """Watch a link (idempotent). Links made with `poller=` are added when they are made."""
        if link in self._members:
            return
        owner = link.doorbell_owner()
        if owner is not None and owner is not self:
            raise ValueError(f"link to {link.peer.name} rings another poller's doorbell; add it there")
        fd = link.fileno()
        self._epoll.register(fd, _LINK_EVENTS)
        self._links[fd] = link
        private = link.private_doorbell()
        if private is not None:
            self._epoll.register(private, select.EPOLLIN)
            self._links[private] = link
        self._members.add(link)
        link.poller = self
        self._rebuild()

    def remove(self, link: Link) -> None:
        """Stop watching a link (idempotent); closing a link removes it."""
        if link not in self._members:
            return
        self._members.discard(link)
        for fd in [fd for fd, owner in self._links.items() if owner is link]:
            del self._links[fd]
            try:
                self._epoll.unregister(fd)
            except OSError:  # already closed: epoll dropped it
                pass
        if link.poller is self:
            link.poller = None
        self._rebuild()

    def add_fd(self, fd: int, events: int = select.EPOLLIN) -> None:
        """Watch another fd (a listener's fileno(), a control socket); wait() returns it when ready."""
        if fd in self._fds:
            return
        self._epoll.register(fd, events)
        self._fds.add(fd)

    def remove_fd(self, fd: int) -> None:
        """Stop watching an fd given to add_fd (idempotent)."""
        if fd in self._fds:
            self._fds.discard(fd)
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def wait(self, timeout_s: float | None = None) -> tuple[list[Link], list[int]]:
        """Block until something is ready, at most timeout_s (None: no limit; 0: just look).

        Returns (links, fds): links with a frame waiting or whose peer is gone (call recv(): it
        returns frames, then raises LinkClosed), and the add_fd fds that are ready. Both may be
        empty after a timeout. A dead link keeps being returned until it is closed.
        """
        if self._closed:
            raise ValueError("poller is closed")
        ready: dict[Link, None] = {}
        if self._streams:
            for link in self._streams:
                if link.holds_frames():
                    ready[link] = None
            if ready:
                timeout_s = 0.0
        # When a ring already holds a frame the epoll set is skipped (no syscall on the hot path),
        # except every 16th call so sockets and listeners are never starved by busy rings.
        self._calls += 1
        ring_idx, events = _native.wait(
            self._epoll_fd, self._doorbell, self._rings, self.spin_us,
            -1.0 if timeout_s is None else timeout_s, not self._calls & 15,
        )
        if not events and not ready:
            if len(ring_idx) == 1:
                return [self._ring_links[ring_idx[0]]], []
            return [self._ring_links[i] for i in ring_idx], []
        for i in ring_idx:
            ready[self._ring_links[i]] = None
        fds = []
        for fd, mask in events:
            link = self._links.get(fd)
            if link is not None:
                if link.on_readable(fd, mask):
                    ready[link] = None
            elif fd in self._fds:
                fds.append(fd)
        return list(ready), fds

    def close(self) -> None:
        """Close the epoll set and the doorbell (the links stay open; close them first)."""
        if self._closed:
            return
        self._closed = True
        for link in list(self._members):
            self.remove(link)
        self._epoll.close()
        os.close(self._doorbell)

    def __enter__(self) -> Poller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rebuild(self) -> None:
        # The native wait takes a plain tuple of rings; rebuilt only when membership changes.
        pairs = [(link.poll_ring(), link) for link in self._members]
        pairs = [(ring, link) for ring, link in pairs if ring is not None]
        self._rings = tuple(ring for ring, _ in pairs)
        self._ring_links = [link for _, link in pairs]
        self._streams = [link for link in self._members if link.poll_ring() is None]


class Wakeup:
    """An eventfd in a poller that other threads ring to interrupt its owner's wait."""

    def __init__(self, poller: Poller) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.poller = poller
        poller.add_fd(self.fd)

    def ring(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except OSError:
            pass  # closed during shutdown

    def drain(self) -> bool:
        try:
            os.eventfd_read(self.fd)
            return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.poller.remove_fd(self.fd)
        os.close(self.fd)

"""The attention worker's forwarding engine: routed-expert calls as frames to expert workers.

For each micro-batch call it groups the (token, k) pairs by destination expert worker through the
ERT (the rows of an expert with several active copies are split between them by their shares) and
cuts each worker's rows into parts that fit the link (part_rules.py), one DISPATCH frame each.
RESULT frames are assembled back into [T*K, D] by (micro-batch, part). Every outstanding part is
kept until answered, so it can be resent elsewhere, and has a deadline. A part goes to another
candidate holding the same experts when its worker dies (closed link), goes silent (unanswered
probes), misses the deadline, or answers with something other than what was asked. Replies are
accepted only from the incarnation a part was sent to, for a part still outstanding, with the
epoch, micro-batch and rows it was sent with: late duplicates and anything malformed are dropped
and counted. Rows of an expert with no live copy left are held, not failed: they go out as soon as
a routing table or a new link gives the expert a copy again (a replacement loaded it), and only
past `expert_wait_s` does their call fail. Nothing a peer does can raise out of here except
ExpertUnavailableError (an expert had no live copy for that long) and StepCancelled (this worker is
stopping).

Sends never block: a part waits in its worker's outbox while the link has no room or the worker
already holds a window of unanswered bytes, and goes out from `wait`, which drains replies first.

Shape letters: T tokens, K experts per token, D hidden, n rows of one part.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from resilient_moe.datapath.routing_table import Routes, RoutingTable
from resilient_moe.datapath.faults import LINK_KINDS, FaultPlan, FaultyLink, LinkFault
from resilient_moe.datapath.frames import Frame, FrameFlags, FrameHeader, FrameKind
from resilient_moe.datapath.dial import connect
from resilient_moe.datapath.link import FrameTooLarge, Link, LinkClosed, PeerInfo
from resilient_moe.datapath.part_rules import DeadlineModel, check_result, rows_per_part
from resilient_moe.datapath.poller import Poller
from resilient_moe.errors import ExpertUnavailableError
from resilient_moe.procs import RUNNABLE, background_thread, process_state

log = logging.getLogger("resilient_moe.forwarding")


@dataclass
class _Call:
    """A micro-batch's routed-expert call being assembled."""

    micro_batch: int
    layer: int
    top_k: int
    out: torch.Tensor  # [T*K, D]
    remaining: int = 0  # parts not answered yet
    error: ExpertUnavailableError | None = None


@dataclass
class _Part:
    """Rows of one call for one expert worker, sent as one DISPATCH frame."""

    call: _Call  # identity matters: a reply for a call that was abandoned must not land in a newer one
    pair_index: torch.Tensor  # [n] positions among the call's T*K pairs
    rows: torch.Tensor  # [n, D] the hidden rows (kept for resending)
    experts: torch.Tensor  # [n] int32 expert id of each row
    excluded: frozenset[str] = frozenset()  # workers that answered that they do not hold its experts
    seq: int = 0  # set when sent: the link's sequence number, echoed by the RESULT
    epoch: int = 0
    sent_at: float = 0.0
    deadline: float = 0.0
    rows_ahead: int = 0  # rows already outstanding on its worker when it was sent
    received: int = 0  # rows answered so far (a RESULT the EW had to split arrives in pieces)

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.experts.nbytes


@dataclass
class _Held:
    """Rows of a call whose experts have no live copy, waiting for one (until `deadline`)."""

    call: _Call
    pair_index: torch.Tensor  # [n]
    experts: torch.Tensor  # [n]
    rows: torch.Tensor  # [n, D] one per pair
    excluded: frozenset[str]
    deadline: float
    error: ExpertUnavailableError  # what the call fails with past the deadline


@dataclass
class _Peer:
    """An expert worker as this attention worker sees it."""

    name: str
    incarnation: int
    link: Link
    outstanding: dict[int, _Part] = field(default_factory=dict)  # seq -> part sent, not yet answered
    outbox: deque[_Part] = field(default_factory=deque)  # parts waiting for room on the link
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


class StepCancelled(Exception):
    """The worker is stopping (e.g. fenced after a hang) and abandons the step it was in."""


class Forwarder:
    """Routed-expert calls of micro-batches over datapath links to expert workers (see the module doc)."""

    def __init__(
        self,
        identity: PeerInfo,
        poller: Poller,
        ring_bytes: int,
        on_other: Callable[[list[Link], list[int]], None] = lambda links, fds: None,
        probe_interval_s: float = 0.010,
        probe_misses: int = 3,
        on_suspect: Callable[[str, int, str], None] = lambda name, incarnation, reason: None,
        deadlines: DeadlineModel | None = None,
        busy_grace_s: float = 5.0,
        expert_wait_s: float = 15.0,
    ) -> None:
        """`on_suspect(name, incarnation, reason)` is told (and must not block) when this AW stops
        routing to a worker on its own, before the controller has decided anything. `expert_wait_s`:
        how long rows of an expert with no live copy wait for one (0: their call fails at once)."""
        self.identity = identity
        self.poller = poller
        self.ring_bytes = ring_bytes
        self.on_other = on_other
        self.probe_interval_s = probe_interval_s
        self.probe_misses = probe_misses
        self.on_suspect = on_suspect
        self.deadlines = deadlines or DeadlineModel()
        self.busy_grace_s = busy_grace_s  # longest a busy (runnable) peer is waited for before acting anyway
        self.expert_wait_s = expert_wait_s
        self._held: list[_Held] = []
        self._connecting: set[tuple[str, int]] = set()  # links being opened in the background
        self._opened: "queue.SimpleQueue[tuple[str, int, Link | None]]" = queue.SimpleQueue()
        self.peers: dict[str, _Peer] = {}
        self.zombies: list[_Peer] = []  # fenced or replaced incarnations, kept open only to drop their late frames
        self.ert: RoutingTable | None = None
        self.cancelled = False
        self.unavailable: set[str] = set()  # expert workers not to route to (not connected, dead)
        self._workers: list[str] = []
        self._routes: Routes | None = None  # where each expert's rows go, as indices into _workers
        self._calls: dict[int, _Call] = {}
        self.step = 0
        self.faults: FaultPlan | None = None  # injected faults (chaos testing, faults.py); None: off
        self.wait_s = 0.0  # time blocked waiting for expert outputs (the AW's idle time)
        self.round_trip_s = 0.0  # sum over answered parts of (reply arrival - send)
        self.counters = dict.fromkeys(
            ("expert_calls", "frames_sent", "frames_answered", "stale_replies", "replayed_frames", "suspicions",
             "probes", "deadline_misses", "deadline_extensions", "malformed_replies", "error_replies",
             "split_parts", "held_parts", "held_expired"), 0)

    # ---- membership and routing -------------------------------------------------------------

    def connect(self, name: str, address: str, incarnation: int) -> None:
        """Open a link to an expert worker (replacing any link to an older incarnation)."""
        old = self.peers.get(name)
        if old is not None and old.incarnation == incarnation and old.link.alive:
            return
        self._install(name, incarnation, self._open(name, address, incarnation))

    def connect_soon(self, name: str, address: str, incarnation: int) -> None:
        """Open the link on a thread of its own (setting up a link takes tens of milliseconds, which a
        step must not wait for); it joins from the next `drain`. Failures are logged, and the next
        cluster view asks again."""
        old = self.peers.get(name)
        if (old is not None and old.incarnation == incarnation and old.link.alive) or \
                (name, incarnation) in self._connecting:
            return
        self._connecting.add((name, incarnation))

        def open_link() -> None:
            background_thread()
            try:
                self._opened.put((name, incarnation, self._open(name, address, incarnation)))
            except Exception as e:  # noqa: BLE001 (refused, gone, a bad handshake: asked again by the next view)
                log.warning("cannot link to %s at %s: %s", name, address, e)
                self._opened.put((name, incarnation, None))

        threading.Thread(target=open_link, name=f"link-{name}", daemon=True).start()

    def _open(self, name: str, address: str, incarnation: int) -> Link:
        """A link to `name` at `address`, checked to be `incarnation` (no poller yet: any thread)."""
        options = {"ring_size": self.ring_bytes} if address.startswith("shm:") else {}
        link = connect(address, self.identity, None, to=name, **options)
        if link.peer.incarnation != incarnation:
            link.close()
            raise ConnectionError(f"{address} answered as {link.peer.name} incarnation {link.peer.incarnation}, "
                                  f"expected {name} incarnation {incarnation}")
        return link

    def _install(self, name: str, incarnation: int, link: Link) -> None:
        old = self.peers.get(name)
        if old is not None and old.incarnation >= incarnation and old.link.alive:
            link.close()  # a link to this incarnation (or a newer one) is there already
            return
        if old is not None:
            self._retire(old, "replaced by a new incarnation")
        self.poller.add(link)
        peer = _Peer(name, incarnation, link)
        self.peers[name] = peer
        self._wrap_faulty(peer)
        self.unavailable.discard(name)
        self._reroute()
        log.info("linked to %s incarnation %d", name, incarnation)

    def settle_links(self, timeout_s: float) -> None:
        """Wait until every link being opened has joined or failed, at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self._connecting and time.monotonic() < deadline:
            self._install_opened()
            time.sleep(0.002)
        self._install_opened()

    def _install_opened(self) -> None:
        """Links opened in the background since the last call join (on the thread that owns the poller)."""
        while not self._opened.empty():
            name, incarnation, link = self._opened.get()
            self._connecting.discard((name, incarnation))
            if link is not None:
                self._install(name, incarnation, link)

    def disconnect(self, name: str, reason: str) -> list[_Part]:
        """Forget an expert worker; returns its parts that were still unanswered."""
        peer = self.peers.pop(name, None)
        self.unavailable.add(name)
        self._reroute()
        if peer is None:
            return []
        self.poller.remove(peer.link)
        peer.link.close()
        log.warning("link to %s dropped: %s", name, reason)
        return self._take_parts(peer)

    def set_routing(self, ert: RoutingTable) -> None:
        self.ert = ert
        self._reroute()

    def _reroute(self) -> None:
        if self.ert is None:
            return
        self._workers = self.ert.workers
        self._routes = self._lookup(frozenset())
        if self._held:
            self._retry_held()

    def _lookup(self, excluded: frozenset[str]) -> Routes:
        """Where each expert's rows go among its usable candidates. A suspect is only silent or late
        (perhaps slow, not dead): when it is an expert's last copy, keep sending to it rather than hold
        the rows; the controller decides whether it is dead."""
        gone = self.unavailable | excluded | {w for w in self._workers if w not in self.peers or self.peers[w].fenced}
        suspects = {w for w in self._workers if w in self.peers and self.peers[w].suspect}
        routes = self.ert.routes(self._workers, gone | suspects)
        if suspects:
            routes = routes.merged(self.ert.routes(self._workers, gone))
        return routes

    def _retire(self, peer: _Peer, reason: str) -> None:
        """Stop using an incarnation but keep its link open: whatever it still sends is counted and dropped."""
        if self.peers.get(peer.name) is peer:
            del self.peers[peer.name]
        peer.fenced = True
        lost = self._take_parts(peer)
        self.zombies.append(peer)
        self._reroute()
        log.warning("retired %s incarnation %d: %s", peer.name, peer.incarnation, reason)
        self._resend(lost)

    def fence(self, name: str, incarnation: int) -> None:
        """The controller declared this incarnation dead."""
        peer = self.peers.get(name)
        if peer is not None and peer.incarnation == incarnation:
            self._retire(peer, "fenced by the controller")

    # ---- the executor protocol (engine/remote_experts.py) -------------------------------------------

    def begin_step(self, step: int) -> None:
        self.step = step
        if self._calls:  # calls of micro-batches that failed last step: forget them and their parts
            self._calls.clear()
            self._held.clear()
            for peer in self.peers.values():
                self._take_parts(peer)

    def submit(self, micro_batch: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """Start the routed experts of rows x [T, D] for expert ids [T, K]; returns without waiting."""
        T, K = expert_ids.shape
        call = _Call(micro_batch, layer, K, x.new_empty((T * K, x.shape[1])))
        self._calls[micro_batch] = call
        self.counters["expert_calls"] += 1
        self._dispatch(call, torch.arange(T * K), expert_ids.reshape(-1).to(torch.int32), x, by_token=True)

    def take(self, micro_batch: int) -> torch.Tensor | None:
        """The call's outputs [T, K, D] once every part is answered; raises its ExpertUnavailableError."""
        call = self._calls.get(micro_batch)
        if call is None:
            return None
        if call.error is not None:
            del self._calls[micro_batch]
            raise call.error
        if call.remaining:
            return None
        del self._calls[micro_batch]
        return call.out.view(-1, call.top_k, call.out.shape[1])

    def cancel(self) -> None:
        """Abandon the step under way (this worker is stopping): `wait` raises StepCancelled. Thread-safe."""
        self.cancelled = True

    def wait(self) -> None:
        """Block until a part may have been answered (or a failure needs handling), at most a probe interval."""
        if self.cancelled:
            raise StepCancelled("the attention worker is stopping")
        start = time.perf_counter()
        links, fds = self.poller.wait(self._wait_timeout())
        self.wait_s += time.perf_counter() - start
        self.drain()
        self.pump()
        self.check_overdue()
        if self._held and time.monotonic() >= min(h.deadline for h in self._held):
            self._retry_held()
        others = [link for link in links if link.peer.name not in self.peers]
        if others or fds:
            self.on_other(others, fds)

    def _wait_timeout(self) -> float:
        timeout = self.probe_interval_s
        now = time.monotonic()
        if self._held:
            timeout = min(timeout, max(0.0, min(h.deadline for h in self._held) - now))
        for peer in self.peers.values():
            if peer.outbox or peer.link.backlogged:
                return 0.001  # room may open at any moment: look again soon
            if isinstance(peer.link, FaultyLink) and (due := peer.link.next_due()) is not None:
                timeout = min(timeout, max(0.0, due - now))
        return timeout

    # ---- sending ----------------------------------------------------------------------------

    def _dispatch(self, call: _Call, pair_index: torch.Tensor, experts: torch.Tensor, x: torch.Tensor,
                  by_token: bool = False, excluded: frozenset[str] = frozenset(),
                  deadline: float | None = None) -> None:
        """Queue pairs (positions `pair_index` [n] in the call, expert ids `experts` [n]) as parts to
        the usable candidates of each expert, and send what the links take now. `x` holds one row per
        token of the call (`by_token`: pair p uses row p // K) or one row per pair. Pairs of experts
        with no usable candidate are held until `deadline` (from now + expert_wait_s when new)."""
        assert self._routes is not None, "no routing table yet"
        routes = self._routes if not excluded else self._lookup(excluded)
        destination = routes.destinations(call.layer, experts)  # [n] index into self._workers
        missing = destination < 0  # [n]
        if bool(missing.any()):
            lost = sorted({int(e) for e in experts[missing]})
            tokens = {int(t) for t in (pair_index[missing] // call.top_k).tolist()}
            error = ExpertUnavailableError(f"no live expert worker holds expert(s) {lost} of layer {call.layer}", tokens)
            now = time.monotonic()
            deadline = now + self.expert_wait_s if deadline is None else deadline
            if now >= deadline:
                self.counters["held_expired"] += 1
                raise error
            rows = x[pair_index[missing] // call.top_k] if by_token else x[missing]  # [m, D]
            self._held.append(_Held(call, pair_index[missing], experts[missing], rows, excluded, deadline, error))
            call.remaining += 1
            self.counters["held_parts"] += 1
            log.warning("%s; holding %d rows for up to %.1fs until a copy is back", error, rows.shape[0],
                        deadline - now)
            keep = ~missing
            pair_index, experts, destination = pair_index[keep], experts[keep], destination[keep]
            if not by_token:
                x = x[keep]
        width = x.shape[1]
        workers = self._workers
        for worker in torch.unique(destination).tolist():
            chosen = (destination == worker).nonzero().squeeze(1)  # [n]
            rows = x[pair_index[chosen] // call.top_k] if by_token else x[chosen]  # [n, D]
            peer = self.peers.get(workers[worker])
            if peer is None:  # failed while this call was being sent: route its rows again
                self._dispatch(call, pair_index[chosen], experts[chosen], rows, excluded=excluded)
                continue
            link = peer.link
            step = rows_per_part(link.max_frame, link.max_recv_frame, link.window_bytes, width * x.element_size(),
                                 width * 4)
            if chosen.numel() > step:
                self.counters["split_parts"] += -(-chosen.numel() // step) - 1
            for lo in range(0, chosen.numel(), step):
                part = _Part(call, pair_index[chosen[lo:lo + step]], rows[lo:lo + step], experts[chosen[lo:lo + step]],
                             excluded)
                peer.outbox.append(part)
                call.remaining += 1
            self._send_ready(peer)

    def _send_ready(self, peer: _Peer) -> None:
        """Send queued parts while the link has room and the worker's window allows (never blocks)."""
        window = peer.link.window_bytes
        while peer.outbox and self.peers.get(peer.name) is peer:
            part = peer.outbox[0]
            if peer.outstanding and peer.inflight_bytes + part.nbytes > window:
                return
            seq = peer.next_seq
            flags = FrameFlags.REPLAY if part.excluded or part.seq else FrameFlags.NONE
            header = FrameHeader(FrameKind.DISPATCH, epoch=self.ert.epoch, step=self.step, seq=seq,
                                 layer=part.call.layer, micro_batch=part.call.micro_batch, flags=flags)
            try:
                if not peer.link.try_send(header, aux=part.experts, tensor=part.rows):
                    return
            except (LinkClosed, FrameTooLarge) as e:
                self.peer_failed(peer.name, f"send failed: {e}")
                return
            peer.outbox.popleft()
            now = time.monotonic()
            part.seq, part.epoch, part.sent_at, part.received = seq, self.ert.epoch, now, 0
            part.rows_ahead = peer.inflight_rows
            part.deadline = self.deadlines.deadline(now, peer.inflight_rows, part.n)
            peer.next_seq += 1
            peer.outstanding[seq] = part
            peer.inflight_bytes += part.nbytes
            peer.inflight_rows += part.n
            self.counters["frames_sent"] += 1

    def pump(self) -> None:
        """Send what waits in outboxes and inside links, now that replies may have freed room."""
        for peer in list(self.peers.values()):
            try:
                peer.link.flush()
            except LinkClosed as e:
                self.peer_failed(peer.name, f"link closed on send: {e}")
                continue
            if peer.outbox:
                self._send_ready(peer)

    # ---- replies ----------------------------------------------------------------------------

    def drain(self) -> None:
        """Take every frame that has arrived on every expert link (and add links opened meanwhile)."""
        self._install_opened()
        for peer in [*self.peers.values(), *self.zombies]:
            try:
                got = False
                while (frame := peer.link.recv()) is not None:
                    got = True
                    self._on_frame(peer, frame)
                if got:
                    peer.link.release()
            except LinkClosed as e:
                if peer in self.zombies:
                    self.zombies.remove(peer)
                    self.poller.remove(peer.link)
                    peer.link.close()
                else:
                    self.peer_failed(peer.name, f"link closed: {e}")
        if self.faults is not None:
            self._unwrap_idle()

    def _on_frame(self, peer: _Peer, frame: Frame) -> None:
        header = frame.header
        now = time.monotonic()
        peer.last_heard = now
        peer.probes_sent = 0
        if peer.fenced or self.peers.get(peer.name) is not peer:
            self.counters["stale_replies"] += header.kind == FrameKind.RESULT  # a retired incarnation's late answer
            return
        if header.kind != FrameKind.RESULT:
            if peer.suspect and not any(p.deadline < now for p in peer.outstanding.values()):
                self._trust_again(peer)
            return
        part = peer.outstanding.get(header.seq) if header.incarnation == peer.incarnation else None
        if part is None or header.epoch != part.epoch or header.micro_batch != part.call.micro_batch \
                or header.layer != part.call.layer:
            self.counters["stale_replies"] += 1  # answered already (resent elsewhere), or not ours
            return
        if header.flags & FrameFlags.ERROR:
            self.counters["error_replies"] += 1
            reason = bytes(frame.body).decode(errors="replace")
            log.warning("%s cannot serve part %d (layer %d): %s; resending elsewhere", peer.name, header.seq,
                        header.layer, reason)
            self._forget(peer, part)
            self._resend([part], exclude=peer.name)
            return
        placed = check_result(frame, part.n, part.received, part.rows.shape[1])
        if isinstance(placed, str):
            self.counters["malformed_replies"] += 1
            self.suspect(peer.name, f"malformed RESULT for part {header.seq}: {placed}")
            return
        offset, count = placed
        call = part.call
        call.out[part.pair_index[offset:offset + count]] = frame.tensor.to(call.out.dtype)  # the one copy out
        part.received += count
        if part.received < part.n:
            return
        self._forget(peer, part)
        peer.newest_answered = max(peer.newest_answered, part.seq)
        call.remaining -= 1
        self.round_trip_s += now - part.sent_at
        self.deadlines.observe(now - part.sent_at, part.rows_ahead, part.n)
        self.counters["frames_answered"] += 1
        if peer.suspect:
            self._trust_again(peer)

    def _forget(self, peer: _Peer, part: _Part) -> None:
        del peer.outstanding[part.seq]
        peer.inflight_bytes -= part.nbytes
        peer.inflight_rows -= part.n

    def _trust_again(self, peer: _Peer) -> None:
        peer.suspect = False
        self._reroute()
        log.info("%s answers again; routing to it again", peer.name)

    # ---- failures ---------------------------------------------------------------------------

    def check_overdue(self) -> None:
        """Resend the parts of workers that missed a deadline; probe workers that owe answers and are
        quiet, and suspect them after `probe_misses` unanswered probes.

        Before acting on silence or lateness it looks at the peer's process when it runs on this host
        (procs.py): one that is runnable is busy or starved of CPU, not lost, so its deadlines are
        extended (doubling) instead of loading the other workers with its parts, up to
        `busy_grace_s`; one that is stopped, gone or asleep with a part overdue (so the frame was
        lost) is acted on at once. So is a part the worker skipped: it answered a part sent after it (a
        worker answers a link's parts in order), so this one was lost or its answer is late."""
        now = time.monotonic()
        for peer in list(self.peers.values()):
            if not peer.outstanding or peer.fenced:
                continue
            late = [p for p in peer.outstanding.values() if p.deadline < now]
            if late:
                skipped = any(p.seq < peer.newest_answered for p in late)
                if not skipped and self._busy(peer, now - min(p.sent_at for p in late)):
                    for part in late:
                        part.deadline = now + 2 * (part.deadline - part.sent_at)
                    self.counters["deadline_extensions"] += len(late)
                    continue
                worst = max(now - p.deadline for p in late)
                self.counters["deadline_misses"] += len(late)
                self.suspect(peer.name, f"{len(late)} part(s) overdue by up to {1000 * worst:.0f} ms", force=True)
                continue
            if not peer.routable:
                continue
            # Silence counts from when it should have answered (the expert time of what it owes, as
            # measured), so a worker busy with a big part is not probed, only one that runs late.
            oldest = min(part.sent_at for part in peer.outstanding.values())
            quiet = now - max(peer.last_heard, oldest + self.deadlines.s_per_row * peer.inflight_rows)
            if quiet < self.probe_interval_s * (min(peer.probes_sent, self.probe_misses) + 1):
                continue
            if peer.probes_sent >= self.probe_misses:
                if not self._busy(peer, quiet):
                    self.suspect(peer.name, f"{peer.probes_sent} probes unanswered, silent for {1000 * quiet:.0f} ms")
                continue
            try:
                if peer.link.try_send(FrameHeader(FrameKind.PROBE, step=self.step)):
                    peer.probes_sent += 1
                    self.counters["probes"] += 1
            except LinkClosed as e:
                self.peer_failed(peer.name, f"link closed on probe: {e}")

    def _busy(self, peer: _Peer, waited_s: float) -> bool:
        """Is the peer's process runnable on this host (busy, or starved of CPU) and not yet past the grace?
        (Looked up at most once a probe interval: it reads /proc.)"""
        if waited_s > self.busy_grace_s:
            return False
        now = time.monotonic()
        if now - peer.busy_checked_at >= self.probe_interval_s:
            info = peer.link.peer
            peer.busy_checked_at, peer.busy = now, process_state(info.pid, info.host) == RUNNABLE
        return peer.busy

    def suspect(self, name: str, reason: str, force: bool = False) -> None:
        """Route around a silent, late or misbehaving worker now and resend what it owes; the
        controller decides its fate. `force`: resend even if it is already suspect (new late parts)."""
        peer = self.peers.get(name)
        if peer is None or (peer.suspect and not force):
            return
        if not peer.suspect:
            peer.suspect = True
            self.counters["suspicions"] += 1
            self._reroute()
            self.on_suspect(name, peer.incarnation, reason)
        lost = self._take_parts(peer)
        log.warning("suspect %s incarnation %d: %s; resending %d parts", name, peer.incarnation, reason, len(lost))
        self._resend(lost)

    def peer_failed(self, name: str, reason: str) -> None:
        """An expert worker is gone: drop it and resend its unanswered parts to other candidates."""
        peer = self.peers.get(name)
        if peer is not None:
            self.on_suspect(name, peer.incarnation, reason)
        self._resend(self.disconnect(name, reason))

    def _take_parts(self, peer: _Peer) -> list[_Part]:
        """Every part of `peer` not answered yet (sent or waiting to be), which it no longer owes."""
        parts = [*peer.outstanding.values(), *peer.outbox]
        peer.outstanding.clear()
        peer.outbox.clear()
        peer.inflight_bytes = peer.inflight_rows = 0
        return parts

    def _retry_held(self) -> None:
        """Send held rows whose experts have a live copy again; fail the calls of those past their deadline."""
        held, self._held = self._held, []
        for h in held:
            call = h.call
            if self._calls.get(call.micro_batch) is not call or call.error is not None:
                continue
            call.remaining -= 1
            try:
                self._dispatch(call, h.pair_index, h.experts, h.rows, excluded=h.excluded, deadline=h.deadline)
            except ExpertUnavailableError as e:
                log.error("%s: waited %.1fs for a copy; failing the requests that need it", e, self.expert_wait_s)
                call.error = e

    def _resend(self, parts: list[_Part], exclude: str | None = None) -> None:
        """Send parts again to the next usable candidate of each expert, marked REPLAY (served first)."""
        self.counters["replayed_frames"] += len(parts)
        for part in parts:
            call = part.call
            if self._calls.get(call.micro_batch) is not call or call.error is not None:
                continue
            call.remaining -= 1
            excluded = part.excluded | {exclude} if exclude else part.excluded
            try:
                self._dispatch(call, part.pair_index, part.experts, part.rows, excluded=excluded)
            except ExpertUnavailableError as e:
                call.error = e

    # ---- injected faults (chaos testing) ----------------------------------------------------

    def set_faults(self, faults: list[LinkFault]) -> None:
        """Adopt the cluster's injected link faults; those naming other AWs are ignored."""
        if self.faults is None:
            if not any(f.source in ("", self.identity.name) and f.kind in LINK_KINDS for f in faults):
                return
            self.faults = FaultPlan(self.identity.name)
        self.faults.update(faults)
        for peer in self.peers.values():
            self._wrap_faulty(peer)

    def _wrap_faulty(self, peer: _Peer) -> None:
        if self.faults is not None and not isinstance(peer.link, FaultyLink) and self.faults.on(peer.name):
            peer.link = FaultyLink(peer.link, self.faults, peer.name)

    def _unwrap_idle(self) -> None:
        """Links no fault names any more go back to the plain link once nothing is held in them."""
        for peer in [*self.peers.values(), *self.zombies]:
            link = peer.link
            if isinstance(link, FaultyLink) and link.idle and not self.faults.on(peer.name):
                peer.link = link.inner
        if not self.faults.faults and not any(isinstance(p.link, FaultyLink) for p in self.peers.values()):
            self.faults = None

    # ---- stats and shutdown -----------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.counters.items()}
        out |= {"expert_wait_s": self.wait_s, "round_trip_s": self.round_trip_s,
                "part_s_per_row": self.deadlines.s_per_row}
        for transport in ("shm", "tcp"):  # live links by transport (shm within a node, TCP across nodes)
            out[f"links_{transport}"] = float(sum(1 for p in self.peers.values()
                                                   if p.link.transport == transport and not p.fenced))
        if self.faults is not None:
            out |= {f"fault_{k}": float(v) for k, v in self.faults.counters.items()}
        return out

    @property
    def outstanding(self) -> int:
        return sum(len(p.outstanding) + len(p.outbox) for p in self.peers.values()) + len(self._held)

    def close(self) -> None:
        for name in list(self.peers):
            self.disconnect(name, "attention worker stopping")
        for peer in self.zombies:
            self.poller.remove(peer.link)
            peer.link.close()
        self.zombies.clear()

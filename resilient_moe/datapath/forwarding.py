"""The attention worker's forwarding engine: routed-expert calls as frames to expert workers.

For each micro-batch call it groups the (token, k) pairs by destination expert worker through the
ERT, sends one DISPATCH frame per worker, and assembles the RESULT frames back into [T, K, D]. It
keeps every outstanding frame's rows until answered, so they can be replayed elsewhere. A reply is
accepted only from the incarnation it was sent to, for a sequence number still outstanding:
anything else (a late answer from a worker we failed over from, a duplicate) is dropped and counted.

Shape letters: T tokens, K experts per token, D hidden, n rows of one frame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from resilient_moe.datapath.ert import RoutingTable
from resilient_moe.datapath.faults import LinkFault, LinkFaults
from resilient_moe.datapath.frames import Frame, FrameFlags, FrameHeader, FrameKind
from resilient_moe.datapath.link import Link, LinkClosed, PeerInfo, connect
from resilient_moe.datapath.poller import Poller
from resilient_moe.engine.pipeline import ExpertCall, ExpertExecutor
from resilient_moe.errors import ExpertUnavailableError

log = logging.getLogger("resilient_moe.forwarding")


@dataclass
class _Call:
    """A micro-batch's routed-expert call being assembled."""

    tokens: int
    top_k: int
    out: torch.Tensor  # [T*K, D]
    remaining: int = 0
    error: ExpertUnavailableError | None = None


@dataclass
class _Part:
    """One DISPATCH frame in flight: which pairs of which call it carries."""

    call: _Call  # identity matters: a reply for a call that was abandoned must not land in a newer one
    micro_batch: int
    layer: int
    pair_index: torch.Tensor  # [n] positions among the call's T*K pairs
    rows: torch.Tensor  # [n, D] the hidden rows sent (kept for replay)
    experts: torch.Tensor  # [n] int32 expert id of each row
    sent_at: float


@dataclass
class _Peer:
    """An expert worker as this attention worker sees it."""

    name: str
    incarnation: int
    link: Link
    outstanding: dict[int, _Part] = field(default_factory=dict)  # seq -> part
    next_seq: int = 1
    last_heard: float = field(default_factory=time.monotonic)
    probes_sent: int = 0  # unanswered probes since it was last heard from
    suspect: bool = False  # silent with work outstanding: routed around until it answers again
    fenced: bool = False  # declared dead by the controller: never routed to again

    @property
    def routable(self) -> bool:
        return not (self.suspect or self.fenced)


class StepCancelled(Exception):
    """The worker is stopping (e.g. fenced after a hang) and abandons the step it was in."""


class RemoteExperts(ExpertExecutor):
    """ExpertExecutor over datapath links to expert workers."""

    def __init__(
        self,
        identity: PeerInfo,
        poller: Poller,
        ring_bytes: int,
        on_other: Callable[[list[Link], list[int]], None] = lambda links, fds: None,
        probe_interval_s: float = 0.010,
        probe_misses: int = 3,
        on_suspect: Callable[[str, int, str], None] = lambda name, incarnation, reason: None,
    ) -> None:
        """`on_suspect(name, incarnation, reason)` is told (and must not block) when this AW stops
        routing to a worker on its own, before the controller has decided anything."""
        self.identity = identity
        self.poller = poller
        self.ring_bytes = ring_bytes
        self.on_other = on_other
        self.probe_interval_s = probe_interval_s
        self.probe_misses = probe_misses
        self.on_suspect = on_suspect
        self.peers: dict[str, _Peer] = {}
        self.zombies: list[_Peer] = []  # fenced or replaced incarnations, kept open only to drop their late frames
        self.ert: RoutingTable | None = None
        self.cancelled = False
        self.unavailable: set[str] = set()  # expert workers not to route to (not connected, dead)
        self._workers: list[str] = []
        self._route: torch.Tensor | None = None  # [L, E] index into _workers, -1 = no live candidate
        self._calls: dict[int, _Call] = {}
        self.step = 0
        self.stale_replies = 0
        self.frames_sent = 0
        self.calls = 0  # routed-expert calls (micro-batch x sparse layer)
        self.wait_s = 0.0  # time blocked waiting for expert outputs (the AW's idle time)
        self.round_trip_s = 0.0  # sum over answered frames of (reply arrival - send)
        self.frames_answered = 0
        self.replayed_frames = 0
        self.suspicions = 0
        self.probes = 0
        self.faults: LinkFaults | None = None  # injected faults (chaos testing, faults.py); None: off

    # ---- membership and routing -------------------------------------------------------------

    def connect(self, name: str, address: str, incarnation: int) -> None:
        """Open a link to an expert worker (replacing any link to an older incarnation)."""
        old = self.peers.get(name)
        if old is not None and old.incarnation == incarnation and old.link.alive:
            return
        if old is not None:
            self._retire(old, "replaced by a new incarnation")
        options = {"ring_size": self.ring_bytes} if address.startswith("shm:") else {}
        link = connect(address, self.identity, self.poller, **options)
        if link.peer.incarnation != incarnation:
            link.close()
            raise ConnectionError(f"{address} answered as {link.peer.name} incarnation {link.peer.incarnation}, "
                                  f"expected {name} incarnation {incarnation}")
        self.peers[name] = _Peer(name, incarnation, link)
        self.unavailable.discard(name)
        self._reroute()
        log.info("linked to %s incarnation %d at %s", name, incarnation, address)

    def disconnect(self, name: str, reason: str) -> list[_Part]:
        """Forget an expert worker; returns its parts that were still outstanding."""
        peer = self.peers.pop(name, None)
        self.unavailable.add(name)
        self._reroute()
        if peer is None:
            return []
        self.poller.remove(peer.link)
        peer.link.close()
        log.warning("link to %s dropped: %s", name, reason)
        return list(peer.outstanding.values())

    def set_routing(self, ert: RoutingTable) -> None:
        self.ert = ert
        self._reroute()

    def _reroute(self) -> None:
        if self.ert is None:
            return
        self._workers = self.ert.workers
        gone = self.unavailable | {w for w in self._workers if w not in self.peers or self.peers[w].fenced}
        suspects = {w for w in self._workers if w in self.peers and self.peers[w].suspect}
        route = self.ert.route_lookup(self._workers, gone | suspects)
        if suspects:
            # A suspect is only silent (perhaps slow, not dead): when it is an expert's last copy, keep
            # sending to it rather than fail requests; the controller decides whether it is dead.
            route = torch.where(route < 0, self.ert.route_lookup(self._workers, gone), route)
        self._route = route

    def _retire(self, peer: _Peer, reason: str) -> None:
        """Stop using an incarnation but keep its link open: whatever it still sends is counted and dropped."""
        if self.peers.get(peer.name) is peer:
            del self.peers[peer.name]
        peer.fenced = True
        lost = list(peer.outstanding.values())
        peer.outstanding.clear()
        self.zombies.append(peer)
        self._reroute()
        log.warning("retired %s incarnation %d: %s", peer.name, peer.incarnation, reason)
        self._replay(lost)

    def fence(self, name: str, incarnation: int) -> None:
        """The controller declared this incarnation dead."""
        peer = self.peers.get(name)
        if peer is not None and peer.incarnation == incarnation:
            self._retire(peer, "fenced by the controller")

    # ---- ExpertExecutor ---------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        self.step = step
        if self._calls:  # calls of micro-batches that failed last step: forget them and their frames
            self._calls.clear()
            for peer in self.peers.values():
                peer.outstanding.clear()

    def submit(self, micro_batch: int, call: ExpertCall) -> None:
        T, K = call.expert_ids.shape
        pairs = call.expert_ids.reshape(-1)  # [T*K]
        record = _Call(T, K, call.x.new_empty((T * K, call.x.shape[1])))
        self._calls[micro_batch] = record
        self.calls += 1
        self._dispatch(micro_batch, call.layer, torch.arange(T * K), call.x, pairs, K, record, replay=False)

    def _dispatch(
        self,
        micro_batch: int,
        layer: int,
        pair_index: torch.Tensor,
        x: torch.Tensor,
        experts: torch.Tensor,
        top_k: int,
        record: _Call,
        replay: bool,
    ) -> None:
        """Send pairs (pair_index into the call, their expert ids) to each expert's first live candidate.

        `x` holds one row per token (fresh dispatch; row = pair // top_k) or one row per pair (replay,
        top_k = 1)."""
        assert self._route is not None, "no routing table yet"
        destination = self._route[layer][experts.long()]  # [n] index into self._workers
        if bool((destination < 0).any()):
            missing = destination < 0
            lost = sorted({int(e) for e in experts[missing]})
            tokens = {int(t) for t in (pair_index[missing] // record.top_k).tolist()}
            raise ExpertUnavailableError(f"no live expert worker holds expert(s) {lost} of layer {layer}", tokens)
        flags = FrameFlags.REPLAY if replay else FrameFlags.NONE
        for worker in torch.unique(destination).tolist():
            chosen = (destination == worker).nonzero().squeeze(1)  # [n]
            rows = x[chosen // top_k] if top_k > 1 else x[chosen]  # [n, D]
            ids = experts[chosen].to(torch.int32)
            peer = self.peers[self._workers[worker]]
            seq = peer.next_seq
            peer.next_seq += 1
            header = FrameHeader(FrameKind.DISPATCH, epoch=self.ert.epoch, step=self.step, seq=seq, layer=layer,
                                 micro_batch=micro_batch, flags=flags)
            peer.outstanding[seq] = _Part(record, micro_batch, layer, pair_index[chosen], rows, ids, time.monotonic())
            record.remaining += 1
            try:
                if self.faults is None or not self.faults.hold_send(peer, peer.name, peer.link, header, ids, rows):
                    peer.link.send(header, aux=ids, tensor=rows)
                self.frames_sent += 1
            except LinkClosed as e:
                self.peer_failed(peer.name, f"link closed on send: {e}")

    def take(self, micro_batch: int) -> torch.Tensor | None:
        record = self._calls.get(micro_batch)
        if record is None:
            return None
        if record.error is not None:
            del self._calls[micro_batch]
            raise record.error
        if record.remaining:
            return None
        del self._calls[micro_batch]
        return record.out.view(record.tokens, record.top_k, -1)

    def cancel(self) -> None:
        """Abandon the step under way (this worker is stopping): `wait` raises StepCancelled. Thread-safe."""
        self.cancelled = True

    def wait(self) -> None:
        if self.cancelled:
            raise StepCancelled("the attention worker is stopping")
        start = time.perf_counter()
        timeout = self.probe_interval_s if self.faults is None else self.faults.timeout(self.probe_interval_s)
        links, fds = self.poller.wait(timeout)
        self.wait_s += time.perf_counter() - start
        if self.faults is not None:
            self._pump_faults()
        self.drain()
        self.check_silence()
        others = [link for link in links if link.peer.name not in self.peers]
        if others or fds:
            self.on_other(others, fds)

    # ---- injected faults (chaos testing) ----------------------------------------------------

    def set_faults(self, faults: list[LinkFault]) -> None:
        """Adopt the cluster's injected link faults; those naming other AWs are ignored."""
        if self.faults is None:
            if not any(f.source in ("", self.identity.name) for f in faults):
                return
            self.faults = LinkFaults(self.identity.name)
        self.faults.update(faults)
        if self.faults.idle:
            self.faults = None

    def _pump_faults(self) -> None:
        """Send held frames that are due and take in held replies, for links still in use."""
        failed, arrived = self.faults.pump()
        for peer, error in failed:
            if self.peers.get(peer.name) is peer:
                self.peer_failed(peer.name, f"link closed on send: {error}")
        for peer, frame in arrived:
            if self.peers.get(peer.name) is peer or peer in self.zombies:
                self._on_frame(peer, frame)
        if self.faults.idle:
            self.faults = None

    # ---- replies ----------------------------------------------------------------------------

    def drain(self) -> None:
        """Take every reply that has arrived on every expert link."""
        for peer in [*self.peers.values(), *self.zombies]:
            try:
                got = False
                while (frame := peer.link.recv()) is not None:
                    got = True
                    if self.faults is None or not self.faults.hold_recv(peer, peer.name, peer.link, frame):
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

    def check_silence(self) -> None:
        """Probe workers that owe us answers and have gone quiet; suspect them after `probe_misses`."""
        now = time.monotonic()
        for peer in list(self.peers.values()):
            if not peer.outstanding or not peer.routable:
                continue
            oldest = min(part.sent_at for part in peer.outstanding.values())
            quiet = now - max(peer.last_heard, oldest)
            if quiet < self.probe_interval_s * (peer.probes_sent + 1):
                continue
            if peer.probes_sent >= self.probe_misses:
                self.suspect(peer.name, f"{peer.probes_sent} probes unanswered, silent for {1000 * quiet:.0f} ms")
                continue
            try:
                probe = FrameHeader(FrameKind.PROBE, step=self.step)
                if self.faults is None or not self.faults.hold_send(peer, peer.name, peer.link, probe):
                    peer.link.send(probe)
                peer.probes_sent += 1
                self.probes += 1
            except LinkClosed as e:
                self.peer_failed(peer.name, f"link closed on probe: {e}")

    def suspect(self, name: str, reason: str) -> None:
        """Route around a silent worker now and resend what it owes; the controller decides its fate."""
        peer = self.peers.get(name)
        if peer is None or peer.suspect:
            return
        peer.suspect = True
        self.suspicions += 1
        lost = list(peer.outstanding.values())
        peer.outstanding.clear()
        self._reroute()
        log.warning("suspect %s incarnation %d: %s; replaying %d frames", name, peer.incarnation, reason, len(lost))
        self.on_suspect(name, peer.incarnation, reason)
        self._replay(lost)

    def _on_frame(self, peer: _Peer, frame: Frame) -> None:
        header = frame.header
        peer.last_heard = time.monotonic()
        peer.probes_sent = 0
        if peer.fenced:
            self.stale_replies += header.kind == FrameKind.RESULT  # a fenced incarnation's late answer: dropped
            return
        if peer.suspect:  # it answers again and nobody fenced it: route to it again
            peer.suspect = False
            self._reroute()
            log.info("%s answers again; routing to it again", peer.name)
        if header.kind != FrameKind.RESULT:
            return
        part = peer.outstanding.get(header.seq) if header.incarnation == peer.incarnation else None
        if part is None:
            self.stale_replies += 1  # answered already (replayed elsewhere), or from a fenced incarnation
            return
        del peer.outstanding[header.seq]
        record = part.call
        if self._calls.get(part.micro_batch) is not record:
            self.stale_replies += 1  # its call was abandoned (a failed micro-batch)
            return
        if header.flags & FrameFlags.ERROR:
            tokens = {int(t) for t in (part.pair_index // record.top_k).tolist()}
            record.error = ExpertUnavailableError(f"{peer.name}: {bytes(frame.body).decode(errors='replace')}", tokens)
            return
        record.out[part.pair_index] = frame.tensor.to(record.out.dtype)  # the one copy out of the ring
        record.remaining -= 1
        self.round_trip_s += time.monotonic() - part.sent_at
        self.frames_answered += 1

    # ---- failures ---------------------------------------------------------------------------

    def peer_failed(self, name: str, reason: str) -> None:
        """An expert worker is gone: drop it and resend its outstanding frames to other candidates."""
        peer = self.peers.get(name)
        if peer is not None:
            self.on_suspect(name, peer.incarnation, reason)
        self._replay(self.disconnect(name, reason))

    def _replay(self, lost: list[_Part]) -> None:
        """Resend parts to the next live candidate of each expert, marked REPLAY (served first)."""
        self.replayed_frames += len(lost)
        for part in lost:
            record = part.call
            if self._calls.get(part.micro_batch) is not record:
                continue
            record.remaining -= 1
            try:
                self._dispatch(part.micro_batch, part.layer, part.pair_index, part.rows, part.experts.long(), 1,
                               record, replay=True)
            except ExpertUnavailableError as e:
                record.error = e

    def stats(self) -> dict[str, float]:
        return {"expert_calls": float(self.calls), "expert_wait_s": self.wait_s, "frames_sent": float(self.frames_sent),
                "frames_answered": float(self.frames_answered), "round_trip_s": self.round_trip_s,
                "stale_replies": float(self.stale_replies), "replayed_frames": float(self.replayed_frames),
                "suspicions": float(self.suspicions), "probes": float(self.probes)}

    @property
    def outstanding(self) -> int:
        return sum(len(p.outstanding) for p in self.peers.values())

    def close(self) -> None:
        for name in list(self.peers):
            self.disconnect(name, "attention worker stopping")
        for peer in self.zombies:
            self.poller.remove(peer.link)
            peer.link.close()
        self.zombies.clear()

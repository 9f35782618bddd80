"""The attention worker's forwarding engine: routed-expert calls as frames to expert workers.

For each micro-batch call it groups the (token, k) pairs by destination expert worker through the
ERT (the rows of an expert with several active copies are split between them by their shares). Each
worker gets each token's hidden row once, with the list of that token's experts there in gate
order, cut into parts that fit the link (part_rules.py), one DISPATCH frame each. RESULT frames
carry one row per pair and are assembled back into [T*K, D] by (micro-batch, part), so the combine
order, and so the bits, do not depend on where the experts live. Every outstanding part is
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

Beside this file: what is kept of a call and its parts (expert_calls.py), of each expert worker and
how links to them are opened (expert_peers.py), and what a peer's silence or lateness means
(peer_health.py, a pure judgement this engine acts on).

Shape letters: T tokens, K experts per token, D hidden, n rows (tokens) of one part, P (token, expert)
pairs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from resilient_moe.datapath import peer_health
from resilient_moe.datapath.expert_calls import HeldRows, Part, RoutedCall
from resilient_moe.datapath.expert_peers import ExpertPeer, LinkOpener
from resilient_moe.datapath.faults import LINK_KINDS, FaultPlan, FaultyLink, LinkFault
from resilient_moe.datapath.frames import Frame, FrameFlags, FrameHeader, FrameKind
from resilient_moe.datapath.link import FrameTooLarge, Link, LinkClosed, PeerInfo
from resilient_moe.datapath.part_rules import DeadlineModel, check_result, cut_parts
from resilient_moe.datapath.peer_health import Action
from resilient_moe.datapath.poller import Poller
from resilient_moe.datapath.routing_table import LiveRoutes, RoutingTable
from resilient_moe.errors import ExpertUnavailableError

log = logging.getLogger("resilient_moe.forwarding")


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
        self.on_other = on_other
        self.probe_interval_s = probe_interval_s
        self.probe_misses = probe_misses
        self.on_suspect = on_suspect
        self.deadlines = deadlines or DeadlineModel()
        self.busy_grace_s = busy_grace_s  # longest a busy (runnable) peer is waited for before acting anyway
        self.expert_wait_s = expert_wait_s
        self._held: list[HeldRows] = []
        self._links = LinkOpener(identity, ring_bytes)
        self.peers: dict[str, ExpertPeer] = {}
        self.zombies: list[ExpertPeer] = []  # fenced or replaced incarnations, kept open only to drop their late frames
        self.ert: RoutingTable | None = None
        self.cancelled = False
        self.unavailable: set[str] = set()  # expert workers not to route to (not connected, dead)
        self._workers: list[str] = []
        self._live: LiveRoutes | None = None  # where each expert's rows go, as indices into _workers
        self._calls: dict[int, RoutedCall] = {}
        self.step = 0
        self.faults: FaultPlan | None = None  # injected faults (chaos testing, faults.py); None: off
        self.wait_s = 0.0  # time blocked waiting for expert outputs (the AW's idle time)
        self.round_trip_s = 0.0  # sum over answered parts of (reply arrival - send)
        self.counters = dict.fromkeys(
            ("expert_calls", "frames_sent", "frames_answered", "stale_replies", "replayed_frames", "suspicions",
             "probes", "deadline_misses", "deadline_extensions", "malformed_replies", "error_replies",
             "split_parts", "held_parts", "held_expired", "rows_sent", "pairs_sent"), 0)

    # ---- membership and routing -------------------------------------------------------------

    def connect(self, name: str, address: str, incarnation: int) -> None:
        """Open a link to an expert worker (replacing any link to an older incarnation)."""
        if not self._linked(name, incarnation):
            self._install(name, incarnation, self._links.open(name, address, incarnation))

    def connect_soon(self, name: str, address: str, incarnation: int) -> None:
        """Open the link in the background; it joins from the next `drain`. Failures are logged, and
        the next cluster view asks again."""
        if not self._linked(name, incarnation):
            self._links.open_soon(name, address, incarnation)

    def _linked(self, name: str, incarnation: int) -> bool:
        old = self.peers.get(name)
        return old is not None and old.incarnation == incarnation and old.link.alive

    def _install(self, name: str, incarnation: int, link: Link) -> None:
        old = self.peers.get(name)
        if old is not None and old.incarnation >= incarnation and old.link.alive:
            link.close()  # a link to this incarnation (or a newer one) is there already
            return
        if old is not None:
            self._retire(old, "replaced by a new incarnation")
        self.poller.add(link)
        peer = ExpertPeer(name, incarnation, link)
        self.peers[name] = peer
        self._wrap_faulty(peer)
        self.unavailable.discard(name)
        self._reroute()
        log.info("linked to %s incarnation %d", name, incarnation)

    def settle_links(self, timeout_s: float) -> None:
        """Wait until every link being opened has joined or failed, at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self._links.busy and time.monotonic() < deadline:
            self._install_opened()
            time.sleep(0.002)
        self._install_opened()

    def _install_opened(self) -> None:
        """Links opened in the background since the last call join (on the thread that owns the poller)."""
        for name, incarnation, link in self._links.opened():
            if link is not None:
                self._install(name, incarnation, link)

    def disconnect(self, name: str, reason: str) -> list[Part]:
        """Forget an expert worker; returns its parts that were still unanswered."""
        peer = self.peers.pop(name, None)
        self.unavailable.add(name)
        self._reroute()
        if peer is None:
            return []
        self.poller.remove(peer.link)
        peer.link.close()
        log.warning("link to %s dropped: %s", name, reason)
        return peer.take_parts()

    def set_routing(self, ert: RoutingTable) -> None:
        """Route by a new table (its tensors are best built beforehand, off the step: `ert.prepare()`)."""
        self.ert = ert
        self._workers = ert.workers
        self._live = LiveRoutes(ert, self._states())
        if self._held:
            self._retry_held()

    def _reroute(self) -> None:
        """A worker's state changed: update the routes of the experts it holds, in place."""
        if self._live is None:
            return
        self._live.update(self._states())
        if self._held:
            self._retry_held()

    def _states(self) -> dict[str, int]:
        """Each expert worker of the table as routing sees it. A suspect is only silent or late
        (perhaps slow, not dead): where it is an expert's last copy, rows keep going to it rather than
        wait; the controller decides whether it is dead."""
        states = {}
        for w in self._workers:
            peer = self.peers.get(w)
            if w in self.unavailable or peer is None or peer.fenced:
                states[w] = LiveRoutes.GONE
            elif peer.suspect:
                states[w] = LiveRoutes.SUSPECT
        return states

    def _retire(self, peer: ExpertPeer, reason: str) -> None:
        """Stop using an incarnation but keep its link open: whatever it still sends is counted and dropped."""
        if self.peers.get(peer.name) is peer:
            del self.peers[peer.name]
        peer.fenced = True
        lost = peer.take_parts()
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
                peer.take_parts()

    def submit(self, micro_batch: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """Start the routed experts of rows x [T, D] for expert ids [T, K]; returns without waiting."""
        T, K = expert_ids.shape
        call = RoutedCall(micro_batch, layer, K, x.new_empty((T * K, x.shape[1])))
        self._calls[micro_batch] = call
        self.counters["expert_calls"] += 1
        pairs = torch.arange(T * K)  # [T*K] token-major, each token's in gate order
        self._dispatch(call, pairs, expert_ids.reshape(-1).to(torch.int32), x, pairs // K)

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

    def _dispatch(self, call: RoutedCall, pair_index: torch.Tensor, experts: torch.Tensor, x: torch.Tensor,
                  row_of_pair: torch.Tensor, excluded: frozenset[str] = frozenset(),
                  deadline: float | None = None) -> None:
        """Queue pairs (positions `pair_index` [P] in the call, expert ids `experts` [P], hidden row
        `row_of_pair` [P] of `x`, non-decreasing) as parts to the usable candidates of each expert,
        and send what the links take now. Each worker gets each token's row once, with the list of
        its experts there. Pairs of experts with no usable candidate are held until `deadline` (from
        now + expert_wait_s when new)."""
        assert self._live is not None, "no routing table yet"
        routes = self._live.routes if not excluded else self._live.with_gone(set(excluded))
        destination = routes.destinations(call.layer, experts)  # [P] index into self._workers
        missing = destination < 0  # [P]
        if bool(missing.any()):
            lost = sorted({int(e) for e in experts[missing]})
            tokens = {int(t) for t in (pair_index[missing] // call.top_k).tolist()}
            error = ExpertUnavailableError(f"no live expert worker holds expert(s) {lost} of layer {call.layer}", tokens)
            now = time.monotonic()
            deadline = now + self.expert_wait_s if deadline is None else deadline
            if now >= deadline:
                self.counters["held_expired"] += 1
                raise error
            rows, rows_of_held = _gather_rows(x, row_of_pair[missing])
            self._held.append(HeldRows(call, pair_index[missing], experts[missing], rows, rows_of_held, excluded,
                                       deadline, error))
            call.remaining += 1
            self.counters["held_parts"] += 1
            log.warning("%s; holding %d rows for up to %.1fs until a copy is back", error, rows.shape[0],
                        deadline - now)
            keep = ~missing
            pair_index, experts, destination, row_of_pair = (pair_index[keep], experts[keep], destination[keep],
                                                             row_of_pair[keep])
        width = x.shape[1]
        workers = self._workers
        for worker in torch.unique(destination).tolist():
            chosen = (destination == worker).nonzero().squeeze(1)  # [p] pairs for this worker, in order
            peer = self.peers.get(workers[worker])
            if peer is None:  # failed while this call was being sent: route its pairs again
                self._dispatch(call, pair_index[chosen], experts[chosen], x, row_of_pair[chosen], excluded=excluded)
                continue
            token_rows, counts = torch.unique_consecutive(row_of_pair[chosen], return_counts=True)  # [n] each
            rows = x.index_select(0, token_rows)  # [n, D] one row per token, however many of its experts
            link = peer.link
            cuts = cut_parts(counts, width * x.element_size(), width * 4, link.max_frame, link.max_recv_frame,
                             link.window_bytes)
            self.counters["split_parts"] += len(cuts) - 1
            self.counters["rows_sent"] += rows.shape[0]
            self.counters["pairs_sent"] += chosen.numel()
            starts = torch.cumsum(counts, 0) - counts  # [n] first pair of each row
            for lo, hi in cuts:
                first = int(starts[lo])
                last = int(starts[hi]) if hi < counts.numel() else chosen.numel()
                picked = chosen[first:last]
                peer.outbox.append(Part(call, pair_index[picked], rows[lo:hi], counts[lo:hi], experts[picked],
                                        excluded))
                call.remaining += 1
            self._send_ready(peer)

    def _send_ready(self, peer: ExpertPeer) -> None:
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
                if not peer.link.try_send(header, aux=part.aux, tensor=part.rows):
                    return
            except (LinkClosed, FrameTooLarge) as e:
                self.peer_failed(peer.name, f"send failed: {e}")
                return
            peer.outbox.popleft()
            now = time.monotonic()
            part.seq, part.epoch, part.sent_at, part.received = seq, self.ert.epoch, now, 0
            part.rows_ahead = peer.inflight_rows
            part.deadline = self.deadlines.deadline(now, peer.inflight_rows, part.pairs)
            peer.next_seq += 1
            peer.outstanding[seq] = part
            peer.inflight_bytes += part.nbytes
            peer.inflight_rows += part.pairs
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

    def _on_frame(self, peer: ExpertPeer, frame: Frame) -> None:
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
            peer.forget(part)
            self._resend([part], exclude=peer.name)
            return
        placed = check_result(frame, part.pairs, part.received, part.rows.shape[1])
        if isinstance(placed, str):
            self.counters["malformed_replies"] += 1
            self.suspect(peer.name, f"malformed RESULT for part {header.seq}: {placed}")
            return
        offset, count = placed
        call = part.call
        call.out[part.pair_index[offset:offset + count]] = frame.tensor.to(call.out.dtype)  # the one copy out
        part.received += count
        if part.received < part.pairs:
            return
        peer.forget(part)
        peer.newest_answered = max(peer.newest_answered, part.seq)
        call.remaining -= 1
        self.round_trip_s += now - part.sent_at
        self.deadlines.observe(now - part.sent_at, part.rows_ahead, part.pairs)
        self.counters["frames_answered"] += 1
        if peer.suspect:
            self._trust_again(peer)

    def _trust_again(self, peer: ExpertPeer) -> None:
        peer.suspect = False
        self._reroute()
        log.info("%s answers again; routing to it again", peer.name)

    # ---- failures ---------------------------------------------------------------------------

    def check_overdue(self) -> None:
        """Act on each peer's silence or lateness as `peer_health.judge` rules: extend the deadlines of
        a busy one, suspect a late or silent one (resending what it owes), probe a quiet one."""
        now = time.monotonic()
        for peer in list(self.peers.values()):
            verdict = peer_health.judge(peer, now, self.deadlines.s_per_row, self.probe_interval_s,
                                        self.probe_misses, self._busy)
            if verdict.action is Action.EXTEND:
                for part in verdict.late:
                    part.deadline = now + 2 * (part.deadline - part.sent_at)
                self.counters["deadline_extensions"] += len(verdict.late)
            elif verdict.action is Action.LATE:
                self.counters["deadline_misses"] += len(verdict.late)
                self.suspect(peer.name, verdict.reason, force=True)
            elif verdict.action is Action.SILENT:
                self.suspect(peer.name, verdict.reason)
            elif verdict.action is Action.PROBE:
                try:
                    if peer.link.try_send(FrameHeader(FrameKind.PROBE, step=self.step)):
                        peer.probes_sent += 1
                        self.counters["probes"] += 1
                except LinkClosed as e:
                    self.peer_failed(peer.name, f"link closed on probe: {e}")

    def _busy(self, peer: ExpertPeer, waited_s: float) -> bool:
        return peer_health.is_busy(peer, waited_s, time.monotonic(), self.busy_grace_s, self.probe_interval_s)

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
        lost = peer.take_parts()
        log.warning("suspect %s incarnation %d: %s; resending %d parts", name, peer.incarnation, reason, len(lost))
        self._resend(lost)

    def peer_failed(self, name: str, reason: str) -> None:
        """An expert worker is gone: drop it and resend its unanswered parts to other candidates."""
        peer = self.peers.get(name)
        if peer is not None:
            self.on_suspect(name, peer.incarnation, reason)
        self._resend(self.disconnect(name, reason))

    def _retry_held(self) -> None:
        """Send held rows whose experts have a live copy again; fail the calls of those past their deadline."""
        held, self._held = self._held, []
        for h in held:
            call = h.call
            if self._calls.get(call.micro_batch) is not call or call.error is not None:
                continue
            call.remaining -= 1
            try:
                self._dispatch(call, h.pair_index, h.experts, h.rows, h.row_of_pair, excluded=h.excluded,
                               deadline=h.deadline)
            except ExpertUnavailableError as e:
                log.error("%s: waited %.1fs for a copy; failing the requests that need it", e, self.expert_wait_s)
                call.error = e

    def _resend(self, parts: list[Part], exclude: str | None = None) -> None:
        """Send parts again to the next usable candidate of each expert, marked REPLAY (served first)."""
        self.counters["replayed_frames"] += len(parts)
        for part in parts:
            call = part.call
            if self._calls.get(call.micro_batch) is not call or call.error is not None:
                continue
            call.remaining -= 1
            excluded = part.excluded | {exclude} if exclude else part.excluded
            try:
                self._dispatch(call, part.pair_index, part.experts, part.rows, part.row_of_pair, excluded=excluded)
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

    def _wrap_faulty(self, peer: ExpertPeer) -> None:
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


def _gather_rows(x: torch.Tensor, row_of_pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of x [r, D] that pairs use (`row_of_pair` [P], non-decreasing), each once, and each
    pair's row among them: ([n, D], [P])."""
    used, inverse = torch.unique_consecutive(row_of_pair, return_inverse=True)
    return x.index_select(0, used), inverse

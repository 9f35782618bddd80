"""Expert worker (EW): holds a subset of the routed experts and answers DISPATCH frames.

DESIGN.md, step 4: the EW drains whatever frames have arrived from any attention worker (any layer,
any micro-batch), groups the rows by (layer, expert), computes, and answers each frame. A DISPATCH
carries each token's hidden row once with the list of its experts here (datapath/frames.py); the
round expands it to one row per (token, expert) pair as it copies the rows out of the ring, and the
RESULT carries one row per pair back. It never
waits for a particular AW, so a dead AW cannot stall it; it keeps no state across frames, so a frame
replayed to another holder of the same expert gets the same answer (batch-invariant kernels).
Replayed frames are served before fresh ones.

It counts the rows it computes per (layer, expert) and reports them in its heartbeats: the
controller's load estimate, from which load_aware placement plans. The controller's heartbeat replies
name experts to load (a rebalance or a scale step) and copies to drop: new experts are read from the
checkpoint on a thread of their own and installed between rounds, so serving never waits for a load.
SIGTERM drains it: the controller takes it out of the routing table where another copy serves, it
answers what still arrives, and leaves once nothing has come for a moment (bounded by drain_timeout_s).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import signal
import threading
import time
from dataclasses import dataclass

import torch

from resilient_moe.deployment import DeploymentConfig, WorkerConfig
from resilient_moe.controller.client import ControllerClient, worker_info
from resilient_moe.controller.view import ClusterView
from resilient_moe.datapath.frames import Frame, FrameFlags, FrameHeader, FrameKind, worker_number
from resilient_moe.datapath.dial import listen
from resilient_moe.datapath.link import FrameTooLarge, Link, LinkClosed, Outbox, PeerInfo
from resilient_moe.datapath.part_rules import check_dispatch, rows_per_part
from resilient_moe.datapath.poller import Poller, Wakeup
from resilient_moe.engine.engine import resolve_device
from resilient_moe.errors import ExpertUnavailableError
from resilient_moe.model import ops
from resilient_moe.model.weights import Checkpoint, torch_dtype
from resilient_moe.model.expert_side import ExpertKey, ExpertSide, Prepared
from resilient_moe.model.kernel_choice import KernelSet
from resilient_moe.procs import background_thread
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.workers.common import configure_process, link_addresses, load_yielding_cpu

log = logging.getLogger("resilient_moe.expert_worker")


MAX_QUEUED_REPLIES = 256  # replies waiting for room on one link before its frames are left unread
DRAIN_QUIET_S = 0.3  # a draining worker leaves once no DISPATCH has come for this long


@dataclass
class _Work:
    link: Link
    frame: Frame  # a view into the link's ring until the round copies its rows out
    counts: torch.Tensor  # [n] experts asked of each row (checked)
    experts: torch.Tensor  # [P] expert id of each (row, expert) pair, row by row


def _in_turn(work: list[_Work]) -> list[list[_Work]]:
    """The order a round computes its frames in, as batches of one layer each.

    Each turn takes every sender's oldest call (the parts of one (step, layer, micro-batch)) and
    computes those of one layer together: frames of several attention workers share the expert
    weights read for them, but a sender's later micro-batch never rides with its earlier one, whose
    answer it needs first (ping-pong: while the experts compute micro-batch i+1, attention computes
    micro-batch i's next layer)."""
    calls: dict[Link, dict[tuple[int, int, int], list[_Work]]] = {}
    for w in work:
        h = w.frame.header
        calls.setdefault(w.link, {}).setdefault((h.step, h.layer, h.micro_batch), []).append(w)
    queues = [list(by_call.values()) for by_call in calls.values()]  # per sender, its calls in arrival order
    batches: list[list[_Work]] = []
    while queues:
        by_layer: dict[int, list[_Work]] = {}
        for pending in queues:
            head = pending.pop(0)
            by_layer.setdefault(head[0].frame.header.layer, []).extend(head)
        batches.extend(by_layer.values())
        queues = [q for q in queues if q]
    return batches


class ExpertServer:
    """The EW's serving loop over its links; separate from process set-up so tests can drive it.

    A round takes every frame that has arrived, answers probes, checks each DISPATCH fully (part_rules.py)
    before its rows reach the kernels, copies the rows out of the rings (so the rings are free
    again while it computes), computes by layer with replayed work first, and answers. While it
    computes it keeps answering probes, so a long part never looks like a hang; frames that arrive
    meanwhile wait for the next round. Replies never block: one that finds no room waits in its
    link's queue, and a link with a long queue (its attention worker is not draining) is not read
    until the queue shrinks, which holds that attention worker back and no other.
    """

    def __init__(self, experts: ExpertSide, poller: Poller, identity: PeerInfo) -> None:
        self.experts = experts
        self.poller = poller
        self.identity = identity
        cfg = experts.checkpoint.cfg
        self.hidden, self.num_layers, self.num_experts = cfg.hidden_size, cfg.num_layers, cfg.num_experts
        self.links: set[Link] = set()
        self.fenced: set[tuple[str, int]] = set()  # (worker name, incarnation) declared dead
        self.stopping = threading.Event()
        self._outboxes: dict[Link, Outbox] = {}  # replies that found no room wait here, per link
        self._pending: list[_Work] = []  # DISPATCH frames taken while computing: the next round's
        self._unreleased: set[Link] = set()  # links whose received frames are still views in use
        self._last_service = 0.0
        self.counters = dict.fromkeys(("frames", "rows", "frames_fenced", "errors", "frames_rejected",
                                       "probes_answered", "replies_split", "replies_queued", "batches"), 0)
        self.busy_s = 0.0  # time computing and answering (the rest of the wall time it sits idle)
        self.started = time.monotonic()
        self.last_dispatch = time.monotonic()  # when the latest DISPATCH arrived (a draining worker waits for quiet)
        # Rows computed per (layer, expert) since start (this thread writes; heartbeats read deltas).
        self.expert_rows = torch.zeros((self.num_layers, self.num_experts), dtype=torch.long)
        self.held = (0, list(experts.held))  # (version, experts held): replaced whole when it changes
        self.held_mask = self._mask(self.held[1])  # [L, E] bool: what DISPATCH validation looks up
        self._installs: "queue.SimpleQueue[dict[ExpertKey, Prepared]]" = queue.SimpleQueue()
        self._drops: "queue.SimpleQueue[list[ExpertKey]]" = queue.SimpleQueue()

    def add_link(self, link: Link) -> None:
        self.links.add(link)

    def drop_link(self, link: Link, reason: str) -> None:
        if link in self.links:
            self.links.discard(link)
            self._outboxes.pop(link, None)
            self._unreleased.discard(link)
            self._pending = [w for w in self._pending if w.link is not link]
            self.poller.remove(link)
            link.close()
            log.info("link to %s closed: %s", link.peer.name, reason)

    # ---- one round --------------------------------------------------------------------------

    def poll_once(self, timeout_s: float) -> int:
        """Wait for frames, serve every one that has arrived; returns the number of DISPATCH served."""
        if self._pending:
            pass  # frames taken while the last round computed are already here: no wait (they left the rings)
        elif any(len(o) for o in self._outboxes.values()):
            self.poller.wait(0.001)  # replies wait for room: look again soon
        else:
            self.poller.wait(timeout_s)
        self._apply_changes()
        self._flush_all()
        work, self._pending = self._pending, []
        self._collect_all(work)
        if work:
            self.last_dispatch = time.monotonic()
        if not work:
            self._release_all()
            return 0
        start = time.perf_counter()
        # Replayed work first: it belongs to micro-batches already stalled by a failure.
        replays = [w for w in work if w.frame.header.flags & FrameFlags.REPLAY]
        fresh = [w for w in work if not w.frame.header.flags & FrameFlags.REPLAY]
        batches = [self._copy_out(batch) for batch in _in_turn(replays) + _in_turn(fresh)]
        self._release_all()  # every row is copied out: the rings are free while we compute
        self.counters["batches"] += len(batches)
        for layer, x, ids, answers in batches:
            self._compute(layer, x, ids, answers)
        self.busy_s += time.perf_counter() - start
        return len(work)

    def _collect_all(self, work: list[_Work]) -> None:
        for link in list(self.links):
            self._collect(link, work)

    def _collect(self, link: Link, work: list[_Work]) -> None:
        """Take what `link` has: answer probes, check DISPATCH frames and add them to `work`."""
        if len(self._outbox(link)) >= MAX_QUEUED_REPLIES:
            return  # its attention worker is not draining our answers: hold it back (and only it)
        try:
            while (frame := link.recv()) is not None:
                self._unreleased.add(link)
                self._triage(link, frame, work)
        except LinkClosed as e:
            self.drop_link(link, str(e))

    def _triage(self, link: Link, frame: Frame, work: list[_Work]) -> None:
        header = frame.header
        if (link.peer.name, header.incarnation) in self.fenced:
            self.counters["frames_fenced"] += 1
            return
        if header.kind == FrameKind.DISPATCH:
            checked = check_dispatch(frame, self.hidden, self.held_mask, self.num_layers, self.num_experts)
            if checked.__class__ is tuple:
                work.append(_Work(link, frame, *checked))
                return
            problem = checked
            self.counters["frames_rejected"] += 1
            log.warning("rejected a DISPATCH from %s (seq %d): %s", link.peer.name, header.seq, problem)
            self._reply(link, self._result_header(header, FrameFlags.ERROR), body=problem.encode()[:4096])
        elif header.kind == FrameKind.PROBE:
            self.counters["probes_answered"] += 1
            self._reply(link, FrameHeader(FrameKind.PROBE_ACK, step=header.step, seq=header.seq))
        elif header.kind == FrameKind.GOODBYE:
            self.drop_link(link, "peer said goodbye")

    def _release_all(self) -> None:
        for link in self._unreleased:
            if link in self.links:
                link.release()
        self._unreleased.clear()

    def _service(self) -> None:
        """Between expert groups of a long computation: answer probes, keep new frames for the next round."""
        now = time.monotonic()
        if now - self._last_service < 0.002:
            return
        self._last_service = now
        self._flush_all()
        self._collect_all(self._pending)

    def _copy_out(self, batch: list[_Work]) -> tuple[int, torch.Tensor, torch.Tensor, list]:
        """(layer, rows [N, D], expert ids [N], (link, header, pairs) per frame) of frames of one layer:
        a private copy with one row per (token, expert) pair, each frame's in the order of its aux
        (frames.py)."""
        total = sum(w.experts.numel() for w in batch)
        x = torch.empty((total, self.hidden), dtype=self.experts.dtype)  # [N, D]
        start = 0
        for w in batch:
            rows, pairs = w.frame.tensor, w.experts.numel()  # [n, D] in the ring
            row_of_pair = torch.repeat_interleave(torch.arange(rows.shape[0]), w.counts)  # [pairs]
            if rows.dtype == x.dtype:
                torch.index_select(rows, 0, row_of_pair, out=x[start:start + pairs])  # the one copy out
            else:
                x[start:start + pairs] = rows.index_select(0, row_of_pair)
            start += pairs
        ids = torch.cat([w.experts for w in batch])  # [N]
        return batch[0].frame.header.layer, x, ids, [(w.link, w.frame.header, w.experts.numel()) for w in batch]

    def _compute(self, layer: int, x: torch.Tensor, ids: torch.Tensor, answers: list) -> None:
        try:
            y = self.experts.forward(layer, x, ids, between=self._service)  # [N, D]
            self.expert_rows[layer] += torch.bincount(ids, minlength=self.num_experts)  # [E]
        except ExpertUnavailableError as e:  # checked already; a race with a drop of experts
            self.counters["errors"] += 1
            for link, header, _ in answers:
                self._reply(link, self._result_header(header, FrameFlags.ERROR), body=str(e).encode())
            return
        start = 0
        for link, header, n in answers:
            self._answer(link, header, y[start:start + n])
            start += n
            self.counters["frames"] += 1
            self.counters["rows"] += n

    def _answer(self, link: Link, header: FrameHeader, y: torch.Tensor) -> None:
        """RESULT frame(s) for one DISPATCH: split by rows (aux = first row) when the link takes less."""
        if link not in self.links:
            return
        step = rows_per_part(link.max_frame, link.max_frame, 2 * link.max_frame, 0, y.shape[1] * y.element_size())
        if y.shape[0] <= step:
            self._reply(link, self._result_header(header), tensor=y)
            return
        self.counters["replies_split"] += 1
        for lo in range(0, y.shape[0], step):
            self._reply(link, self._result_header(header), aux=torch.tensor([lo], dtype=torch.int32),
                        tensor=y[lo:lo + step])

    @staticmethod
    def _result_header(h: FrameHeader, flags: FrameFlags = FrameFlags.NONE) -> FrameHeader:
        return FrameHeader(
            FrameKind.RESULT, epoch=h.epoch, step=h.step, seq=h.seq, layer=h.layer, micro_batch=h.micro_batch,
            flags=flags | (h.flags & FrameFlags.REPLAY),
        )

    # ---- replies ----------------------------------------------------------------------------

    def _outbox(self, link: Link) -> Outbox:
        outbox = self._outboxes.get(link)
        if outbox is None:
            outbox = self._outboxes[link] = Outbox(link)
        return outbox

    def _reply(self, link: Link, header: FrameHeader, aux: torch.Tensor | None = None,
               tensor: torch.Tensor | None = None, body: bytes | None = None) -> None:
        outbox = self._outbox(link)
        try:
            outbox.send(header, aux, tensor, body)
        except (LinkClosed, FrameTooLarge) as e:
            self.drop_link(link, str(e))
            return
        self.counters["replies_queued"] += bool(len(outbox))

    def _flush_all(self) -> None:
        for link, outbox in list(self._outboxes.items()):
            try:
                outbox.flush()
            except (LinkClosed, FrameTooLarge) as e:
                self.drop_link(link, str(e))

    # ---- experts held: loads and drops the controller orders ---------------------------------

    def install_later(self, weights: dict[ExpertKey, Prepared]) -> None:
        """Hold these experts from the next round on (any thread)."""
        self._installs.put(weights)

    def drop_later(self, keys: list[ExpertKey]) -> None:
        """Drop these copies from the next round on (any thread)."""
        self._drops.put(keys)

    def _apply_changes(self) -> None:
        """Between rounds: install experts read meanwhile and drop copies no longer wanted."""
        changed = False
        while not self._installs.empty():
            self.experts.install(self._installs.get())
            changed = True
        while not self._drops.empty():
            self.experts.drop(self._drops.get())
            changed = True
        if changed:
            self.held = (self.held[0] + 1, list(self.experts.held))
            self.held_mask = self._mask(self.held[1])
            log.info("now holding %d experts", len(self.held[1]))

    def _mask(self, held: list[ExpertKey]) -> torch.Tensor:
        """[L, E] bool: True where (layer, expert) is held here."""
        mask = torch.zeros((self.num_layers, self.num_experts), dtype=torch.bool)
        if held:
            index = torch.tensor(held, dtype=torch.long)  # [H, 2]
            mask[index[:, 0], index[:, 1]] = True
        return mask

    def stats(self) -> dict[str, float]:
        rejected = sum(link.rejected for link in self.links)
        return {k: float(v) for k, v in self.counters.items()} | {
            "links": float(len(self.links)), "busy_s": self.busy_s, "uptime_s": time.monotonic() - self.started,
            "threads": float(ops.compute_threads()),
            "frames_corrupt": float(rejected), "replies_waiting": float(sum(len(o) for o in self._outboxes.values()))}

    def close(self) -> None:
        for link in list(self.links):
            self.drop_link(link, "expert worker stopping")


def load_experts(dep: DeploymentConfig, checkpoint: Checkpoint, experts: list[ExpertKey]) -> ExpertSide:
    """This worker's experts (and shadows) on the deployment's device, run by its kernels. Frames arrive
    in host memory; on a GPU the expert side stages rows in and results out through pinned memory."""
    device = resolve_device(dep.engine.device)
    dtype = torch_dtype(dep.engine.dtype)
    return ExpertSide(checkpoint, experts, dtype, device, KernelSet.for_device(dep.engine.kernels, device, dtype))


class ControllerOrders:
    """The expert worker's side of its heartbeats: the rows per (layer, expert) computed since the last
    one, the experts held when that changed, and the controller's answer (experts to load, on a
    thread of their own, and copies to drop)."""

    def __init__(self, server: ExpertServer, name: str) -> None:
        self.server = server
        self.name = name
        self._reported_rows = server.expert_rows.clone()
        self._reported_held = -1
        self._loading: set[ExpertKey] = set()
        self._lock = threading.Lock()

    def fill(self, request: pb.HeartbeatRequest):
        rows = self.server.expert_rows.clone()  # [L, E]
        delta = rows - self._reported_rows
        self._reported_rows = rows
        for layer, expert in delta.nonzero().tolist():
            request.expert_tokens.add(layer=layer, expert=expert, tokens=float(delta[layer, expert]))
        version, held = self.server.held
        if version != self._reported_held:
            request.reports_experts = True
            request.experts.extend(pb.ExpertRef(layer=l, expert=e) for l, e in held)
        return lambda reply: self.on_reply(reply, version)

    def on_reply(self, reply: pb.HeartbeatReply, version: int) -> None:
        self._reported_held = max(self._reported_held, version)
        held = set(self.server.held[1])
        if reply.drop_experts:
            self.server.drop_later([(x.layer, x.expert) for x in reply.drop_experts])
        with self._lock:
            wanted = [(x.layer, x.expert) for x in reply.load_experts]
            wanted = [k for k in wanted if k not in held and k not in self._loading]
            self._loading.update(wanted)
        if wanted:
            threading.Thread(target=self._load, args=(wanted,), name="expert-loader", daemon=True).start()

    def _load(self, keys: list[ExpertKey]) -> None:
        began = time.monotonic()
        background_thread()
        try:
            weights = self.server.experts.read(keys)
            self.server.install_later(weights)
            log.info("%s loaded %d experts in %.2fs (asked by the controller)", self.name, len(keys),
                     time.monotonic() - began)
        except Exception:  # an order that cannot be carried out is logged; the controller asks again
            log.exception("could not load experts %s", keys)
        finally:
            with self._lock:
                self._loading.difference_update(keys)


def drain(server: ExpertServer, client: ControllerClient, name: str, incarnation: int, bound_s: float) -> None:
    """Planned removal: out of the routing table first, then answer what still comes until it is quiet."""
    began = time.monotonic()
    client.drain(name, incarnation)
    server.last_dispatch = max(server.last_dispatch, time.monotonic())
    while time.monotonic() - began < bound_s and time.monotonic() - server.last_dispatch < DRAIN_QUIET_S:
        server.poll_once(0.05)
    log.info("%s drained in %.2fs", name, time.monotonic() - began)


def main(config: WorkerConfig) -> int:
    """Run an expert worker until SIGTERM (then drain), or until the controller fences this incarnation."""
    dep = config.deployment
    configure_process(config)
    client = ControllerClient(config.controller_address)
    reply = client.register(worker_info(config.name, pb.EXPERT, config.index, host=dep.host, node=config.node),
                            timeout_s=dep.startup_timeout_s)
    identity = PeerInfo(config.name, worker_number("expert", config.index), reply.incarnation, os.getpid(), dep.host)
    poller = Poller()
    # Links are accepted on a thread of their own (mapping a link's rings takes tens of milliseconds, which
    # the attention workers already served must not wait for) and join the poller from the serving loop.
    listeners = [listen(address, identity)
                 for address in link_addresses(dep, config.cluster_id, config.name, reply.incarnation)]
    accepted: "queue.SimpleQueue[Link]" = queue.SimpleQueue()
    server: ExpertServer | None = None
    orders: ControllerOrders | None = None
    wakeup = Wakeup(poller)
    checkpoint = Checkpoint(dep.model)  # its bytes_read is the progress heartbeats report while loading
    draining = threading.Event()

    def stats() -> dict[str, float]:
        return server.stats() if server is not None else {"loading": 1.0, "loaded_bytes": float(checkpoint.bytes_read)}

    def fill(request: pb.HeartbeatRequest):
        return orders.fill(request) if orders is not None else None

    def on_fenced() -> None:
        log.warning("%s incarnation %d was fenced by the controller; stopping", config.name, reply.incarnation)
        if server is None:
            os._exit(3)  # still loading: nothing to wind down
        server.stopping.set()
        wakeup.ring()

    # Heartbeats start before the weights load, so a slow load is never taken for a death.
    client.start_heartbeats(config.name, reply.incarnation, dep.heartbeat_interval_s, stats, on_fenced, fill)
    experts = load_yielding_cpu(reply.state, lambda: load_experts(dep, checkpoint,
                                                                   [(x.layer, x.expert) for x in reply.load_experts]))
    server = ExpertServer(experts, poller, identity)
    orders = ControllerOrders(server, config.name)

    def on_state(state: pb.ClusterState) -> None:
        view = ClusterView.from_proto(state)
        server.fenced = view.fenced  # replaced whole: the loop reads it without a lock
        if view.is_fenced(config.name, reply.incarnation):
            on_fenced()

    def accept_forever() -> None:
        background_thread()
        while not server.stopping.is_set():
            select.select([listener.fileno() for listener in listeners], [], [], 0.2)
            try:
                for listener in listeners:
                    while (link := listener.accept()) is not None:
                        accepted.put(link)
                        wakeup.ring()
            except ValueError:
                return  # the listener closed: the worker is stopping

    client.start_watch(config.name, on_state)
    signal.signal(signal.SIGTERM, lambda *_: (draining.set(), server.stopping.set(), wakeup.ring()))
    acceptor = threading.Thread(target=accept_forever, name="accept-links", daemon=True)
    acceptor.start()
    addresses = " ".join(listener.address for listener in listeners)
    client.ready(config.name, reply.incarnation, experts.held, addresses)
    log.info("%s ready: %d experts on %s (%s kernels), listening on %s", config.name, len(experts.held),
             experts.device, experts.kernels.name, addresses)
    fenced = False
    try:
        while not server.stopping.is_set():
            server.poll_once(0.5)
            wakeup.drain()
            while not accepted.empty():
                link = accepted.get()
                poller.add(link)
                server.add_link(link)
        fenced = (config.name, reply.incarnation) in server.fenced
        if draining.is_set() and not fenced:
            drain(server, client, config.name, reply.incarnation, dep.drain_timeout_s)
    finally:
        fenced = (config.name, reply.incarnation) in server.fenced
        if not fenced:
            client.deregister(config.name, reply.incarnation)
        server.close()
        acceptor.join(1.0)
        for listener in listeners:
            listener.close()
        while not accepted.empty():
            accepted.get().close()
        client.close()
    return 3 if fenced else 0

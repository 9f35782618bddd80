"""Expert worker (EW): holds a subset of the routed experts and answers DISPATCH frames.

DESIGN.md, step 4: the EW drains whatever frames have arrived from any attention worker (any layer,
any micro-batch), groups the rows by (layer, expert), computes, and answers each frame. It never
waits for a particular AW, so a dead AW cannot stall it; it keeps no state across frames, so a frame
replayed to another holder of the same expert gets the same answer (batch-invariant kernels).
Replayed frames are served before fresh ones.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch

from resilient_moe.config import WorkerConfig
from resilient_moe.controller.client import ControllerClient, worker_info
from resilient_moe.datapath.frames import Frame, FrameFlags, FrameHeader, FrameKind, worker_number
from resilient_moe.datapath.link import Link, LinkClosed, PeerInfo, listen
from resilient_moe.datapath.poller import Poller
from resilient_moe.errors import ExpertUnavailableError
from resilient_moe.model.checkpoint import Checkpoint, torch_dtype
from resilient_moe.model.expert_side import ExpertSide
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.workers.common import Wakeup, configure_process, link_address, yield_cpu_while_loading

log = logging.getLogger("resilient_moe.expert_worker")


@dataclass
class _Work:
    link: Link
    frame: Frame


class ExpertServer:
    """The EW's serving loop over its links; separate from process set-up so tests can drive it."""

    def __init__(self, experts: ExpertSide, poller: Poller, identity: PeerInfo) -> None:
        self.experts = experts
        self.poller = poller
        self.identity = identity
        self.links: set[Link] = set()
        self.fenced: set[tuple[str, int]] = set()  # (worker name, incarnation) declared dead
        self.stopping = threading.Event()
        self.frames_served = 0
        self.rows_served = 0
        self.frames_fenced = 0
        self.errors = 0
        self.busy_s = 0.0  # time computing and answering (the rest of the wall time it sits idle)
        self.started = time.monotonic()

    def add_link(self, link: Link) -> None:
        self.links.add(link)

    def drop_link(self, link: Link, reason: str) -> None:
        if link in self.links:
            self.links.discard(link)
            self.poller.remove(link)
            link.close()
            log.info("link to %s closed: %s", link.peer.name, reason)

    def poll_once(self, timeout_s: float) -> int:
        """Wait for frames, serve every one that has arrived; returns the number served."""
        self.poller.wait(timeout_s)
        work: list[_Work] = []
        touched: list[Link] = []
        for link in list(self.links):
            try:
                got = False
                while (frame := link.recv()) is not None:
                    got = True
                    self._triage(link, frame, work)
                if got:
                    touched.append(link)
            except LinkClosed as e:
                self.drop_link(link, str(e))
        if work:
            start = time.perf_counter()
            # Replayed work first: it belongs to micro-batches already stalled by a failure.
            replays = [w for w in work if w.frame.header.flags & FrameFlags.REPLAY]
            fresh = [w for w in work if not w.frame.header.flags & FrameFlags.REPLAY]
            for group in (replays, fresh):
                if group:
                    self._serve(group)
            self.busy_s += time.perf_counter() - start
        for link in touched:
            if link in self.links:
                link.release()
        return len(work)

    def _triage(self, link: Link, frame: Frame, work: list[_Work]) -> None:
        header = frame.header
        if (link.peer.name, header.incarnation) in self.fenced:
            self.frames_fenced += 1
            return
        if header.kind == FrameKind.DISPATCH:
            work.append(_Work(link, frame))
        elif header.kind == FrameKind.PROBE:
            self._reply(link, FrameHeader(FrameKind.PROBE_ACK, step=header.step, seq=header.seq))
        elif header.kind == FrameKind.GOODBYE:
            self.drop_link(link, "peer said goodbye")

    def _serve(self, work: list[_Work]) -> None:
        by_layer: dict[int, list[_Work]] = {}
        for w in work:
            by_layer.setdefault(w.frame.header.layer, []).append(w)
        for layer, items in by_layer.items():
            rows = [w.frame.tensor for w in items]  # [n_i, D] views into the receive rings
            ids = [w.frame.aux for w in items]
            x = rows[0] if len(rows) == 1 else torch.cat(rows)
            expert_ids = (ids[0] if len(ids) == 1 else torch.cat(ids)).long()
            try:
                y = self.experts.forward(layer, x.to(self.experts.dtype), expert_ids)
            except ExpertUnavailableError as e:
                self.errors += 1
                for w in items:
                    self._reply(w.link, self._result_header(w.frame, FrameFlags.ERROR), body=str(e).encode())
                continue
            start = 0
            for w, part in zip(items, rows):
                n = part.shape[0]
                self._reply(w.link, self._result_header(w.frame), tensor=y[start : start + n])
                start += n
                self.frames_served += 1
                self.rows_served += n

    @staticmethod
    def _result_header(frame: Frame, flags: FrameFlags = FrameFlags.NONE) -> FrameHeader:
        h = frame.header
        return FrameHeader(
            FrameKind.RESULT, epoch=h.epoch, step=h.step, seq=h.seq, layer=h.layer, micro_batch=h.micro_batch,
            flags=flags | (h.flags & FrameFlags.REPLAY),
        )

    def _reply(self, link: Link, header: FrameHeader, tensor: torch.Tensor | None = None, body: bytes | None = None) -> None:
        try:
            link.send(header, tensor=tensor, body=body)
        except LinkClosed as e:
            self.drop_link(link, str(e))

    def stats(self) -> dict[str, float]:
        return {"frames": float(self.frames_served), "rows": float(self.rows_served), "links": float(len(self.links)),
                "busy_s": self.busy_s, "uptime_s": time.monotonic() - self.started,
                "frames_fenced": float(self.frames_fenced), "errors": float(self.errors)}

    def close(self) -> None:
        for link in list(self.links):
            self.drop_link(link, "expert worker stopping")


def main(config: WorkerConfig) -> int:
    """Run an expert worker until SIGTERM, or until the controller fences this incarnation."""
    dep = config.deployment
    configure_process(config)
    client = ControllerClient(config.controller_address)
    reply = client.register(worker_info(config.name, pb.EXPERT, config.index, host=dep.host),
                            timeout_s=dep.startup_timeout_s)
    identity = PeerInfo(config.name, worker_number("expert", config.index), reply.incarnation, os.getpid(), dep.host)
    poller = Poller()
    listener = listen(link_address(dep, config.cluster_id, config.name, reply.incarnation), identity, poller)
    poller.add_fd(listener.fileno())
    server: ExpertServer | None = None
    wakeup = Wakeup(poller)
    checkpoint = Checkpoint(dep.model)  # its bytes_read is the progress heartbeats report while loading

    def stats() -> dict[str, float]:
        return server.stats() if server is not None else {"loading": 1.0, "loaded_bytes": float(checkpoint.bytes_read)}

    def on_fenced() -> None:
        log.warning("%s incarnation %d was fenced by the controller; stopping", config.name, reply.incarnation)
        if server is None:
            os._exit(3)  # still loading: nothing to wind down
        server.stopping.set()
        wakeup.ring()

    # Heartbeats start before the weights load, so a slow load is never taken for a death.
    client.start_heartbeats(config.name, reply.incarnation, dep.heartbeat_interval_s, stats, on_fenced)
    with yield_cpu_while_loading(reply.state):
        experts = ExpertSide(checkpoint, [(x.layer, x.expert) for x in reply.load_experts],
                             torch_dtype(dep.engine.dtype))
    server = ExpertServer(experts, poller, identity)

    def on_state(state: pb.ClusterState) -> None:
        fenced = {(f.name, f.incarnation) for f in state.fenced}
        server.fenced = fenced  # replaced whole: the loop reads it without a lock
        if (config.name, reply.incarnation) in fenced:
            on_fenced()

    client.start_watch(config.name, on_state)
    signal.signal(signal.SIGTERM, lambda *_: (server.stopping.set(), wakeup.ring()))
    client.ready(config.name, reply.incarnation, experts.held, listener.address)
    log.info("%s ready: %d experts, listening on %s", config.name, len(experts.held), listener.address)
    try:
        while not server.stopping.is_set():
            server.poll_once(0.5)
            wakeup.drain()
            while (link := listener.accept()) is not None:
                server.add_link(link)
    finally:
        fenced = (config.name, reply.incarnation) in server.fenced
        server.close()
        listener.close()
        if not fenced:
            client.deregister(config.name, reply.incarnation)
        client.close()
    return 3 if fenced else 0

"""Attention worker (AW): embedding, attention, routers, dense and shared MLPs, LM head, sampler and
the paged KV cache, driving remote expert workers through the forwarding engine.

It serves requests from frontends over links of its own: `submit`/`abort` in, `failed`, `started`
and `handover` out (messages.py), and each step's token events out as one binary TOKENS frame per
frontend (datapath/token_frames.py). Commands that arrive while a step runs are queued and applied between steps, so the
engine is only ever touched by the main loop. Cluster views (controller/view.py) are applied between
steps and also while a step waits on expert workers, so a step whose experts have no live copy sees a
replacement's link and routing table as soon as they exist.

SIGTERM drains it (planned removal): the controller hears it is draining (frontends send it no new
requests), it runs no more steps, checkpoints every computed position (the partial last blocks too)
and waits until that is written and committed, then hands every request over (`handover`): the
frontends move them to other workers, which restore their KV from the store and compute only the
newest position again. SIGKILL is a failure.

Placement note (issue: "shared experts and dense layers where traffic is lowest"): shared experts and
dense MLP layers run here, on the AW. Every token needs them, so on an expert worker they would put
every token's hidden state on the wire twice more per layer; here they cost no traffic, overlap the
routed experts' round trip, and stay inside the failure domain that already holds the request.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Callable

import redis

from resilient_moe import messages
from resilient_moe.deployment import WorkerConfig
from resilient_moe.engine.config import SamplingParams
from resilient_moe.controller.client import ControllerClient, worker_info
from resilient_moe.controller.view import ClusterView, node_of
from resilient_moe.datapath.forwarding import Forwarder, StepCancelled
from resilient_moe.datapath.frames import FrameHeader, FrameKind, worker_number
from resilient_moe.datapath.dial import choose_address, listen
from resilient_moe.datapath.link import FrameTooLarge, Link, LinkClosed, Outbox, PeerInfo
from resilient_moe.datapath.part_rules import DeadlineModel
from resilient_moe.datapath.token_frames import encode_tokens
from resilient_moe.datapath.poller import Poller, Wakeup
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.engine.remote_experts import RemoteExperts
from resilient_moe.engine.sequence import Sequence, TokenEvent
from resilient_moe.errors import ConfigError, RequestError
from resilient_moe.kvstore.checkpoint import KVCheckpointer
from resilient_moe.kvstore.replication import StoreRef, place_stores
from resilient_moe.kvstore.memory_layout import layout_for
from resilient_moe.model import ops
from resilient_moe.model.weights import Checkpoint
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.workers.common import configure_process, load_yielding_cpu

log = logging.getLogger("resilient_moe.attention_worker")


MAX_QUEUED_MESSAGES = 4096  # messages to one frontend that found no room before the frontend is dropped


@dataclass
class Kept:
    """A request that outlives its frontend (submitted with keep_s > 0: a client's Idempotency-Key):
    its token events from `first` on, and since when it has had no frontend / has been finished."""

    keep_s: float
    first: int  # the position of its first event here (a resumed request brought the earlier ones)
    events: list[TokenEvent] = field(default_factory=list)
    orphan_since: float | None = None  # its frontend's link broke then (monotonic); None: owned
    finished_at: float | None = None


class AttentionServer:
    """The AW's loop: frontend commands in, engine steps, token events out.

    Nothing here waits on a peer: messages to a frontend that is not draining its link wait in an
    outbox (a frontend that falls hopelessly behind is dropped, and its requests with it), and a
    request moved here from a failed worker waits aside, not in the engine, while the checkpointer's
    thread reads its KV from the store.
    """

    def __init__(self, engine: LLMEngine, forwarder: Forwarder, poller: Poller, listener, wakeup: Wakeup) -> None:
        self.engine = engine
        self.forwarder = forwarder
        self.poller = poller
        self.listener = listener
        self.wakeup = wakeup
        self.node = os.uname().nodename  # our failure domain (WorkerConfig.node): links to peers on it use shm
        self.frontends: dict[Link, Outbox] = {}
        self.owner: dict[str, Link] = {}  # request id -> frontend link that submitted it
        # moved here, waiting for their KV from the store; or new, waiting for a prefix lookup in the store
        self.restoring: dict[str, Sequence] = {}
        self.kept: dict[str, Kept] = {}  # requests that outlive their frontend (messages.py: keep_s)
        self.requests_started = 0  # requests submitted fresh here (not moved here from another worker)
        self.requests_attached = 0  # kept requests a client resumed through another frontend
        self.begun: set[str] = set()  # requests whose first step here has run (their frontends know)
        self.poison_tokens: set[int] = set()  # chaos testing: prompt tokens that take this worker down
        self.commands: deque[tuple[Link, messages.Message]] = deque()
        self.cluster_updates: deque[ClusterView] = deque()
        self.stopping = threading.Event()
        self.draining = threading.Event()  # SIGTERM: hand every request over, then stop
        self.handed_over = 0  # requests moved to other workers by a drain
        self.fenced = False
        self.step_s = 0.0  # time inside engine steps (attention compute + waiting for experts)
        # Where a step's wall time goes, summed (seconds): commands applied before it, the engine step
        # (of which forwarder.wait_s waits on expert workers), publishing tokens, checkpointing after it.
        self.phase_s = dict.fromkeys(("commands", "publish", "checkpoint"), 0.0)
        self.prefill_steps = 0  # steps that computed prompt tokens beside their decodes
        self._scheduled = (0, 0)  # (decodes, prompt tokens) of the step about to run
        self.started = time.monotonic()
        self.recomputed_tokens = 0  # positions of adopted requests computed again (not restored)
        self.requests_recomputed = 0  # adopted requests with nothing to restore
        # Without resilience (the restart-everything baseline) a lost expert takes this worker down,
        # as a failed collective does in systems without failure domains; the restart re-runs it all.
        self.crash_on_lost_expert = False
        self.checkpointer: KVCheckpointer | None = None  # KV checkpoints into the KV store, when configured
        self.index = 0  # this worker's index (its region in every KV store)
        self.kv_replicas = 0  # replica stores each checkpoint is shipped to (deployment kv_replicas)
        self.warned_no_store = False
        # Prefix reuse across workers (deployment prefix_store): new requests whose prefix blocks were read
        # from the KV store, the positions so read, and lookups that found nothing usable (computed instead)
        self.prefix_store_restores = 0
        self.prefix_store_hit_tokens = 0
        self.prefix_store_misses = 0
        forwarder.on_other = self.on_other
        engine.on_scheduled = self.on_scheduled

    # ---- inputs -----------------------------------------------------------------------------

    def on_other(self, links: list[Link], fds: list[int]) -> None:
        """Frontend traffic, new links and wake-ups seen while waiting (possibly mid-step): commands are
        queued; cluster views are applied (a held step may be waiting for a replacement expert worker)."""
        self.wakeup.drain()
        self.apply_views()
        while (link := self.listener.accept()) is not None:
            self.frontends[link] = Outbox(link)
        for link, outbox in list(self.frontends.items()):
            try:
                outbox.flush()
                got = False
                while (frame := link.recv()) is not None:
                    got = True
                    if frame.header.kind == FrameKind.CONTROL:
                        try:
                            message = messages.decode(frame.body)
                        except messages.MessageError as e:
                            log.error("bad message from %s: %s", link.peer.name, e)
                            continue
                        if self._restores_now(message):
                            self._submit(link, message)  # the store is read while the step runs
                        else:
                            self.commands.append((link, message))
                    elif frame.header.kind == FrameKind.PROBE:  # answered at once, even in the middle of a step
                        outbox.send(FrameHeader(FrameKind.PROBE_ACK, step=frame.header.step))
                if got:
                    link.release()
            except (LinkClosed, FrameTooLarge) as e:
                self._drop_frontend(link, str(e))

    def _restores_now(self, message: messages.Message) -> bool:
        """A request moved here with checkpointed KV: reading it touches no engine state, so it starts
        as soon as it arrives, even mid-step (the engine takes the request between steps, once read)."""
        return isinstance(message, messages.Submit) and message.resume and self.checkpointer is not None \
            and not self.draining.is_set()

    def _drop_frontend(self, link: Link, reason: str) -> None:
        if self.frontends.pop(link, None) is None:
            return
        log.warning("dropping frontend %s: %s", link.peer.name, reason)
        self.poller.remove(link)
        link.close()
        now = time.monotonic()
        for request_id in [r for r, owner in self.owner.items() if owner is link]:
            kept = self.kept.get(request_id)
            if kept is not None:  # a client may resume it at another frontend: keep decoding, unowned
                del self.owner[request_id]
                kept.orphan_since = now
            else:
                self._abort(request_id)  # nobody is left to read its tokens

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.restoring.pop(request_id, None)
        self.owner.pop(request_id, None)
        self.begun.discard(request_id)
        self.kept.pop(request_id, None)

    def _attach(self, link: Link, message: messages.Attach) -> None:
        """A client resumed a kept request through the frontend at `link`: it owns it from now on and
        gets its events from `position` on (those this worker has: from `first`)."""
        kept = self.kept.get(message.request_id)
        if kept is None:
            self._send(link, messages.Failed(message.request_id, f"{message.request_id} is not on "
                                             f"{self.forwarder.identity.name}", "not_here"))
            return
        previous = self.owner.get(message.request_id)
        if previous is not None and previous is not link:
            self._send(previous, messages.Failed(message.request_id, "a client resumed it at another frontend",
                                                 "detached"))
        if kept.finished_at is None:
            self.owner[message.request_id] = link
        kept.orphan_since = None
        self.requests_attached += 1
        first = max(message.position, kept.first)
        self._send(link, messages.Attached(message.request_id, first))
        replay = [e for e in kept.events if e.position >= first]
        if replay:
            self._send_frame(link, FrameHeader(FrameKind.TOKENS, step=self.engine.step_count), encode_tokens(replay))

    def expire_kept(self) -> None:
        """Kept requests nobody resumed within their keep_s are aborted (their KV freed); finished ones
        are forgotten."""
        now = time.monotonic()
        for request_id, kept in list(self.kept.items()):
            since = kept.finished_at if kept.finished_at is not None else kept.orphan_since
            if since is not None and now - since > kept.keep_s:
                if kept.finished_at is None:
                    log.info("%s: no frontend resumed it within %.0fs; aborting it", request_id, kept.keep_s)
                    self._abort(request_id)
                else:
                    del self.kept[request_id]

    def apply_views(self) -> None:
        while self.cluster_updates:
            self.apply_view(self.cluster_updates.popleft())

    def apply_commands(self) -> None:
        self.apply_views()
        while self.commands:
            link, message = self.commands.popleft()
            if isinstance(message, messages.Submit) and self.draining.is_set():
                self._send(link, messages.Handover([message.request_id]))  # not here: this worker is leaving
            elif isinstance(message, messages.Submit):
                self._submit(link, message)
            elif isinstance(message, messages.Abort):
                self._abort(message.request_id)
            elif isinstance(message, messages.Attach):
                self._attach(link, message)
        if self.checkpointer is not None:
            for seq, rows, n in self.checkpointer.finished_restores():
                if self.restoring.pop(seq.request_id, None) is seq:
                    self._resume(seq, rows, n)
            for seq, start, rows in self.checkpointer.finished_prefixes():
                if self.restoring.pop(seq.request_id, None) is seq:
                    restored = self.engine.add_with_prefix(seq, start, rows)
                    self.prefix_store_restores += restored > 0
                    self.prefix_store_hit_tokens += restored
                    self.prefix_store_misses += restored == 0

    def _submit(self, link: Link, message: messages.Submit) -> None:
        try:
            params = SamplingParams.from_dict(message.params)
            seq = self.engine.new_sequence(message.request_id, message.prompt_ids, params,
                                           output_ids=message.output_ids, seed=message.seed)
        except (RequestError, ConfigError) as e:
            self._send(link, messages.Failed(message.request_id, str(e), "invalid_request"))
            return
        seq.suspect = message.suspect
        self.owner[message.request_id] = link
        if message.keep_s > 0:
            self.kept[message.request_id] = Kept(message.keep_s, len(message.output_ids))
        if message.resume and self.checkpointer is not None:  # its checkpointed KV spares the recompute
            self.restoring[message.request_id] = seq
            self.checkpointer.request_restore(seq)
        elif message.resume:
            self._resume(seq, None, 0)
        else:
            self.requests_started += 1
            if self.checkpointer is not None and not self.draining.is_set() and self.checkpointer.request_prefix(seq):
                self.restoring[message.request_id] = seq  # the prefix blocks it misses here may be in the store
            else:
                self.engine.scheduler.add(seq)

    def _resume(self, seq: Sequence, rows, n: int) -> None:
        restored = self.engine.resume(seq, rows, n)
        self.recomputed_tokens += seq.num_tokens - restored
        self.requests_recomputed += restored == 0
        log.info("adopted %s: %d positions restored from the KV store, %d recomputed", seq.request_id, restored,
                 seq.num_tokens - restored)

    def apply_view(self, view: ClusterView) -> None:
        """Connect to expert workers that became ready; adopt the newest routing table; map a new KV store."""
        if self.checkpointer is not None:
            self.checkpointer.fenced = view.fenced  # prefix blocks those wrote are not reused
            self.use_kv_stores(view)
        for w in view.of_role("expert"):
            peer = self.forwarder.peers.get(w.name)
            if view.ended(w.name, w.incarnation):
                self.forwarder.fence(w.name, w.incarnation)
            elif w.serving and w.data_address and (peer is None or peer.incarnation != w.incarnation):
                same_node = w.node == self.node  # shm within a node, TCP across nodes
                self.forwarder.connect_soon(w.name, choose_address(w.data_address, same_node), w.incarnation)
        if self.forwarder.ert is None or view.routing_epoch > self.forwarder.ert.epoch:
            if view.routing is not None:
                self.forwarder.set_routing(view.routing)
        self.forwarder.set_faults(list(view.faults))  # chaos testing; usually none
        self.poison_tokens = {f.token_id for f in view.faults
                              if f.kind == "poison" and f.source in ("", self.forwarder.identity.name)}

    def use_kv_stores(self, view: ClusterView) -> None:
        """Checkpoint into the primary store on this node (mapped) and ship to the replica stores
        (kvstore/replication.py, `place_stores`); a new primary is mapped, a new replica gets every live
        block, a dead one is left out (the writer carries on with the others)."""
        me = view.workers.get(self.forwarder.identity.name)
        node = node_of(me) if me is not None else self.forwarder.identity.host
        stores = [StoreRef(s.name, s.index, s.incarnation, s.data_address, node_of(s), view.kv_store_live(s))
                  for s in view.kv_stores()]
        primary, replicas = place_stores(node, self.index, stores, self.kv_replicas)
        if primary is None and stores and not self.warned_no_store:
            self.warned_no_store = True
            log.warning("no KV store runs on this worker's node (%s): not checkpointing (a store is mapped, "
                        "so the launcher must start one on every node with attention workers)", node)
        if primary is not None and primary.live:
            self.checkpointer.attach(primary.address, primary.incarnation)
        self.checkpointer.use_replicas([r for r in replicas if r.live], [s for s in stores if s.live])

    def on_scheduled(self, seqs: list[Sequence]) -> None:
        """Before a step runs: tell each frontend which of its requests start here with it (if this
        worker dies in the step, those are the suspects); chaos poison strikes here."""
        self._scheduled = (sum(1 for s in seqs if s.num_new_tokens == 1),
                           sum(s.num_scheduled for s in seqs if s.num_new_tokens > 1))
        by_link: dict[Link, list[str]] = {}
        for seq in seqs:
            if seq.request_id not in self.begun and (link := self.owner.get(seq.request_id)) is not None:
                by_link.setdefault(link, []).append(seq.request_id)
                self.begun.add(seq.request_id)
        for link, request_ids in by_link.items():
            self._send(link, messages.Started(request_ids))
        if self.poison_tokens and any(t in self.poison_tokens for seq in seqs for t in seq.prompt_ids):
            for outbox in self.frontends.values():
                outbox.flush()  # what a real crash may lose, the simulated one delivers: the test is exact
            log.error("chaos: a poison request is in this step; exiting as a worker that hit a bug would")
            os._exit(5)

    # ---- outputs ----------------------------------------------------------------------------

    def _send(self, link: Link, message: messages.Message) -> None:
        self._send_frame(link, FrameHeader(FrameKind.CONTROL), messages.encode(message))

    def _send_frame(self, link: Link, header: FrameHeader, body: bytes) -> None:
        outbox = self.frontends.get(link)
        if outbox is None:
            return
        try:
            outbox.send(header, body=body)
        except (LinkClosed, FrameTooLarge) as e:
            self._drop_frontend(link, str(e))
            return
        if len(outbox) > MAX_QUEUED_MESSAGES:
            self._drop_frontend(link, f"{len(outbox)} messages wait for it: it stopped reading")

    def publish(self, events: list[TokenEvent]) -> None:
        """Each frontend gets one TOKENS frame with its requests' events of the step (token_frames.py)."""
        by_link: dict[Link, list[TokenEvent]] = {}
        now = time.monotonic()
        for e in events:
            kept = self.kept.get(e.request_id)
            if kept is not None:
                kept.events.append(e)
                if e.finish_reason is not None:
                    kept.finished_at = now
            link = self.owner.get(e.request_id)
            if link is None:
                continue
            by_link.setdefault(link, []).append(e)
            if e.finish_reason is not None:
                del self.owner[e.request_id]
                self.begun.discard(e.request_id)
        for link, batch in by_link.items():
            self._send_frame(link, FrameHeader(FrameKind.TOKENS, step=self.engine.step_count), encode_tokens(batch))

    # ---- loop -------------------------------------------------------------------------------

    def run_once(self) -> None:
        began = time.perf_counter()
        self.apply_commands()
        if self.kept:
            self.expire_kept()
        if self.draining.is_set():
            self.stopping.set()  # serve_forever hands the requests over next
            return
        if not self.engine.has_unfinished():
            links, fds = self.poller.wait(0.001 if self._backlogged() else 0.5)
            self.forwarder.drain()
            self.on_other(links, fds)
            return
        start = time.perf_counter()
        waited = self.forwarder.wait_s
        try:
            events = self.engine.step()
        except StepCancelled:
            return  # stopping: nothing of this step is published
        stepped = time.perf_counter()
        self.publish(events)
        published, published_at = time.perf_counter(), time.time()
        if self.checkpointer is not None:
            self.checkpointer.after_step()
        done = time.perf_counter()
        self.step_s += stepped - start
        self.phase_s["commands"] += start - began
        self.phase_s["publish"] += published - stepped
        self.phase_s["checkpoint"] += done - published
        decodes, prompt_tokens = self._scheduled
        self.prefill_steps += bool(prompt_tokens)
        # One line a step at debug level (`end`: when its tokens went out): benchmarks/bench_serving.py
        # --attribute lines client gaps up with it.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("step %d end=%.6f commands_ms=%.2f step_ms=%.2f expert_wait_ms=%.2f publish_ms=%.2f "
                      "checkpoint_ms=%.2f decodes=%d prompt_tokens=%d events=%d", self.engine.step_count, published_at,
                      1e3 * (start - began),
                      1e3 * (stepped - start), 1e3 * (self.forwarder.wait_s - waited), 1e3 * (published - stepped),
                      1e3 * (done - published), decodes, prompt_tokens, len(events))
        failures = self.engine.pop_failures()
        if failures and self.crash_on_lost_expert:
            log.error("an expert is lost and resilience is off: exiting (%s)", failures[0][1])
            os._exit(4)
        for request_id, message in failures:
            self.begun.discard(request_id)
            link = self.owner.pop(request_id, None)
            if link is not None:
                self._send(link, messages.Failed(request_id, message, "expert_unavailable"))

    def _backlogged(self) -> bool:
        return any(len(outbox) or outbox.link.backlogged for outbox in self.frontends.values())

    def serve_forever(self) -> None:
        while not self.stopping.is_set():
            self.run_once()

    def hand_over(self, bound_s: float) -> None:
        """Drain: no more steps; once the KV checkpoints of every request are written and committed
        (at most `bound_s`), tell each frontend to move its requests elsewhere, and flush."""
        deadline = time.monotonic() + bound_s
        if self.checkpointer is not None:
            self.checkpointer.after_step(final=True)
            while not self.checkpointer.settled() and time.monotonic() < deadline:
                time.sleep(0.005)
            self.checkpointer.stop()  # nothing more is written, and no record is released
        by_link: dict[Link, list[str]] = {}
        for request_id, link in self.owner.items():
            by_link.setdefault(link, []).append(request_id)
        for link, request_ids in by_link.items():
            self._send(link, messages.Handover(request_ids))
        self.handed_over = sum(len(ids) for ids in by_link.values())
        self.owner.clear()
        while self._backlogged() and time.monotonic() < deadline:
            for outbox in list(self.frontends.values()):
                try:
                    outbox.flush()
                except (LinkClosed, FrameTooLarge) as e:
                    self._drop_frontend(outbox.link, str(e))
            time.sleep(0.001)
        log.info("drained: handed %d requests over to other attention workers", self.handed_over)

    def stats(self) -> dict[str, float]:
        scheduler = self.engine.scheduler
        extra = self.checkpointer.stats() if self.checkpointer is not None else {}
        extra["recomputed_tokens"] = float(self.recomputed_tokens)
        extra["requests_recomputed"] = float(self.requests_recomputed)
        extra["requests_started"] = float(self.requests_started)
        extra["requests_kept"] = float(len(self.kept))
        extra["requests_attached"] = float(self.requests_attached)
        allocator = self.engine.allocator
        extra["kv_cache_usage_perc"] = 1.0 - allocator.num_free / allocator.num_blocks
        # prefix cache (engine/kv_cache.py): tokens looked up at admission, found cached, cached blocks reused
        # for other tokens; counters of this incarnation
        extra["prefix_query_tokens"] = float(scheduler.prefix_query_tokens)
        extra["prefix_hit_tokens"] = float(scheduler.prefix_hit_tokens)
        extra["prefix_evictions"] = float(allocator.num_evictions)
        # of those, read from the KV store (blocks another worker, or this one, checkpointed): requests, positions,
        # and lookups there that found nothing usable
        extra["prefix_store_restores"] = float(self.prefix_store_restores)
        extra["prefix_store_hit_tokens"] = float(self.prefix_store_hit_tokens)
        extra["prefix_store_misses"] = float(self.prefix_store_misses)
        extra["ert_epoch"] = float(self.forwarder.ert.epoch) if self.forwarder.ert is not None else 0.0
        return extra | {"running": float(len(scheduler.running)), "waiting": float(len(scheduler.waiting)),
                        "threads": float(ops.compute_threads()), "tokens": float(scheduler.tokens_in_flight),
                        "seats": float(self.engine.config.max_num_seqs),
                        "restoring": float(len(self.restoring)), "steps": float(self.engine.step_count),
                        "step_s": self.step_s, "prefill_steps": float(self.prefill_steps),
                        **{f"{phase}_s": value for phase, value in self.phase_s.items()},
                        "uptime_s": time.monotonic() - self.started, **self.forwarder.stats()}

    def close(self) -> None:
        for link in list(self.frontends):
            self._drop_frontend(link, "attention worker stopping")
        self.forwarder.close()
        self.listener.close()


def start_checkpointer(config: WorkerConfig, engine: LLMEngine, incarnation: int,
                       wake: Callable[[], None]) -> KVCheckpointer | None:
    """A checkpointer for this worker's region of the KV store (it maps the store once one is ready,
    see AttentionServer.apply_view); None when checkpointing is off (recompute on failover)."""
    dep = config.deployment
    if not (dep.resilience and dep.kv_checkpoint and dep.redis_url):
        return None
    try:
        layout = layout_for(config)
        layout.check_region(config.index)
    except (ConfigError, ValueError) as e:  # ValueError: an index past the store's regions
        log.warning("KV checkpointing off: %s", e)
        return None
    # Every Redis call runs on the checkpointer's thread, never on the step: it can afford to wait.
    client = redis.Redis.from_url(dep.redis_url, socket_timeout=2.0, socket_connect_timeout=1.0)
    checkpointer = KVCheckpointer(engine, layout, config.index, client, config.cluster_id, config.name, incarnation, wake)
    checkpointer.publish_prefixes = dep.prefix_store and dep.engine.enable_prefix_caching
    return checkpointer


def wait_for_expert_workers(client: ControllerClient, view: ClusterView, count: int, timeout_s: float) -> ClusterView:
    """The cluster view once `count` expert workers serve (at most `timeout_s`): without resilience a
    step that finds an expert with no live copy ends the worker, so it must not serve before they do."""
    deadline = time.monotonic() + timeout_s
    while sum(p.serving for p in view.of_role("expert")) < count and time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            view = ClusterView.from_proto(client.get_state(timeout_s=1.0))
        except Exception as e:  # noqa: BLE001 (a slow or restarting controller: ask again)
            log.debug("waiting for expert workers: %s", e)
    return view


def main(config: WorkerConfig) -> int:
    """Run an attention worker until SIGTERM, or until the controller fences this incarnation."""
    dep = config.deployment
    configure_process(config)
    client = ControllerClient(config.controller_address)
    reply = client.register(worker_info(config.name, pb.ATTENTION, config.index, host=dep.host, node=config.node),
                            timeout_s=dep.startup_timeout_s)
    identity = PeerInfo(config.name, worker_number("attention", config.index), reply.incarnation, os.getpid(), dep.host)
    poller = Poller()
    wakeup = Wakeup(poller)
    listener = listen(f"tcp:{dep.host}:0", identity, poller)
    poller.add_fd(listener.fileno())
    reports: "queue.Queue[tuple[str, int, str]]" = queue.Queue()
    # Without resilience (the restart-everything baseline) nothing waits for a lost expert: the restart re-runs it.
    forwarder = Forwarder(identity, poller, dep.ring_bytes, probe_interval_s=dep.probe_interval_s,
                          probe_misses=dep.probe_misses, deadlines=DeadlineModel(floor_s=dep.part_deadline_s),
                          on_suspect=lambda name, incarnation, reason: reports.put((name, incarnation, reason)),
                          expert_wait_s=dep.expert_wait_s if dep.resilience else 0.0)
    server: AttentionServer | None = None
    checkpoint = Checkpoint(dep.model)  # its bytes_read is the progress heartbeats report while loading

    def stats() -> dict[str, float]:
        return server.stats() if server is not None else {"loading": 1.0, "loaded_bytes": float(checkpoint.bytes_read)}

    fencing = threading.Lock()

    def on_fenced() -> None:  # from the heartbeat and the watch thread: the first call does it all
        if not fencing.acquire(blocking=False):
            return
        log.warning("%s incarnation %d was fenced by the controller; stopping", config.name, reply.incarnation)
        if server is None:
            os._exit(3)  # still loading: nothing to wind down
        server.fenced = True
        if server.checkpointer is not None:  # first: once the main loop sees `stopping` the process may exit
            server.checkpointer.stop(fenced=True)
        server.stopping.set()
        forwarder.cancel()  # a step waiting on expert workers that now ignore us must not wait forever
        wakeup.ring()

    # Heartbeats start before the weights load, so a slow load is never taken for a death.
    client.start_heartbeats(config.name, reply.incarnation, dep.heartbeat_interval_s, stats, on_fenced)
    engine = load_yielding_cpu(reply.state, lambda: LLMEngine(
        dep.model, dataclasses.replace(dep.engine, micro_batches=dep.micro_batches, torch_threads=config.threads),
        experts=RemoteExperts(forwarder), checkpoint=checkpoint))
    server = AttentionServer(engine, forwarder, poller, listener, wakeup)
    server.node = config.node or server.node
    server.crash_on_lost_expert = not dep.resilience
    server.checkpointer = start_checkpointer(config, engine, reply.incarnation, wakeup.ring)
    server.index, server.kv_replicas = config.index, dep.kv_replicas
    view = ClusterView.from_proto(reply.state)
    if not dep.resilience:  # the baseline restarts every worker at once: its experts may still be loading
        view = wait_for_expert_workers(client, view, dep.expert_workers, dep.startup_timeout_s)
    server.apply_view(view)
    forwarder.settle_links(5.0)  # linked to the expert workers before the first request

    def on_state(state: pb.ClusterState) -> None:
        view = ClusterView.from_proto(state)
        if view.routing is not None and (forwarder.ert is None or view.routing_epoch > forwarder.ert.epoch):
            view.routing.prepare()  # a new table's tensors are built here, on the watch thread, not on the step
        server.cluster_updates.append(view)
        if view.is_fenced(config.name, reply.incarnation):
            on_fenced()
        wakeup.ring()

    def on_sigterm(*_) -> None:  # a planned removal: drain (the main loop hands the requests over)
        server.draining.set()
        threading.Thread(target=client.drain, args=(config.name, reply.incarnation), name="drain",
                         daemon=True).start()
        wakeup.ring()

    def report_suspects() -> None:  # off the datapath: a slow controller never stalls a step
        while True:
            name, incarnation, reason = reports.get()
            client.report_failure(config.name, name, incarnation, reason)

    threading.Thread(target=report_suspects, name="suspect-reports", daemon=True).start()
    client.start_watch(config.name, on_state)
    signal.signal(signal.SIGTERM, on_sigterm)
    client.ready(config.name, reply.incarnation, data_address=listener.address)
    log.info("%s ready (%s kernels), serving frontends on %s", config.name, engine.kernels.name, listener.address)
    try:
        server.serve_forever()
        if server.draining.is_set() and not server.fenced:
            server.hand_over(dep.drain_timeout_s)
    finally:
        if not server.fenced:  # before the links close: a frontend that sees them close finds it gone, not dead
            client.deregister(config.name, reply.incarnation)
        server.close()
        client.close()
    return 3 if server.fenced else 0

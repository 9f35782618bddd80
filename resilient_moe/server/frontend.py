"""The frontend role's core: routes requests to attention workers and keeps each request's token log.

Tokens are numbered by position in the request's output. The log accepts exactly the next position;
an earlier one (a duplicate after a failover) is dropped, so a caller sees every token exactly once.
When an attention worker is lost, its requests move to the others (see `Frontend._lost`); a draining
one hands its requests over (`handover`) and they move the same way, restored from their KV
checkpoints. Where a request goes is the controller's policy (`choose_attention_worker`) over the
loads the attention workers report, counted in tokens in flight (prompt + generated, not requests),
and the frontend's own count of the tokens it sent.
The frontend's link I/O runs on one thread; callers submit from any thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from resilient_moe import messages
from resilient_moe.engine.config import SamplingParams
from resilient_moe.controller.client import ControllerClient
from resilient_moe.controller.placement import AttentionLoad, choose_attention_worker
from resilient_moe.server.prefix_affinity import RecentPrefixes
from resilient_moe.controller.view import ClusterView
from resilient_moe.datapath.frames import FrameHeader, FrameKind, worker_number
from resilient_moe.datapath.dial import connect
from resilient_moe.datapath.link import FrameTooLarge, Link, LinkClosed, Outbox, PeerInfo
from resilient_moe.datapath.poller import Poller, Wakeup
from resilient_moe.datapath.token_frames import TokenEventRecord, TokenFrameError, decode_tokens
from resilient_moe.procs import GONE, STOPPED, process_state
from resilient_moe.server.idempotency import entry as delivered_entry
from resilient_moe.proto import controller_pb2 as pb

log = logging.getLogger("resilient_moe.frontend")

LOAD_REFRESH_S = 1.0  # a fresh cluster view at least this often: the attention workers' loads place requests


class RequestFailed(RuntimeError):
    """A request could not complete; `kind` is "invalid_request", "expert_unavailable" or "error"."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class Overloaded(RequestFailed):
    """The frontend already holds as many unfinished requests as it lets run (`Frontend.capacity`);
    retry later (HTTP 429)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "overloaded")


@dataclass
class TokenRecord:
    token_id: int
    logprob: float | None
    arrived: float  # time.monotonic() when the frontend received it
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely tokens (params.logprobs of them)


@dataclass
class RequestHandle:
    """A request's token log and its event stream."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    tokens: list[TokenRecord] = field(default_factory=list)
    finish_reason: str | None = None
    error: RequestFailed | None = None
    worker: str = ""
    duplicates: int = 0
    moves: int = 0  # times it was moved to another attention worker after a failure
    lost_on: list[str] = field(default_factory=list)  # attention workers that failed in its first step there
    started_on: str = ""  # the attention worker that ran (or is running) its first step since it was sent
    tokens_at_start: int = 0  # tokens it had then
    submitted_at: float = field(default_factory=time.monotonic)
    keep_s: float = 0.0  # > 0: a keyed request (Idempotency-Key) that outlives its frontend this long
    key: tuple[str, str] | None = None  # (scope, key) of its request record (server/idempotency.py)
    attaching: bool = False  # resumed here: waiting for its attention worker's `attached`
    orphan_until: float | None = None  # its client left: aborted at this time (monotonic) unless resumed
    # Called (on the frontend's I/O thread) after each event is queued: lets an asyncio caller wake up
    # instead of blocking a thread per request. Must be quick and must not raise.
    on_event: Callable[[], None] | None = None
    _events: "queue.Queue[tuple[str, object]]" = field(default_factory=queue.Queue)
    _done: threading.Event = field(default_factory=threading.Event)
    _on_consumed: Callable[[], None] | None = None  # the frontend forgets the handle once its end was read
    _lock: threading.Lock = field(default_factory=threading.Lock)  # orders `_push` against `resubscribe`

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> "RequestHandle":
        """Block until finished; raises RequestFailed (or TimeoutError)."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout_s}s")
        self._consumed()
        if self.error is not None:
            raise self.error
        return self

    def events(self, timeout_s: float | None = None):
        """Yield ("token", TokenRecord) in position order, then ("finish", reason) or ("error", exc)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                kind, value = self._events.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id}: no event within {timeout_s}s") from None
            if kind in ("finish", "error"):
                self._consumed()
                yield kind, value
                return
            yield kind, value

    def poll_events(self) -> list[tuple[str, object]]:
        """The events queued so far, without blocking (pair with `on_event` for asyncio callers)."""
        out = []
        while True:
            try:
                kind, value = self._events.get_nowait()
            except queue.Empty:
                return out
            out.append((kind, value))
            if kind in ("finish", "error"):
                self._consumed()
                return out

    def _consumed(self) -> None:
        if self._on_consumed is not None:
            self._on_consumed()
            self._on_consumed = None

    def _push(self, kind: str, value: object) -> None:
        with self._lock:
            self._events.put((kind, value))
            on_event = self.on_event
        if on_event is not None:
            on_event()

    def resubscribe(self, on_event: Callable[[], None] | None = None) -> "RequestHandle":
        """Read this request again from its first token (a client resumed it here): its events start
        over with every token delivered so far (and its end, if it came), then continue live."""
        with self._lock:
            events: "queue.Queue[tuple[str, object]]" = queue.Queue()
            for record in self.tokens:
                events.put(("token", record))
            if self.done:
                events.put(("error", self.error) if self.error is not None else ("finish", self.finish_reason))
            self._events, self.on_event = events, on_event
            self.orphan_until = None
        return self

    # called on the frontend's I/O thread
    def _accept(self, position: int, token_id: int, logprob: float | None, finish: str | None,
                top_logprobs: list[tuple[int, float]] | None = None) -> bool:
        """Take the token at `position`; True when it was the next one (not a duplicate)."""
        if self.done:
            return False
        if position < len(self.tokens):
            self.duplicates += 1  # already delivered (e.g. re-sent after a failover)
            return False
        if position > len(self.tokens):
            log.error("request %s: token position %d arrived, expected %d", self.request_id, position, len(self.tokens))
            return False
        record = TokenRecord(token_id, logprob, time.monotonic(), top_logprobs)
        self.tokens.append(record)
        self._push("token", record)
        if finish is not None:
            self.finish_reason = finish
            self._push("finish", finish)
            self._done.set()
        return True

    def _fail(self, error: RequestFailed) -> None:
        if not self.done:
            self.error = error
            self._push("error", error)
            self._done.set()


@dataclass
class _AttentionLink:
    """This frontend's link to one attention worker, and what it has heard from it."""

    incarnation: int
    outbox: Outbox
    last_heard: float = field(default_factory=time.monotonic)
    probes_sent: int = 0  # unanswered probes since it was last heard from
    reported: bool = False  # its silence was reported to the controller

    @property
    def link(self) -> Link:
        return self.outbox.link


class Frontend:
    """Submits requests to attention workers of one cluster and streams their tokens back.

    Callers submit and abort from any thread; the link I/O runs on one thread of its own, which never
    blocks on a peer (a message that finds no room waits in that link's outbox) and hands every
    message it takes to its link or fails its request with the reason. `requests` is shared between
    the two sides under a lock; everything else belongs to the I/O thread.
    """

    _ids = itertools.count()

    def __init__(self, controller_address: str, name: str | None = None, max_unfinished: int | None = 1024,
                 park_timeout_s: float = 120.0, max_losses: int = 2, probe_interval_s: float = 0.010,
                 probe_misses: int = 3, per_attention_worker: int | None = None, delivery=None) -> None:
        """`max_unfinished` bounds the requests in flight through this frontend (memory and AW queues);
        with `per_attention_worker`, so does that many for each attention worker that takes requests
        now, following scaling up and down (`capacity`); `submit` beyond the bound raises Overloaded
        rather than queueing without limit. A request whose
        attention worker fails `max_losses` times in its first step there is failed rather than moved again:
        it may be what makes them fail (a poison request), and must not take the next one down (see
        `_lost` for how a failure is pinned on a request). An attention worker that owes tokens and
        has been silent is probed every `probe_interval_s` (see `_probe`). `delivery`: the DeliveryLog
        (server/idempotency.py) that keyed requests' tokens are written to, off this thread."""
        self.name = name or f"frontend-{os.getpid()}-{next(self._ids)}"
        self.identity = PeerInfo(self.name, worker_number("frontend", 0), secrets.randbits(32), os.getpid())
        self.client = ControllerClient(controller_address)
        self.delivery = delivery
        self.poller = Poller()
        self.wakeup = Wakeup(self.poller)
        self.links: dict[str, _AttentionLink] = {}  # aw name -> the link to its current incarnation
        self.prefixes = RecentPrefixes()  # prompt prefixes sent to each attention worker lately (placement)
        self.requests: dict[str, RequestHandle] = {}  # unfinished, plus finished ones not yet read to the end
        self._lock = threading.Lock()  # guards `requests`
        self.max_unfinished = max_unfinished
        self.per_attention_worker = per_attention_worker
        self._capacity_listeners: list[Callable[[], None]] = []
        self._last_capacity = 0
        self.max_losses = max_losses
        self.probe_interval_s = probe_interval_s
        self.probe_misses = probe_misses
        self.probes = 0
        self.token_frames_rejected = 0  # malformed TOKENS frames dropped (token_frames.py)
        self._released: "queue.SimpleQueue[str]" = queue.SimpleQueue()
        self._outbox: "queue.Queue[tuple[RequestHandle, messages.Message]]" = queue.Queue()
        self._parked: list[tuple[RequestHandle, messages.Submit, float]] = []  # moved, waiting for a worker
        self.park_timeout_s = park_timeout_s
        self.resilience = True  # from the cluster state (off: the restart-everything baseline, no poison rule)
        self.view: ClusterView | None = None  # the controller's latest snapshot
        self._states: "queue.Queue[pb.ClusterState]" = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-io", daemon=True)
        self._ready = threading.Event()

    def start(self, timeout_s: float = 30.0) -> "Frontend":
        self._states.put(self.client.get_state(timeout_s=timeout_s))
        self.client.start_watch(self.name, self._on_state, refresh_s=LOAD_REFRESH_S)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise ConnectionError("no attention worker is reachable")
        return self

    def _on_state(self, state: pb.ClusterState) -> None:
        self._states.put(state)
        self.wakeup.ring()

    # ---- API (any thread) ---------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        on_event: Callable[[], None] | None = None,
        seed: int | None = None,
        keep_s: float = 0.0,
        key: tuple[str, str] | None = None,
    ) -> RequestHandle:
        """Send a request to an attention worker; raises Overloaded past `max_unfinished`. `seed`: its
        random stream's (default: the params', else a new one); `keep_s` and `key`: a keyed request
        (Idempotency-Key), whose tokens go to the delivery log and which outlives this frontend."""
        request_id = request_id or f"req-{secrets.token_hex(6)}"
        if seed is None:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
        handle = RequestHandle(request_id, list(prompt_ids), params, seed, on_event=on_event, keep_s=keep_s, key=key)
        handle._on_consumed = lambda: self._released.put(request_id)
        limit = self.capacity()
        with self._lock:
            if sum(1 for h in self.requests.values() if not h.done) >= limit:
                raise Overloaded(f"{limit} requests are already in flight (what the attention workers serving now "
                                 "take); retry later")
            self.requests[request_id] = handle
        self._outbox.put((handle, messages.Submit(request_id, list(prompt_ids), params.to_dict(), seed,
                                                  keep_s=keep_s)))
        self.wakeup.ring()
        return handle

    def attach(self, request_id: str, prompt_ids: list[int], params: SamplingParams, seed: int, worker: str,
               delivered: list[tuple[int, float | None, list | None]], keep_s: float, key: tuple[str, str],
               finish_reason: str | None = None, on_event: Callable[[], None] | None = None) -> RequestHandle:
        """A keyed request a client resumes here (server/idempotency.py): the handle this frontend still
        has of it, read again from its first token; else one that starts from its delivered log and is
        attached to the attention worker that runs it (`worker`), or, when that one no longer has it,
        resubmitted from the log (decoding is deterministic: what the log lacks comes again identical).
        `finish_reason`: it finished (the log is complete), so nothing is sent anywhere."""
        with self._lock:
            existing = self.requests.get(request_id)
        if existing is not None:
            return existing.resubscribe(on_event)
        handle = RequestHandle(request_id, list(prompt_ids), params, seed, on_event=on_event, keep_s=keep_s, key=key,
                               worker=worker)
        handle._on_consumed = lambda: self._released.put(request_id)
        now = time.monotonic()
        handle.tokens = [TokenRecord(token, logprob, now, top) for token, logprob, top in delivered]
        for record in handle.tokens:
            handle._events.put(("token", record))
        if finish_reason is not None:
            handle.finish_reason = finish_reason
            handle._events.put(("finish", finish_reason))
            handle._done.set()
            return handle
        with self._lock:
            self.requests[request_id] = handle
        handle.attaching = True
        self._outbox.put((handle, messages.Attach(request_id, len(handle.tokens))))
        self.wakeup.ring()
        return handle

    def orphan(self, request_id: str, grace_s: float) -> None:
        """A keyed request's client left: keep it `grace_s` for the client to resume, then abort it."""
        with self._lock:
            handle = self.requests.get(request_id)
        if handle is not None and not handle.done:
            handle.orphan_until = time.monotonic() + grace_s
            self.wakeup.ring()

    def abort(self, request_id: str) -> None:
        with self._lock:
            handle = self.requests.get(request_id)
        if handle is not None and not handle.done:
            self._outbox.put((handle, messages.Abort(request_id)))
            handle._fail(RequestFailed("aborted", "aborted"))
            self.wakeup.ring()

    def release(self, request_id: str) -> None:
        """Forget a request (aborting it first if unfinished), e.g. after its client went away."""
        self.abort(request_id)
        self._released.put(request_id)
        self.wakeup.ring()

    def capacity(self) -> int:
        """The requests this frontend lets run at once, the one place it is computed (the API's
        admission follows it too): `per_attention_worker` for each attention worker that takes
        requests in the latest cluster view (at least one worker's worth, so that a moment with none
        fails new requests with "no attention worker is available" instead of queueing them), within
        `max_unfinished`. Any thread."""
        limit = self.max_unfinished if self.max_unfinished is not None else 1 << 62
        if self.per_attention_worker is None:
            return limit
        view = self.view
        live = sum(w.takes_requests for w in view.of_role("attention")) if view is not None else 0
        return min(limit, max(1, live) * self.per_attention_worker)

    def on_capacity(self, listener: Callable[[], None]) -> None:
        """Call `listener` (on the I/O thread; quick, must not raise) whenever `capacity` changes."""
        self._capacity_listeners.append(listener)

    def unfinished(self) -> int:
        """Requests submitted and not yet finished, failed or aborted."""
        return sum(1 for h in self._handles() if not h.done)

    def _handles(self) -> list[RequestHandle]:
        with self._lock:
            return list(self.requests.values())

    @property
    def alive(self) -> bool:
        """True while the I/O thread runs (it stops only on close)."""
        return self._thread.is_alive()

    def stats(self) -> dict[str, float]:
        """For /admin/cluster: requests in flight, attention workers linked."""
        return {"unfinished": float(self.unfinished()), "attention_links": float(len(self.links)),
                "capacity": float(self.capacity()), "token_frames_rejected": float(self.token_frames_rejected)}

    def generate(self, prompts: list[list[int]], params: SamplingParams, timeout_s: float = 300.0) -> list[RequestHandle]:
        handles = [self.submit(p, params) for p in prompts]
        for h in handles:
            h.wait(timeout_s)
        return handles

    def close(self) -> None:
        self._stop.set()
        self.wakeup.ring()
        if self._thread.is_alive():
            self._thread.join(5)
        for entry in self.links.values():
            entry.link.close()
        self.client.close()

    # ---- I/O thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._forget_released()
                self._abort_orphans()
                self._apply_states()
                self._flush_outbox()
                self._flush_links()
                owing = self._probe()
                backlog = any(len(e.outbox) or e.link.backlogged for e in self.links.values())
                self.poller.wait(0.001 if backlog else self.probe_interval_s if owing else 0.2)
                self.wakeup.drain()
                for name, entry in list(self.links.items()):
                    self._drain(name, entry)
            except Exception:  # one bad pass must never stop the loop
                log.exception("frontend loop error")

    def _apply_states(self) -> None:
        while not self._states.empty():
            view = self.view = ClusterView.from_proto(self._states.get_nowait())
            for w in view.of_role("attention"):
                current = self.links.get(w.name)
                if w.takes_requests and (current is None or current.incarnation != w.incarnation):
                    if current is not None:  # the fence itself may not have been seen (states coalesce)
                        self._lost(w.name, f"replaced by incarnation {w.incarnation}", report=False)
                    try:
                        link = connect(w.data_address, self.identity, self.poller, to=w.name)
                        self.links[w.name] = _AttentionLink(w.incarnation, Outbox(link))
                    except (OSError, ConnectionError) as e:
                        log.warning("cannot reach %s: %s", w.name, e)
                elif current is not None and view.ended(w.name, current.incarnation):
                    self._drain(w.name, current)  # what it sent before it left (tokens, a handover) first
                    self._lost(w.name, f"{w.state.value} (controller)", report=False)
            self.resilience = view.resilience
            if self.links:
                self._ready.set()
        capacity = self.capacity()
        if capacity != self._last_capacity:
            self._last_capacity = capacity
            for listener in self._capacity_listeners:
                listener()
        self._unpark()

    def _unpark(self) -> None:
        """Send parked requests once a worker is reachable; fail those parked for too long."""
        if not self._parked:
            return
        now = time.monotonic()
        parked, self._parked = self._parked, []
        for handle, message, since in parked:
            if handle.done:
                continue
            if self._targets():
                self._outbox.put((handle, message))
            elif now - since > self.park_timeout_s:
                handle._fail(RequestFailed(
                    f"no attention worker came back within {self.park_timeout_s:.0f}s", "unavailable"))
            else:
                self._parked.append((handle, message, since))

    def _abort_orphans(self) -> None:
        """Keyed requests whose client left and did not come back within their grace are aborted."""
        now = time.monotonic()
        for handle in self._handles():
            if handle.orphan_until is not None and now > handle.orphan_until and not handle.done:
                log.info("%s: no client resumed it within its grace; aborting it", handle.request_id)
                handle.orphan_until = None
                self.release(handle.request_id)

    def _forget_released(self) -> None:
        """Drop finished handles whose final event was read."""
        while True:
            try:
                request_id = self._released.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                handle = self.requests.get(request_id)
                if handle is not None and handle.done:
                    del self.requests[request_id]

    def _targets(self) -> list[str]:
        """Linked attention workers that take new requests (not draining)."""
        return [n for n in self.links if self.view is None or not self.view.draining(n)]

    def _pick_worker(self, prompt_ids: list[int]) -> str | None:
        """The controller's placement policy (`choose_attention_worker`) over the linked attention workers
        that take requests. Each one's load is what it reports (tokens in flight, running and waiting
        requests, its seats), at least what this frontend has in flight there, which counts at once
        (a report lags by a heartbeat); with how much of `prompt_ids` each was sent lately as a prefix
        (`RecentPrefixes`), which a worker within a request or two of the least loaded wins by."""
        targets = self._targets()
        tokens, requests = dict.fromkeys(targets, 0), dict.fromkeys(targets, 0)
        for h in self._handles():
            if not h.done and h.worker in tokens:
                tokens[h.worker] += len(h.prompt_ids) + len(h.tokens)
                requests[h.worker] += 1
        loads = {}
        for name in targets:
            peer = self.view.workers.get(name) if self.view is not None else None
            load = peer.load if peer is not None else {}
            reported = load.get("running", 0.0) + load.get("waiting", 0.0) + load.get("restoring", 0.0)
            loads[name] = AttentionLoad(max(load.get("tokens", 0.0), float(tokens[name])),
                                        1.0 - load.get("kv_cache_usage_perc", 0.0),
                                        max(reported, float(requests[name])), load.get("seats", float("inf")))
        hashes = RecentPrefixes.hashes(prompt_ids)
        name = choose_attention_worker(loads, self.prefixes.shared(hashes, targets) if hashes else None)
        if name is not None:
            self.prefixes.add(name, hashes)
        return name

    def _flush_outbox(self) -> None:
        """Hand every message callers queued to its link; a message that cannot go fails its request."""
        while not self._outbox.empty():
            handle, message = self._outbox.get_nowait()
            try:
                self._route(handle, message)
            except Exception as e:  # noqa: BLE001 (whatever it is, the request hears of it)
                log.exception("cannot send %s for %s", type(message).__name__, handle.request_id)
                handle._fail(RequestFailed(f"could not be sent to an attention worker: {e}", "error"))

    def _route(self, handle: RequestHandle, message: messages.Message) -> None:
        submit = isinstance(message, messages.Submit)
        if submit and handle.done:
            return  # aborted while it waited
        if isinstance(message, messages.Attach) and handle.worker not in self.links:
            self._move(handle)  # its attention worker is gone: resubmit it from what was delivered
            return
        if submit:
            handle.worker = self._pick_worker(handle.prompt_ids) or ""
            if handle.key is not None and self.delivery is not None and handle.worker:
                self.delivery.update(*handle.key, worker=handle.worker, frontend=self.name)
        name = handle.worker
        if name not in self.links:
            if submit and message.resume:
                self._parked.append((handle, message, time.monotonic()))  # until a worker is back
            elif submit:
                handle._fail(RequestFailed("no attention worker is available", "unavailable"))
            return
        try:
            self.links[name].outbox.send(FrameHeader(FrameKind.CONTROL), body=messages.encode(message))
        except LinkClosed:
            self._lost(name, "link closed on send")  # moves a submitted request on; an abort is moot
        except FrameTooLarge as e:
            handle._fail(RequestFailed(f"request is too large for the link to {name}: {e}", "invalid_request"))

    def _flush_links(self) -> None:
        for name, entry in list(self.links.items()):
            try:
                entry.outbox.flush()
            except LinkClosed as e:
                self._lost(name, f"link closed on send: {e}")

    def _probe(self) -> bool:
        """Probe attention workers that owe tokens and have gone quiet (as attention workers probe
        expert workers); returns whether any owes tokens. After `probe_misses` unanswered probes the
        worker's process is looked at (the second path, procs.py): one that is stopped or gone is
        reported to the controller, which confirms it the same way and fences it at once; one that is
        runnable is busy (a long step, a starved machine) and one asleep is left to the heartbeats."""
        owing = {h.worker for h in self._handles() if not h.done and h.worker}
        now = time.monotonic()
        for name, entry in list(self.links.items()):
            if name not in owing:
                entry.probes_sent = 0
                continue
            quiet = now - entry.last_heard
            if quiet < self.probe_interval_s * (min(entry.probes_sent, self.probe_misses) + 1):
                continue
            if entry.probes_sent < self.probe_misses:
                try:
                    if entry.link.try_send(FrameHeader(FrameKind.PROBE)):
                        entry.probes_sent += 1
                        self.probes += 1
                except LinkClosed as e:
                    self._lost(name, f"link closed on probe: {e}")
                continue
            state = process_state(entry.link.peer.pid, entry.link.peer.host)
            if state in (STOPPED, GONE) and not entry.reported:
                entry.reported = True
                log.warning("%s: %d probes unanswered for %.0f ms, process %s", name, entry.probes_sent,
                            1000 * quiet, state)
                self.client.report_failure(self.name, name, entry.incarnation, f"{entry.probes_sent} probes "
                                           f"unanswered for {1000 * quiet:.0f} ms (process {state})", wait=False)
        return bool(owing)

    def _drain(self, name: str, entry: _AttentionLink) -> None:
        link = entry.link
        try:
            got = False
            while (frame := link.recv()) is not None:
                got = True
                entry.last_heard, entry.probes_sent = time.monotonic(), 0
                if frame.header.kind == FrameKind.TOKENS:
                    try:
                        events = decode_tokens(frame.body)
                    except TokenFrameError as e:
                        self.token_frames_rejected += 1
                        log.error("bad TOKENS frame from %s: %s", name, e)
                        continue
                    self._on_tokens(events)
                elif frame.header.kind == FrameKind.CONTROL:
                    try:
                        self._on_message(name, messages.decode(frame.body))
                    except messages.MessageError as e:
                        log.error("bad message from %s: %s", name, e)
            if got:
                link.release()
        except LinkClosed as e:
            self._lost(name, str(e))

    def _on_tokens(self, events: list[TokenEventRecord]) -> None:
        with self._lock:
            handles = [self.requests.get(e.request_id) for e in events]
        for e, handle in zip(events, handles):
            if handle is None:
                continue
            if handle._accept(e.position, e.token_id, e.logprob, e.finish_reason, e.top_logprobs) \
                    and handle.key is not None and self.delivery is not None:
                self.delivery.put(handle.request_id, e.position, delivered_entry(e.token_id, e.logprob, e.top_logprobs),
                                  e.finish_reason is not None)

    def _on_message(self, worker: str, message: messages.Message) -> None:
        with self._lock:
            requests = dict(self.requests)
        if isinstance(message, messages.Started):
            for request_id in message.request_ids:
                handle = requests.get(request_id)
                if handle is not None and handle.worker == worker:
                    handle.started_on, handle.tokens_at_start = worker, len(handle.tokens)
        elif isinstance(message, messages.Attached) and (handle := requests.get(message.request_id)) is not None:
            handle.attaching = False
            if message.first > len(handle.tokens):  # it cannot replay positions the log lacks: start it again
                log.info("%s: %s replays from position %d, the delivered log ends at %d; resubmitting it",
                         message.request_id, worker, message.first, len(handle.tokens))
                self._route(handle, messages.Abort(message.request_id))
                self._move(handle)
        elif isinstance(message, messages.Failed) and (handle := requests.get(message.request_id)) is not None:
            if message.kind == "not_here" and handle.attaching:
                handle.attaching = False
                self._move(handle)  # the worker lost it (it died, or the grace ran out): from the log
            else:
                handle._fail(RequestFailed(message.message, message.kind))
        elif isinstance(message, messages.Handover):
            moved = [requests[r] for r in message.request_ids if r in requests and requests[r].worker == worker]
            for handle in moved:
                if not handle.done:
                    handle.started_on = ""
                    self._move(handle)
            log.info("%s is draining: moved %d requests to other attention workers", worker, len(moved))

    def _move(self, handle: RequestHandle) -> None:
        """Send a request to another attention worker, resuming from its token log (the fair baseline
        does too: one re-prefill); its KV is restored there from the checkpoint store if it has one."""
        handle.worker = ""
        handle.moves += 1
        self._outbox.put((handle, messages.Submit(
            handle.request_id, handle.prompt_ids, handle.params.to_dict(), handle.seed,
            output_ids=handle.token_ids, resume=True, suspect=bool(handle.lost_on), keep_s=handle.keep_s,
        )))
        self.wakeup.ring()

    def _lost(self, name: str, reason: str, report: bool = True) -> None:
        """An attention worker is gone: move its unfinished requests to the others.

        With resilience, a request resumes from its token log (the tokens it already delivered); the
        adopting worker restores the KV cache it can from the checkpoint store and recomputes the
        rest. In the restart-everything baseline it resumes from its token log too (the fair baseline:
        its prompt and delivered tokens are computed again in one prefill), with no KV to restore.
        Requests wait (parked) while no worker is reachable.
        A request is a suspect of the failure when the worker died in its first step there (the
        worker announces the requests each step starts, before running it: `Started`): it is sent on
        marked, so the next worker admits it alone in its step. A request that has been a suspect
        `max_losses` times is failed instead (a poison request); requests that merely shared a worker
        with it are never counted, however often it dies.
        """
        entry = self.links.pop(name, None)
        if entry is None:
            return
        self.prefixes.forget(name)  # its replacement starts with an empty prefix cache
        self.poller.remove(entry.link)
        entry.link.close()
        log.warning("lost attention worker %s: %s", name, reason)
        if report:  # tell the controller at once rather than after its heartbeat timeout
            self.client.report_failure(self.name, name, entry.incarnation, reason, wait=False)
        for handle in self._handles():
            if handle.worker != name or handle.done:
                continue
            if handle.started_on == name and len(handle.tokens) == handle.tokens_at_start:
                handle.lost_on.append(name)  # it died in this request's first step there: a suspect
            handle.started_on = ""
            if self.resilience and len(handle.lost_on) >= self.max_losses:
                log.error("request %s failed: attention workers %s each died in its first step there",
                          handle.request_id, ", ".join(handle.lost_on))
                handle._fail(RequestFailed(
                    f"request {handle.request_id} was starting on {' and then on '.join(handle.lost_on)} when each of "
                    f"them died; it is not moved to another worker, in case it is what makes them fail", "poison"))
                continue
            self._move(handle)
        self.wakeup.ring()

"""Prometheus metrics of the whole cluster, served by the API process at /metrics.

Two sources feed one private registry:
- request-side series (latencies, token counts, outcomes), observed here as the API streams tokens;
- cluster-side series (worker up/state, routing epoch, shadows, loads, KV), computed at scrape time
  from the latest controller snapshot. Every worker's heartbeat carries its load map, so the
  controller's state already aggregates the cluster: users scrape one endpoint, not every process.

Names follow Prometheus conventions (`resilient_moe_` prefix, `_seconds`, `_total`) and mirror vLLM's
set where one exists (time to first token, inter-token latency, e2e latency, queue time, running and
waiting requests, KV cache usage, prompt and generation tokens).

Failover stall: when the controller reports a worker dead, every request that was streaming around
that moment is examined once it finishes; its longest token gap overlapping the window
[failure - STALL_LOOKBACK_S, failure] is observed in `failover_stall_seconds`. (A dead worker is
declared after its peers already noticed and replayed, so the stall itself precedes the event.)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from resilient_moe.proto import controller_pb2 as pb

NAMESPACE = "resilient_moe"
STALL_LOOKBACK_S = 2.0
STALL_SETTLE_S = 3.0
SAMPLE_INTERVAL_S = 1.0  # the dashboard's series: one point per second  # wait this long after a request ends for the controller's failure events

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 10.0)
STALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)

STATE_NAMES = {pb.STARTING: "starting", pb.READY: "ready", pb.SUSPECT: "suspect", pb.DEAD: "dead",
               pb.STOPPED: "stopped"}
ROLE_NAMES = {pb.ATTENTION: "attention", pb.EXPERT: "expert", pb.FRONTEND: "frontend", pb.KV_STORE: "kv_store"}


def failure_kind(detail: str) -> str:
    """How a death was detected, from the controller's event detail."""
    text = detail.lower()
    if "no heartbeat" in text:
        return "heartbeat_timeout"
    if "probe" in text:
        return "probe_timeout"
    if "link" in text:
        return "link_closed"
    return "reported"


@dataclass
class _PendingStall:
    ended: float  # unix time of the last token
    arrivals: list[float]  # unix times of the request's token deliveries


class ServingMetrics:
    """The registry behind /metrics, the hooks the API calls per request, and the dashboard's series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, ns = self.registry, NAMESPACE
        self.ttft = Histogram("time_to_first_token_seconds", "Time from request arrival to its first token.",
                              namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             namespace=ns, registry=r, buckets=ITL_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.queue_time = Histogram("request_queue_time_seconds",
                                    "Time a request waited for admission before reaching an attention worker.",
                                    namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.stall = Histogram("failover_stall_seconds",
                               "Longest token gap of a request streaming when a worker failure was detected.",
                               namespace=ns, registry=r, buckets=STALL_BUCKETS)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of admitted requests.", namespace=ns, registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated and delivered to clients.",
                                         namespace=ns, registry=r)
        self.success = Counter("request_success", "Requests finished, by finish reason.", ["finished_reason"],
                               namespace=ns, registry=r)
        self.failure = Counter("request_failure", "Requests that ended with an error, by kind.", ["kind"],
                               namespace=ns, registry=r)
        self.failures_detected = Counter("failures_detected", "Worker deaths declared by the controller.",
                                         ["role", "kind"], namespace=ns, registry=r)
        self.cluster = ClusterCollector()
        self.registry.register(self.cluster)
        self._lock = threading.Lock()
        self._seen_events: set[tuple[float, str, str, str]] = set()
        self._failure_times: deque[float] = deque(maxlen=256)
        self._pending: deque[_PendingStall] = deque(maxlen=10_000)
        # plain running totals for the dashboard's series (the histograms keep theirs privately)
        self._tokens = 0
        self._itl_sum = 0.0
        self._itl_count = 0
        self._ttft_sum = 0.0
        self._ttft_count = 0
        self._last_sample: tuple[float, int, float, int] | None = None
        self.series: deque[dict[str, float]] = deque(maxlen=600)

    # ---- request side (the API's event loop) ------------------------------------------------

    def admitted(self, queue_s: float, prompt_tokens: int) -> None:
        self.queue_time.observe(queue_s)
        self.prompt_tokens.inc(prompt_tokens)

    def token(self, ttft_s: float | None = None, gap_s: float | None = None) -> None:
        """One token delivered: the request's first (`ttft_s`) or a later one (`gap_s` since the previous)."""
        self.generation_tokens.inc()
        with self._lock:
            self._tokens += 1
            if ttft_s is not None:
                self._ttft_sum += ttft_s
                self._ttft_count += 1
            if gap_s is not None:
                self._itl_sum += gap_s
                self._itl_count += 1
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if gap_s is not None:
            self.itl.observe(gap_s)

    def finished(self, e2e_s: float, reason: str, arrivals: list[float]) -> None:
        """A request ended normally; `arrivals` are the unix times its tokens were delivered."""
        self.e2e.observe(e2e_s)
        self.success.labels(finished_reason=reason).inc()
        self._remember(arrivals)

    def failed(self, kind: str, arrivals: list[float] = ()) -> None:
        self.failure.labels(kind=kind).inc()
        self._remember(list(arrivals))

    def _remember(self, arrivals: list[float]) -> None:
        if len(arrivals) >= 2:
            with self._lock:
                self._pending.append(_PendingStall(arrivals[-1], arrivals))

    # ---- cluster side (the monitor thread) --------------------------------------------------

    def update_cluster(self, state: pb.ClusterState | None, workers: list[dict], api_waiting: int) -> None:
        """Take a new controller snapshot (None: unreachable) and the /admin/cluster worker list built
        from it (every process, controller and frontend included): count newly declared deaths, settle
        stalls, sample the dashboard's series."""
        if state is not None:
            roles = {w.name: ROLE_NAMES.get(w.role, "unknown") for w in state.workers}
            current = set()
            for e in state.events:
                key = (e.time, e.kind, e.worker, e.detail)
                current.add(key)
                if e.kind == "dead" and key not in self._seen_events:
                    self.failures_detected.labels(role=roles.get(e.worker, "unknown"), kind=failure_kind(e.detail)).inc()
                    with self._lock:
                        self._failure_times.append(e.time)
            self._seen_events = current  # the controller keeps a bounded window; so do we
        self.cluster.update(state, workers, api_waiting)
        self._settle_stalls(time.time())
        self._sample()

    def _settle_stalls(self, now: float) -> None:
        with self._lock:
            ready = []
            while self._pending and now - self._pending[0].ended >= STALL_SETTLE_S:
                ready.append(self._pending.popleft())
            failures = list(self._failure_times)
        for pending in ready:
            for failure in failures:
                if not pending.arrivals[0] - STALL_LOOKBACK_S <= failure <= pending.ended + STALL_LOOKBACK_S:
                    continue
                gaps = [b - a for a, b in zip(pending.arrivals, pending.arrivals[1:])
                        if b >= failure - STALL_LOOKBACK_S and a <= failure]
                if gaps:
                    self.stall.observe(max(gaps))

    def _sample(self) -> None:
        now = time.time()
        with self._lock:
            totals = (now, self._tokens, self._itl_sum, self._itl_count)
            ttft = (self._ttft_sum, self._ttft_count)
        last = self._last_sample
        if last is not None and now - last[0] < SAMPLE_INTERVAL_S:
            return
        self._last_sample = totals
        if last is None:
            return
        dt = now - last[0]
        itl_n = totals[3] - last[3]
        self.series.append({
            "time": now,
            "tokens_per_s": (totals[1] - last[1]) / dt,
            "itl_mean_s": (totals[2] - last[2]) / itl_n if itl_n else None,
            "running": self.cluster.running,
            "waiting": self.cluster.waiting,
            "ttft_mean_s": ttft[0] / ttft[1] if ttft[1] else None,
        })

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ClusterCollector:
    """Gauges (and failover counters) computed at scrape time from the latest controller snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state: pb.ClusterState | None = None
        self.workers: list[dict] = []
        self.api_waiting = 0
        self.running = 0.0
        self.waiting = 0.0
        self._rows: dict[tuple[str, int], tuple[float, float]] = {}  # (ew, incarnation) -> (rows, time)
        self.expert_rows_per_s: dict[str, float] = {}

    def update(self, state: pb.ClusterState | None, workers: list[dict], api_waiting: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.workers = list(workers)
            self.api_waiting = api_waiting
            if state is None:
                return
            self.state = state
            live = [w for w in state.workers if w.state in (pb.READY, pb.SUSPECT)]
            attention = [w for w in live if w.role == pb.ATTENTION]
            self.running = sum(w.load.get("running", 0.0) for w in attention)
            self.waiting = sum(w.load.get("waiting", 0.0) for w in attention) + api_waiting
            rows: dict[tuple[str, int], tuple[float, float]] = {}
            for w in live:
                if w.role != pb.EXPERT or "rows" not in w.load:
                    continue
                key = (w.name, w.incarnation)
                rows[key] = (w.load["rows"], now)
                before = self._rows.get(key)
                if before is not None and now - before[1] >= 0.2:
                    self.expert_rows_per_s[w.name] = max(0.0, (w.load["rows"] - before[0]) / (now - before[1]))
                else:
                    rows[key] = before or rows[key]  # keep the older sample until the interval is long enough
            self._rows = rows
            live_experts = {w.name for w in live if w.role == pb.EXPERT}
            self.expert_rows_per_s = {k: v for k, v in self.expert_rows_per_s.items() if k in live_experts}

    def collect(self) -> list[Metric]:
        ns = NAMESPACE
        with self._lock:
            state, workers = self.state, self.workers
            running, waiting = self.running, self.waiting
            expert_rows = dict(self.expert_rows_per_s)
        up = GaugeMetricFamily(f"{ns}_worker_up", "1 while a process of the cluster serves (ready or suspect), else 0.",
                               labels=["worker", "role"])
        states = GaugeMetricFamily(f"{ns}_worker_state", "1 for the worker's current state, 0 for the others.",
                                   labels=["worker", "role", "state"])
        age = GaugeMetricFamily(f"{ns}_worker_heartbeat_age_seconds", "Time since the worker's last heartbeat.",
                                labels=["worker", "role"])
        kv = GaugeMetricFamily(f"{ns}_kv_cache_usage_perc", "Fraction of an attention worker's KV cache in use (0-1).",
                               labels=["worker"])
        load = GaugeMetricFamily(f"{ns}_expert_load_rows_per_second", "Token rows an expert worker computes per second.",
                                 labels=["worker"])
        metrics: list[Metric] = [
            GaugeMetricFamily(f"{ns}_num_requests_running", "Requests in attention workers' running batches.",
                              value=running),
            GaugeMetricFamily(f"{ns}_num_requests_waiting",
                              "Requests queued for admission in the API or in attention workers' queues.",
                              value=waiting),
            up, states, age, kv, load,
        ]
        for w in workers:
            up.add_metric([w["id"], w["role"]], 1.0 if w["state"] in ("ready", "suspect") else 0.0)
            for name in STATE_NAMES.values():
                states.add_metric([w["id"], w["role"], name], 1.0 if w["state"] == name else 0.0)
        restored = CounterMetricFamily(f"{ns}_requests_restored", "Requests an attention worker adopted from a "
                                       "dead one by restoring their checkpointed KV.", labels=["worker"])
        recomputed = CounterMetricFamily(f"{ns}_requests_recomputed", "Requests an attention worker adopted from a "
                                         "dead one by recomputing (no usable KV checkpoint).", labels=["worker"])
        recomputed_tokens = CounterMetricFamily(f"{ns}_recomputed_tokens", "Positions of adopted requests computed "
                                                "again instead of restored.", labels=["worker"])
        epoch = shadows = unprotected = lag = 0.0
        if state is not None:
            epoch = float(state.ert.epoch)
            shadows = float(sum(max(0, len(c.workers) - 1) for c in state.ert.entries))
            unprotected = float(len(state.unprotected))
            for w in state.workers:
                role = ROLE_NAMES.get(w.role, "unknown")
                serving = w.state in (pb.READY, pb.SUSPECT)
                age.add_metric([w.name, role], w.heartbeat_age_s)
                if w.role == pb.ATTENTION:
                    load_ = w.load
                    if serving and "kv_cache_usage_perc" in load_:
                        kv.add_metric([w.name], load_["kv_cache_usage_perc"])
                    if serving:
                        lag += load_.get("ckpt_lag_tokens", 0.0)
                    # per attention worker (and incarnation): a replacement starts again from 0, a counter reset
                    restored.add_metric([w.name], load_.get("ckpt_restored", 0.0))
                    recomputed.add_metric([w.name], load_.get("requests_recomputed", load_.get("ckpt_restore_misses", 0.0)))
                    recomputed_tokens.add_metric([w.name], load_.get("recomputed_tokens", 0.0))
            for name, value in sorted(expert_rows.items()):
                load.add_metric([name], value)
        metrics += [
            GaugeMetricFamily(f"{ns}_ert_epoch", "Epoch of the expert routing table.", value=epoch),
            GaugeMetricFamily(f"{ns}_shadow_experts_active",
                              "Shadow expert copies on live expert workers, ready to take over.", value=shadows),
            GaugeMetricFamily(f"{ns}_unprotected_experts",
                              "(layer, expert) pairs with a single live copy (lost with their worker).",
                              value=unprotected),
            GaugeMetricFamily(f"{ns}_kv_checkpoint_lag_tokens",
                              "Generated tokens whose KV is not yet committed to the checkpoint store.", value=lag),
            restored, recomputed, recomputed_tokens,
        ]
        return metrics

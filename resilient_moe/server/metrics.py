"""Prometheus metrics of the whole cluster, served by the API process at /metrics.

Two sources feed one private registry:
- request-side series (latencies, token counts, outcomes), observed here as the API streams tokens;
- cluster-side series (worker up/state, routing epoch, shadows, loads, KV), computed at scrape time
  from the latest controller snapshot. Every worker's heartbeat carries its load map, so the
  controller's state already aggregates the cluster: users scrape one endpoint, not every process.

Names follow Prometheus conventions (`resilient_moe_` prefix, `_seconds`, `_total`) and mirror vLLM's
set where one exists (time to first token, inter-token latency, e2e latency, queue time, running and
waiting requests, KV cache usage, prompt and generation tokens).

Failures and recovery (recovery.py defines the figures): per fault record of any component, its
detection time, its time until a replacement served and until redundancy was restored (histograms by
role, and gauges for the latest fault), and each affected request's stall (`failover_stall_seconds`).

The controller's reconcile loop: the decayed load per expert (`expert_load_tokens`, what load_aware
placement plans from), the imbalance between expert workers (max over mean of their measured rows per
second), the desired roster, and its counters: rebalances (placement switches), scale events, drains,
and orders to the launcher issued, completed, resumed by a restarted controller, or expired.

Alerting (configs/prometheus/alerts.yml) reads, besides those: `http_responses_total{code, handler}`
(every HTTP answer, request-side, so summed over the frontends like the latencies), the experts with
no live copy at all, `worker_deaths_total{role}` (the controller's count, the same at every frontend:
a crash loop), and the control plane outside the controller as this frontend sees it: `redis_up`,
and `supervisor_up` from the supervisor's lease in Redis (a `ControlPlane`, frontend_server.py).

Authentication: `auth_refused_total{process, purpose}` counts peers refused for not proving the
cluster secret, in this (frontend) process, the controller (its snapshot's counters) and every
worker (its heartbeat's load map).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from resilient_moe import auth
from resilient_moe.controller.fault_records import ROLES as FAULT_ROLES
from resilient_moe.controller.records import WorkerState
from resilient_moe.controller.view import ROLES, desired_roster, retired, state_to_pb, unprotected_by_node
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.metrics_merge import MergedRequests
from resilient_moe.server.recovery import Changes, RecoveryTracker

NAMESPACE = "resilient_moe"
SAMPLE_INTERVAL_S = 1.0  # the dashboard's series: one point per second

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 10.0)
STALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
RESTORE_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)

STATE_NAMES = {state_to_pb(s): s.value for s in WorkerState}  # controller_pb2.WorkerState -> "ready", ...
ROLE_NAMES = ROLES


class ServingMetrics:
    """The registry behind /metrics, the hooks the API calls per request, and the dashboard's series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Request-side series live in a registry of their own, which every frontend publishes and /metrics
        # sums over the cluster's frontends (metrics_merge.py); the cluster-side ones are the same everywhere.
        self.request_registry = CollectorRegistry()
        self.merged = MergedRequests(self.request_registry)
        self.registry.register(self.merged)
        r, ns = self.request_registry, NAMESPACE
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
                               "Longest wait for a token of a request in flight when a worker was declared dead "
                               "(overlapping the span from its last heartbeat to the declaration).",
                               namespace=ns, registry=r, buckets=STALL_BUCKETS)
        self.detection = Histogram("fault_detection_seconds", "From a dead worker's last heartbeat to the "
                                   "controller declaring it dead.", ["role"], namespace=ns, registry=self.registry,
                                   buckets=STALL_BUCKETS)
        self.restore = Histogram("redundancy_restore_seconds", "From a dead worker's last heartbeat until a "
                                 "replacement is ready and no more experts are unprotected than before.", ["role"],
                                 namespace=ns, registry=self.registry, buckets=RESTORE_BUCKETS)
        self.replacement = Histogram("replacement_seconds", "From a component declared dead (or its exit seen) "
                                     "until a replacement serves.", ["role"], namespace=ns, registry=self.registry,
                                     buckets=RESTORE_BUCKETS)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of admitted requests.", namespace=ns, registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated and delivered to clients.",
                                         namespace=ns, registry=r)
        self.success = Counter("request_success", "Requests finished, by finish reason.", ["finished_reason"],
                               namespace=ns, registry=r)
        self.failure = Counter("request_failure", "Requests that ended with an error, by kind.", ["kind"],
                               namespace=ns, registry=r)
        self.responses = Counter("http_responses", "HTTP responses, by status code and route (other: no route "
                                 "matched).", ["code", "handler"], namespace=ns, registry=r)
        self.failures_detected = Counter("failures_detected", "Faults of any component (fault records), by role "
                                         "and observed cause: killed, exited, stopped, gone, node_lost, "
                                         "no_heartbeat, unresponsive, link_closed, reported.",
                                         ["role", "kind"], namespace=ns, registry=self.registry)
        self.cluster = ClusterCollector()
        self.registry.register(self.cluster)
        self.control_plane = None  # a ControlPlane (frontend_server.py) where the cluster has Redis
        self.control_health: dict[str, float] = {}
        self.registry.register(ControlPlaneCollector(self))
        self.recovery = RecoveryTracker()
        self.registry.register(LastFaultCollector(self.recovery))
        self._lock = threading.Lock()
        self._cluster_lock = threading.Lock()  # snapshots arrive from the monitor's poll and its watch stream
        # plain running totals for the dashboard's series (the histograms keep theirs privately)
        self._tokens = 0
        self._itl_sum = 0.0
        self._itl_count = 0
        self._ttft_sum = 0.0
        self._ttft_count = 0
        self._last_sample: tuple[float, ...] | None = None
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

    def finished(self, e2e_s: float, reason: str, started: float, arrivals: list[float]) -> None:
        """A request ended normally; `started` and `arrivals` (its tokens' deliveries) are unix times."""
        self.e2e.observe(e2e_s)
        self.success.labels(finished_reason=reason).inc()
        self._apply(self.recovery.request_done(started, arrivals, time.time()))

    def failed(self, kind: str, started: float, arrivals: list[float] = ()) -> None:
        self.failure.labels(kind=kind).inc()
        self._apply(self.recovery.request_done(started, list(arrivals), time.time()))

    def _apply(self, changes: Changes) -> None:
        for fault in changes.new:
            self.failures_detected.labels(role=fault.role, kind=fault.kind).inc()
            if fault.detection_s is not None:
                self.detection.labels(role=fault.role).observe(fault.detection_s)
        for fault in changes.replaced:
            self.replacement.labels(role=fault.role).observe(fault.replacement_s)
        for fault in changes.restored:
            self.restore.labels(role=fault.role).observe(fault.restored_s)
        for stall in changes.stalls:
            self.stall.observe(stall)

    # ---- cluster side (the monitor thread) --------------------------------------------------

    def update_cluster(self, state: pb.ClusterState | None, workers: list[dict] | None, api_waiting: int,
                       now: float | None = None) -> None:
        """Take a new controller snapshot (None: unreachable, `now`: when it was received) and the
        /admin/cluster worker list built from it (every process, controller and frontend included;
        None: keep the last one): note newly declared deaths and recoveries, sample the series."""
        with self._cluster_lock:
            if state is not None:
                self._apply(self.recovery.observe(state, time.time() if now is None else now))
            if workers is not None:
                self.cluster.update(state, workers, api_waiting)
                self._sample()
        if workers is not None and self.control_plane is not None:
            self.control_health = self.control_plane.health()  # Redis round trips: outside the lock

    def _response_totals(self) -> tuple[float, float]:
        """API responses so far (every /v1 route): server errors (5xx) and refusals for load (429)."""
        errors = rejected = 0.0
        for family in self.responses.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("handler", "").startswith("/v1"):
                    code = sample.labels.get("code", "")
                    errors += sample.value if code.startswith("5") else 0.0
                    rejected += sample.value if code == "429" else 0.0
        return errors, rejected

    def _sample(self) -> None:
        now = time.time()
        with self._lock:
            totals = (now, self._tokens, self._itl_sum, self._itl_count, *self._response_totals())
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
            "errors_per_s": (totals[4] - last[4]) / dt,  # 5xx answers of the API
            "rejected_per_s": (totals[5] - last[5]) / dt,  # 429: at capacity
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
        up = GaugeMetricFamily(f"{ns}_worker_up", "1 while a process of the cluster serves (ready, suspect or "
                               "draining), else 0; a worker scaled away and gone is no longer listed.",
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
        node_up = GaugeMetricFamily(f"{ns}_node_workers_up", "Processes of the cluster serving on each node "
                                    "(a node is a failure domain: Ray node id, or the hostname).", labels=["node"])
        node_unprotected = GaugeMetricFamily(f"{ns}_node_loss_unprotected_experts", "(layer, expert) pairs that "
                                             "losing this node would leave with no live copy.", labels=["node"])
        metrics += [node_up, node_unprotected]
        serving_on: dict[str, float] = {}
        for w in workers:
            up.add_metric([w["id"], w["role"]], 1.0 if w["state"] in ("ready", "suspect", "draining") else 0.0)
            for name in STATE_NAMES.values():
                states.add_metric([w["id"], w["role"], name], 1.0 if w["state"] == name else 0.0)
            if w.get("node"):
                serving_on[w["node"]] = serving_on.get(w["node"], 0.0) + (w["state"] in ("ready", "suspect", "draining"))
        for node, count in sorted(serving_on.items()):
            node_up.add_metric([node], count)
        if state is not None:
            for node, keys in sorted(unprotected_by_node(state).items()):
                node_unprotected.add_metric([node], float(len(keys)))
        restored = CounterMetricFamily(f"{ns}_requests_restored", "Requests an attention worker adopted from a "
                                       "dead one by restoring their checkpointed KV.", labels=["worker"])
        recomputed = CounterMetricFamily(f"{ns}_requests_recomputed", "Requests an attention worker adopted from a "
                                         "dead one by recomputing (no usable KV checkpoint).", labels=["worker"])
        recomputed_tokens = CounterMetricFamily(f"{ns}_recomputed_tokens", "Positions of adopted requests computed "
                                                "again instead of restored.", labels=["worker"])
        kv_restores = CounterMetricFamily(f"{ns}_kv_restore", "Requests an attention worker adopted, by where their "
                                          "KV came from: the primary store's copy (local), a replica store's "
                                          "copy (replica), or nowhere (recompute).", labels=["worker", "source"])
        prefix = {key: CounterMetricFamily(f"{ns}_{key}", text, labels=["worker"]) for key, text in (
            ("prefix_query_tokens", "Prompt tokens an attention worker looked up in its prefix cache at admission."),
            ("prefix_hit_tokens", "Of those, tokens whose KV blocks it found cached (reused, not computed)."),
            ("prefix_evictions", "Cached KV blocks an attention worker gave to other tokens when free ones ran out."),
            ("prefix_store_restores", "New requests whose missing prefix blocks an attention worker read from the KV "
             "store (checkpointed by any worker) instead of computing them."),
            ("prefix_store_hit_tokens", "Prompt tokens an attention worker read from the KV store that way."),
            ("prefix_store_misses", "Prefix lookups in the KV store that found nothing usable (computed instead)."))}
        epoch = shadows = unprotected = no_copy = lag = 0.0
        if state is not None:
            epoch = float(state.ert.epoch)
            shadows = float(sum(max(0, len(c.workers) - 1) for c in state.ert.entries))
            unprotected = float(len(state.unprotected))
            # the controller lists pairs of sparse layers with fewer than two live copies; of those, the
            # ones whose routing entry is empty have none (a dense layer's entries are empty too: not listed)
            num_experts = max(1, state.ert.num_experts)
            no_copy = float(sum(1 for ref in state.unprotected if ref.layer * num_experts + ref.expert
                                < len(state.ert.entries)
                                and not state.ert.entries[ref.layer * num_experts + ref.expert].workers))
            desired = desired_roster(state)
            for w in state.workers:
                role = ROLE_NAMES.get(w.role, "unknown")
                serving = w.state in (pb.READY, pb.SUSPECT)
                if not retired(w, desired):  # a scaled-away worker has no heartbeat to wait for
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
                    for key, family in prefix.items():
                        family.add_metric([w.name], load_.get(key, 0.0))
                    for source, key in (("local", "ckpt_restored_local"), ("replica", "ckpt_restored_replica"),
                                        ("recompute", "requests_recomputed")):
                        kv_restores.add_metric([w.name, source], load_.get(key, 0.0))
            for name, value in sorted(expert_rows.items()):
                load.add_metric([name], value)
        metrics += self._controller_metrics(state, expert_rows)
        metrics.append(self._auth_metrics(state))
        metrics += self._process_metrics(state)
        metrics += [
            GaugeMetricFamily(f"{ns}_ert_epoch", "Epoch of the expert routing table.", value=epoch),
            GaugeMetricFamily(f"{ns}_shadow_experts_active",
                              "Shadow expert copies on live expert workers, ready to take over.", value=shadows),
            GaugeMetricFamily(f"{ns}_unprotected_experts",
                              "(layer, expert) pairs with a single live copy (lost with their worker).",
                              value=unprotected),
            GaugeMetricFamily(f"{ns}_experts_without_live_copy", "(layer, expert) pairs no live expert worker "
                              "holds: tokens routed to them cannot be computed.", value=no_copy),
            GaugeMetricFamily(f"{ns}_kv_checkpoint_lag_tokens",
                              "Generated tokens whose KV is not yet committed to the checkpoint store.", value=lag),
            restored, recomputed, recomputed_tokens, kv_restores, *prefix.values(),
        ]
        return metrics

    @staticmethod
    def _process_metrics(state: pb.ClusterState | None) -> list[Metric]:
        """Each live process's CPU time and resident memory (from its heartbeat), and the KV stores' use."""
        ns = NAMESPACE
        cpu = CounterMetricFamily(f"{ns}_worker_cpu_seconds", "CPU time of a live worker process, every thread "
                                  "(a replacement starts again from 0).", labels=["worker", "role"])
        rss = GaugeMetricFamily(f"{ns}_worker_resident_memory_bytes", "Resident memory of a live worker process.",
                                labels=["worker", "role"])
        store = GaugeMetricFamily(f"{ns}_kv_store_bytes", "A KV checkpoint store's memory: the bytes of the regions "
                                  "it holds (capacity) and those touched so far (resident).", labels=["worker", "kind"])
        for w in state.workers if state is not None else ():
            if w.state not in (pb.READY, pb.SUSPECT, pb.DRAINING):
                continue
            role = ROLE_NAMES.get(w.role, "unknown")
            if "cpu_s" in w.load:
                cpu.add_metric([w.name, role], w.load["cpu_s"])
            if "rss_bytes" in w.load:
                rss.add_metric([w.name, role], w.load["rss_bytes"])
            if w.role == pb.KV_STORE:
                for kind, key in (("capacity", "bytes"), ("resident", "resident_bytes")):
                    if key in w.load:
                        store.add_metric([w.name, kind], w.load[key])
        return [cpu, rss, store]

    @staticmethod
    def _auth_metrics(state: pb.ClusterState | None) -> Metric:
        refused = CounterMetricFamily(f"{NAMESPACE}_auth_refused", "Peers refused for not proving the cluster "
                                      "secret, by the process that refused them and the kind of connection "
                                      "(link, grpc, kv-store).", labels=["process", "purpose"])
        prefix = "auth_refused_"
        sources = [("frontend", auth.refusal_counts(prefix))]
        if state is not None:
            sources.append(("controller", dict(state.counters)))
            sources += [(w.name, dict(w.load)) for w in state.workers]
        for process, counts in sources:
            for key, value in sorted(counts.items()):
                if key.startswith(prefix):
                    refused.add_metric([process, key[len(prefix):]], value)
        return refused

    @staticmethod
    def _controller_metrics(state: pb.ClusterState | None, expert_rows: dict[str, float]) -> list[Metric]:
        ns = NAMESPACE
        expert_load = GaugeMetricFamily(f"{ns}_expert_load_tokens", "The controller's decayed estimate of the tokens "
                                        "routed to each expert (all its copies), which load_aware placement plans "
                                        "from.", labels=["layer", "expert"])
        imbalance = GaugeMetricFamily(f"{ns}_expert_worker_imbalance", "Max over mean of the rows per second the "
                                      "live expert workers compute (1: even).")
        desired = GaugeMetricFamily(f"{ns}_desired_workers", "Workers of each role the controller reconciles "
                                    "towards.", labels=["role"])
        orders = CounterMetricFamily(f"{ns}_controller_orders", "Orders the controller gave the launcher, by what "
                                     "became of them (resumed: sent again by a restarted controller).", labels=["event"])
        deaths = CounterMetricFamily(f"{ns}_worker_deaths", "Faults of each role, one per fault record: worker "
                                     "incarnations declared dead, and exits of Redis, controllers, fork servers and "
                                     "supervisors (kept across controller restarts).", labels=["role"])
        families: list[Metric] = [expert_load, imbalance, desired, orders, deaths]
        rates = list(expert_rows.values())
        if rates and sum(rates) > 0:
            imbalance.add_metric([], max(rates) / (sum(rates) / len(rates)))
        if state is None:
            return families
        for c in state.expert_load:
            expert_load.add_metric([str(c.layer), str(c.expert)], c.tokens)
        desired.add_metric(["attention"], float(state.desired.attention_workers))
        desired.add_metric(["expert"], float(state.desired.expert_workers))
        counters = dict(state.counters)
        for role in FAULT_ROLES:
            deaths.add_metric([role], counters.get(f"deaths_{role}", 0.0))
        for event in ("issued", "completed", "resumed", "expired"):
            orders.add_metric([event], counters.get(f"orders_{event}", 0.0))
        for key, help_text in (("rebalances", "Expert placements the routing table switched to (a rebalance or a "
                                "scale step)."), ("scale_events", "Roster changes asked through /admin/scale."),
                               ("drains", "Workers that began a planned drain (SIGTERM, or removed by scaling).")):
            families.append(CounterMetricFamily(f"{ns}_{key}", help_text, value=counters.get(key, 0.0)))
        return families


class ControlPlaneCollector:
    """`redis_up` and `supervisor_up` from the frontend's last look at the control plane (both absent
    without Redis; `supervisor_up` also while Redis does not answer: the lease cannot be read then)."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        health = self.metrics.control_health
        families: list[Metric] = []
        if "redis_up" in health:
            families.append(GaugeMetricFamily(f"{NAMESPACE}_redis_up", "1 while the cluster's Redis (commit "
                                              "records, keyed requests, the supervisor's lease) answers this "
                                              "frontend, else 0.", value=health["redis_up"]))
        if "supervisor_up" in health:
            families.append(GaugeMetricFamily(f"{NAMESPACE}_supervisor_up", "1 while a supervisor holds the "
                                              "cluster's lease and its process runs, else 0 (then nothing "
                                              "replaces dead workers).", value=health["supervisor_up"]))
        return families


class ResponseCounter:
    """ASGI middleware: counts every HTTP response by status code and route (`http_responses_total`),
    at its start (a stream counts when its headers go out). Put outside BodyLimit, so its 413 and 408
    count; an exception that escapes the app counts as the 500 Starlette's error handler then sends."""

    def __init__(self, app, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        def count(status: int) -> None:
            route = scope.get("route")  # set by the router once a route matched
            self.counter.labels(code=str(status), handler=getattr(route, "path", "other")).inc()

        async def counted(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:
                count(500)
            raise


class LastFaultCollector:
    """Gauges of the most recent fault: its detection time, its time until redundancy was restored,
    and its affected requests' stall (p50, max); absent until the figure is known."""

    def __init__(self, recovery: RecoveryTracker) -> None:
        self.recovery = recovery

    def collect(self) -> list[Metric]:
        ns = NAMESPACE
        families = {
            "detection_s": GaugeMetricFamily(f"{ns}_last_fault_detection_seconds", "The latest fault: from the "
                                             "worker's last heartbeat to its declared death.",
                                             labels=["worker", "role"]),
            "replacement_s": GaugeMetricFamily(f"{ns}_last_fault_replacement_seconds", "The latest fault: from its "
                                               "declaration until a replacement served.", labels=["worker", "role"]),
            "redundancy_restored_s": GaugeMetricFamily(f"{ns}_last_fault_redundancy_restore_seconds", "The latest "
                                                       "fault: from the worker's last heartbeat until redundancy was "
                                                       "restored.", labels=["worker", "role"]),
            "stall_p50_s": GaugeMetricFamily(f"{ns}_last_fault_stall_p50_seconds", "The latest fault: median stall "
                                             "of the requests in flight.", labels=["worker", "role"]),
            "stall_max_s": GaugeMetricFamily(f"{ns}_last_fault_stall_max_seconds", "The latest fault: longest stall "
                                             "of the requests in flight.", labels=["worker", "role"]),
        }
        table = self.recovery.table()
        if table:
            latest = table[0]
            for key, family in families.items():
                if latest[key] is not None:
                    family.add_metric([latest["worker"], latest["role"]], latest[key])
        return list(families.values())

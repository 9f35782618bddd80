"""The controller process: a gRPC server around the ClusterModel, and its reconcile loop.

The loop runs every heartbeat interval (and after every change an RPC makes): it declares dead the
workers whose heartbeats stopped and reconciles desired with observed state (state.py), which issues
orders. Orders live in the model, are persisted with it in Redis, and reach the launcher through its
command stream, every outstanding one on each (re)connection: so an order survives a controller that
dies before the launcher took it. Each pass is wrapped so that one exception never halts the loop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent import futures

import grpc

from resilient_moe import auth
from resilient_moe.deployment import WorkerConfig
from resilient_moe.model.config import ModelConfig
from resilient_moe.controller.fault_records import FaultRecord, fault_record_problem
from resilient_moe.controller.grpc_auth import ServerAuth
from resilient_moe.controller.records import ControllerSettings, ModelShape, Order, WorkerRecord
from resilient_moe.controller.state import ClusterModel
from resilient_moe.controller.view import state_to_pb
from resilient_moe.datapath.faults import LinkFault
from resilient_moe.procs import GONE, STOPPED, UNKNOWN, dumpable, process_state
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.proto import controller_pb2_grpc as pb_grpc

log = logging.getLogger("resilient_moe.controller")

def controller_key(cluster_id: str) -> str:
    """Redis key of the controller's state (documented with the others in kvstore/keys.py)."""
    return f"rmoe:{cluster_id}:controller"


ROLE_TO_PB = {"attention": pb.ATTENTION, "expert": pb.EXPERT, "frontend": pb.FRONTEND, "kv_store": pb.KV_STORE}
PB_TO_ROLE = {v: k for k, v in ROLE_TO_PB.items()}


def worker_to_pb(record: WorkerRecord, now: float) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        name=record.name, role=ROLE_TO_PB.get(record.role, pb.ROLE_UNSPECIFIED), index=record.index,
        incarnation=record.incarnation, pid=record.pid, host=record.host, data_address=record.data_address,
        state=state_to_pb(record.state), experts=[pb.ExpertRef(layer=l, expert=e) for l, e in record.experts],
        heartbeat_age_s=max(0.0, now - record.last_heartbeat) if record.incarnation else 0.0, load=record.load,
        started_at=record.started_at, node=record.node,
    )


def order_to_pb(order: Order) -> pb.LauncherCommand:
    return pb.LauncherCommand(action=order.action, worker=order.worker, pid=order.pid, id=order.id,
                              generation=order.generation, issued_at=order.issued_at, resumed=order.resumed)


def _refs(keys) -> list[pb.ExpertRef]:
    return [pb.ExpertRef(layer=l, expert=e) for l, e in keys]


class ControllerService(pb_grpc.ControllerServicer):
    """gRPC face of the controller. All state lives in `self.model`, guarded by `self.lock`."""

    def __init__(self, model: ClusterModel, cluster_id: str, tick_interval_s: float) -> None:
        self.model = model
        self.cluster_id = cluster_id
        self.tick_interval_s = tick_interval_s
        self.lock = threading.Condition()
        self.stopping = threading.Event()

    # ---- snapshots --------------------------------------------------------------------------

    def snapshot(self) -> pb.ClusterState:
        m = self.model
        now = m.clock()
        return pb.ClusterState(
            epoch=m.epoch,
            workers=[worker_to_pb(r, now) for r in sorted(m.workers.values(), key=lambda r: r.name)],
            ert=m.ert.to_proto(pb),
            fenced=[pb.Fence(name=n, incarnation=i) for n, i in sorted(m.fenced)],
            events=[pb.Event(time=e.time, kind=e.kind, worker=e.worker, detail=e.detail) for e in m.events],
            cluster_id=self.cluster_id,
            unprotected=_refs(m.unprotected()),
            resilience=m.resilience,
            faults=[f.to_proto(pb) for f in m.active_faults()],
            orders=[order_to_pb(o) for o in sorted(m.orders.values(), key=lambda o: o.id)],
            desired=pb.Roster(attention_workers=m.desired.attention_workers, expert_workers=m.desired.expert_workers),
            expert_load=[pb.ExpertCount(layer=l, expert=e, tokens=v) for (l, e), v in sorted(m.load.items())],
            counters={**{k: float(v) for k, v in m.counters.items()}, **auth.refusal_counts(),
                      "dumpable": float(dumpable())},  # the controller's own flag (0: hardened)
            placement_policy=m.settings.shadow_policy,
            rebalancing=m.rebalancing,
            fault_records=m.fault_records.to_pb(),
        )

    def _changed(self) -> None:
        """Reconcile after a change an RPC made (orders go out now, not at the next tick); wake watchers."""
        self.model.reconcile()
        self.lock.notify_all()

    # ---- RPCs -------------------------------------------------------------------------------

    def Register(self, request, context):
        w = request.worker
        with self.lock:
            record = self.model.register(w.name, PB_TO_ROLE.get(w.role, "frontend"), w.index, w.pid, w.host, w.data_address,
                                         node=w.node)
            load = self.model.experts_for(w.name) if record.role == "expert" else []
            self._changed()
            log.info("registered %s incarnation %d pid %d", w.name, record.incarnation, w.pid)
            return pb.RegisterReply(incarnation=record.incarnation, load_experts=_refs(load), state=self.snapshot())

    def Ready(self, request, context):
        with self.lock:
            experts = [(x.layer, x.expert) for x in request.experts]
            if self.model.ready(request.name, request.incarnation, experts, request.data_address):
                self._changed()
        return pb.Empty()

    def Heartbeat(self, request, context):
        with self.lock:
            before = self.model.version
            answer = self.model.heartbeat(
                request.name, request.incarnation, dict(request.load),
                [(c.layer, c.expert, c.tokens) for c in request.expert_tokens],
                [(x.layer, x.expert) for x in request.experts] if request.reports_experts else None)
            if self.model.version != before:
                self._changed()
            return pb.HeartbeatReply(fenced=not answer.alive, epoch=self.model.epoch,
                                     load_experts=_refs(answer.load_experts), drop_experts=_refs(answer.drop_experts))

    def Deregister(self, request, context):
        with self.lock:
            self.model.deregister(request.name, request.incarnation)
            self._changed()  # a worker that left is replaced: its order goes out now
        return pb.Empty()

    def Drain(self, request, context):
        with self.lock:
            epoch = self.model.drain(request.name, request.incarnation)
            self._changed()
        log.info("%s incarnation %d is draining", request.name, request.incarnation)
        return pb.DrainReply(epoch=epoch)

    def ReportFailure(self, request, context):
        with self.lock:
            record = self.model.workers.get(request.suspect)
            # The second path of detection: a report of silence is acted on at once when the process is
            # gone, or stopped (it runs again only if someone resumes it); otherwise it is only suspect.
            seen = process_state(record.pid, record.host) if record is not None else UNKNOWN
            before = self.model.version
            self.model.report_failure(request.reporter, request.suspect, request.suspect_incarnation, request.reason,
                                      seen in (GONE, STOPPED), process=seen)
            if self.model.version != before:
                self._changed()
        return pb.Empty()

    def GetState(self, request, context):
        with self.lock:
            return self.snapshot()

    def Watch(self, request, context):
        """A snapshot on every change, and at least every `refresh_s` when the watcher asks for that."""
        seen = -1
        sent_at = 0.0
        refresh = request.refresh_s if request.refresh_s > 0 else float("inf")
        while context.is_active() and not self.stopping.is_set():
            with self.lock:
                if self.model.version == seen:
                    self.lock.wait(timeout=min(0.5, refresh))
                if self.model.version == seen and time.monotonic() - sent_at < refresh:
                    continue
                seen = self.model.version
                state = self.snapshot()
            sent_at = time.monotonic()
            yield state

    def LauncherCommands(self, request, context):
        """Every outstanding order, then each new one (all of them again on a new stream: the
        launcher knows which it carried out)."""
        sent: set[int] = set()
        while context.is_active() and not self.stopping.is_set():
            with self.lock:
                pending = [o for o in sorted(self.model.orders.values(), key=lambda o: o.id) if o.id not in sent]
                if not pending:
                    self.lock.wait(timeout=0.5)
                    continue
            for order in pending:
                sent.add(order.id)
                log.info("order %d to the launcher: %s %s (pid %d)%s", order.id, order.action, order.worker,
                         order.pid, " (resumed)" if order.resumed else "")
                yield order_to_pb(order)

    def SetFaults(self, request, context):
        """Chaos testing: switch injected datapath faults on or off (datapath/faults.py)."""
        try:
            add = [LinkFault.from_proto(f) for f in request.add]
            with self.lock:
                faults = self.model.set_faults(add, list(request.remove), request.clear)
                self._changed()
        except ValueError as e:  # ConfigError too: a bad fault, or one naming an unknown worker
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        log.warning("injected datapath faults in force: %s", ", ".join(f"{f.kind} {f.link}" for f in faults) or "none")
        return pb.FaultList(faults=[f.to_proto(pb) for f in faults])

    def Scale(self, request, context):
        """Admin: change the roster; INVALID_ARGUMENT names what is not possible."""
        try:
            with self.lock:
                before = self.model.desired
                desired = self.model.scale(request.attention_workers, request.expert_workers)
                self._changed()
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        detail = "unchanged" if desired == before else "scaling"
        log.warning("scale: %s -> %s", before, desired)
        return pb.ScaleReply(desired=pb.Roster(attention_workers=desired.attention_workers,
                                               expert_workers=desired.expert_workers), detail=detail)

    def Rebalance(self, request, context):
        """Admin: place the experts by the load observed so far."""
        with self.lock:
            started, detail = self.model.rebalance("asked by an operator")
            self._changed()
        log.warning("rebalance: %s", detail)
        return pb.RebalanceReply(started=started, detail=detail)

    def RecordFault(self, request, context):
        """A fault of a component the controller cannot see itself (fault_records.py), or its update."""
        problem = fault_record_problem(request)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        with self.lock:
            kept = self.model.record_fault(FaultRecord.from_pb(request))
            self._changed()
        log.warning("fault of %s (pid %d): %s%s", kept.component, kept.pid, kept.cause,
                    f", replaced after {kept.replaced_at - kept.detected_at:.2f}s" if kept.replaced_at else "")
        return pb.Empty()

    # ---- loops ------------------------------------------------------------------------------

    def persist_forever(self, redis_client, key: str) -> None:
        """Write the model's snapshot to Redis after each change, off the RPC threads (the newest
        version only). Redis down: retried on the next change or tick, serving is unaffected."""
        written = -1
        written_at = 0.0
        failures = 0
        while not self.stopping.is_set():
            with self.lock:
                if self.model.version == written:
                    self.lock.wait(1.0)
                # Unchanged state is rewritten every few seconds too: a restarted (empty) Redis gets it back,
                # and the load estimate (which changes without a version bump) stays fresh.
                if self.model.version == written and time.monotonic() - written_at < 3.0:
                    continue
                version = self.model.version
                snapshot = json.dumps(self.model.to_snapshot())
            try:
                redis_client.set(key, snapshot)
                written, written_at = version, time.monotonic()
                failures = 0
            except Exception as e:  # noqa: BLE001 (any Redis failure)
                failures += 1
                if failures in (1, 10, 100):
                    log.warning("cannot persist the controller state to Redis (%d failures): %s", failures, e)
                self.stopping.wait(0.05 if failures < 20 else 0.2)  # a restarted Redis gets the state back at once
        self.persist_once(redis_client, key)  # stopping: the last word is the newest state

    def persist_once(self, redis_client, key: str) -> bool:
        with self.lock:
            snapshot = json.dumps(self.model.to_snapshot())
        try:
            redis_client.set(key, snapshot)
            return True
        except Exception as e:  # noqa: BLE001 (any Redis failure)
            log.warning("cannot persist the controller state to Redis on the way out: %s", e)
            return False

    def reconcile_forever(self) -> None:
        while not self.stopping.wait(self.tick_interval_s):
            try:
                with self.lock:
                    before = self.model.version
                    newly_dead = self.model.tick()
                    if newly_dead:
                        log.warning("declared dead: %s", ", ".join(newly_dead))
                    if self.model.version != before:
                        self.lock.notify_all()
            except Exception:  # one bad pass must never stop the loop
                log.exception("reconcile pass failed")


def serve(config: WorkerConfig, ready: threading.Event | None = None) -> None:
    """Run the controller until SIGTERM (or `stop` is set on the returned service)."""
    dep = config.deployment
    model_cfg = ModelConfig.from_pretrained(dep.model)
    shape = ModelShape(model_cfg.num_layers, model_cfg.num_experts, model_cfg.sparse_layer_ids)
    slots = None
    if dep.shadow_budget_bytes is not None:
        dtype_bytes = 2 if dep.engine.dtype == "bfloat16" else 4
        slots = dep.shadow_budget_bytes // (model_cfg.expert_bytes(dtype_bytes) * max(1, len(shape.sparse_layers)))
    model = ClusterModel(shape, ControllerSettings.from_deployment(dep, slots, config.worker_nodes))
    unprotected = model.active.unprotected
    if unprotected and dep.resilience:
        log.warning("shadow budget too small: %d (layer, expert) pairs have no shadow and die with their primary: %s",
                    len(unprotected), ", ".join(f"{l}/{e}" for l, e in unprotected))
    if config.worker_nodes and dep.resilience:  # nodes as failure domains: what each node's loss would cost
        for node, keys in sorted(model.unprotected_by_node().items()):
            if keys:
                log.warning("losing node %s would leave %d (layer, expert) pairs with no copy (shadow budget too "
                            "small to place them elsewhere)", node[:12], len(keys))
    persistence = None
    if dep.resilience and dep.redis_url:
        import redis

        persistence = redis.Redis.from_url(dep.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        key = controller_key(config.cluster_id)
        try:
            saved = persistence.get(key)
        except redis.RedisError as e:
            saved = None
            log.warning("cannot read a previous controller's state from Redis (%s): starting empty", e)
        if saved:
            model.restore(json.loads(saved))
            log.warning("recovered the state of a previous controller: %d workers, routing epoch %d, %d outstanding "
                        "orders (sent again)", len(model.workers), model.epoch, len(model.orders))
    service = ControllerService(model, config.cluster_id, dep.heartbeat_interval_s)
    auth.secret()  # fails now, naming the problem, rather than refusing every call
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="controller"),
                         interceptors=[ServerAuth()])
    pb_grpc.add_ControllerServicer_to_server(service, server)
    if server.add_insecure_port(config.controller_address) == 0:
        raise RuntimeError(f"controller cannot bind {config.controller_address}")
    server.start()
    log.info("controller serving on %s (cluster %s)", config.controller_address, config.cluster_id)
    loop = threading.Thread(target=service.reconcile_forever, name="reconcile", daemon=True)
    loop.start()
    persist = None
    if persistence is not None:
        persist = threading.Thread(target=service.persist_forever, args=(persistence, controller_key(config.cluster_id)),
                                   name="persist", daemon=True)
        persist.start()
    if ready is not None:
        ready.set()
    _wait_for_termination(service)
    server.stop(grace=0.5).wait()
    if persist is not None:
        persist.join(2.0)  # its last write: a successor starts from the newest state


def _wait_for_termination(service: ControllerService) -> None:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: service.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: service.stopping.set())
    while not service.stopping.wait(1.0):
        pass


def main(config: WorkerConfig) -> int:
    serve(config)
    return 0


"""The controller's reconcile pass: each tick compares desired and observed state and issues what
closes the gap (state.py's module docstring has the state machine).

  - orders to the launcher: start a worker (one the roster gained, or a replacement of a dead one),
    stop one the roster lost (after it drained), restart everything (the baseline). An order is issued
    once per need (the same one is never outstanding twice), is persisted with the snapshot, and is
    done when the observed state shows it; one not done within the startup timeout is issued again.
  - placement: a roster change plans a new placement; a rebalance switches the routing table to the
    target placement (a new epoch) once every expert worker holds its part, and old copies are dropped
    only once every attention worker routes by that epoch; periodic rebalancing by observed load.

`ReconcilePass` is a part of `ClusterModel` (which inherits it): it reads and changes the model's
state and needs nothing else, so tests drive it with an injected clock and no processes.
"""

from __future__ import annotations

import logging

from resilient_moe.controller.records import ENDED, REPLACED_ROLES, SERVING, Order, WorkerRecord, WorkerState

log = logging.getLogger("resilient_moe.controller")

PERIODIC_GAIN = 0.9  # a periodic rebalance moves experts only if it cuts the expected imbalance by 10%


class ReconcilePass:
    """The reconcile pass of `ClusterModel` (see the module docstring)."""

    def reconcile(self) -> None:
        """Compare desired and observed state; issue what closes the gap (see the module docstring).
        Each part runs on its own: one that raises is logged and never keeps the others from running."""
        now = self.clock()
        parts = [self._complete_orders, self._expire_orders, lambda: self._decay_load(now),
                 lambda: self._reconcile_roster(now), lambda: self._reconcile_placement(now)]
        if not self.resilience:
            parts.insert(4, self._reconcile_restart_all)
        for part in parts:
            try:
                part()
            except Exception:
                log.exception("a reconcile step failed; the others went on")

    def _order(self, action: str, worker: str, pid: int, generation: int = 0) -> Order:
        """Issue an order unless the same one is outstanding."""
        for order in self.orders.values():
            if order.key() == (action, worker, pid, generation):
                return order
        order = Order(self.next_order, action, worker, pid, self.wall(), generation, self.next_incarnation)
        self.next_order += 1
        self.orders[order.id] = order
        self.counters["orders_issued"] += 1
        what = {"start": f"start {worker}" + (f" in place of pid {pid}" if pid else ""),
                "stop": f"drain and stop {worker} (pid {pid})",
                "restart-all": f"restart every worker (generation {generation})"}[action]
        self._event("order", worker, f"order {order.id}: {what}")
        return order

    def _order_done(self, order: Order) -> bool:
        record = self.workers.get(order.worker)
        roster = self.roster()
        if order.action == "start":
            return order.worker not in roster or (record is not None and record.incarnation > 0
                                                  and record.pid != order.pid)
        if order.action == "stop":
            return record is None or record.state in ENDED or record.pid != order.pid
        workers = [self.workers.get(n) for n, (role, _) in roster.items() if role in ("expert", "attention")]
        return all(r is not None and r.incarnation >= order.floor and r.state in SERVING for r in workers)

    def _complete_orders(self) -> None:
        for order in list(self.orders.values()):
            if self._order_done(order):
                del self.orders[order.id]
                self.counters["orders_completed"] += 1
                self.version += 1

    def _expire_orders(self) -> None:
        """An order not seen done within the startup timeout is forgotten; the next pass issues it
        again if it is still needed (the launcher may have failed to carry it out)."""
        now = self.wall()
        for order in list(self.orders.values()):
            if now - order.issued_at > self.settings.startup_timeout_s:
                del self.orders[order.id]
                self.counters["orders_expired"] += 1
                self._event("order", order.worker, f"order {order.id} ({order.action}) not done after "
                            f"{self.settings.startup_timeout_s:.0f}s; issuing it again if still needed")

    def _starting_order(self, name: str) -> bool:
        return any(o.action == "start" and o.worker == name for o in self.orders.values())

    def _reconcile_roster(self, now: float) -> None:
        roster = self.roster()
        for name, (role, index) in roster.items():
            record = self.workers.get(name)
            if record is None:  # added by `scale`
                self.workers[name] = WorkerRecord(name, role, index, 0, 0, "", since=now)
                self._event("starting", name, "added to the roster")
                self._order("start", name, 0)
            elif record.state == WorkerState.STARTING:
                if not self._starting_order(name) and now - record.since > self.settings.startup_timeout_s:
                    self._order("start", name, 0)  # never registered: whatever was to start it failed
            elif record.state in ENDED and (self.resilience or role == "kv_store") and role in REPLACED_ROLES:
                self._order("start", name, record.pid)
        for record in list(self.workers.values()):
            if record.name in roster or record.state in ENDED or record.role not in ("expert", "attention"):
                continue
            if not record.incarnation:  # removed before it ever registered
                self._set_state(record, WorkerState.GONE)
                self._event("stopped", record.name, "removed from the roster before it started")
                continue
            if record.state != WorkerState.DRAINING:
                self._set_state(record, WorkerState.DRAINING)
                self.counters["drains"] += 1
                self._event("draining", record.name, "removed from the roster")
                if record.role == "expert":
                    self._publish_routing(f"{record.name} draining")
            # An attention worker hands its requests over at once; an expert worker stops once no
            # routing table any attention worker uses names it.
            if record.role == "attention" or (record.name not in self.active.workers
                                              and self._adopted(self.switch_epoch)):
                self._order("stop", record.name, record.pid)

    def _reconcile_restart_all(self) -> None:
        """The baseline: a death bumps the restart generation (unless a restart is under way), and the
        launcher restarts every worker for it."""
        if any(o.action == "restart-all" for o in self.orders.values()):
            return
        roster = self.roster()
        if any(r.state == WorkerState.FENCED and r.name in roster for r in self.workers.values()
               if r.role in ("expert", "attention")):
            self.restart_generation += 1
            self._order("restart-all", "", 0, self.restart_generation)

    def _adopted(self, epoch: int) -> bool:
        """Does every attention worker that may still send frames route by `epoch` or a later table?"""
        return all(r.load.get("ert_epoch", 0.0) >= epoch for r in self.workers.values()
                   if r.role == "attention" and (r.state in SERVING or r.state == WorkerState.DRAINING))

    def _settled(self) -> bool:
        """No rebalance is under way and every attention worker routes by the active placement."""
        return not self.rebalancing and self._adopted(self.switch_epoch)

    def _reconcile_placement(self, now: float) -> None:
        experts = self.expert_names()
        if tuple(experts) != self.target.workers:  # the roster changed: plan for the new one
            self.target = self._plan(experts, self.observed_load(), self.active)
            if self.target.copies == self.active.copies and self.target.shares == self.active.shares \
                    and self.target.workers == self.active.workers:
                self.target = self.active
            else:
                self._event("rebalance", "", f"placing experts on {len(experts)} expert workers; loading copies")
        if self.rebalancing:
            ready = all(
                (r := self.workers.get(w)) is not None and r.state in SERVING
                and set(self.target.held_by(w)) <= set(r.experts)
                for w in self.target.workers
            )
            if ready:
                self.active = self.target
                self.counters["rebalances"] += 1
                self.epoch += 1
                self.ert = self._build_ert()
                self.switch_epoch = self.epoch
                self._event("epoch", "", f"routing table epoch {self.epoch}: the new placement serves "
                            f"({len(self.active.unprotected)} experts unprotected)")
        elif self.settings.rebalance_interval_s > 0 and now - self.last_rebalance >= self.settings.rebalance_interval_s:
            self.rebalance("periodic", min_gain=PERIODIC_GAIN)

    def _decay_load(self, now: float) -> None:
        dt = now - self._load_at
        if dt <= 0:
            return
        self._load_at = now
        factor = 0.5 ** (dt / self.settings.load_half_life_s)
        self.load = {k: v * factor for k, v in self.load.items() if v * factor > 1e-3}

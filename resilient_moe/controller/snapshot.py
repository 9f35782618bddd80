"""What the controller persists in Redis so that a restarted controller carries on where its
predecessor stopped: desired state (roster, placements, restart generation), observed state
(membership, incarnations, fences, epoch, load) and the outstanding orders. `Persistence` is a part of
`ClusterModel` (which inherits it); controller/server.py writes the snapshot and reads it back.
"""

from __future__ import annotations

from resilient_moe.controller.placement import Placement
from resilient_moe.controller.records import ClusterEvent, Order, Roster, WorkerRecord, WorkerState


class Persistence:
    """`ClusterModel`'s snapshot and its restore (see the module docstring)."""

    def to_snapshot(self) -> dict:
        """Everything a restarted controller needs to carry on: desired state (roster, placements,
        restart generation), observed state (membership, incarnations, fences, epoch, load) and the
        outstanding orders."""
        return {
            "epoch": self.epoch,
            "next_incarnation": self.next_incarnation,
            "fenced": sorted([name, inc] for name, inc in self.fenced),
            "workers": [
                {"name": r.name, "role": r.role, "index": r.index, "incarnation": r.incarnation, "pid": r.pid,
                 "host": r.host, "node": r.node, "data_address": r.data_address, "state": r.state.value,
                 "experts": [list(e) for e in r.experts], "started_at": r.started_at,
                 "ert_epoch": r.load.get("ert_epoch", 0.0)}
                for r in self.workers.values()
            ],
            "events": [[e.time, e.kind, e.worker, e.detail] for e in list(self.events)[-100:]],
            "fault_records": self.fault_records.dump(),
            "desired": {"attention_workers": self.desired.attention_workers,
                        "expert_workers": self.desired.expert_workers},
            "restart_generation": self.restart_generation,
            "orders": [{"id": o.id, "action": o.action, "worker": o.worker, "pid": o.pid, "issued_at": o.issued_at,
                        "generation": o.generation, "floor": o.floor} for o in self.orders.values()],
            "next_order": self.next_order,
            "counters": dict(self.counters),
            "load": [[layer, expert, value] for (layer, expert), value in sorted(self.load.items())],
            "active": self.active.to_json(),
            "target": None if not self.rebalancing else self.target.to_json(),
            "switch_epoch": self.switch_epoch,
        }

    def restore(self, snapshot: dict) -> None:
        """Adopt a predecessor's snapshot; every live worker gets a fresh heartbeat deadline, and every
        outstanding order is sent again (counted as resumed)."""
        now = self.clock()
        self.epoch = int(snapshot["epoch"])
        self.next_incarnation = int(snapshot["next_incarnation"])
        self.fenced = {(str(n), int(i)) for n, i in snapshot["fenced"]}
        self.workers = {}
        for w in snapshot["workers"]:
            record = WorkerRecord(str(w["name"]), str(w["role"]), int(w["index"]), int(w["incarnation"]),
                                  int(w["pid"]), str(w["host"]), str(w["data_address"]), WorkerState(w["state"]),
                                  [tuple(e) for e in w["experts"]], last_heartbeat=now,
                                  load={"ert_epoch": float(w["ert_epoch"])}, started_at=float(w["started_at"]),
                                  since=now, node=str(w.get("node", "")))
            self.workers[record.name] = record
        self.events.extend(ClusterEvent(float(t), str(k), str(w), str(d)) for t, k, w, d in snapshot["events"])
        self.fault_records.load(snapshot.get("fault_records", []))  # absent in a predecessor's older snapshot
        self.desired = Roster(int(snapshot["desired"]["attention_workers"]), int(snapshot["desired"]["expert_workers"]))
        self.restart_generation = int(snapshot["restart_generation"])
        self.orders = {int(o["id"]): Order(int(o["id"]), str(o["action"]), str(o["worker"]), int(o["pid"]),
                                           float(o["issued_at"]), int(o["generation"]), int(o["floor"]), resumed=True)
                       for o in snapshot["orders"]}
        self.next_order = int(snapshot["next_order"])
        self.counters.update({k: int(v) for k, v in snapshot["counters"].items() if k in self.counters})
        self.counters["orders_resumed"] += len(self.orders)
        self.load = {(int(layer), int(expert)): float(v) for layer, expert, v in snapshot["load"]}
        self.active = Placement.from_json(snapshot["active"])
        self.target = self.active if snapshot["target"] is None else Placement.from_json(snapshot["target"])
        self.switch_epoch = int(snapshot["switch_epoch"])
        self.ert = self._build_ert()
        self._event("controller", "controller", f"restarted; recovered {len(self.workers)} workers, routing epoch "
                    f"{self.epoch} and {len(self.orders)} outstanding orders from Redis")

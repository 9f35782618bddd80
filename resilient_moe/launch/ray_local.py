"""A Ray cluster on this host, on loopback only, for tests and benchmarks: `ray.cluster_utils.Cluster`
with a head node and worker nodes, each a raylet of its own (so removing one kills its processes as a
lost node would), kept small (this host has few cores)."""

from __future__ import annotations

import os


class LoopbackRayCluster:
    """`ray.cluster_utils.Cluster` on loopback: a head node and 3 worker nodes, small (this host has few
    cores), with the driver connected. `worker_nodes` are the node ids (hex) of the worker nodes."""

    def __init__(self, workers: int = 3) -> None:
        self.workers = workers
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only (read when Ray is imported)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves this host
        import ray
        from ray.cluster_utils import Cluster

        self.ray = ray
        # Ray declares a silent node dead after health_check_failure_threshold missed checks; the defaults
        # take many seconds, during which a replacement could still be sent there.
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=2, include_dashboard=False, object_store_memory=80 << 20,
            _system_config={"health_check_initial_delay_ms": 1000, "health_check_period_ms": 500,
                            "health_check_timeout_ms": 1000, "health_check_failure_threshold": 4}))
        try:
            self.handles = [self.add_node() for _ in range(workers)]
            self.cluster.wait_for_nodes()
            ray.init(address=self.cluster.address, log_to_driver=False)
        except BaseException:
            self.shutdown()
            raise

    def add_node(self):
        return self.cluster.add_node(num_cpus=2, object_store_memory=80 << 20)

    @property
    def worker_nodes(self) -> list[str]:
        return [h.node_id for h in self.handles]

    def handle_of(self, node_id: str):
        return next(h for h in self.handles if h.node_id == node_id)

    def remove_node(self, node_id: str) -> None:
        """Kill a worker node's processes at once (those still alive: a node-kill may have killed its
        raylet already)."""
        handle = self.handle_of(node_id)
        self.handles.remove(handle)
        try:
            self.cluster.remove_node(handle, allow_graceful=False)
        except Exception:  # noqa: BLE001 (some of its processes were gone already)
            pass

    def refill(self, workers: int = 0) -> None:
        """Add worker nodes until there are `workers` (default: as many as at the start) again."""
        while len(self.handles) < (workers or self.workers):
            self.handles.append(self.add_node())
        self.cluster.wait_for_nodes()

    def shutdown(self) -> None:
        try:
            self.ray.shutdown()
        finally:
            self.cluster.shutdown()

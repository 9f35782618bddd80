"""Pieces every worker process shares: process set-up, addresses, a cross-thread wake-up."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from resilient_moe.deployment import DeploymentConfig, WorkerConfig
from resilient_moe.model import ops
from resilient_moe.procs import background_thread
from resilient_moe.proto import controller_pb2 as pb

T = TypeVar("T")


def configure_process(config: WorkerConfig) -> None:
    """Pin the process to its cores, one torch and native GEMM thread per core, and tagged log lines."""
    if config.cpus:
        os.sched_setaffinity(0, config.cpus)
    ops.configure_threads(config.threads, config.deployment.engine.dtype, config.deployment.engine.device)
    logging.basicConfig(
        level=config.deployment.log_level,
        format=f"%(asctime)s {config.name} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def load_yielding_cpu(state: pb.ClusterState, load: Callable[[], T]) -> T:
    """`load()`, for a worker joining a cluster that already serves (a replacement: some attention
    worker in the `state` it registered into is ready) on a thread of the lowest CPU priority, so that
    on a host short of cores the survivors' serving and replays come first.

    Linux nice values are per thread, and lowering one needs no privilege while raising it again
    does: so the load runs on a thread of its own that ends with it, and every thread that goes on
    (the serving loop, heartbeats, the GEMM pools made at start-up) keeps the priority the process
    started with, for any user."""
    if not any(w.role == pb.ATTENTION and w.state == pb.READY for w in state.workers):
        return load()
    outcome: dict[str, object] = {}

    def run() -> None:
        background_thread()
        try:
            outcome["value"] = load()
        except BaseException as e:  # noqa: BLE001 (raised again on the caller's thread)
            outcome["error"] = e

    thread = threading.Thread(target=run, name="load-at-low-priority", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def link_addresses(dep: DeploymentConfig, cluster_id: str, name: str, incarnation: int) -> list[str]:
    """Where a worker listens for datapath links. The incarnation is part of a shm name so a
    replacement never collides with a dying predecessor's socket. Under Ray, peers on other nodes
    need TCP and peers on this node are faster over shm: both (each peer picks, link.choose_address)."""
    shm, tcp = f"shm:@rmoe-{cluster_id}-{name}-{incarnation}", f"tcp:{dep.host}:0"
    if dep.launcher == "ray":
        return [shm, tcp] if dep.transport == "shm" else [tcp]
    return [shm] if dep.transport == "shm" else [tcp]

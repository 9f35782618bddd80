"""Pieces every worker process shares: process set-up, addresses, a cross-thread wake-up."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from resilient_moe.deployment import DeploymentConfig, WorkerConfig
from resilient_moe.model import ops
from resilient_moe.proto import controller_pb2 as pb


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


@contextlib.contextmanager
def yield_cpu_while_loading(state):
    """A worker joining a cluster that is already serving (a replacement: some attention worker in the
    `state` it registered into is ready) loads its weights at the
    lowest CPU priority, so that on a host short of cores the survivors' serving and replays come
    first. Linux nice values are per thread: only this (the loading) thread is lowered, and it is
    restored afterwards, which needs CAP_SYS_NICE; without it the load runs at normal priority."""
    serving = any(w.role == pb.ATTENTION and w.state == pb.READY for w in state.workers)
    lowered = False
    if serving and os.geteuid() == 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)
            lowered = True
        except OSError:
            pass
    try:
        yield
    finally:
        if lowered:
            os.setpriority(os.PRIO_PROCESS, 0, 0)


def link_addresses(dep: DeploymentConfig, cluster_id: str, name: str, incarnation: int) -> list[str]:
    """Where a worker listens for datapath links. The incarnation is part of a shm name so a
    replacement never collides with a dying predecessor's socket. Under Ray, peers on other nodes
    need TCP and peers on this node are faster over shm: both (each peer picks, link.choose_address)."""
    shm, tcp = f"shm:@rmoe-{cluster_id}-{name}-{incarnation}", f"tcp:{dep.host}:0"
    if dep.launcher == "ray":
        return [shm, tcp] if dep.transport == "shm" else [tcp]
    return [shm] if dep.transport == "shm" else [tcp]

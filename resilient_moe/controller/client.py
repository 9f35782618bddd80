"""What a worker (or frontend, or launcher) uses to talk to the controller.

Registration retries until the controller answers (it may be starting, or restarting). Heartbeats
and the cluster-state watch run on background threads and reconnect on their own; the datapath
never waits for them (DESIGN.md: when the controller is down, serving continues). Every call
proves the cluster secret (grpc_auth.py); a process without it gets UNAUTHENTICATED.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import grpc

from resilient_moe import auth
from resilient_moe.controller.grpc_auth import authenticated_channel
from resilient_moe.procs import own_usage
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.proto import controller_pb2_grpc as pb_grpc

log = logging.getLogger("resilient_moe.controller.client")

RPC_TIMEOUT_S = 2.0


class ControllerClient:
    """A gRPC channel to the controller with the calls workers make."""

    def __init__(self, address: str) -> None:
        auth.secret()  # without the cluster secret every call would be refused: fail here, saying why
        self.address = address
        self.channel = authenticated_channel(address)
        self.stub = pb_grpc.ControllerStub(self.channel)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- one-shot calls ---------------------------------------------------------------------

    def register(self, info: pb.WorkerInfo, timeout_s: float = 60.0) -> pb.RegisterReply:
        """Register, retrying while the controller is unreachable (up to `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.stub.Register(pb.RegisterRequest(worker=info), timeout=RPC_TIMEOUT_S, wait_for_ready=True)
            except grpc.RpcError as e:
                if time.monotonic() > deadline or self._stop.is_set():
                    raise ConnectionError(f"controller at {self.address} unreachable: {e.code().name}") from None
                time.sleep(0.05)

    def ready(self, name: str, incarnation: int, experts: list[tuple[int, int]] = (), data_address: str = "") -> None:
        self.stub.Ready(
            pb.ReadyRequest(name=name, incarnation=incarnation, data_address=data_address,
                            experts=[pb.ExpertRef(layer=l, expert=e) for l, e in experts]),
            timeout=RPC_TIMEOUT_S, wait_for_ready=True,
        )

    def deregister(self, name: str, incarnation: int) -> None:
        try:
            self.stub.Deregister(pb.Fence(name=name, incarnation=incarnation), timeout=0.5)
        except grpc.RpcError:
            pass  # leaving anyway; the controller will notice the missing heartbeats

    def drain(self, name: str, incarnation: int) -> int | None:
        """Tell the controller this worker is leaving in a planned way; the routing epoch that no
        longer sends it new work where another copy can (None: the controller did not answer)."""
        try:
            return self.stub.Drain(pb.Fence(name=name, incarnation=incarnation), timeout=RPC_TIMEOUT_S).epoch
        except grpc.RpcError as e:
            log.warning("could not tell the controller that %s drains (%s); draining anyway", name, e.code().name)
            return None

    def report_failure(self, reporter: str, suspect: str, incarnation: int, reason: str, wait: bool = True) -> None:
        """Best effort and quick: a report that cannot be delivered is logged, never retried inline.
        `wait=False` returns at once (for I/O threads); the outcome is then only logged."""
        report = pb.FailureReport(reporter=reporter, suspect=suspect, suspect_incarnation=incarnation, reason=reason)
        if not wait:
            future = self.stub.ReportFailure.future(report, timeout=0.5)
            future.add_done_callback(
                lambda f: f.exception() and log.warning("could not report %s as failed: %s", suspect, f.exception()))
            return
        try:
            self.stub.ReportFailure(report, timeout=0.5)
        except grpc.RpcError as e:
            log.warning("could not report %s as failed (%s): %s", suspect, reason, e.code().name)

    def record_fault(self, record: pb.FaultRecord, timeout_s: float = RPC_TIMEOUT_S) -> None:
        """Report a fault the controller cannot see itself (raises grpc.RpcError: the caller retries)."""
        self.stub.RecordFault(record, timeout=timeout_s)

    def get_state(self, timeout_s: float = RPC_TIMEOUT_S) -> pb.ClusterState:
        return self.stub.GetState(pb.Empty(), timeout=timeout_s)

    # ---- background loops -------------------------------------------------------------------

    def start_heartbeats(
        self,
        name: str,
        incarnation: int,
        interval_s: float,
        load: Callable[[], dict[str, float]],
        on_fenced: Callable[[], None],
        fill: Callable[[pb.HeartbeatRequest], Callable[[pb.HeartbeatReply], None] | None] | None = None,
    ) -> None:
        """Send heartbeats every `interval_s` on a daemon thread; call `on_fenced` once if fenced. The
        load map also carries this process's authentication refusals (`auth_refused_<purpose>`), its CPU
        seconds (`cpu_s`) and its resident memory (`rss_bytes`).
        `fill` adds what an expert worker reports (expert token counts, the experts it holds) to each
        request and returns what to call with the reply once it arrives (None: nothing)."""

        def loop() -> None:
            fenced_reported = False
            while not self._stop.wait(interval_s):
                try:
                    request = pb.HeartbeatRequest(name=name, incarnation=incarnation,
                                                  load={**load(), **auth.refusal_counts(), **own_usage()})
                    on_reply = fill(request) if fill is not None else None
                    reply = self.stub.Heartbeat(request, timeout=RPC_TIMEOUT_S)
                except grpc.RpcError:
                    continue  # controller down or restarting: keep serving, keep trying
                except Exception:
                    log.exception("heartbeat failed")
                    continue
                if reply.fenced and not fenced_reported:
                    fenced_reported = True
                    on_fenced()
                elif not reply.fenced and on_reply is not None:
                    on_reply(reply)

        self._spawn(loop, f"heartbeat-{name}")

    def start_watch(self, name: str, on_state: Callable[[pb.ClusterState], None], refresh_s: float = 0.0) -> None:
        """Stream cluster states to `on_state` on a daemon thread, reconnecting when the stream breaks:
        one on every change, and with `refresh_s` at least that often (for the loads workers report)."""

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    for state in self.stub.Watch(pb.WatchRequest(name=name, refresh_s=refresh_s), wait_for_ready=True):
                        if self._stop.is_set():
                            return
                        on_state(state)
                except grpc.RpcError:
                    pass
                except Exception:
                    log.exception("cluster state handler failed")
                self._stop.wait(0.1)

        self._spawn(loop, f"watch-{name}")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        self.channel.close()


def worker_info(name: str, role: int, index: int, data_address: str = "", host: str = "127.0.0.1",
                node: str = "") -> pb.WorkerInfo:
    """`node`: the failure domain it runs on (WorkerConfig.node_name); "" means this host's name."""
    return pb.WorkerInfo(name=name, role=role, index=index, pid=os.getpid(), host=host, data_address=data_address,
                         started_at=time.time(), node=node or os.uname().nodename)

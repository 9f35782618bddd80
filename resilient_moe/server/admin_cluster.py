"""Admin endpoints that change the cluster's desired state: its roster and its expert placement.

    POST /admin/scale      {"attention_workers": N, "expert_workers": M} (either may be left out)
                           -> {"desired": {"attention_workers", "expert_workers"}, "detail"}
    POST /admin/rebalance  {} -> {"started": bool, "detail"}
    POST /admin/node-kill  {"node": ID} -> {"node", "killed"}   (chaos; served by api.py, which holds the launcher)

Both only change what the controller reconciles towards and answer at once; the controller's loop
does the work while the cluster serves (controller/state.py): new workers are started and loaded
before any routing changes, removed ones drain (an attention worker hands its requests over with
their KV, an expert worker finishes its parts once no routing table names it). `GET /admin/cluster`
shows the progress, every worker with its `state`. A rebalance places the experts by the load the
controller has observed (load_aware); with the spread policy there is nothing to rebalance, and the
answer says so.
"""

from __future__ import annotations

from typing import Any, Sequence

import grpc
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, model_validator

from resilient_moe.controller.client import ControllerClient
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.protocol import ERROR_RESPONSES, ApiError


class ScaleRequest(BaseModel):
    """The roster to reach; a role left out keeps its count."""

    model_config = ConfigDict(extra="forbid")

    attention_workers: int | None = Field(None, ge=1, le=1024)
    expert_workers: int | None = Field(None, ge=1, le=4096)

    @model_validator(mode="after")
    def _something(self) -> "ScaleRequest":
        if self.attention_workers is None and self.expert_workers is None:
            raise ValueError("give attention_workers, expert_workers or both")
        return self


class NodeKillRequest(BaseModel):
    """POST /admin/node-kill: the node to take down (its id as /admin/cluster shows it)."""

    model_config = ConfigDict(extra="forbid")

    node: str = Field(..., max_length=256)


class RebalanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")


def call_controller(client: ControllerClient, method: str, request, param: str | None = None):
    """One controller RPC; its refusal (INVALID_ARGUMENT) is a 400 naming `param`, anything else a 503."""
    try:
        return getattr(client.stub, method)(request, timeout=5.0)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise ApiError(400, e.details() or "invalid request", param=param) from None
        raise ApiError(503, f"the controller is unreachable ({e.code().name}); nothing was changed") from None


def cluster_router(controller: ControllerClient | str, dependencies: Sequence[Any] = ()) -> APIRouter:
    """The /admin/scale and /admin/rebalance endpoints over the controller at `controller` (a client or
    its address); `dependencies` guard them (the admin token check)."""
    client = ControllerClient(controller) if isinstance(controller, str) else controller
    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=list(dependencies))

    @router.post("/scale", responses=ERROR_RESPONSES)
    async def scale(body: ScaleRequest) -> dict[str, Any]:
        """Change how many attention and expert workers the cluster runs, while it serves."""
        request = pb.ScaleRequest(attention_workers=body.attention_workers or 0, expert_workers=body.expert_workers or 0)
        param = "attention_workers" if body.attention_workers is not None else "expert_workers"
        reply = await run_in_threadpool(call_controller, client, "Scale", request, param)
        return {"desired": {"attention_workers": reply.desired.attention_workers,
                            "expert_workers": reply.desired.expert_workers}, "detail": reply.detail}

    @router.post("/rebalance", responses=ERROR_RESPONSES)
    async def rebalance(body: RebalanceRequest | None = None) -> dict[str, Any]:
        """Place the experts by the load observed so far (load_aware): copies load first, then the
        routing table switches, then old copies are dropped."""
        reply = await run_in_threadpool(call_controller, client, "Rebalance", pb.Empty())
        return {"started": reply.started, "detail": reply.detail}

    return router

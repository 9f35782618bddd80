"""Admin endpoints that switch injected datapath faults on and off (chaos testing).

    GET  /admin/faults     {"faults": [fault...]}
    POST /admin/faults     {"add": [fault...], "remove": [id...], "clear": false} -> {"faults": [fault...]}

A fault: {"kind": "delay"|"drop"|"partition", "link": "aw-0->ew-1" ("*" for any side; a bare worker
name means all of its links), "delay_ms", "jitter_ms", "drop_rate", "retransmit_ms", "duration_s"
(none: until removed), "id" (optional)}. The answer lists the faults in force with their `id`, `link`
and `expires_at` (unix time). What each kind does is in resilient_moe/datapath/faults.py; the controller
keeps them (in memory only: a restarted controller starts with none) and every attention worker
applies those on its links. Include the router in the app with the admin guard:
`app.include_router(faults_router(cluster.client, [Depends(require_admin)]))`.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal, Sequence

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from resilient_moe.controller.client import ControllerClient
from resilient_moe.datapath.faults import LinkFault
from resilient_moe.errors import ConfigError
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.server.admin_cluster import call_controller
from resilient_moe.server.protocol import ERROR_RESPONSES, ApiError


class FaultSpec(BaseModel):
    """One datapath fault to switch on."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["delay", "drop", "partition"]
    link: str = Field("*->*", description="aw-0->ew-1; * for any side; a bare worker name: all of its links")
    delay_ms: float = Field(0.0, ge=0.0)
    jitter_ms: float = Field(0.0, ge=0.0, description="uniform extra delay in [0, jitter_ms] per frame")
    drop_rate: float = Field(0.0, ge=0.0, le=1.0, description="share of frames lost (resent after retransmit_ms)")
    retransmit_ms: float = Field(200.0, ge=0.0)
    duration_s: float | None = Field(None, gt=0.0, description="lifted after this long; none: until removed")
    id: str | None = Field(None, min_length=1, max_length=128)


class FaultUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    add: list[FaultSpec] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list, description="ids of faults to lift")
    clear: bool = Field(False, description="lift every fault first")


def fault_json(fault: LinkFault) -> dict[str, Any]:
    return {**fault.to_dict(), "link": fault.link}


def _ends(link: str, roles: dict[str, int], param: str) -> tuple[str, str]:
    """(source attention worker, target expert worker) of a link; "" = any."""
    if "->" in link:
        source, target = (part.strip() for part in link.split("->", 1))
        source, target = ("" if source == "*" else source), ("" if target == "*" else target)
    else:
        name = link.strip()
        if roles.get(name) == pb.ATTENTION:
            source, target = name, ""
        else:
            source, target = "", name
    for name, role, what in ((source, pb.ATTENTION, "attention"), (target, pb.EXPERT, "expert")):
        if name and roles.get(name) != role:
            known = ", ".join(sorted(n for n, r in roles.items() if r == role)) or "none"
            raise ApiError(400, f"{param}: {name!r} is not an {what} worker of this cluster ({what} workers: {known})",
                           param=param)
    return source, target


def faults_router(controller: ControllerClient | str, dependencies: Sequence[Any] = ()) -> APIRouter:
    """The /admin/faults endpoints over the controller at `controller` (a client or its address);
    `dependencies` guard them (the admin token check)."""
    client = ControllerClient(controller) if isinstance(controller, str) else controller
    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=list(dependencies))

    def call(method: str, request):
        return call_controller(client, method, request, param="add")

    @router.get("/faults", responses=ERROR_RESPONSES)
    async def list_faults() -> dict[str, Any]:
        """The injected datapath faults in force."""
        state = await run_in_threadpool(call, "GetState", pb.Empty())
        return {"faults": [fault_json(LinkFault.from_proto(f)) for f in state.faults]}

    @router.post("/faults", responses=ERROR_RESPONSES)
    async def set_faults(body: FaultUpdate) -> dict[str, Any]:
        """Switch datapath faults on (`add`) or off (`remove` by id, `clear` all)."""
        roles: dict[str, int] = {}
        if body.add:
            state = await run_in_threadpool(call, "GetState", pb.Empty())
            roles = {w.name: w.role for w in state.workers}
        now = time.time()
        add = []
        for i, spec in enumerate(body.add):
            source, target = _ends(spec.link, roles, f"add[{i}].link")
            try:
                add.append(LinkFault(
                    id=spec.id or f"fault-{secrets.token_hex(4)}", kind=spec.kind, source=source, target=target,
                    delay_ms=spec.delay_ms, jitter_ms=spec.jitter_ms, drop_rate=spec.drop_rate,
                    retransmit_ms=spec.retransmit_ms, expires_at=now + spec.duration_s if spec.duration_s else 0.0,
                ))
            except ConfigError as e:
                raise ApiError(400, f"add[{i}]: {e}", param=f"add[{i}]") from None
        update = pb.FaultUpdate(add=[f.to_proto(pb) for f in add], remove=body.remove, clear=body.clear)
        answer = await run_in_threadpool(call, "SetFaults", update)
        return {"faults": [fault_json(LinkFault.from_proto(f)) for f in answer.faults]}

    return router

"""The engine's executor for expert workers elsewhere: each micro-batch's routed-expert call goes
through the attention worker's forwarding engine (datapath/forwarding.py), which owns the links,
the parts and every failure of a peer. Frames carry host memory, so on a GPU the rows are staged
to pinned host memory here and the expert outputs staged back to the rows' device."""

from __future__ import annotations

import torch

from resilient_moe import staging
from resilient_moe.datapath.forwarding import Forwarder
from resilient_moe.engine.pipeline import ExpertCall, ExpertExecutor


class RemoteExperts(ExpertExecutor):
    """ExpertExecutor over a `Forwarder`."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self._devices: dict[int, torch.device] = {}  # micro-batch -> where its rows (and outputs) live

    def begin_step(self, step: int) -> None:
        self.forwarder.begin_step(step)

    def submit(self, micro_batch: int, call: ExpertCall) -> None:
        self._devices[micro_batch] = call.x.device
        self.forwarder.submit(micro_batch, call.layer, staging.to_host(call.x), call.expert_ids.cpu())

    def take(self, micro_batch: int) -> torch.Tensor | None:
        out = self.forwarder.take(micro_batch)  # [T, K, D] on the host, or None
        if out is None:
            return None
        return staging.to_device(out, self._devices.pop(micro_batch))

    def wait(self) -> None:
        self.forwarder.wait()

"""The engine's executor for expert workers elsewhere: each micro-batch's routed-expert call goes
through the attention worker's forwarding engine (datapath/forwarding.py), which owns the links,
the parts and every failure of a peer."""

from __future__ import annotations

import torch

from resilient_moe.datapath.forwarding import Forwarder
from resilient_moe.engine.pipeline import ExpertCall, ExpertExecutor


class RemoteExperts(ExpertExecutor):
    """ExpertExecutor over a `Forwarder`."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def begin_step(self, step: int) -> None:
        self.forwarder.begin_step(step)

    def submit(self, micro_batch: int, call: ExpertCall) -> None:
        self.forwarder.submit(micro_batch, call.layer, call.x, call.expert_ids)

    def take(self, micro_batch: int) -> torch.Tensor | None:
        return self.forwarder.take(micro_batch)

    def wait(self) -> None:
        self.forwarder.wait()

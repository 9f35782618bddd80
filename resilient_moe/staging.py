"""Host <-> device copies staged through pinned (page-locked) host memory.

Frames, rings and the KV store live in host memory; on a GPU the tensors they carry must cross
PCIe. A copy from pageable memory is staged by the driver through a bounce buffer and blocks the
host; from pinned memory it is one DMA transfer. These two helpers are the one place that decides
how a tensor crosses, so every caller (the expert side today; frames and KV checkpoints next) moves
data the same way. On the same device they return the tensor itself.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: pinned, then copied without blocking the host (the copy is ordered
    before any later work on the device's current stream, so kernels that use the result wait for it)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)  # the tensor itself when it is there already


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor copied into pinned host memory; returns once the copy has landed (the caller
    hands the bytes to a ring or a socket next, so they must be there)."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)  # synchronous: waits for the kernels that produce t, then one DMA transfer
    return out

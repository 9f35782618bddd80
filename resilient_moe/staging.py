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


class SideCopy:
    """Device tensors on their way to host memory, copied on a side stream so the caller never waits.

    The engine thread snapshots KV rows after a step and hands them to the checkpoint thread. On a GPU
    a synchronous copy would stall the engine until every queued kernel had run; instead the copy
    is queued on a second stream, ordered after the work that produced the rows (the side stream waits
    on the current one), into pinned memory, and `wait()` on the consuming thread blocks only that
    thread until the bytes have landed. Host tensors pass through untouched.
    """

    _streams: dict[torch.device, torch.cuda.Stream] = {}

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._event = None
        if not tensors or tensors[0].device.type != "cuda":
            self._host = tensors
            return
        device = tensors[0].device
        stream = SideCopy._streams.get(device)
        if stream is None:
            stream = SideCopy._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._host = []
            for t in tensors:
                out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                out.copy_(t, non_blocking=True)
                t.record_stream(stream)  # the caching allocator keeps t alive until the copy ran
                self._host.append(out)
            self._event = torch.cuda.Event()
            self._event.record(stream)

    def wait(self) -> list[torch.Tensor]:
        """The host copies, once they have landed."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host

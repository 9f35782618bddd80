"""Which cores each worker process of a host runs on (`cpu_affinity: auto`): a pure function.

Attention and expert workers each get cores of their own when the host has enough: an equal share,
contiguous (so a worker's threads share caches), attention workers first, the rest of the cores
(fewer than a share) to nobody. With fewer cores than workers, each gets one core, dealt round-robin,
so the load spreads evenly and no worker's threads migrate over every core. The controller, the KV
store and Redis are mostly idle and are not pinned. A replacement takes the cores of the worker it
replaces, never those of a worker that is serving.
"""

from __future__ import annotations


def cpu_plan(cores: list[int], workers: list[str]) -> dict[str, tuple[int, ...]]:
    """worker name -> the cores it runs on, for `workers` (attention and expert workers, in order)."""
    if not cores or not workers:
        return {}
    cores = sorted(cores)
    share = len(cores) // len(workers)
    if share == 0:
        return {name: (cores[i % len(cores)],) for i, name in enumerate(workers)}
    return {name: tuple(cores[i * share:(i + 1) * share]) for i, name in enumerate(workers)}

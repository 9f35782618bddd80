"""One decode step of this host's runtime, simulated: workers on shared cores, micro-batches in flight,
expert workers merging what waits for the same layer. Pure: values in, a step time out.

What it mirrors (engine/pipeline.py, workers/expert_worker.py, launch/cpus.py):
- an attention worker (AW) runs one micro-batch's attention at a time, the first one ready; it sends
  a frame to every expert worker (EW) and the micro-batch waits for all their replies; after the last
  layer of every micro-batch comes the step's own work (s0), then the next step;
- an EW takes every frame waiting, groups them by layer, computes each group as one round over the
  group's tokens (a group reads its experts' weights once), replying to its frames after each round;
- a core runs the jobs of its workers in processor sharing: k busy workers each get 1/k of it, slowed
  by `slowdown` when k > 1 (switches and caches: measured by the profile);
- a frame takes `latency` each way; a reply reaches an AW with micro-batches still in flight `lag`
  later (measured by the profile: the runtime's pipelined round trips are slower than its lone ones).

Two steps run and the last is timed (each step starts with every micro-batch at layer 0).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StepResult:
    """The simulated step: its time, and each core's busy share over it (the bottleneck's is near 1)."""

    step_s: float
    core_busy: dict[tuple, float]
    workers_on: dict[tuple, tuple[str, ...]]


def simulate_step(layers: int, m: int, batch_per_aw: float, attention: list[str], experts: list[str],
                  core_of: dict[str, tuple], t_attention: Callable[[str, float], float],
                  t_expert: Callable[[str, float], float], s0: float, latency: float, lag: float = 0.0,
                  slowdown: float = 1.0, steps: int = 2, start_at: dict[str, float] | None = None) -> StepResult:
    """`t_attention(aw, tokens)`, `t_expert(ew, tokens)`: work (core-seconds at full speed) of one
    micro-batch of `tokens` on that AW, one round over `tokens` on that EW."""
    b = batch_per_aw / m
    running: dict[str, list] = {}  # worker -> [work left, callback]
    timers: list = []
    order = itertools.count()
    now = 0.0
    busy_since: dict[tuple, float] = {}
    busy_total: dict[tuple, float] = {}
    aws = {a: {"ready": deque((i, 0) for i in range(m)), "waiting": {}, "done": 0, "began": 0.0, "steps": []}
           for a in attention}
    ews = {e: {"pending": [], "groups": deque()} for e in experts}
    per_core: dict[tuple, int] = {}

    def start(worker: str, work: float, done: Callable[[], None]) -> None:
        running[worker] = [work, done]
        core = core_of[worker]
        if per_core.get(core, 0) == 0:
            busy_since[core] = now
        per_core[core] = per_core.get(core, 0) + 1

    def finish(worker: str) -> Callable[[], None]:
        _, done = running.pop(worker)
        core = core_of[worker]
        per_core[core] -= 1
        if per_core[core] == 0:
            busy_total[core] = busy_total.get(core, 0.0) + now - busy_since.pop(core)
        return done

    def rate(worker: str) -> float:
        k = per_core[core_of[worker]]
        return 1.0 / (k * slowdown) if k > 1 else 1.0

    def later(delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(timers, (now + delay, next(order), fn))

    def aw_next(a: str) -> None:
        state = aws[a]
        if a in running or not state["ready"]:
            return
        mb, layer = state["ready"].popleft()

        def sent() -> None:
            state["waiting"][(mb, layer)] = len(experts)
            for e in experts:
                later(latency, lambda e=e: ew_take(e, a, mb, layer))
            aw_next(a)

        start(a, t_attention(a, b), sent)

    def aw_reply(a: str, mb: int, layer: int) -> None:
        state = aws[a]
        state["waiting"][(mb, layer)] -= 1
        if state["waiting"][(mb, layer)]:
            return
        del state["waiting"][(mb, layer)]
        if layer + 1 < layers:
            state["ready"].append((mb, layer + 1))
            aw_next(a)
            return
        state["done"] += 1
        if state["done"] < m:
            return

        def stepped() -> None:
            state["steps"].append(now - state["began"])
            state["began"], state["done"] = now, 0
            if len(state["steps"]) < steps:
                state["ready"].extend((i, 0) for i in range(m))
                aw_next(a)

        start(a, s0, stepped)

    def ew_take(e: str, a: str, mb: int, layer: int) -> None:
        ews[e]["pending"].append((a, mb, layer))
        ew_next(e)

    def ew_next(e: str) -> None:
        state = ews[e]
        if e in running:
            return
        if not state["groups"]:
            if not state["pending"]:
                return
            by_layer: dict[int, list] = {}
            for frame in state["pending"]:
                by_layer.setdefault(frame[2], []).append(frame)
            state["groups"].extend(by_layer.values())
            state["pending"] = []
        group = state["groups"].popleft()

        def answered() -> None:
            for a, mb, layer in group:
                delay = latency + (lag if m > 1 else 0.0)
                later(delay, lambda a=a, mb=mb, layer=layer: aw_reply(a, mb, layer))
            ew_next(e)

        start(e, t_expert(e, len(group) * b), answered)

    for a in attention:
        if start_at and start_at.get(a):
            aws[a]["began"] = start_at[a]
            later(start_at[a], lambda a=a: aw_next(a))
        else:
            aw_next(a)
    for _ in range(1_000_000):
        if all(len(aws[a]["steps"]) >= steps for a in attention):
            break
        first, who = None, None
        for worker, (left, _) in running.items():
            dt = left / rate(worker)
            if first is None or dt < first:
                first, who = dt, worker
        timer = timers[0][0] - now if timers else None
        if first is None and timer is None:
            raise RuntimeError("simulated step stalled")  # cannot happen: every frame is answered
        take_timer = timer is not None and (first is None or timer <= first)
        dt = timer if take_timer else first
        rates = {w: rate(w) for w in running}
        for worker in running:
            running[worker][0] -= rates[worker] * dt
        now += dt
        if take_timer:
            heapq.heappop(timers)[2]()
        else:
            finish(who)()
    tail = [s for a in attention for s in aws[a]["steps"][1:] or aws[a]["steps"]]
    step = sum(tail) / len(tail)
    for core in list(busy_since):  # still busy at the end
        busy_total[core] = busy_total.get(core, 0.0) + now - busy_since[core]
    workers_on: dict[tuple, list[str]] = {}
    for w, core in core_of.items():
        workers_on.setdefault(core, []).append(w)
    # the busy share over the whole run stands for the last step's (the steps are alike)
    share = {core: min(1.0, busy_total.get(core, 0.0) / now) for core in workers_on}
    return StepResult(step, share, {c: tuple(ws) for c, ws in workers_on.items()})

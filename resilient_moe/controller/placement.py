"""Expert placement: pure functions from cluster shape to who holds which expert.

No state, no I/O: the controller calls these and publishes the result. An expert worker holds the
same set of experts for every sparse layer unless a policy says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from resilient_moe.datapath.ert import RoutingTable


def primary_placement(num_experts: int, workers: list[str], policy: str = "contiguous") -> dict[int, str]:
    """expert -> the expert worker that holds it as primary.

    contiguous: worker i takes a run of consecutive experts (sizes differ by at most one, the first
    workers taking the larger runs: 8 experts over 3 workers -> 3, 3, 2).
    round_robin: expert e goes to worker e mod len(workers).
    """
    if not workers:
        raise ValueError("placement needs at least one expert worker")
    if num_experts < len(workers):
        raise ValueError(f"{len(workers)} expert workers for {num_experts} experts: some would hold nothing")
    if policy == "round_robin":
        return {e: workers[e % len(workers)] for e in range(num_experts)}
    if policy != "contiguous":
        raise ValueError(f"unknown placement policy {policy!r}")
    base, extra = divmod(num_experts, len(workers))
    placement = {}
    expert = 0
    for i, worker in enumerate(workers):
        for _ in range(base + (i < extra)):
            placement[expert] = worker
            expert += 1
    return placement


def experts_of(placement: dict[int, str], worker: str) -> list[int]:
    """phy2log: the experts a worker holds as primary."""
    return sorted(e for e, w in placement.items() if w == worker)


def routing_table(
    epoch: int,
    sparse_layers: list[int],
    num_layers: int,
    num_experts: int,
    primaries: dict[int, str],
    shadows: dict[tuple[int, int], list[str]] | None = None,
    dead: set[str] = frozenset(),
) -> RoutingTable:
    """The ERT: for each (layer, expert) the primary then its shadows, leaving out `dead` workers (so a
    shadow of a dead primary is promoted to the front). Dense layers route nowhere."""
    shadows = shadows or {}
    sparse = set(sparse_layers)
    entries = []
    for layer in range(num_layers):
        for expert in range(num_experts):
            if layer in sparse:
                primary = primaries[expert]
                chain = [primary, *[w for w in shadows.get((layer, expert), []) if w != primary]]
                entries.append(tuple(w for w in chain if w not in dead))
            else:
                entries.append(())
    return RoutingTable(epoch, num_layers, num_experts, tuple(entries))


ExpertKey = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class ShadowPlan:
    """Spare copies: (layer, expert) -> workers holding a shadow, and what is left unprotected."""

    shadows: dict[ExpertKey, list[str]]
    unprotected: list[ExpertKey]  # no shadow at all: lost with its primary

    def held_by(self, worker: str) -> list[ExpertKey]:
        return sorted(k for k, ws in self.shadows.items() if worker in ws)


def shadow_placement(
    primaries: dict[int, str],
    workers: list[str],
    sparse_layers: list[int],
    slots_per_layer: int | dict[str, int],
    policy: str = "spread",
    load: dict[ExpertKey, float] | None = None,
) -> ShadowPlan:
    """Place shadow copies of every (layer, expert) on workers other than its primary.

    `slots_per_layer`: how many shadow experts each worker can hold per sparse layer (its spare memory
    divided by the size of one expert), the same for all workers or per worker.

    spread: one shadow per expert while slots last, on the worker with the most free slots, ties broken
    by distance from the primary in `workers` order, so the experts of any one worker land on different
    workers and a single loss spreads its load over the survivors. With enough slots, losing any one
    worker leaves every expert served.

    load_aware (EPLB-style): first the spread pass, then every remaining slot goes to the expert with
    the highest load per copy (from `load`, e.g. tokens routed to it), on the least-filled worker that
    does not hold it yet: hot experts get more copies.
    """
    if policy not in ("spread", "load_aware"):
        raise ValueError(f"unknown shadow policy {policy!r} (spread or load_aware)")
    if policy == "load_aware" and load is None:
        raise ValueError("the load_aware shadow policy needs the per-expert load")
    capacity = slots_per_layer if isinstance(slots_per_layer, dict) else {w: slots_per_layer for w in workers}
    order = {w: i for i, w in enumerate(workers)}
    shadows: dict[ExpertKey, list[str]] = {}
    for layer in sparse_layers:
        free = {w: capacity.get(w, 0) for w in workers}
        # Step 1: one shadow per expert, spread.
        for expert in sorted(primaries):
            primary = primaries[expert]
            options = [w for w in workers if w != primary and free[w] > 0]
            if not options:
                shadows[(layer, expert)] = []
                continue
            distance = {w: (order[w] - order[primary]) % len(workers) for w in options}
            choice = max(options, key=lambda w: (free[w], -distance[w]))
            shadows[(layer, expert)] = [choice]
            free[choice] -= 1
        # Step 2 (load_aware): remaining slots to the hottest experts per copy.
        if policy == "load_aware":
            assert load is not None
            while True:
                candidates = [
                    e for e in primaries
                    if any(free[w] > 0 and w != primaries[e] and w not in shadows[(layer, e)] for w in workers)
                ]
                if not candidates:
                    break
                hottest = max(candidates, key=lambda e: (load.get((layer, e), 0.0) / (1 + len(shadows[(layer, e)])), -e))
                if load.get((layer, hottest), 0.0) <= 0:
                    break
                options = [w for w in workers
                           if free[w] > 0 and w != primaries[hottest] and w not in shadows[(layer, hottest)]]
                choice = max(options, key=lambda w: (free[w], -order[w]))
                shadows[(layer, hottest)].append(choice)
                free[choice] -= 1
    unprotected = sorted(k for k, ws in shadows.items() if not ws)
    return ShadowPlan(shadows, unprotected)


def served_after_loss(primaries: dict[int, str], plan: ShadowPlan, lost: set[str]) -> list[ExpertKey]:
    """(layer, expert) pairs left with no live copy if the workers in `lost` die."""
    return sorted(
        key for key, ws in plan.shadows.items()
        if primaries[key[1]] in lost and all(w in lost for w in ws)
    )

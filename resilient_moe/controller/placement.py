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

    First pass (both policies): one shadow per expert while slots last, on the worker with the most
    free slots, ties broken by distance from the primary in `workers` order, so the experts of any one
    worker land on different workers and a single loss spreads its load over the survivors. With
    enough slots, losing any one worker leaves every expert served.

    Then every remaining slot goes to the expert with the highest load per copy, on the least-filled
    worker that does not hold it yet. spread: all experts weigh the same, so surplus slots give every
    expert a second copy in turn (surviving two losses when the budget allows). load_aware
    (EPLB-style): the weight is `load` (e.g. tokens routed to each expert): hot experts get more copies.
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
        # Step 2: remaining slots to the hottest experts per copy.
        weight = load if policy == "load_aware" else {(layer, e): 1.0 for e in primaries}
        assert weight is not None
        def options(e: int) -> list[str]:
            return [w for w in workers if free[w] > 0 and w != primaries[e] and w not in shadows[(layer, e)]]

        def place(e: int) -> bool:
            """Add a copy of `e` on the freest allowed worker; when none has room, make room by moving
            another expert's shadow from an allowed full worker to a free one (one augmenting step)."""
            primary = primaries[e]
            allowed = options(e)
            if allowed:
                choice = max(allowed, key=lambda w: (free[w], -((order[w] - order[primary]) % len(workers))))
                shadows[(layer, e)].append(choice)
                free[choice] -= 1
                return True
            for w in workers:
                if w == primary or w in shadows[(layer, e)]:
                    continue
                for other in sorted(primaries):  # first copies stay where the spread pass put them
                    if w in shadows[(layer, other)][1:] and (room := options(other)):
                        target = max(room, key=lambda x: free[x])
                        shadows[(layer, other)][shadows[(layer, other)].index(w)] = target
                        free[target] -= 1
                        shadows[(layer, e)].append(w)
                        return True
            return False

        stuck: set[int] = set()
        while True:
            candidates = [e for e in primaries if e not in stuck and weight.get((layer, e), 0.0) > 0]
            if not candidates:
                break
            hottest = max(candidates, key=lambda e: (weight[(layer, e)] / (1 + len(shadows[(layer, e)])), -e))
            if not place(hottest):
                stuck.add(hottest)
    unprotected = sorted(k for k, ws in shadows.items() if not ws)
    return ShadowPlan(shadows, unprotected)


def served_after_loss(primaries: dict[int, str], plan: ShadowPlan, lost: set[str]) -> list[ExpertKey]:
    """(layer, expert) pairs left with no live copy if the workers in `lost` die."""
    return sorted(
        key for key, ws in plan.shadows.items()
        if primaries[key[1]] in lost and all(w in lost for w in ws)
    )

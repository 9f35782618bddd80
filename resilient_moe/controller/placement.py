"""Expert placement: pure functions from cluster shape (and observed load) to who holds which expert.

No state, no I/O: the controller calls these and publishes the result. A `Placement` names, for every
(layer, expert) of the sparse layers, the expert workers holding a copy and the share of the expert's
tokens each copy takes. Two policies make one:

- spread: a primary per expert (the same for every layer) and shadow copies spread over the other
  workers; the primary takes every token, the shadows stand by for a failure.
- load_aware (after DeepSeek's EPLB): hot experts get more copies and the copies are packed so that
  each worker's expected load is balanced; every copy takes an equal share of its expert's tokens.
  It needs observed load; until there is some, the controller plans with spread.

Names follow EPLB where they match: `experts_of` is phy2log for one worker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from resilient_moe.datapath.routing_table import RoutingTable

ExpertKey = tuple[int, int]  # (layer, expert)
STAY_BONUS = 0.25  # a copy stays on its worker unless moving it balances better by a quarter of its load
POLICIES = ("spread", "load_aware")


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


@dataclass(frozen=True)
class Placement:
    """Copies of every (layer, expert) of the sparse layers and each copy's share of its tokens.

    copies[key] lists the holders, the primary first; shares[key] has one share per holder, summing
    to 1. `workers` are the expert workers it was planned for."""

    workers: tuple[str, ...]
    copies: Mapping[ExpertKey, tuple[str, ...]]
    shares: Mapping[ExpertKey, tuple[float, ...]]

    def held_by(self, worker: str) -> list[ExpertKey]:
        """Every (layer, expert) `worker` holds a copy of (its primaries and its shadows)."""
        return sorted(k for k, ws in self.copies.items() if worker in ws)

    @property
    def unprotected(self) -> list[ExpertKey]:
        """(layer, expert) pairs with a single copy: lost with their worker."""
        return sorted(k for k, ws in self.copies.items() if len(ws) < 2)

    def worker_loads(self, load: Mapping[ExpertKey, float]) -> dict[str, float]:
        """Expected tokens per worker when each expert sees `load` and its copies take their shares."""
        out = dict.fromkeys(self.workers, 0.0)
        for key, holders in self.copies.items():
            for w, share in zip(holders, self.shares[key]):
                out[w] = out.get(w, 0.0) + load.get(key, 0.0) * share
        return out

    def to_json(self) -> dict:
        return {"workers": list(self.workers),
                "entries": [[layer, expert, list(ws), list(self.shares[(layer, expert)])]
                            for (layer, expert), ws in sorted(self.copies.items())]}

    @classmethod
    def from_json(cls, data: dict) -> "Placement":
        copies, shares = {}, {}
        for layer, expert, ws, ss in data["entries"]:
            copies[(int(layer), int(expert))] = tuple(str(w) for w in ws)
            shares[(int(layer), int(expert))] = tuple(float(s) for s in ss)
        return cls(tuple(str(w) for w in data["workers"]), copies, shares)


def imbalance(placement: Placement, load: Mapping[ExpertKey, float]) -> float:
    """Max over mean of the expected per-worker load (1.0: perfectly even, or no load)."""
    loads = placement.worker_loads(load)
    mean = sum(loads.values()) / max(1, len(loads))
    return max(loads.values()) / mean if mean > 0 else 1.0


def plan_placement(
    policy: str,
    num_experts: int,
    workers: list[str],
    sparse_layers: list[int],
    shadow_slots: int,
    primary_policy: str = "contiguous",
    load: Mapping[ExpertKey, float] | None = None,
    current: Placement | None = None,
    resilience: bool = True,
    node_of: Mapping[str, str] | None = None,
) -> Placement:
    """The placement of `policy` for `workers`. `shadow_slots`: copies beyond its primaries each worker
    has room for per sparse layer. load_aware without `load` plans with spread (nothing observed yet);
    `current` lets load_aware keep copies where they are when that costs little balance. `node_of`
    (worker -> node): spread puts an expert's copies on different nodes where it can."""
    if policy not in POLICIES:
        raise ValueError(f"unknown shadow policy {policy!r} (spread or load_aware)")
    if policy == "spread" or load is None:
        return spread_placement(num_experts, workers, sparse_layers, shadow_slots, primary_policy, node_of)
    capacity = -(-num_experts // len(workers)) + shadow_slots
    return load_aware_placement(load, num_experts, workers, sparse_layers, capacity,
                                min_copies=2 if resilience else 1, current=current)


def spread_placement(num_experts: int, workers: list[str], sparse_layers: list[int], shadow_slots: int,
                     primary_policy: str = "contiguous", node_of: Mapping[str, str] | None = None) -> Placement:
    """Primaries by `primary_policy`, shadows by `shadow_placement`; the primary takes every token."""
    primaries = primary_placement(num_experts, workers, primary_policy)
    plan = shadow_placement(primaries, workers, sparse_layers, shadow_slots, node_of)
    copies = {key: (primaries[key[1]], *ws) for key, ws in plan.shadows.items()}
    shares = {key: tuple(1.0 if i == 0 else 0.0 for i in range(len(ws))) for key, ws in copies.items()}
    return Placement(tuple(workers), copies, shares)


def load_aware_placement(
    load: Mapping[ExpertKey, float],
    num_experts: int,
    workers: list[str],
    sparse_layers: list[int],
    capacity: int,
    min_copies: int = 2,
    current: Placement | None = None,
) -> Placement:
    """EPLB-style: replicate hot experts, then pack the copies so each worker's load is even.

    Per sparse layer, `capacity` copies fit on each worker. Step 1: active copies, those that take
    tokens: an expert gets as many as its load needs for no copy to carry more than an even share of
    one worker's load (a cold expert keeps one, so its rows are not cut into smaller GEMMs for nothing).
    Step 2: standby copies, for failures only: up to `min_copies` copies of every expert while room
    lasts, then every remaining slot to the expert with the most load per copy. Step 3: pack the
    active copies heaviest first, each on the worker with the least load so far that has room and
    holds no copy of that expert yet (copies of one expert on distinct workers), then the standby
    copies on the freest such worker. A copy that `current` already has on a worker stays there
    unless that costs more than STAY_BONUS of its load, so a rebalance moves few experts. Active
    copies share their expert's tokens equally (the first is its primary); standby copies take none
    until the active ones are lost. A layer with no observed load weighs all its experts the same."""
    if num_experts > capacity * len(workers):
        raise ValueError(f"{len(workers)} expert workers with room for {capacity} experts each cannot hold "
                         f"{num_experts} experts")
    order = {w: i for i, w in enumerate(workers)}
    room_total = capacity * len(workers)
    copies: dict[ExpertKey, tuple[str, ...]] = {}
    shares: dict[ExpertKey, tuple[float, ...]] = {}
    for layer in sparse_layers:
        weight = [max(0.0, float(load.get((layer, e), 0.0))) for e in range(num_experts)]
        if sum(weight) <= 0:
            weight = [1.0] * num_experts
        total = sum(weight)
        # Step 1: active copies.
        active = [min(len(workers), max(1, math.ceil(weight[e] * len(workers) / total - 1e-9)))
                  for e in range(num_experts)]
        while sum(active) > room_total:  # not enough room: the least loaded copies go first
            e = min((e for e in range(num_experts) if active[e] > 1), key=lambda e: (weight[e] / active[e], e))
            active[e] -= 1
        # Step 2: standby copies.
        count = list(active)
        room = room_total - sum(count)
        for e in sorted(range(num_experts), key=lambda e: (-weight[e], e)):
            take = max(0, min(min(min_copies, len(workers)) - count[e], room))
            count[e] += take
            room -= take
        while room > 0:
            growable = [e for e in range(num_experts) if count[e] < len(workers)]
            if not growable:
                break
            hottest = max(growable, key=lambda e: (weight[e] / count[e], -e))
            count[hottest] += 1
            room -= 1
        # Step 3: pack, active copies first (experts with the most first, heaviest first among equals).
        worker_load = dict.fromkeys(workers, 0.0)
        free = dict.fromkeys(workers, capacity)
        holders: dict[int, list[str]] = {e: [] for e in range(num_experts)}
        taking: dict[int, int] = dict.fromkeys(range(num_experts), 0)  # active copies placed
        items = sorted(((active[e], weight[e] / active[e], e) for e in range(num_experts) for _ in range(active[e])),
                       key=lambda item: (-item[0], -item[1], item[2]))
        items += sorted(((0, 0.0, e) for e in range(num_experts) for _ in range(count[e] - active[e])),
                        key=lambda item: (-weight[item[2]], item[2]))
        for n_active, w_copy, e in items:
            options = [w for w in workers if free[w] > 0 and w not in holders[e]]
            if not options:
                continue  # no room left that keeps copies apart: this expert gets one copy fewer
            before = set(current.copies.get((layer, e), ())) if current is not None else set()
            if n_active:
                choice = min(options, key=lambda w: (worker_load[w] - (STAY_BONUS * w_copy if w in before else 0.0),
                                                     -free[w], order[w]))
                taking[e] += 1
            else:
                choice = min(options, key=lambda w: (w not in before, -free[w], order[w]))
            holders[e].append(choice)
            free[choice] -= 1
            worker_load[choice] += w_copy
        for e in range(num_experts):
            copies[(layer, e)] = tuple(holders[e])
            shares[(layer, e)] = tuple(1.0 / taking[e] if i < taking[e] else 0.0 for i in range(len(holders[e])))
    return Placement(tuple(workers), copies, shares)


def routing_table(
    epoch: int,
    sparse_layers: list[int],
    num_layers: int,
    num_experts: int,
    placement: Placement,
    dead: set[str] = frozenset(),
    draining: set[str] = frozenset(),
) -> RoutingTable:
    """The ERT: for each (layer, expert) its copies with their shares, leaving out `dead` workers (so a
    shadow of a dead primary is promoted to the front) and `draining` ones wherever another copy is
    left (a draining worker gets no new work it can be spared). Dense layers route nowhere."""
    sparse = set(sparse_layers)
    entries: list[tuple[str, ...]] = []
    shares: list[tuple[float, ...]] = []
    for layer in range(num_layers):
        for expert in range(num_experts):
            if layer not in sparse:
                entries.append(())
                shares.append(())
                continue
            pairs = [(w, s) for w, s in zip(placement.copies[(layer, expert)], placement.shares[(layer, expert)])
                     if w not in dead]
            kept = [(w, s) for w, s in pairs if w not in draining]
            pairs = kept or pairs
            entries.append(tuple(w for w, _ in pairs))
            shares.append(tuple(s for _, s in pairs))
    return RoutingTable(epoch, num_layers, num_experts, tuple(entries), tuple(shares))


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
    node_of: Mapping[str, str] | None = None,
) -> ShadowPlan:
    """Place shadow copies of every (layer, expert) on workers other than its primary (spread).

    `slots_per_layer`: how many shadow experts each worker can hold per sparse layer (its spare memory
    divided by the size of one expert), the same for all workers or per worker.

    First pass: one shadow per expert while slots last, on the worker with the most free slots, ties
    broken by distance from the primary in `workers` order, so the experts of any one worker land on
    different workers and a single loss spreads its load over the survivors. With enough slots,
    losing any one worker leaves every expert served.

    Then every remaining slot gives an expert with the fewest copies another one, on the least-filled
    worker that does not hold it yet: surplus slots give every expert a second shadow in turn
    (surviving two losses when the budget allows).

    `node_of` (worker -> node; workers on one node fail together): a copy goes first to a worker on a
    node that holds no copy of that expert yet, so where the slots allow, losing any one node leaves
    every expert served (`unprotected_by_node` says what a node's loss would leave without a copy).
    """
    capacity = slots_per_layer if isinstance(slots_per_layer, dict) else {w: slots_per_layer for w in workers}
    order = {w: i for i, w in enumerate(workers)}
    node = {w: (node_of or {}).get(w, w) for w in workers}  # no node given: every worker its own

    def new_node(w: str, holders: list[str]) -> bool:
        return all(node[w] != node[h] for h in holders)

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
            choice = max(options, key=lambda w: (new_node(w, [primary]), free[w], -distance[w]))
            shadows[(layer, expert)] = [choice]
            free[choice] -= 1

        # Step 2: remaining slots to the experts with the fewest copies.
        def options(e: int) -> list[str]:
            return [w for w in workers if free[w] > 0 and w != primaries[e] and w not in shadows[(layer, e)]]

        def place(e: int) -> bool:
            """Add a copy of `e` on the freest allowed worker; when none has room, make room by moving
            another expert's shadow from an allowed full worker to a free one (one augmenting step)."""
            primary = primaries[e]
            allowed = options(e)
            if allowed:
                holders = [primary, *shadows[(layer, e)]]
                choice = max(allowed, key=lambda w: (new_node(w, holders), free[w],
                                                     -((order[w] - order[primary]) % len(workers))))
                shadows[(layer, e)].append(choice)
                free[choice] -= 1
                return True
            for w in workers:
                if w == primary or w in shadows[(layer, e)]:
                    continue
                for other in sorted(primaries):  # first copies stay where the first pass put them
                    if w in shadows[(layer, other)][1:] and (room := options(other)):
                        target = max(room, key=lambda x: free[x])
                        shadows[(layer, other)][shadows[(layer, other)].index(w)] = target
                        free[target] -= 1
                        shadows[(layer, e)].append(w)
                        return True
            return False

        stuck: set[int] = set()
        while True:
            candidates = [e for e in primaries if e not in stuck]
            if not candidates:
                break
            fewest = min(candidates, key=lambda e: (len(shadows[(layer, e)]), e))
            if not place(fewest):
                stuck.add(fewest)
    unprotected = sorted(k for k, ws in shadows.items() if not ws)
    return ShadowPlan(shadows, unprotected)


def unprotected_by_node(copies: Mapping[ExpertKey, Sequence[str]], node_of: Mapping[str, str]) -> dict[str, list[ExpertKey]]:
    """node -> the (layer, expert) pairs that losing that node would leave with no copy: those whose
    every live copy (`copies`, e.g. the routing table's candidates) sits on it. Every node that holds
    a copy of anything is a key (an empty list: its loss leaves every expert served). A worker missing
    from `node_of` counts as a node of its own."""
    out: dict[str, list[ExpertKey]] = {}
    for key, holders in sorted(copies.items()):
        nodes = {node_of.get(w, w) for w in holders}
        for n in nodes:
            out.setdefault(n, [])
        if len(nodes) == 1:
            out[nodes.pop()].append(key)
    return out


def served_after_loss(primaries: dict[int, str], plan: ShadowPlan, lost: set[str]) -> list[ExpertKey]:
    """(layer, expert) pairs left with no live copy if the workers in `lost` die."""
    return sorted(
        key for key, ws in plan.shadows.items()
        if primaries[key[1]] in lost and all(w in lost for w in ws)
    )


def default_shadow_slots(num_experts: int, num_workers: int, resilience: bool) -> int:
    """Shadow slots per worker per layer with no memory budget given: one shadow copy of every expert."""
    if not resilience or num_workers < 2:
        return 0
    return math.ceil(num_experts / (num_workers - 1))


@dataclass(frozen=True)
class AttentionLoad:
    """What the placement of requests knows of one attention worker."""

    tokens: float  # tokens in flight there (prompt + generated, running and waiting): what its steps cost
    kv_free: float  # share of its KV cache free (0-1)
    requests: float = 0.0  # requests running and waiting there
    seats: float = float("inf")  # requests it runs at once (engine.max_num_seqs)


PREFIX_SLACK_REQUESTS = 2  # requests more than the least loaded choice a prefix-sharing worker may have


def choose_attention_worker(loads: Mapping[str, AttentionLoad], shared_prefix: Mapping[str, int] | None = None
                            ) -> str | None:
    """Where a new request (or one moved off a dead or draining worker) goes: a worker with a free seat
    first (a request sent to a full one waits although another could run it now), then the fewest
    tokens in flight (one 4k-token request costs every step of its worker as much as hundreds of
    short ones), then the most free KV cache, then by name. Moving several requests one by one, each
    counted where it went, spreads them over the adopters.

    `shared_prefix`: tokens of the request's prompt that each worker's recent prompts share (its prefix
    cache likely holds their KV). A worker with a free seat, within PREFIX_SLACK_REQUESTS requests of
    that choice, that shares a longer prefix than it goes instead (the longest, then by name): reusing
    those blocks saves their prefill, and the imbalance stays a request or two."""
    if not loads:
        return None
    best = min(sorted(loads), key=lambda name: (loads[name].requests >= loads[name].seats, loads[name].tokens,
                                                 -loads[name].kv_free))
    if not shared_prefix:
        return best
    near = [n for n in sorted(loads) if loads[n].requests < loads[n].seats
            and loads[n].requests <= loads[best].requests + PREFIX_SLACK_REQUESTS
            and shared_prefix.get(n, 0) > shared_prefix.get(best, 0)]
    return max(near, key=lambda n: shared_prefix[n]) if near else best

"""Routes kept current in place equal a full rebuild, for any sequence of suspect / trust / link / fence.

`reference_routes` is the rule written out one entry at a time (the form the routing table had before
it was vectorized); `LiveRoutes.update` recomputes only the entries naming a worker whose state
changed, with tensor operations. Hypothesis draws tables (copies in any order, shares or none,
shares of zero, entries with no copy) and event sequences, and after every event the updated routes
must equal both a fresh `LiveRoutes` and the reference, bit for bit, and send every row where the
reference sends it.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_moe.datapath.routing_table import LiveRoutes, Routes, RoutingTable

WORKERS = ("ew-0", "ew-1", "ew-2", "ew-3")
USABLE, SUSPECT, GONE = LiveRoutes.USABLE, LiveRoutes.SUSPECT, LiveRoutes.GONE


def reference_routes(table: RoutingTable, dead: set[str]) -> Routes:
    """The rule, entry by entry: live copies split the shares; none with a share: the first live one takes all."""
    workers = table.workers
    position = {w: i for i, w in enumerate(workers)}
    width = max(1, max((len(c) for c in table.candidates), default=1))
    index = torch.full((table.num_layers, table.num_experts, width), -1, dtype=torch.long)
    bound = torch.full((table.num_layers, table.num_experts, width), float("inf"))
    for i, entry in enumerate(table.candidates):
        layer, expert = divmod(i, table.num_experts)
        live = [(w, s) for w, s in zip(entry, table.shares_of(layer, expert)) if w not in dead]
        if not live:
            continue
        total = sum(s for _, s in live)
        if total <= 0:
            live, total = [(live[0][0], 1.0)], 1.0
        live = [(w, s) for w, s in live if s > 0]
        cumulative = 0.0
        for j, (w, s) in enumerate(live):
            cumulative += s / total
            index[layer, expert, j] = position[w]
            bound[layer, expert, j] = cumulative
        bound[layer, expert, len(live) - 1] = float("inf")
    return Routes(index, bound)


def reference_live(table: RoutingTable, states: dict[str, int]) -> Routes:
    """Suspects are left out, except for experts that have no other copy left."""
    gone = {w for w, s in states.items() if s == GONE}
    suspects = {w for w, s in states.items() if s == SUSPECT}
    routes = reference_routes(table, gone | suspects)
    if not suspects:
        return routes
    fallback = reference_routes(table, gone)
    missing = routes.index[..., :1] < 0
    return Routes(torch.where(missing, fallback.index, routes.index), torch.where(missing, fallback.bound, routes.bound))


@st.composite
def tables(draw) -> RoutingTable:
    layers, experts = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    candidates, shares = [], []
    for _ in range(layers * experts):
        entry = tuple(draw(st.permutations(WORKERS))[:draw(st.integers(0, 3))])
        candidates.append(entry)
        shares.append(tuple(draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1 / 3])) for _ in entry))
    if not any(candidates):
        candidates[0] = ("ew-0",)
        shares[0] = (1.0,)
    with_shares = draw(st.booleans())
    return RoutingTable(1, layers, experts, tuple(candidates), tuple(shares) if with_shares else ())


events = st.lists(st.tuples(st.sampled_from(["suspect", "trust", "link", "fence"]), st.sampled_from(WORKERS)),
                  max_size=25)


@settings(max_examples=150, deadline=None)
@given(tables(), events)
def test_updates_in_place_equal_a_full_rebuild(table, sequence):
    states: dict[str, int] = {}
    live = LiveRoutes(table, states)
    for event, worker in sequence:
        if event == "suspect" and states.get(worker, USABLE) == USABLE:
            states[worker] = SUSPECT
        elif event == "trust" and states.get(worker) == SUSPECT:
            del states[worker]
        elif event == "link":
            states.pop(worker, None)  # a new incarnation's link: usable again
        elif event == "fence":
            states[worker] = GONE
        live.update(dict(states))
        expected = reference_live(table, {w: s for w, s in states.items() if w in table.workers})
        rebuilt = LiveRoutes(table, dict(states)).routes
        for routes in (live.routes, rebuilt):
            assert torch.equal(routes.index, expected.index), (event, worker, states)
            assert torch.equal(routes.bound, expected.bound), (event, worker, states)
        rows = torch.arange(table.num_experts).repeat(5)  # five rows of every expert
        for layer in range(table.num_layers):
            assert torch.equal(live.routes.destinations(layer, rows), expected.destinations(layer, rows))


def test_only_the_entries_naming_a_changed_worker_are_recomputed():
    table = RoutingTable(1, 2, 4, (("ew-0", "ew-1"), ("ew-1",), ("ew-2", "ew-3"), ("ew-3",)) * 2)
    live = LiveRoutes(table)
    assert live.update({}) == 0
    assert live.update({"ew-1": SUSPECT}) == 4, "two entries per layer name ew-1"
    assert live.routes.first()[0].tolist() == [0, 1, 2, 3], "ew-1 stays the last copy of expert 1: still used"
    assert live.update({"ew-1": GONE, "ew-3": GONE}) == 8
    assert live.routes.first()[0].tolist() == [0, -1, 2, -1]
    avoid = live.with_gone({"ew-2"})
    assert avoid.first()[0].tolist() == [0, -1, -1, -1] and live.routes.first()[0].tolist() == [0, -1, 2, -1]

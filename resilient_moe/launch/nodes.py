"""Which node each worker runs on: pure functions, the Ray launcher's policy (tested without Ray).

Nodes are failure domains (DESIGN.md): no node should hold every attention worker, nor every copy of
an expert. Workers of one role are therefore dealt round-robin over the worker nodes, each role
starting from the first node, so with N nodes any one node holds at most ceil(A/N) of the A attention
workers, and the i-th expert worker lands on node i mod N (the spread shadow placement then puts an
expert's shadow on another expert worker, which with N >= 2 sits on another node; `placement.py`
makes that explicit where workers outnumber nodes).

The head node (the driver's: frontend, controller, Redis, KV store) takes workers only when it is
the only node, so losing a worker node never takes the control plane with it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping


def worker_nodes(head: str, nodes: list[str]) -> list[str]:
    """The nodes workers go on: every node but the head, or the head alone when there is no other."""
    others = [n for n in nodes if n != head]
    return others or [head]


def spread_workers(names: Iterable[str], nodes: list[str]) -> dict[str, str]:
    """worker name ("aw-1", "ew-2") -> node: each role round-robin over `nodes` by index."""
    if not nodes:
        raise ValueError("no node to place workers on")
    plan = {}
    for name in names:
        index = int(name.rpartition("-")[2])
        plan[name] = nodes[index % len(nodes)]
    return plan


def replacement_node(name: str, placed: Mapping[str, str], alive: list[str], lost: Iterable[str] = ()) -> str:
    """Where a replacement for `name` starts: its node if that is alive and not `lost` (a process died,
    the node did not), else the surviving node holding the fewest workers of its role, then the
    fewest workers, then the first in `alive` order."""
    lost = set(lost)
    surviving = [n for n in alive if n not in lost]
    if not surviving:
        raise ValueError(f"no surviving node to start {name} on")
    if placed.get(name) in surviving:
        return placed[name]
    role = name.partition("-")[0]
    same_role = Counter(node for worker, node in placed.items() if worker != name and worker.startswith(role + "-"))
    everyone = Counter(node for worker, node in placed.items() if worker != name)
    return min(surviving, key=lambda n: (same_role[n], everyone[n], surviving.index(n)))

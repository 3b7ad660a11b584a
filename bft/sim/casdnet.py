"""What the CASD simulator draws from: diffusion graphs, link delays and clock offsets.

The distributions are the real network, against which a run's assumed bounds (delta, epsilon)
may hold or not: "bounded" stays inside the default bounds (delta 4 ms, epsilon 2 ms); the others
have tails that no bound covers. Every value is an integer number of microseconds.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

Draw = Callable[[random.Random], int]

DELAYS: dict[str, Draw] = {
    "bounded": lambda rng: rng.randint(500, 4_000),  # 0.5-4 ms, inside delta = 4 ms
    # Median 1.5 ms, 1% above 6 ms: a LAN under load.
    "lognormal": lambda rng: int(rng.lognormvariate(math.log(1_500), 0.6)),
    # 0.5 ms plus a Pareto tail of index 1.5: mostly fast, now and then very slow.
    "pareto": lambda rng: 500 + int(1_000 * (rng.paretovariate(1.5) - 1)),
}
SKEWS: dict[str, Draw] = {
    "bounded": lambda rng: rng.randint(-1_000, 1_000),  # any two clocks within epsilon = 2 ms
    # Laplace, scale 1 ms: synchronised clocks with an occasional straggler.
    "laplace": lambda rng: int(rng.expovariate(1 / 1_000)) * rng.choice((-1, 1)),
}


def choose(table: dict[str, Draw], name: str, what: str) -> Draw:
    if name not in table:
        raise ValueError(f"unknown {what} distribution {name!r} (choose {', '.join(table)})")
    return table[name]


def graph(name: str, n: int) -> dict[int, tuple[int, ...]]:
    """``complete`` or ``ring:K`` (each node linked to the K nearest on either side)."""
    if name == "complete":
        return {i: tuple(j for j in range(n) if j != i) for i in range(n)}
    kind, _, k = name.partition(":")
    if kind == "ring" and k.isdigit() and 1 <= int(k) < n:
        reach = int(k)
        return {i: tuple(sorted({(i + s) % n for s in range(-reach, reach + 1)} - {i})) for i in range(n)}
    raise ValueError(f"unknown graph {name!r} (complete, or ring:K with 1 <= K < n)")


def diameter(links: dict[int, tuple[int, ...]], nodes: set[int]) -> int | None:
    """The diameter of the graph restricted to ``nodes``; None if they are not connected."""
    worst = 0
    for start in nodes:
        seen, frontier, hops = {start}, [start], 0
        while frontier:
            frontier = [j for i in frontier for j in links[i] if j in nodes and j not in seen]
            seen.update(frontier)
            hops += bool(frontier)
        if seen != nodes:
            return None
        worst = max(worst, hops)
    return worst


def worst_diameter(links: dict[int, tuple[int, ...]], faulty: int) -> int | None:
    """d: the largest diameter the correct nodes' graph can have once any ``faulty`` nodes fail."""
    everyone = set(links)
    worst = 0
    for failed in itertools.combinations(sorted(everyone), faulty):
        d = diameter(links, everyone - set(failed))
        if d is None:
            return None
        worst = max(worst, d)
    return worst

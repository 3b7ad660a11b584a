"""What a simulator run reports: whether it held, what it did, and the faults it injected."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bft.sim.simulator import Simulation


@dataclass(slots=True)
class Result:
    seed: int
    ok: bool
    error: str = ""
    sim_time_ms: int = 0
    messages: int = 0
    completed: int = 0
    crashed: tuple[int, ...] = ()
    dropped: Counter[str] = field(default_factory=Counter)
    transcript: str = ""  # digest of every message sent, in order (golden transcripts)
    injected: tuple[str, ...] = ()  # the faults the seed drew, by kind ("KIND REPLICA")
    events: Counter[str] = field(default_factory=Counter)  # what those faults did, counted
    longest_gap_ms: int = 0  # the longest a client waited for a completion while faults lasted
    longest_heal_ms: int = 0  # the longest a request took after the faults healed
    gap_bound_ms: int | None = None  # what longest_gap_ms was held to (None: not held, partitions...)
    heal_bound_ms: int | None = None  # what longest_heal_ms was held to
    latencies_ms: list[int] = field(default_factory=list)  # each request's, submission to completion


def injected(sim: Simulation) -> tuple[str, ...]:
    s = sim.schedule
    kinds = [f"crash {v}" for v, _ in sim.crash_schedule]
    kinds += [f"wiped or disk restart {v}" for _, v in s.restart_at]
    kinds += [f"partition {r}" for _, _, r in s.partitions] + [f"disk restart {i}" for _, _, i in s.bounces]
    if s.equivocator is not None:
        kinds.append(f"equivocating-primary {s.equivocator}")
    kinds += [f"{b} {i}" for i, b in sorted(s.byzantine.items())]
    kinds += [f"twin split {k}" for k in range(len(s.twin_splits))]
    kinds += [f"slow disk {i}" for i in sorted(s.slow_disks)]
    kinds += ["big-mac client"] if s.big_mac else []
    return tuple(kinds)


def events(sim: Simulation) -> Counter[str]:
    out = Counter(sim.acts)
    out["late checkpoint writes"] = sum(d.late for d in sim.disks.values())
    out["checkpoint writes lost in a restart"] = sum(d.lost for d in sim.disks.values())
    out["frames replayed by the network"] = sim.net.replayed
    return +out


def report(sim: Simulation, ok: bool, error: str = "") -> Result:
    dropped: Counter[str] = Counter()
    for r in sim.replicas:
        dropped.update(r.dropped)
    return Result(
        sim.seed,
        ok,
        error,
        sim.now,
        sim.messages,
        sim.completed,
        tuple(sorted(sim.crashed)),
        dropped,
        sim.net.transcript.hexdigest(),
        injected(sim),
        events(sim),
        sim.progress.longest_gap_ms,
        sim.progress.longest_heal_ms,
        sim.progress.gap_ms,
        sim.progress.heal_ms,
        sim.progress.latencies_ms,
    )

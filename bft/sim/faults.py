"""What can go wrong in a simulator run, and the schedule a seed draws of it.

The sets the golden transcripts pin ("none", "network", "crash", "all") draw exactly what they
always drew, in the same order from the same streams: the main stream (which the network and the
clients go on drawing from during the run) for crashes and the equivocating primary, streams of
their own for partitions, bounces and the one liar. The newer faults (a mix of up to f Byzantine
replicas, Twins, slow checkpoint writes, replayed frames) each draw from a stream named after
them, and only the sets that ask for them ("byzantine", "liars", "mixed") ever consult those
streams, so adding them moved no fault of an older seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from bft.sim.liars import CATALOGUE, LEGACY_LIES, PRIMARY_BEHAVIOURS, TWINS

# A twin partition lasts this long, so that each side may order (or try to) on its own.
TWIN_SPLIT_MS_MIN, TWIN_SPLIT_MS_MAX = 300, 1500
# A slow disk lands a checkpoint this long after it was handed over, at most: a few checkpoint
# intervals at the simulator's load, so a bounce often finds one in flight and loses it.
DISK_LAG_MS_MAX = 2000


@dataclass(frozen=True, slots=True)
class Faults:
    loss: float = 0.05
    duplicate: float = 0.05
    delay_ms_max: int = 20
    crashes: bool = True
    restarts: bool = True  # crashed replicas may come back with an empty state
    byzantine: bool = True  # view 0's primary may equivocate
    partitions: bool = True  # one replica at a time may be cut off, for longer than the log window
    bounces: bool = True  # up to f correct replicas restart from their data directory mid-run
    liar_chance: float = 0.7  # how likely a run gets a liar, where the fault budget leaves room
    # Empty: one liar from the legacy catalogue. Otherwise what is left of the fault budget goes
    # to up to f Byzantine replicas, each with a behaviour drawn from this catalogue.
    catalogue: tuple[str, ...] = ()
    disk_lag: bool = False  # stable-checkpoint writes land late, and are lost by a restart before
    replay: bool = False  # the network re-delivers frames it carried earlier in the run
    big_mac: bool = False  # a faulty client whose tags are good for one replica each (bft.sim.attackers)

    @staticmethod
    def named(name: str) -> Faults:
        if name == "none":
            return Faults(0.0, 0.0, 2, False, False, False, False, False)
        if name == "network":
            return Faults(crashes=False, restarts=False, byzantine=False, bounces=False)
        if name == "crash":
            return Faults(byzantine=False)
        if name == "all":
            return Faults()
        newer = {"catalogue": CATALOGUE, "disk_lag": True, "replay": True}
        if name == "byzantine":  # the whole budget for Byzantine replicas, beside partitions and bounces
            return Faults(crashes=False, restarts=False, liar_chance=1.0, **newer)
        if name == "liars":  # Byzantine replicas alone: no partition, crash or restart; clients must progress
            alone = {"partitions": False, "bounces": False, "disk_lag": False, "big_mac": True}
            liars = tuple(b for b in CATALOGUE if b != TWINS)
            return Faults(crashes=False, restarts=False, liar_chance=1.0, **(newer | alone | {"catalogue": liars}))
        if name == "mixed":  # "all", with the budget shared between crashes and the whole catalogue
            return Faults(**newer)
        raise ValueError(f"unknown fault set {name!r} (choose {', '.join(FAULT_SETS)})")


FAULT_SETS = ("none", "network", "crash", "all", "byzantine", "liars", "mixed")


@dataclass(slots=True)
class Schedule:
    """The faults one seed drew, before the run starts."""

    crash_at: list[tuple[int, int]] = field(default_factory=list)  # (time, replica), in time order
    restart_at: list[tuple[int, int]] = field(default_factory=list)
    equivocator: int | None = None  # view 0's primary, equivocating (the legacy fault)
    partitions: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, isolated replica)
    bounces: list[tuple[int, int, int]] = field(default_factory=list)  # (down, up, replica)
    byzantine: dict[int, str] = field(default_factory=dict)  # replica -> behaviour
    # (start, end, side 1): while a split lasts, every node in side 1 and each twin's second
    # instance are on one side, everything else on the other.
    twin_splits: list[tuple[int, int, frozenset[tuple[str, int]]]] = field(default_factory=list)
    slow_disks: dict[int, int] = field(default_factory=dict)  # replica -> longest lag of a checkpoint write
    big_mac: bool = False  # a "big MAC" client sends while the faults last

    @property
    def twins(self) -> list[int]:
        return sorted(i for i, b in self.byzantine.items() if b == TWINS)

    def byzantine_alone(self) -> bool:
        """No partition, twin split, crash or restart: every correct replica is up and reachable,
        so only the Byzantine replicas stand between the clients and progress."""
        return not (self.crash_at or self.restart_at or self.partitions or self.bounces or self.twins)


def draw(seed: int, f: int, faults: Faults, fault_phase_ms: int, clients: int, rng: random.Random) -> Schedule:
    n = 3 * f + 1
    s = Schedule()
    # Up to f faulty replicas: an equivocating primary, crashes, restarts with a wiped state.
    faulty = rng.sample(range(n), rng.randint(0, f))
    if faults.byzantine and 0 in faulty and rng.random() < 0.5:
        s.equivocator = 0
        faulty.remove(0)
    if faults.crashes:
        for v in faulty:
            at = rng.randrange(fault_phase_ms)
            s.crash_at.append((at, v))
            if faults.restarts and rng.random() < 0.5:
                s.restart_at.append((at + rng.randrange(1, fault_phase_ms), v))
        s.crash_at.sort()
        s.restart_at.sort()
    # Partitions come from a stream of their own, so that adding them kept every seed's
    # other faults where they were (the regression seeds depend on it).
    if faults.partitions:
        prng = random.Random(seed ^ 0x9A27)
        for _ in range(prng.randint(0, 2)):
            start = prng.randrange(fault_phase_ms)
            end = min(fault_phase_ms, start + prng.randint(300, 1500))
            s.partitions.append((start, end, prng.randrange(n)))
    # Restarts from disk ("bounces"), from a stream of their own too: up to f replicas that
    # the fault budget does not count, since a replica that kept its promises is as correct
    # after a restart as before it. They may come alongside the equivocating primary.
    if faults.bounces:
        brng = random.Random(seed ^ 0xB0B5)
        correct = [i for i in range(n) if i not in faulty and i != s.equivocator]
        for i in brng.sample(correct, brng.randint(0, f)):
            down = brng.randrange(fault_phase_ms)
            s.bounces.append((down, down + brng.randint(1, 300), i))
    budget = f - (len(faulty) if faults.crashes else 0) - (s.equivocator is not None)
    bounced = {i for _, _, i in s.bounces}
    honest = [i for i in range(n) if i not in faulty and i != s.equivocator and i not in bounced]
    if faults.byzantine and budget > 0:
        if faults.catalogue:
            _draw_byzantine(s, random.Random(f"{seed}-byzantine"), faults, budget, honest)
        else:
            # One liar, within the fault budget left: a replica that runs the honest core, but
            # whose messages a behaviour of bft.byzantine rewrites on the way out.
            lrng = random.Random(seed ^ 0xB1A5)
            if honest and lrng.random() < faults.liar_chance:
                liar = lrng.choice(honest)  # drawn before its lie, as it always was
                s.byzantine[liar] = lrng.choice(LEGACY_LIES)
    if s.twins:
        _draw_twin_splits(s, random.Random(f"{seed}-twins"), n, clients, fault_phase_ms)
    if faults.big_mac:
        s.big_mac = random.Random(f"{seed}-big-mac").random() < 0.5
    if faults.disk_lag:
        drng = random.Random(f"{seed}-disk")
        restarting = bounced | {i for _, i in s.restart_at}
        for i in range(n):
            if i in restarting or drng.random() < 0.5:
                s.slow_disks[i] = drng.randint(50, DISK_LAG_MS_MAX)
    return s


def _draw_byzantine(s: Schedule, rng: random.Random, faults: Faults, budget: int, honest: list[int]) -> None:
    """Up to ``budget`` Byzantine replicas, each with its own behaviour. One that only matters
    while it leads (slow, silent, equivocating, twins) is, half the time, the earliest primary
    left, so that it leads before any view change has moved past it."""
    candidates = list(honest)
    for _ in range(budget):
        if not candidates or rng.random() >= faults.liar_chance:
            continue
        behaviour = rng.choice(faults.catalogue)
        leads = behaviour in PRIMARY_BEHAVIOURS and rng.random() < 0.5
        replica = min(candidates) if leads else rng.choice(candidates)
        candidates.remove(replica)
        s.byzantine[replica] = behaviour


def _draw_twin_splits(s: Schedule, rng: random.Random, n: int, clients: int, fault_phase_ms: int) -> None:
    """One to three splits of the network, one after another: each twin's two instances on
    opposite sides, every other replica and client on a side drawn for it."""
    others = [("replica", i) for i in range(n) if i not in s.twins] + [("client", c) for c in range(clients)]
    at = rng.randrange(fault_phase_ms // 4)
    for _ in range(rng.randint(1, 3)):
        end = min(fault_phase_ms, at + rng.randint(TWIN_SPLIT_MS_MIN, TWIN_SPLIT_MS_MAX))
        if at >= end:
            break
        s.twin_splits.append((at, end, frozenset(node for node in others if rng.random() < 0.5)))
        at = end + rng.randrange(300)

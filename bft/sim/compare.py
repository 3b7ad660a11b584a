"""``bft sim --compare casd,pbft``: the same seeded workloads and faults under CASD and PBFT, over
a sweep of CASD's Delta and of the real delay and skew distributions.

Four nodes (f = pi = 1), one of them crashing halfway (an omission fault, inside every CASD
variant's model and PBFT's), the same number of operations from the same seeds, links drawing
their delays from the same distribution (``bft.sim.casdnet``). CASD's assumed link bound delta
sweeps a range (epsilon fixed at 2 ms), and Delta follows from the paper's formula; a learned
row lets each sender choose delta online (``bft.core.estimator``). PBFT does not read clocks (its
timers measure intervals, which a clock's offset does not change), so the skew distribution
changes nothing for it and it runs once per delay distribution; it has no Delta either, and its
latency is a line across the plot.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace

from bft.casd.protocol import Variant
from bft.sim.casd import CasdConfig, run_casd
from bft.sim.casdnet import DELAYS, SKEWS
from bft.sim.faults import Faults, Schedule
from bft.sim.simulator import Simulation

LINK_SWEEP_US = (250, 500, 1_000, 2_000, 4_000, 8_000)
SKEW_US = 2_000
# The learned link bound stays within these, at every node.
LEARN_RANGE_US = (100, 16_000)
OPERATIONS = 60  # per run: CASD broadcasts, PBFT requests (3 clients of 20)
CRASH_MS = 1_000  # node 3 stops then


@dataclass(frozen=True, slots=True)
class Row:
    protocol: str  # "casd omission", ..., "pbft"
    delays: str
    skews: str  # "-" for PBFT
    link_us: int | None  # delta assumed; None: learned (CASD) or none (PBFT)
    delta_ms: float | None  # mean Delta the broadcasts carried; None for PBFT
    latency_ms: float
    p99_ms: float
    violation_rate: float  # broadcasts with a violation, over broadcasts (PBFT: failed seeds over seeds)
    messages_per_op: float
    failed_seeds: tuple[int, ...]


def _casd_row(variant: Variant, delays: str, skews: str, link_us: int | None, seeds: range) -> Row:
    base = CasdConfig(
        variant=variant, n=4, faulty=1, faults="none", delays=delays, skews=skews, skew_us=SKEW_US,
        broadcasts=OPERATIONS, duration_us=2_000_000, crashes=((3, CRASH_MS * 1000),),
    )
    # Learned: each sender starts from the in-bounds delta (4 ms) and learns from what arrives.
    cfg = replace(base, link_us=link_us or 4_000, learn=None if link_us else LEARN_RANGE_US)
    latencies, broken, broadcasts, messages, deltas, failed = [], 0, 0, 0, [], []
    for seed in seeds:
        r = run_casd(seed, cfg)
        latencies += r.latencies_us
        broken += len(r.broken)
        broadcasts += r.broadcasts
        messages += r.messages
        deltas += [r.delta_for(link) for link in r.link_us_used]
        if not r.ok:
            failed.append(seed)
    return Row(
        f"casd {variant.value}", delays, skews, link_us, statistics.fmean(deltas) / 1000,
        statistics.fmean(latencies) / 1000, _p99(latencies) / 1000, broken / broadcasts, messages / broadcasts,
        tuple(failed),
    )


def _pbft_row(delays: str, seeds: range) -> Row:
    latencies, messages, failed = [], 0, []
    for seed in seeds:
        sim = Simulation(
            seed, 1, Faults.named("none"), clients=3, ops_per_client=OPERATIONS // 3, tentative=False,
            schedule=Schedule(crash_at=[(CRASH_MS, 3)]), delays=DELAYS[delays],
        )
        r = sim.run()
        latencies += [ms * 1000 for ms in r.latencies_ms]
        messages += r.messages
        if not r.ok:
            failed.append(seed)
    return Row(
        "pbft", delays, "-", None, None, statistics.fmean(latencies) / 1000, _p99(latencies) / 1000,
        len(failed) / len(seeds), messages / (OPERATIONS * len(seeds)), tuple(failed),
    )


def _p99(values: list[int]) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]) if ordered else 0.0


def compare(
    protocols: list[str], seeds: range, delays: list[str] | None = None, skews: list[str] | None = None,
    progress: Callable[[Row], None] = lambda _row: None,
) -> list[Row]:
    """Every row of the comparison; ``progress`` sees each as it is done."""
    rows: list[Row] = []
    for d in delays or list(DELAYS):
        if "pbft" in protocols:
            rows.append(_pbft_row(d, seeds))
            progress(rows[-1])
        if "casd" not in protocols:
            continue
        for s in skews or list(SKEWS):
            for variant in Variant:
                for link in (*LINK_SWEEP_US, None):
                    rows.append(_casd_row(variant, d, s, link, seeds))
                    progress(rows[-1])
    return rows

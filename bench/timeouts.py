"""Fixed against adaptive timeouts (``adaptive_timeouts``, README "Timeouts learned online"), in
the simulator over seeds and with real processes, in one run.

Scenarios, each with the fixed timers (request 500 ms, view 1 s: the defaults) and the adaptive
ones (the same values as their starting point):
- crashed primary: replica 0 stops mid-run; the longest a client then waits (detection, the
  view change and the client finding the new primary) and the time from the crash to the first
  operation completed in a later view;
- load spike: a few closed loops, then many more at once; every view change is needless;
- slow links (simulator): every link's delay lognormal with a 20 ms median and a long tail;
  every view change is needless;
- slow primary: replica 0 holds each PRE-PREPARE for 0.9 of the fixed view timeout
  (``--byzantine slow-primary``), with the slow-primary monitor off, so the timers alone decide.

    python -m bench.timeouts [--seeds 10] [--seconds 8] [--repeats 3] [--skip-processes]

Prints a table and writes ``bench/results/timeouts.{md,json}``. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.micro import RESULTS, machine, write_results
from bft.core.params import Params
from bft.local import LocalCluster
from bft.runtime.process import run_async
from bft.service import KVService
from bft.sim.faults import Faults, Schedule
from bft.sim.liars import SLOW as SLOW_PRIMARY
from bft.sim.simulator import SIM_PARAMS, Simulation
from client import Client

FIXED = replace(SIM_PARAMS, request_timeout_ms=500, view_timeout_ms=1_000, primary_throughput_fraction=0.0)
TIMERS = {"fixed": FIXED, "adaptive": replace(FIXED, adaptive_timeouts=True)}
CRASH_MS = 500
SPIKE_MS = 1_500
SPIKE_CLIENTS = 24


class Watched(Simulation):
    """The simulator, noting when each operation completes and in which view, and holding back
    the clients of a load spike until it starts."""

    def __init__(self, *a, steady: int | None = None, **kw) -> None:
        super().__init__(*a, **kw)
        self.steady = steady
        self.done_at: list[tuple[int, int]] = []  # (time, the view its client knew)

    def _submit(self, c: int) -> None:
        if self.steady is None or c < self.steady or self.now >= SPIKE_MS:
            super()._submit(c)

    def _tick(self) -> None:
        if self.steady is not None and self.now == SPIKE_MS:
            for c in range(self.steady, len(self.clients)):
                super()._submit(c)
        super()._tick()

    def _collect(self, c: int) -> None:
        before = self.completed
        super()._collect(c)
        self.done_at += [(self.now, self.clients[c].view)] * (self.completed - before)


def _lognormal_links(rng) -> int:
    return int(rng.lognormvariate(math.log(20_000), 0.8))


def sim_runs(seeds: range) -> dict:
    out: dict = {}
    none = Faults.named("none")
    for timer, params in TIMERS.items():
        rows = out[timer] = {}
        crash = [_sim(s, params, none, Schedule(crash_at=[(CRASH_MS, 0)]), 3, 150) for s in seeds]
        rows["crashed primary"] = {
            "longest wait ms": statistics.fmean(r["longest_wait_ms"] for r in crash),
            "crash to a later view ms": statistics.fmean(r["first_later_ms"] - CRASH_MS for r in crash),
            "view changes": statistics.fmean(r["views"] for r in crash),
        }
        for name, kw in (
            ("load spike", {"clients": 3 + SPIKE_CLIENTS, "ops": 30, "steady": 3}),
            ("slow links", {"clients": 3, "ops": 60, "delays": _lognormal_links}),
        ):
            runs = [_sim(s, params, none, Schedule(), kw["clients"], kw["ops"], kw.get("steady"), kw.get("delays"))
                    for s in seeds]
            rows[name] = {
                "needless view changes": sum(r["views"] for r in runs),
                "mean latency ms": statistics.fmean(r["mean_ms"] for r in runs),
                "longest wait ms": statistics.fmean(r["longest_wait_ms"] for r in runs),
            }
        slow = [_sim(s, params, none, Schedule(byzantine={0: SLOW_PRIMARY}), 3, 60) for s in seeds]
        rows["slow primary"] = {
            "replaced in (share of seeds)": sum(r["first_later_ms"] < math.inf for r in slow) / len(slow),
            "crash to a later view ms": statistics.fmean(min(r["first_later_ms"], 60_000) for r in slow),
            "mean latency ms": statistics.fmean(r["mean_ms"] for r in slow),
        }
    return out


def _sim(seed, params, faults, schedule, clients, ops, steady=None, delays=None) -> dict:
    sim = Watched(seed, 1, faults, clients=clients, ops_per_client=ops, params=params, tentative=False,
                  schedule=schedule, delays=delays, steady=steady)
    r = sim.run()
    assert r.ok, f"seed {seed}: {r.error}"
    times = sorted(t for t, _ in sim.done_at)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    later = [t for t, view in sim.done_at if view >= 1]
    return {
        "views": max(rep.view for i, rep in enumerate(sim.replicas) if i not in sim.crashed and i not in sim.byzantine),
        "longest_wait_ms": max(r.latencies_ms),
        "longest_gap_ms": max(gaps, default=0),
        "first_later_ms": min(later, default=math.inf),
        "mean_ms": statistics.fmean(r.latencies_ms),
    }


# -- real processes ------------------------------------------------------------------------------


async def _loops(lc: LocalCluster, loops: int, seconds: float, events=None) -> dict:
    cs = [Client(lc.cluster, i) for i in range(min(loops, len(lc.cluster.clients)))]
    for c in cs:
        await c.start()
    await asyncio.gather(*(c.wait_connected() for c in cs))
    done: list[tuple[float, int]] = []
    t0 = time.perf_counter()

    async def loop(i: int, start_s: float) -> None:
        c = cs[i % len(cs)]
        await asyncio.sleep(start_s)
        n = 0
        while time.perf_counter() - t0 < seconds:
            await c.invoke(KVService.put(b"t-%d" % i, b"%d" % n), timeout=60)
            done.append((time.perf_counter() - t0, c.core.view))
            n += 1

    tasks = [asyncio.create_task(loop(i, s)) for i, s in enumerate(events["starts"])] if events else []
    if events and "kill_s" in events:
        await asyncio.sleep(events["kill_s"])
        lc.kill(0)
    await asyncio.gather(*tasks)
    for c in cs:
        await c.close()
    times = sorted(t for t, _ in done)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    later = [t for t, view in done if view >= 1]
    live = [i for i in range(lc.cluster.n) if not (events and "kill_s" in events and i == 0)]
    return {
        "ops": len(done),
        "longest stall s": max(gaps, default=0.0),
        "first op in a later view s": min(later, default=math.inf),
        "view changes": max(lc.status(i)["view"] for i in live),
    }


def process_runs(seconds: float, repeats: int) -> dict:
    defaults = Params(primary_throughput_fraction=0.0)
    out: dict = {}
    for timer, params in {"fixed": defaults, "adaptive": replace(defaults, adaptive_timeouts=True)}.items():
        rows = out[timer] = {}
        cases = {
            "crashed primary": ({"starts": [0.0] * 4, "kill_s": seconds / 2}, None),
            "load spike": ({"starts": [0.0] * 2 + [seconds / 2] * 30}, None),
            # Two loops: few enough that the fixed view timer never catches it (bench.slow_primary).
            "slow primary": ({"starts": [0.0] * 2}, "slow-primary"),
        }
        for name, (events, behaviour) in cases.items():
            runs = []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    byzantine = (0, behaviour) if behaviour else None
                    lc = LocalCluster(Path(tmp) / "c", 1, "kv", params, byzantine=byzantine)
                    try:
                        r = run_async(_loops(lc, len(events["starts"]), seconds, events))
                    finally:
                        lc.stop()
                if "kill_s" in events:
                    r["crash to a later view s"] = r.pop("first op in a later view s") - events["kill_s"]
                print(f"processes, {timer}, {name}: {r}", flush=True)
                runs.append(r)
            rows[name] = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
    return out


def table(results: dict) -> str:
    lines = ["Simulator (mean over seeds; needless view changes: total)", "",
             "| scenario | measure | fixed | adaptive |", "|---|---|---|---|"]
    sim = results["sim"]
    for scenario, measures in sim["fixed"].items():
        for measure, value in measures.items():
            lines.append(f"| {scenario} | {measure} | {value:.2f} | {sim['adaptive'][scenario][measure]:.2f} |")
    if "processes" in results:
        lines += ["", f"Real processes (4 replicas, kv, loopback; mean of {results['repeats']} runs)", "",
                  "| scenario | measure | fixed | adaptive |", "|---|---|---|---|"]
        proc = results["processes"]
        for scenario, measures in proc["fixed"].items():
            for measure, value in measures.items():
                other = proc["adaptive"][scenario][measure]
                lines.append(f"| {scenario} | {measure} | {value:.2f} | {other:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each real-process run")
    ap.add_argument("--repeats", type=int, default=3, help="real-process runs per scenario (means are printed)")
    ap.add_argument("--skip-processes", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "seeds": a.seeds, "repeats": a.repeats}
    t0 = time.perf_counter()
    results["sim"] = sim_runs(range(a.seeds))
    print(f"simulator: {time.perf_counter() - t0:.0f} s", flush=True)
    if not a.skip_processes:
        results["processes"] = process_runs(a.seconds, a.repeats)
    md = table(results)
    print("\n" + md)
    write_results(a.out, "timeouts", results, md, lambda _r, _p: False)


if __name__ == "__main__":
    main()

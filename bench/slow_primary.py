"""A slow primary on a real 4-replica cluster (kv service, default parameters otherwise).

Replica 0, view 0's primary, runs ``bft replica --byzantine slow-primary``: it holds every
PRE-PREPARE for 0.9 of the view timeout, just within the view timer of the requests it carries.
For each number of closed loops in ``--clients`` (over the cluster's 8 client identities, one
operation at a time each), three runs writing for ``--seconds``: fault-free, slow primary with
the slow-primary monitor off (``primary_throughput_fraction = 0``: what the view timer alone
does) and with it on (the defaults). Prints, for each, the throughput over the run, the time
from the start to the first operation completed in a later view, the throughput before and
from then on, and which replicas' monitors started a view change; writes
``bench/results/slow_primary.{md,json}``. A measurement, not a test.

    python -m bench.slow_primary [--clients 2,16] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench.micro import RESULTS, machine, write_results
from bft.core.params import Params
from bft.local import LocalCluster
from bft.runtime.process import run_async
from bft.service import KVService
from client import Client

RUNS = {
    "fault-free": (Params(), None),
    "slow primary, monitor off": (Params(primary_throughput_fraction=0), "slow-primary"),
    "slow primary, monitor on": (Params(), "slow-primary"),
}


async def load(lc: LocalCluster, clients: int, seconds: float) -> dict:
    cs = [Client(lc.cluster, i) for i in range(min(clients, 8))]  # the cluster's authorised clients
    for c in cs:
        await c.start()
    await asyncio.gather(*(c.wait_connected() for c in cs))
    completions: list[tuple[float, int]] = []  # (seconds since the start, the view the client knew)
    t0 = time.perf_counter()
    stop_at = t0 + seconds

    async def loop(c: Client, i: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            await c.invoke(KVService.put(b"slow-%d" % i, b"%d" % n), timeout=120)
            completions.append((time.perf_counter() - t0, c.core.view))
            n += 1

    await asyncio.gather(*(loop(cs[i % len(cs)], i) for i in range(clients)))
    elapsed = time.perf_counter() - t0
    for c in cs:
        await c.close()
    changed = [t for t, view in completions if view >= 1]
    out: dict = {"ops": len(completions), "seconds": round(elapsed, 1), "ops_per_s": len(completions) / elapsed}
    if changed:
        first = min(changed)
        out["view_change_s"] = round(first, 2)
        out["ops_per_s_before"] = sum(t < first for t, _ in completions) / first
        out["ops_per_s_after"] = len(changed) / (elapsed - first)
    else:
        out["ops_per_s_before"] = out["ops_per_s"]
    out["views"] = [lc.status(i)["view"] for i in range(lc.cluster.n)]
    out["monitor_view_changes"] = [
        lc.status(i)["stats"].get("slow-primary-view-changes", 0) for i in range(lc.cluster.n)
    ]
    return out


def table(results: dict) -> str:
    rows = [
        "| closed loops | run | ops/s over the run | first op in a later view | ops/s before | ops/s after "
        "| monitor view changes by replica |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients, runs in results["runs"].items():
        for name, r in runs.items():
            vc = f"{r['view_change_s']:.1f} s" if "view_change_s" in r else "none"
            after = f"{r['ops_per_s_after']:.0f}" if "ops_per_s_after" in r else "-"
            rows.append(
                f"| {clients} | {name} | {r['ops_per_s']:.1f} | {vc} | {r['ops_per_s_before']:.1f} | {after} "
                f"| {r['monitor_view_changes']} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="2,16", help="numbers of closed loops, comma-separated")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "seconds": a.seconds, "runs": {}}
    for clients in (int(c) for c in a.clients.split(",")):
        runs = results["runs"][clients] = {}
        for name, (params, behaviour) in RUNS.items():
            with tempfile.TemporaryDirectory() as tmp:
                byzantine = (0, behaviour) if behaviour else None
                lc = LocalCluster(Path(tmp) / "c", 1, "kv", params, byzantine=byzantine)
                try:
                    runs[name] = r = run_async(load(lc, clients, a.seconds))
                finally:
                    lc.stop()
            print(f"{clients} loops, {name}: {r}", flush=True)
    md = table(results)
    print("\n" + md)
    write_results(a.out, "slow_primary", results, md, lambda _r, _p: False)


if __name__ == "__main__":
    main()

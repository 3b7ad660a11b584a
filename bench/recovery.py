"""Fault and memory measurements on a real 4-replica cluster (kv service, default parameters).

1. View change: the time from killing the primary, under load from 4 clients, to the first
   operation completed in the new view.
2. Catch-up: a replica whose data directory is wiped is restarted next to a state of
   ``--state-mb`` megabytes; the time until it has executed as far as the others.
3. Memory: each replica's resident set size after 10,000 and 100,000 operations.

Prints a Markdown table and writes ``bench/results/recovery.{md,json}``. A measurement, not a test.

    python -m bench.recovery [--state-mb 100] [--ops 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.micro import RESULTS, machine, rss_mb
from bft import config as cfg
from bft.launch import start_replicas, stop_replicas
from bft.local import LocalCluster, free_base_port, wait_for_port
from bft.runtime.process import run_async
from bft.service import KVService
from client import Client


async def view_change(lc: LocalCluster) -> float:
    clients = [Client(lc.cluster, i) for i in range(4)]
    for c in clients:
        await c.start()
    await asyncio.gather(*(c.wait_connected() for c in clients))
    completions: list[tuple[float, int]] = []  # (when, the view the client then knew)
    stop = False

    async def load(c: Client, i: int) -> None:
        n = 0
        while not stop:
            await c.invoke(KVService.put(b"vc-%d" % i, b"%d" % n), timeout=60)
            completions.append((time.perf_counter(), c.core.view))
            n += 1

    tasks = [asyncio.create_task(load(c, i)) for i, c in enumerate(clients)]
    await asyncio.sleep(2)
    killed_at = time.perf_counter()
    lc.kill(0)
    while not any(view >= 1 for _, view in completions):
        await asyncio.sleep(0.005)
    first = min(t for t, view in completions if view >= 1)
    stop = True
    await asyncio.gather(*tasks)
    for c in clients:
        await c.close()
    assert lc.status(1)["view"] >= 1
    return first - killed_at


async def fill(c: Client, megabytes: int, value_kb: int = 64) -> None:
    value = bytes(value_kb * 1024)
    count = megabytes * 1024 // value_kb
    sem = asyncio.Semaphore(8)

    async def put(i: int) -> None:
        async with sem:
            await c.invoke(KVService.put(b"big-%d" % i, value), timeout=120)

    for start in range(0, count, 256):
        await asyncio.gather(*(put(i) for i in range(start, min(count, start + 256))))
        print(f"  filled {min(count, start + 256) * value_kb // 1024} of {megabytes} MB", flush=True)


async def catch_up(lc: LocalCluster, megabytes: int) -> dict:
    async with Client(lc.cluster, 4) as c:
        await c.wait_connected()
        await fill(c, megabytes)
        for i in range(300):  # move past a checkpoint so the state is certified beyond the fill
            await c.invoke(KVService.put(b"tick", b"%d" % i))
        lc.kill(3)
        shutil.rmtree(lc.cluster.path.parent / "data" / "replica-3")
        t0 = time.perf_counter()
        lc.restart(3)
        target = max(lc.status(i)["executed"] for i in range(3))
        while True:
            s = lc.status(3)
            if s["executed"] >= target and s["stats"].get("state-transfers", 0) >= 1:
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
    return {
        "seconds": elapsed,
        "partitions": s["stats"].get("state-transfer-partitions", 0),
        "state_mb": megabytes,
    }


async def memory(cluster: cfg.Cluster, procs: list, ops: int) -> dict:
    clients = [Client(cluster, i) for i in range(16)]
    for c in clients:
        await c.start()
    await asyncio.gather(*(c.wait_connected() for c in clients))
    done = 0
    out: dict = {}
    marks = sorted({10_000, ops})

    async def load(c: Client, i: int) -> None:
        nonlocal done
        while done < marks[-1]:
            await c.invoke(KVService.put(b"key-%d" % (done % 1000), b"x" * 100))
            done += 1

    async def sample() -> None:
        for mark in marks:
            while done < mark:
                await asyncio.sleep(0.05)
            out[mark] = [round(rss_mb(p.pid), 1) for p in procs]
            print(f"  {mark} operations: replica RSS {out[mark]} MB", flush=True)

    await asyncio.gather(sample(), *(load(c, i) for i, c in enumerate(clients)))
    for c in clients:
        await c.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-mb", type=int, default=100)
    ap.add_argument("--ops", type=int, default=100_000, help="operations for the memory measurement")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    print(f"machine: {results['machine']}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        print("view change after killing the primary under load:", flush=True)
        lc = LocalCluster(Path(tmp) / "vc", 1, "kv", cfg.Params())
        try:
            results["view_change_s"] = run_async(view_change(lc))
        finally:
            lc.stop()
        print(f"  first operation in the new view {results['view_change_s']:.2f} s after the kill", flush=True)

        print(f"catch-up of a wiped replica on {args.state_mb} MB of state:", flush=True)
        lc = LocalCluster(Path(tmp) / "st", 1, "kv", cfg.Params())
        try:
            results["catch_up"] = run_async(catch_up(lc, args.state_mb))
        finally:
            lc.stop()
        print(f"  caught up in {results['catch_up']['seconds']:.2f} s "
              f"({results['catch_up']['partitions']} partitions fetched)", flush=True)

        print("replica memory:", flush=True)
        base = free_base_port(4)
        cfg.keygen(Path(tmp) / "mem", 1, 16, base_port=base)
        cluster = cfg.load(Path(tmp) / "mem" / "cluster.toml")
        procs = start_replicas(cluster, "kv", Path(tmp) / "mem" / "logs", "warning")
        try:
            for r in cluster.replicas:
                wait_for_port(r.host, r.port)
            results["rss_mb"] = run_async(memory(cluster, procs, args.ops))
        finally:
            stop_replicas(procs)

    rss = results["rss_mb"]
    lines = [
        "| measurement | result |",
        "|---|---|",
        f"| kill the primary under load: first operation in the new view | {results['view_change_s']:.2f} s |",
        f"| wiped replica catches up on {args.state_mb} MB (state transfer + log) "
        f"| {results['catch_up']['seconds']:.2f} s, {results['catch_up']['partitions']} partitions |",
    ]
    for mark, values in rss.items():
        lines.append(f"| replica RSS after {mark:,} operations | {min(values):.0f}-{max(values):.0f} MB |")
    md = "\n".join(lines)
    print()
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recovery.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "recovery.md").write_text(f"Machine: {results['machine']}, {results['date']}\n\n{md}\n")


if __name__ == "__main__":
    main()

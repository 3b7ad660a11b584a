"""Null-operation micro-benchmark: a 4-replica PBFT cluster against ``bft serve`` on this machine.

Prints, for each argument/result size (the paper's 0/0, 4/0 and 0/4 KB), the median and 90th
percentile latency of sequential operations from one client (read-write and, for the cluster,
read-only), then the throughput of 16 closed-loop clients, for both targets in one run, with
the replicated/unreplicated ratio.
Writes the table as Markdown and JSON (and a PNG chart when matplotlib is installed) under
``bench/results/``. This is a measurement, not a test: nothing here asserts a speed.

    python -m bench.micro [--ops 2000] [--seconds 5] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from bft import config as cfg
from bft.core.params import DEFAULT_PARAMS, DURABILITY_MODES
from bft.launch import start_replicas, stop_replicas
from bft.local import free_base_port, wait_for_port
from bft.runtime.process import run_async
from bft.service import NullService
from client import Client

RESULTS = Path(__file__).parent / "results"
SIZES = [(0, 0), (4096, 0), (0, 4096)]


def write_results(out: Path, name: str, results: dict, md: str, plot_to: Callable[[dict, Path], bool]) -> None:
    """``NAME.json``, ``NAME.md`` (with the machine and date) and, with matplotlib, ``NAME.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(f"Machine: {results['machine']}, {results['date']}\n\n{md}\n")
    if plot_to(results, out / f"{name}.png"):
        print(f"\nwrote {out / name}.md, {name}.json and {name}.png")
    else:
        print(f"\nwrote {out / name}.md and {name}.json (install matplotlib for the chart)")


def pyplot():
    """matplotlib's pyplot on its file-only backend, or None without matplotlib (the ``bench``
    extra): the benchmarks print and write their figures either way."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, path: Path) -> bool:
    """Write a benchmark's chart and let its memory go; True, for ``write_results``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


async def latency(
    make_client, arg: int, res: int, ops: int, read_only: bool = False, seconds: float = math.inf
) -> dict:
    """Sequential operations from client 0 after a warm-up: ``ops`` of them, or as many as fit in
    ``seconds`` when that comes first."""
    op = NullService.op(res, bytes(arg))
    async with make_client(0) as c:
        await c.wait_connected()
        for _ in range(min(200, ops)):
            await c.invoke(op, read_only)
        samples = []
        stop_at = time.perf_counter() + seconds
        while len(samples) < ops and time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await c.invoke(op, read_only)
            samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return {
        "median_ms": statistics.median(samples),
        "p90_ms": samples[int(len(samples) * 0.9)],
        "p99_ms": samples[int(len(samples) * 0.99)],
        "ops": len(samples),
    }


async def throughput(make_client, clients: int, seconds: float, cpu_s: Callable[[], float] | None = None) -> dict:
    """Null operations from ``clients`` closed-loop clients for ``seconds`` after a 1 s warm-up.
    ``cpu_s``, when given, is read at the start and end of the measured part: ``cpu_s`` in the
    result is the difference (the caller says whose CPU time it reads)."""
    op = NullService.op(0)
    cs = [make_client(i) for i in range(clients)]
    for c in cs:
        await c.start()
    try:
        await asyncio.gather(*(c.wait_connected() for c in cs))
        done = 0
        stop_at = 0.0

        async def loop(c: Client) -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await c.invoke(op)
                done += 1

        stop_at = time.perf_counter() + 1.0  # warm-up
        await asyncio.gather(*(loop(c) for c in cs))
        done = 0
        cpu0 = cpu_s() if cpu_s is not None else 0.0
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*(loop(c) for c in cs))
        elapsed = time.perf_counter() - t0
        out = {"ops_per_s": done / elapsed, "clients": clients, "ops": done, "seconds": elapsed}
        if cpu_s is not None:
            out["cpu_s"] = cpu_s() - cpu0
        return out
    finally:
        for c in cs:
            await c.close()


async def measure(name: str, make_client, args: argparse.Namespace, read_only: bool) -> dict:
    out: dict = {}
    for arg, res in SIZES:
        ops = args.ops if arg == res == 0 else max(1, args.ops // 2)
        for ro in (False, True) if read_only else (False,):
            r = await latency(make_client, arg, res, ops, ro)
            out[f"{arg // 1024}/{res // 1024}" + ("-ro" if ro else "")] = r
            print(f"  {name:<12} {arg // 1024}/{res // 1024} KB {'read-only ' if ro else 'read-write'}  "
                  f"median {r['median_ms']:.3f} ms  p90 {r['p90_ms']:.3f} ms  ({ops} ops)", flush=True)
    t = await throughput(make_client, args.clients, args.seconds)
    out["throughput"] = t
    print(f"  {name:<12} {args.clients} clients  {t['ops_per_s']:.0f} ops/s", flush=True)
    return out


def table(results: dict, clients: int) -> str:
    rep, unrep = results["replicated"], results["unreplicated"]
    lines = [
        "| arg/res (KB) | read-write median (p90) ms | read-only median (p90) ms "
        "| unreplicated median (p90) ms | slowdown rw / ro |",
        "|---|---|---|---|---|",
    ]
    for arg, res in SIZES:
        k = f"{arg // 1024}/{res // 1024}"
        a, r, b = rep[k], rep[k + "-ro"], unrep[k]
        lines.append(
            f"| {k} | {a['median_ms']:.3f} ({a['p90_ms']:.3f}) | {r['median_ms']:.3f} ({r['p90_ms']:.3f}) "
            f"| {b['median_ms']:.3f} ({b['p90_ms']:.3f}) "
            f"| {a['median_ms'] / b['median_ms']:.2f}x / {r['median_ms'] / b['median_ms']:.2f}x |"
        )
    ta, tb = rep["throughput"]["ops_per_s"], unrep["throughput"]["ops_per_s"]
    lines.append(f"| 0/0 throughput, {clients} clients | {ta:.0f} ops/s | | {tb:.0f} ops/s | {ta / tb:.2f}x |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    keys = [f"{a // 1024}/{r // 1024}" for a, r in SIZES]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    series = (
        ("read-write", "replicated", "", "tab:blue"),
        ("read-only", "replicated", "-ro", "tab:cyan"),
        ("unreplicated", "unreplicated", "", "tab:gray"),
    )
    width = 0.27
    for i, (label, target, suffix, color) in enumerate(series):
        med = [results[target][k + suffix]["median_ms"] for k in keys]
        ax1.bar([x + i * width for x in range(len(keys))], med, width, label=label, color=color)
    ax1.set_xticks([x + width for x in range(len(keys))], keys)
    ax1.set_xlabel("argument/result (KB)")
    ax1.set_ylabel("median latency (ms)")
    ax1.legend()
    tp = [results[t]["throughput"]["ops_per_s"] for t in ("replicated", "unreplicated")]
    ax2.bar(["replicated", "unreplicated"], tp, color=["tab:blue", "tab:gray"])
    ax2.set_ylabel("null ops/s, closed loop")
    fig.suptitle("PBFT null operations (" + results["machine"] + ")", fontsize=8)
    return save(fig, path)


# Each optimisation's switch, with the operation whose latency it is meant to cut.
OPTIMISATIONS = [
    ("tentative execution", "tentative", (0, 0)),
    ("digest replies", "digest_replies", (0, 4096)),
    ("separate large requests", "separate_large_requests", (4096, 0)),
]


def measure_optimisations(tmp: Path, ops: int, durability: str) -> dict:
    """Median read-write latency with each optimisation off and on, on a fresh cluster each."""
    out: dict = {}
    for label, switch, (arg, res) in OPTIMISATIONS:
        out[switch] = {}
        for on in (False, True):
            directory = tmp / f"{switch}-{on}"
            params = replace(DEFAULT_PARAMS, durability=durability, **{switch: on})
            cfg.keygen(directory, 1, 2, base_port=free_base_port(4), params=params)
            cluster = cfg.load(directory / "cluster.toml")
            procs = start_replicas(cluster, "null", directory / "logs", "warning")
            try:
                for r in cluster.replicas:
                    wait_for_port(r.host, r.port)
                r = run_async(latency(lambda i, c=cluster: Client(cluster=c, client_id=i), arg, res, ops))
            finally:
                stop_replicas(procs)
            out[switch]["on" if on else "off"] = r
            print(f"  {label:<24} {'on ' if on else 'off'} {arg // 1024}/{res // 1024} KB  "
                  f"median {r['median_ms']:.3f} ms  p90 {r['p90_ms']:.3f} ms", flush=True)
    return out


def optimisation_table(opt: dict) -> str:
    lines = ["| optimisation | operation | off: median (p90) ms | on: median (p90) ms |", "|---|---|---|---|"]
    for label, switch, (arg, res) in OPTIMISATIONS:
        off, on = opt[switch]["off"], opt[switch]["on"]
        lines.append(
            f"| {label} | {arg // 1024}/{res // 1024} KB read-write | {off['median_ms']:.3f} ({off['p90_ms']:.3f}) "
            f"| {on['median_ms']:.3f} ({on['p90_ms']:.3f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=2000, help="sequential operations per 0/0 latency run")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of the throughput run")
    ap.add_argument("--clients", type=int, default=16, help="closed-loop clients for throughput")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--skip-optimisations", action="store_true", help="skip the per-switch comparison")
    ap.add_argument(
        "--durability", choices=DURABILITY_MODES, default="memory",
        help="what the replicas keep on disk (default memory: the paper's, and like the unreplicated server, "
        "no disk on the path; bench.durability measures the others)",
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = free_base_port(4)
        cfg.keygen(tmp, 1, args.clients + 1, base_port=base, params=replace(DEFAULT_PARAMS, durability=args.durability))
        cluster = cfg.load(Path(tmp) / "cluster.toml")
        procs = start_replicas(cluster, "null", Path(tmp) / "logs", "warning")
        port = free_base_port(1)
        server = subprocess.Popen(
            [sys.executable, "-m", "bft", "serve", "--service", "null", "--port", str(port)],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)
            results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
            print(f"machine: {results['machine']}", flush=True)
            results["durability"] = args.durability
            print(f"4 replicas (f = 1, durability {args.durability}) on 127.0.0.1:", flush=True)
            results["replicated"] = run_async(measure("replicated", lambda i: Client(cluster, i), args, True))
            print("bft serve (no replication):", flush=True)
            results["unreplicated"] = run_async(
                measure("unreplicated", lambda i: Client.unreplicated("127.0.0.1", port, i), args, False)
            )
        finally:
            stop_replicas(procs)
            server.terminate()
            server.wait(5)
        if not args.skip_optimisations:
            print("each optimisation off and on (a fresh cluster each):", flush=True)
            results["optimisations"] = measure_optimisations(Path(tmp), max(200, args.ops // 2), args.durability)

    md = table(results, args.clients)
    if "optimisations" in results:
        md += "\n\n" + optimisation_table(results["optimisations"])
    print()
    print(md)
    write_results(args.out, "micro", results, md, plot)


if __name__ == "__main__":
    main()

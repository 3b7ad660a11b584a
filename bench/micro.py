"""Null-operation micro-benchmark: a 4-replica PBFT cluster against ``bft serve`` on this machine,
in one run, with the issue's floors checked at the end.

Targets: ``replicated`` (4 replicas, f = 1, default parameters), ``tentative`` (the same with
tentative execution, for latency), ``unreplicated`` (``bft serve``: no agreement, no
authentication) and ``unreplicated+auth`` (``bft serve --config``: no agreement, but sessions and
request tags as the replicas have them), so the slowdown can be read both ways.

- Latency: the median and 90th percentile of sequential operations from one client for the
  paper's 0/0, 4/0 and 0/4 KB argument/result sizes (read-write; read-only for the cluster).
- Throughput: closed-loop clients (1, 4, 16, 64) for each size, with the CPU seconds all server
  processes spent per 1,000 operations, the client process's, and the mean batch the primary made.
- Replica memory: resident set size after 10k and after 100k operations.

Writes Markdown, JSON and PNG charts (latency, throughput against clients) under
``bench/results/``. A measurement, not a test: the floors are printed as met or not, never
asserted. ``--quick`` runs a smaller version in under two minutes.

    python -m bench.micro [--quick] [--clients 1,4,16,64] [--seconds 3] [--ops 2000]
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
from bft.local import free_base_port, replica_status, wait_for_port
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



# Replica CPU per 1,000 committed 0/0 operations before this work (commit 077bbdc, measured with
# this benchmark's throughput loop on this machine in the same hour as the first run of the new
# code, 64 and 16 clients): the issue asks for half of it.
REFERENCE_CPU_S_PER_1000 = {64: 0.381, 16: 0.691}
KB = 1024


def size_key(arg: int, res: int) -> str:
    return f"{arg // KB}/{res // KB}"


class Progress:
    """One line per measurement: how far the run is and how long it has taken."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        print(f"[{self.done:>2}/{self.total} {time.monotonic() - self.t0:5.0f} s] {what}", flush=True)


async def latency(
    make_client, arg: int, res: int, ops: int, read_only: bool = False, seconds: float = math.inf,
    cpu_s: Callable[[], float] | None = None,
) -> dict:
    """Sequential operations from client 0 after a warm-up: ``ops`` of them, or as many as fit in
    ``seconds`` when that comes first. With ``cpu_s`` (the servers' CPU seconds so far), also
    the CPU one operation costs the servers and this client: on a machine of few cores, CPU
    rather than message hops may be what bounds the latency."""
    op = NullService.op(res, bytes(arg))
    async with make_client(0) as c:
        await c.wait_connected()
        for _ in range(min(200, ops)):
            await c.invoke(op, read_only)
        samples = []
        cpu0, own0 = cpu_s() if cpu_s is not None else 0.0, time.process_time()
        stop_at = time.perf_counter() + seconds
        while len(samples) < ops and time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await c.invoke(op, read_only)
            samples.append((time.perf_counter() - t0) * 1e3)
        own = time.process_time() - own0
        server = cpu_s() - cpu0 if cpu_s is not None else math.nan
    samples.sort()
    return {
        "median_ms": statistics.median(samples),
        "p90_ms": samples[int(len(samples) * 0.9)],
        "p99_ms": samples[int(len(samples) * 0.99)],
        "ops": len(samples),
        "server_cpu_ms_per_op": server / len(samples) * 1e3,
        "client_cpu_ms_per_op": own / len(samples) * 1e3,
    }


async def throughput(
    make_client, clients: int, seconds: float, cpu_s: Callable[[], float] | None = None, arg: int = 0, res: int = 0
) -> dict:
    """Operations of ``arg``/``res`` bytes from ``clients`` closed-loop clients for ``seconds``
    after a 1 s warm-up. ``cpu_s``, when given, is read at the start and end of the measured
    part: ``cpu_s`` in the result is the difference (the caller says whose CPU time it reads);
    ``client_cpu_s`` is this process's."""
    op = NullService.op(res, bytes(arg))
    cs = [make_client(i) for i in range(clients)]
    for c in cs:
        await c.start()
    try:
        await asyncio.gather(*(c.wait_connected(10) for c in cs))
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
        own0 = time.process_time()
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*(loop(c) for c in cs))
        elapsed = time.perf_counter() - t0
        out = {"ops_per_s": done / elapsed, "clients": clients, "ops": done, "seconds": elapsed,
               "client_cpu_s": time.process_time() - own0}
        if cpu_s is not None:
            out["cpu_s"] = cpu_s() - cpu0
        return out
    finally:
        for c in cs:
            await c.close()


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pids: list[int]) -> float:
    """User plus system CPU seconds the processes (all their threads) have used so far; one
    that is gone counts 0. The benchmarks' one reader of /proc/PID/stat."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # After the command name (which may hold spaces): utime and stime are fields 14 and 15.
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS_PER_S


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB (NaN if it has none to report)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Target:
    """One system under test: how to start it, reach it, and read its processes."""

    def __init__(self, name: str, tmp: Path, clients: int, durability: str, **params) -> None:
        self.name = name
        self.procs: list[subprocess.Popen] = []
        self.cluster: cfg.Cluster | None = None
        self.port = 0
        directory = tmp / name.replace("+", "-")
        p = replace(DEFAULT_PARAMS, durability=durability, **params)
        if name == "unreplicated":
            self.port = free_base_port(1)
            self.procs = [subprocess.Popen(
                [sys.executable, "-m", "bft", "serve", "--service", "null", "--port", str(self.port)],
                stdout=subprocess.DEVNULL,
            )]
            wait_for_port("127.0.0.1", self.port)
            return
        f = 0 if name == "unreplicated+auth" else 1
        cfg.keygen(directory, f, clients, base_port=free_base_port(3 * f + 1), params=p)
        self.cluster = cfg.load(directory / "cluster.toml")
        if f == 0:
            self.procs = [subprocess.Popen(
                [sys.executable, "-m", "bft", "serve", "--service", "null", "--config", str(self.cluster.path)],
                stdout=subprocess.DEVNULL,
            )]
        else:
            self.procs = start_replicas(self.cluster, "null", directory / "logs", "warning")
        for r in self.cluster.replicas:
            wait_for_port(r.host, r.port)

    def client(self, i: int) -> Client:
        if self.cluster is None:
            return Client.unreplicated("127.0.0.1", self.port, i)
        return Client(self.cluster, i)

    def cpu_s(self) -> float:
        return process_cpu_s([p.pid for p in self.procs])

    def batches(self) -> tuple[int, int]:
        """(batches, requests batched) so far at replica 0, the primary of view 0."""
        if self.cluster is None or self.cluster.f == 0:
            return 0, 0
        stats = replica_status(self.cluster, 0)["stats"]
        return stats.get("batches", 0), stats.get("batched-requests", 0)

    def stop(self) -> None:
        stop_replicas(self.procs)


def measure_throughput(t: Target, clients: int, seconds: float, arg: int, res: int) -> dict:
    b0 = t.batches()
    r = run_async(throughput(t.client, clients, seconds, t.cpu_s, arg, res))
    b1 = t.batches()
    r["cpu_s_per_1000"] = r["cpu_s"] / max(1, r["ops"]) * 1000
    r["client_cpu_s_per_1000"] = r["client_cpu_s"] / max(1, r["ops"]) * 1000
    if b1[0] > b0[0]:
        r["batch_mean"] = (b1[1] - b0[1]) / (b1[0] - b0[0])
    return r


def measure_rss(t: Target, marks: tuple[int, int], clients: int = 16) -> dict:
    """Replica RSS once the cluster has executed ``marks[0]`` and then ``marks[1]`` operations."""
    assert t.cluster is not None
    out: dict = {}

    async def run() -> None:
        cs = [t.client(i) for i in range(clients)]
        for c in cs:
            await c.start()
        try:
            await asyncio.gather(*(c.wait_connected(10) for c in cs))
            op = NullService.op(0)
            for mark in marks:
                while replica_status(t.cluster, 1)["stats"].get("executed-requests", 0) < mark:
                    await asyncio.gather(*(c.invoke(op) for c in cs for _ in range(50)))
                out[str(mark)] = max(rss_mb(p.pid) for p in t.procs)
        finally:
            for c in cs:
                await c.close()

    run_async(run())
    return out


def latency_table(lat: dict) -> str:
    lines = [
        "| arg/res (KB) | read-write | read-only | tentative | unreplicated | unreplicated+auth "
        "| slowdown rw / ro / tentative (vs +auth) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arg, res in SIZES:
        k = size_key(arg, res)
        rw, ro, te = lat["replicated"][k], lat["replicated"][k + "-ro"], lat["tentative"][k]
        un, ua = lat["unreplicated"][k], lat["unreplicated+auth"][k]
        cell = lambda r: f"{r['median_ms']:.3f} ({r['p90_ms']:.3f})"  # noqa: E731
        x, y = un["median_ms"], ua["median_ms"]
        lines.append(
            f"| {k} | {cell(rw)} | {cell(ro)} | {cell(te)} | {cell(un)} | {cell(ua)} "
            f"| {rw['median_ms'] / x:.2f}x / {ro['median_ms'] / x:.2f}x / {te['median_ms'] / x:.2f}x "
            f"({rw['median_ms'] / y:.2f}x / {ro['median_ms'] / y:.2f}x / {te['median_ms'] / y:.2f}x) |"
        )
    return "median (p90) ms, sequential operations from one client\n\n" + "\n".join(lines)


def latency_cpu_table(lat: dict) -> str:
    """What one sequential 0/0 operation costs in CPU: with every process on this machine's
    cores, the latency cannot be below the total over the cores, whatever the message hops."""
    cores = os.cpu_count() or 1
    lines = [
        f"| 0/0, one client | median ms | server CPU ms / op | client CPU ms / op | total / {cores} cores (ms) |",
        "|---|---|---|---|---|",
    ]
    for label, r in (
        ("read-write", lat["replicated"]["0/0"]), ("read-only", lat["replicated"]["0/0-ro"]),
        ("tentative", lat["tentative"]["0/0"]), ("unreplicated", lat["unreplicated"]["0/0"]),
        ("unreplicated+auth", lat["unreplicated+auth"]["0/0"]),
    ):
        total = r["server_cpu_ms_per_op"] + r["client_cpu_ms_per_op"]
        lines.append(
            f"| {label} | {r['median_ms']:.3f} | {r['server_cpu_ms_per_op']:.3f} | {r['client_cpu_ms_per_op']:.3f} "
            f"| {total / cores:.3f} |"
        )
    return "\n".join(lines)


def throughput_table(thr: dict) -> str:
    lines = [
        "| clients | arg/res (KB) | replicated ops/s | mean batch | replica CPU s / 1000 ops | client CPU s / 1000 "
        "| unreplicated ops/s (CPU) | unreplicated+auth ops/s (CPU) | replicated / unreplicated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in thr.values():
        rep, un, ua = row["replicated"], row["unreplicated"], row["unreplicated+auth"]
        lines.append(
            f"| {row['clients']} | {row['size']} | {rep['ops_per_s']:.0f} | {rep.get('batch_mean', 0):.1f} "
            f"| {rep['cpu_s_per_1000']:.3f} | {rep['client_cpu_s_per_1000']:.3f} "
            f"| {un['ops_per_s']:.0f} ({un['cpu_s_per_1000']:.3f}) "
            f"| {ua['ops_per_s']:.0f} ({ua['cpu_s_per_1000']:.3f}) "
            f"| {rep['ops_per_s'] / un['ops_per_s']:.2f} |"
        )
    return "closed loop; CPU: seconds of all server processes per 1,000 operations\n\n" + "\n".join(lines)


def floors(results: dict) -> list[tuple[str, str, bool]]:
    """Each floor of issue 11 that this run measured: (what, the figure, met)."""
    lat, thr = results["latency"], results["throughput"]
    out = []
    un = lat["unreplicated"]["0/0"]["median_ms"]
    for label, figure, limit in (
        ("read-write 0/0 median <= 3x unreplicated", lat["replicated"]["0/0"]["median_ms"], 3.0),
        ("read-only 0/0 median <= 1.4x unreplicated", lat["replicated"]["0/0-ro"]["median_ms"], 1.4),
        ("tentative 0/0 median <= 2.5x unreplicated", lat["tentative"]["0/0"]["median_ms"], 2.5),
    ):
        out.append((label, f"{figure / un:.2f}x", figure / un <= limit))
    for clients, limit in ((64, 0.35), (16, 0.30)):
        row = thr.get(f"{clients} 0/0")
        if row:
            ratio = row["replicated"]["ops_per_s"] / row["unreplicated"]["ops_per_s"]
            what = f"0/0 throughput, {clients} clients >= {limit:.0%} of unreplicated"
            out.append((what, f"{ratio:.0%}", ratio >= limit))
    base = thr.get("64 0/0")
    for size in ("0/4", "4/0"):
        row = thr.get(f"64 {size}")
        if row and base:
            ratio = row["replicated"]["ops_per_s"] / base["unreplicated"]["ops_per_s"]
            out.append((f"{size} throughput, 64 clients >= 25% of unreplicated 0/0", f"{ratio:.0%}", ratio >= 0.25))
    for clients, before in REFERENCE_CPU_S_PER_1000.items():
        row = thr.get(f"{clients} 0/0")
        if row:
            now = row["replicated"]["cpu_s_per_1000"]
            out.append((f"replica CPU per op, {clients} clients <= half of {before:.3f} s / 1000",
                        f"{now:.3f} ({now / before:.2f}x)", now <= before / 2))
    rss = results.get("rss")
    if rss:
        (a, ma), (b, mb) = sorted(rss.items(), key=lambda kv: int(kv[0]))
        out.append((f"replica RSS flat from {int(a) // 1000}k to {int(b) // 1000}k operations (<= +10%)",
                    f"{ma:.1f} -> {mb:.1f} MB", mb <= ma * 1.1))
    return out


def floors_table(rows: list[tuple[str, str, bool]]) -> str:
    lines = ["| floor (issue 11) | measured | met |", "|---|---|---|"]
    lines += [f"| {what} | {figure} | {'yes' if ok else '**no**'} |" for what, figure, ok in rows]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    lat, thr = results["latency"], results["throughput"]
    keys = [size_key(a, r) for a, r in SIZES]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    series = (
        ("read-write", "replicated", "", "tab:blue"),
        ("read-only", "replicated", "-ro", "tab:cyan"),
        ("tentative", "tentative", "", "tab:purple"),
        ("unreplicated", "unreplicated", "", "tab:gray"),
        ("unreplicated+auth", "unreplicated+auth", "", "tab:olive"),
    )
    width = 0.16
    for i, (label, target, suffix, color) in enumerate(series):
        med = [lat[target][k + suffix]["median_ms"] for k in keys]
        ax1.bar([x + i * width for x in range(len(keys))], med, width, label=label, color=color)
    ax1.set_xticks([x + 2 * width for x in range(len(keys))], keys)
    ax1.set_xlabel("argument/result (KB)")
    ax1.set_ylabel("median latency (ms)")
    ax1.legend(fontsize=7)
    styles = {"0/0": "-", "0/4": "--", "4/0": ":"}
    for target, color in (("replicated", "tab:blue"), ("unreplicated", "tab:gray"), ("unreplicated+auth", "tab:olive")):
        for size, style in styles.items():
            rows = [row for row in thr.values() if row["size"] == size]
            if rows:
                ax2.plot([r["clients"] for r in rows], [r[target]["ops_per_s"] for r in rows], style,
                         marker="o", color=color, label=f"{target} {size}")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("closed-loop clients")
    ax2.set_ylabel("operations/s")
    ax2.legend(fontsize=6)
    fig.suptitle("PBFT null operations (" + results["machine"] + ")", fontsize=8)
    return save(fig, path)


# Each optimisation's switch, with the operation whose latency it is meant to cut.
OPTIMISATIONS = [
    ("tentative execution", "tentative", (0, 0)),
    ("digest replies", "digest_replies", (0, 4096)),
    ("separate large requests", "separate_large_requests", (4096, 0)),
    ("replies from a quorum", "replies_from_quorum", (0, 0)),
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
    ap.add_argument("--quick", action="store_true", help="a smaller run, under two minutes")
    ap.add_argument("--ops", type=int, default=2000, help="sequential operations per 0/0 latency run")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each throughput run")
    ap.add_argument("--clients", default="1,4,16,64", help="closed-loop client counts, comma-separated")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--skip-optimisations", action="store_true", help="skip the per-switch comparison")
    ap.add_argument(
        "--durability", choices=DURABILITY_MODES, default="memory",
        help="what the replicas keep on disk (default memory: the paper's, and like the unreplicated server, "
        "no disk on the path; bench.durability measures the others)",
    )
    args = ap.parse_args()
    try:
        counts = sorted({int(c) for c in args.clients.split(",")})
        if not counts or counts[0] < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--clients wants positive integers separated by commas, not {args.clients!r}")
    if args.quick:
        args.ops, args.seconds, args.skip_optimisations = 300, 1.0, True
        counts = [c for c in counts if c >= 16] or counts[-1:]
    marks = (5_000, 25_000) if args.quick else (10_000, 100_000)
    names = ("replicated", "unreplicated", "unreplicated+auth")
    progress = Progress(len(SIZES) * 5 + len(counts) * len(SIZES) * len(names) + 1)
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "durability": args.durability,
                     "latency": {n: {} for n in (*names, "tentative")}, "throughput": {}}
    print(f"machine: {results['machine']}; {', '.join(names)} and tentative, durability {args.durability}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        targets = {n: Target(n, Path(tmp), counts[-1] + 1, args.durability) for n in names}
        try:
            time.sleep(1.0)
            lat = results["latency"]
            for arg, res in SIZES:
                k = size_key(arg, res)
                ops = args.ops if arg == res == 0 else max(1, args.ops // 2)
                for name, ro in (("replicated", False), ("replicated", True), ("unreplicated", False),
                                 ("unreplicated+auth", False)):
                    r = run_async(latency(targets[name].client, arg, res, ops, ro, cpu_s=targets[name].cpu_s))
                    lat[name][k + ("-ro" if ro else "")] = r
                    progress.step(f"latency {name} {k} KB {'read-only' if ro else 'read-write'}: "
                                  f"median {r['median_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms")
            for clients in counts:
                for arg, res in SIZES:
                    k = size_key(arg, res)
                    row = results["throughput"][f"{clients} {k}"] = {"clients": clients, "size": k}
                    for name in names:
                        r = row[name] = measure_throughput(targets[name], clients, args.seconds, arg, res)
                        batch = f", batch {r['batch_mean']:.1f}" if "batch_mean" in r else ""
                        progress.step(f"throughput {name} {clients} clients {k} KB: {r['ops_per_s']:.0f} ops/s, "
                                      f"CPU {r['cpu_s_per_1000']:.3f} s / 1000{batch}")
            results["rss"] = measure_rss(targets["replicated"], marks)
            rss = ", ".join(f"{int(m) // 1000}k ops {v:.1f} MB" for m, v in results["rss"].items())
            progress.step(f"replica RSS: {rss}")
        finally:
            for t in targets.values():
                t.stop()
        tentative = Target("tentative", Path(tmp), 2, args.durability, tentative=True)
        try:
            for arg, res in SIZES:
                k = size_key(arg, res)
                ops = args.ops if arg == res == 0 else max(1, args.ops // 2)
                r = run_async(latency(tentative.client, arg, res, ops, cpu_s=tentative.cpu_s))
                results["latency"]["tentative"][k] = r
                progress.step(f"latency tentative {k} KB read-write: median {r['median_ms']:.3f} ms")
        finally:
            tentative.stop()
        if not args.skip_optimisations:
            print("each optimisation off and on (a fresh cluster each):", flush=True)
            results["optimisations"] = measure_optimisations(Path(tmp), max(200, args.ops // 2), args.durability)

    results["floors"] = [{"floor": w, "measured": m, "met": ok} for w, m, ok in floors(results)]
    md = "\n\n".join([
        latency_table(results["latency"]), latency_cpu_table(results["latency"]),
        throughput_table(results["throughput"]), floors_table(floors(results)),
    ])
    if "optimisations" in results:
        md += "\n\n" + optimisation_table(results["optimisations"])
    print()
    print(md)
    write_results(args.out, "micro", results, md, plot)


if __name__ == "__main__":
    main()

"""What each durability mode costs: a 4-replica PBFT cluster (f = 1) on this machine, per mode.

For each ``durability`` (memory: stable checkpoints only, the paper's; log: also the promise log,
written before the messages it covers leave, no fsync; strict: the same, fsynced first), on a
fresh cluster with the ``null`` service:

1. the median and 99th percentile latency of sequential read-write null operations (0/0) from
   one client, for ``--seconds``;
2. the throughput of ``--clients`` closed-loop clients, for ``--seconds``, with the CPU time of
   the four replica processes (utime + stime from /proc/PID/stat) per 1,000 operations.

Then, in strict mode with the ``kv`` service: fill ``--state-mb`` of values, let the cluster go
idle, kill -9 one replica, restart it from its data directory, and time until its /status shows
it at the others' executed sequence number; with whether it needed a state transfer and how many
batches it replayed from its promise log.

With ``--rounds N`` every mode is measured N times, the modes interleaved (each round starting
with another), and each figure is the median over the rounds: on a shared machine, other work
moves these figures more than a single run can tell apart from the modes' own cost.

Prints a Markdown table (each mode, and its ratio to memory) and writes
``bench/results/durability.{md,json,png}``. A measurement, not a test: nothing here asserts a speed.

    python -m bench.durability [--seconds 5] [--clients 16] [--rounds 1] [--state-mb 100] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.micro import RESULTS, latency, machine, process_cpu_s, pyplot, save, throughput, write_results
from bench.recovery import fill
from bft import config as cfg
from bft.core.params import DEFAULT_PARAMS, DURABILITY_MODES, Params
from bft.launch import start_replicas, stop_replicas
from bft.local import LocalCluster, free_base_port, replica_status, wait_for_port
from bft.runtime.process import run_async
from bft.service import KVService
from client import Client

LATENCY_OPS_MAX = 1_000_000  # the latency run is bounded by --seconds; this only bounds that
RESTART_REPLICA = 3  # a backup: killing it starts no view change
RESTART_TIMEOUT_S = 120.0
TAIL_OPS = 200  # puts after the fill, so the restarted replica has batches past a checkpoint to replay
def measure_mode(directory: Path, mode: str, args: argparse.Namespace) -> dict:
    """Latency and throughput on a fresh null-service cluster with ``durability = mode``."""
    return measure(directory, replace(DEFAULT_PARAMS, durability=mode), mode, args)


def measure(directory: Path, params: Params, mode: str, args: argparse.Namespace) -> dict:
    """Latency and throughput on a fresh null-service cluster with ``params``, called ``mode``."""
    cfg.keygen(directory, 1, args.clients + 1, base_port=free_base_port(4), params=params)
    cluster = cfg.load(directory / "cluster.toml")
    procs = start_replicas(cluster, "null", directory / "logs", "warning")
    try:
        for r in cluster.replicas:
            wait_for_port(r.host, r.port)
            wait_for_port(r.host, r.admin_port)
        status = replica_status(cluster, 0)
        assert status.get("durability") == params.durability, f"replica runs with {status.get('durability')}"

        def make_client(i: int) -> Client:
            return Client(cluster, i)

        lat = run_async(latency(make_client, 0, 0, LATENCY_OPS_MAX, seconds=args.seconds))
        print(f"  {mode:<7} 0/0 read-write, 1 client   median {lat['median_ms']:.3f} ms  "
              f"p99 {lat['p99_ms']:.3f} ms  ({lat['ops']} ops)", flush=True)
        pids = [p.pid for p in procs]
        tp = run_async(throughput(make_client, args.clients, args.seconds, lambda: process_cpu_s(pids)))
        tp["cpu_s_per_1000_ops"] = tp["cpu_s"] / tp["ops"] * 1000
        print(f"  {mode:<7} 0/0 read-write, {args.clients} clients  {tp['ops_per_s']:.0f} ops/s  "
              f"replica CPU {tp['cpu_s_per_1000_ops']:.3f} s per 1,000 ops", flush=True)
        promise_logs = [replica_status(cluster, r.id).get("promise_log", {}) for r in cluster.replicas]
    finally:
        stop_replicas(procs)
    return {"latency": lat, "throughput": tp, "promise_log": promise_logs}


def combine(rounds: list[dict]) -> dict:
    """One mode's figures over several rounds: the median of each, and every round as measured."""
    out: dict = {"rounds": rounds}
    for part, keys in (("latency", ("median_ms", "p99_ms")), ("throughput", ("ops_per_s", "cpu_s_per_1000_ops"))):
        out[part] = {k: statistics.median(r[part][k] for r in rounds) for k in keys}
        out[part]["ops"] = sum(r[part]["ops"] for r in rounds)
    out["throughput"]["clients"] = rounds[0]["throughput"]["clients"]
    return out


def directory_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


async def restart_from_disk(lc: LocalCluster, megabytes: int) -> dict:
    """Fill the kv state, go idle, kill -9 a backup and restart it from its data directory."""
    me = RESTART_REPLICA
    async with Client(lc.cluster, 4) as c:
        await c.wait_connected()
        await fill(c, megabytes)
        for i in range(TAIL_OPS):
            await c.invoke(KVService.put(b"tick", b"%d" % i))
    # Idle now: wait until the replica to kill has executed everything, so the restart measures
    # reading the disk back, not also catching up on what it had not yet received.
    others = [i for i in range(len(lc.cluster.replicas)) if i != me]
    target = max(lc.status(i)["executed"] for i in others)
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while lc.status(me)["executed"] < target:
        assert time.monotonic() < deadline, "the replica to kill never caught up before the kill"
        await asyncio.sleep(0.02)
    before = lc.status(me)
    data = lc.cluster.path.parent / "data" / f"replica-{me}"
    on_disk_mb = directory_mb(data)
    promise_log_mb = sum(p.stat().st_size for p in data.glob("promises.log*")) / 2**20

    lc.kill(me)
    t0 = time.perf_counter()
    lc.restart(me)  # returns once its replica and admin ports accept connections
    listening = time.perf_counter() - t0
    while True:
        s = lc.status(me)
        if s["executed"] >= target:
            break
        assert time.perf_counter() - t0 < RESTART_TIMEOUT_S, f"no catch-up after {RESTART_TIMEOUT_S} s: {s}"
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - t0
    stats = s["stats"]
    return {
        "seconds": elapsed,
        "listening_s": listening,
        "state_mb": megabytes,
        "executed": target,
        "stable_checkpoint_before_kill": before["stable_checkpoint"],
        "data_dir_mb": on_disk_mb,
        "promise_log_mb": promise_log_mb,
        "replayed_batches": stats.get("replayed-batches", 0),
        "recovered_records": stats.get("recovered-records", 0),
        "state_transfers": stats.get("state-transfers", 0),
        "state_fetches": stats.get("state-fetches", 0),
        "state_transfer": stats.get("state-transfers", 0) + stats.get("state-fetches", 0) > 0,
        "data_problems": s.get("data_problems", []),
    }


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def cells_against(m: dict, base: dict, is_base: bool) -> list[str]:
    """One configuration's median and p99 latency, throughput and CPU per 1,000 operations
    (``measure``'s figures, after ``combine``), each with its ratio to ``base``'s."""
    cells = []
    for part, key, fmt in (
        ("latency", "median_ms", "{:.3f}"),
        ("latency", "p99_ms", "{:.3f}"),
        ("throughput", "ops_per_s", "{:.0f}"),
        ("throughput", "cpu_s_per_1000_ops", "{:.3f}"),
    ):
        cell = fmt.format(m[part][key])
        cells.append(cell if is_base else f"{cell} ({ratio(m[part][key], base[part][key])})")
    return cells


def table(results: dict) -> str:
    modes = results["modes"]
    base = modes["memory"]
    clients = base["throughput"]["clients"]
    restart = results.get("restart")
    restart_head = f" | restart from disk next to {restart['state_mb']} MB" if restart else ""
    lines = [
        f"| durability | 0/0 rw median ms | 0/0 rw p99 ms | {clients}-client ops/s "
        f"| replica CPU s / 1,000 ops{restart_head} |",
        "|---|---|---|---|---|" + ("---|" if restart else ""),
    ]
    for mode, m in modes.items():
        cells = cells_against(m, base, mode == "memory")
        if restart:
            if mode == restart["mode"]:
                cells.append(
                    f"{restart['seconds']:.2f} s ({restart['listening_s']:.2f} s to listen), "
                    f"{restart['replayed_batches']} batches replayed, "
                    + ("state transfer" if restart["state_transfer"] else "no state transfer")
                )
            else:
                cells.append("not measured")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fsync_note(results: dict) -> str:
    """One line per mode with a promise log: what replica 0's log did over that mode's run."""
    out = []
    for mode, m in results["modes"].items():
        logs = [r["promise_log"][0] for r in m["rounds"] if r["promise_log"] and r["promise_log"][0]]
        if not logs:
            continue
        commits, fsyncs = sum(x.get("commits", 0) for x in logs), sum(x.get("fsyncs", 0) for x in logs)
        line = f"{mode}: replica 0 made {commits:.0f} promise-log commits"
        if fsyncs:
            line += f", {fsyncs:.0f} fsyncs, mean {sum(x['fsync_seconds'] for x in logs) / fsyncs * 1e3:.3f} ms"
        out.append(line + " (whole runs, warm-ups included)")
    return "\n".join(out)


def plot(results: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    modes = list(results["modes"])
    ms = [results["modes"][m] for m in modes]
    colors = {"memory": "tab:gray", "log": "tab:blue", "strict": "tab:red"}
    restart = results.get("restart")
    fig, axes = plt.subplots(1, 4 if restart else 3, figsize=(12 if restart else 9, 3.5))
    xs = range(len(modes))
    width = 0.4
    ax = axes[0]
    ax.bar([x - width / 2 for x in xs], [m["latency"]["median_ms"] for m in ms], width, label="median",
           color=[colors.get(m, "tab:green") for m in modes])
    ax.bar([x + width / 2 for x in xs], [m["latency"]["p99_ms"] for m in ms], width, label="p99",
           color=[colors.get(m, "tab:green") for m in modes], alpha=0.45)
    ax.set_xticks(list(xs), modes)
    ax.set_ylabel("0/0 read-write latency (ms)")
    ax.legend(fontsize=8)
    clients = ms[0]["throughput"]["clients"]
    for ax, key, label in (
        (axes[1], "ops_per_s", f"null ops/s, {clients} clients"),
        (axes[2], "cpu_s_per_1000_ops", "replica CPU s per 1,000 ops"),
    ):
        ax.bar(modes, [m["throughput"][key] for m in ms], color=[colors.get(m, "tab:green") for m in modes])
        ax.set_ylabel(label)
    if restart:
        ax = axes[3]
        ax.bar([restart["mode"]], [restart["listening_s"]], color="tab:orange", label="process up")
        ax.bar([restart["mode"]], [restart["seconds"] - restart["listening_s"]], bottom=[restart["listening_s"]],
               color=colors.get(restart["mode"], "tab:red"), label="to the others' executed")
        ax.set_ylabel(f"restart next to {restart['state_mb']} MB (s)")
        ax.set_ylim(0, restart["seconds"] * 1.4)
        ax.legend(fontsize=8, loc="upper center")
    fig.suptitle("PBFT durability modes, 4 replicas (" + results["machine"] + ")", fontsize=8)
    return save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=None, help="length of each latency and throughput run (5)")
    ap.add_argument("--clients", type=int, default=16, help="closed-loop clients for throughput")
    ap.add_argument("--state-mb", type=int, default=None, help="kv state for the restart measurement (100)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every mode this many times, interleaved, and report the medians")
    ap.add_argument("--quick", action="store_true", help="2 s runs and a 20 MB state, for a try-out")
    ap.add_argument("--skip-restart", action="store_true", help="skip the restart-from-disk measurement")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 5.0
    if args.state_mb is None:
        args.state_mb = 20 if args.quick else 100

    results: dict = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": args.seconds,
        "load_average_before": os.getloadavg(),
        "modes": {},
    }
    # Other work on the machine moves these figures more than anything measured here: say how busy it was.
    print(f"machine: {results['machine']}, load average {results['load_average_before'][0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"4 replicas (f = 1, null service) on 127.0.0.1, a fresh cluster per mode, {args.seconds:g} s runs:",
              flush=True)
        rounds: dict[str, list[dict]] = {mode: [] for mode in DURABILITY_MODES}
        for k in range(args.rounds):
            if args.rounds > 1:
                print(f" round {k + 1} of {args.rounds}:", flush=True)
            # Each round starts with another mode, so that no mode always runs first (or last).
            order = DURABILITY_MODES[k % len(DURABILITY_MODES) :] + DURABILITY_MODES[: k % len(DURABILITY_MODES)]
            for mode in order:
                rounds[mode].append(measure_mode(Path(tmp) / f"{mode}-{k}", mode, args))
        results["modes"] = {mode: combine(rs) for mode, rs in rounds.items()}
        if not args.skip_restart:
            mode = "strict"
            print(f"restart from disk next to {args.state_mb} MB of kv state ({mode}):", flush=True)
            lc = LocalCluster(Path(tmp) / "restart", 1, "kv", replace(DEFAULT_PARAMS, durability=mode))
            try:
                results["restart"] = run_async(restart_from_disk(lc, args.state_mb)) | {"mode": mode}
            finally:
                lc.stop()
            r = results["restart"]
            print(f"  replica {RESTART_REPLICA} at executed {r['executed']} {r['seconds']:.2f} s after the restart "
                  f"(listening after {r['listening_s']:.2f} s); {r['replayed_batches']} batches replayed, "
                  f"{r['state_transfers']} state transfers, {r['state_fetches']} state fetches; "
                  f"data directory {r['data_dir_mb']:.1f} MB, promise log {r['promise_log_mb']:.2f} MB", flush=True)

    results["load_average_after"] = os.getloadavg()
    md = table(results)
    note = fsync_note(results) + (
        f"\nload average (1 min) {results['load_average_before'][0]:.2f} before, "
        f"{results['load_average_after'][0]:.2f} after"
    )
    print()
    print(md)
    print()
    print(note)
    write_results(args.out, "durability", results, f"{md}\n\n{note}", plot)


if __name__ == "__main__":
    main()

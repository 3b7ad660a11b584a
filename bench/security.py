"""What sessions, encryption and proactive recovery cost: a 4-replica PBFT cluster (f = 1) here.

First the session layer by itself, in this process: a handshake (both ends), and sealing plus
opening one frame of 200 bytes and of 4 KiB, tagged (the default) and encrypted.

Then, on a fresh cluster each (null service, ``durability = "memory"`` so the disk stays out of
it, as in bench.micro), the median and 99th percentile latency of sequential 0/0 read-write
operations from one client and the throughput of ``--clients`` closed-loop clients with the
replicas' CPU per 1,000 operations (bench.durability's measurement), for:

- ``sessions``: the defaults (every frame tagged; proactive recovery every 600 s, so never in a
  run this short);
- ``encrypted``: ``encrypt = true``;
- ``recovering``: ``recovery_period_s = 4``, so one of the four replicas recovers every second
  (closes every session, forgets its request keys, audits its state): far more often than anyone
  would run it, to make its cost visible. The figure for a real period scales with the ratio.

With ``--rounds N`` the configurations are measured N times, interleaved, and each figure is the
median. Prints a Markdown table with ratios to ``sessions`` and writes
``bench/results/security.{md,json,png}``. A measurement, not a test.

    python -m bench.security [--seconds 5] [--clients 16] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import timeit
from dataclasses import replace
from pathlib import Path

from bench.durability import cells_against, combine, measure
from bench.micro import RESULTS, machine, pyplot, save, write_results
from bft import config as cfg
from bft.core.params import DEFAULT_PARAMS
from bft.crypto import CLIENT, REPLICA
from bft.runtime.session import Session

BASE = replace(DEFAULT_PARAMS, durability="memory")
CONFIGS = {
    "sessions": BASE,
    "encrypted": replace(BASE, encrypt=True),
    "recovering": replace(BASE, recovery_period_s=4),
}


def session_costs() -> dict:
    """Microseconds per handshake and per frame sealed and opened, in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        cluster = cfg.load(cfg.keygen(Path(tmp), 1, 1, base_port=17300))
        client, replica = cluster.keyring(CLIENT, 0), cluster.keyring(REPLICA, 0)

    def handshake(encrypt: bool = False) -> tuple[Session, Session]:
        a, b = Session(client, expect=0, encrypt=encrypt), Session(replica)
        b.receive_handshake(a.receive_handshake(b.receive_handshake(a.initiate())))
        return a, b

    runs = 200
    out = {"handshake_us": timeit.timeit(handshake, number=runs) / runs * 1e6}
    for encrypt in (False, True):
        a, b = handshake(encrypt)
        for size in (200, 4096):
            frame = bytes(size)
            n = 20_000
            us = timeit.timeit(lambda a=a, b=b, frame=frame: b.open(a.seal(frame)), number=n) / n * 1e6
            out[f"{'encrypted' if encrypt else 'tagged'}_{size}B_us"] = us
    return out


def table(results: dict) -> str:
    configs = results["configs"]
    base = configs["sessions"]
    clients = base["throughput"]["clients"]
    lines = [
        f"| configuration | 0/0 rw median ms | 0/0 rw p99 ms | {clients}-client ops/s | replica CPU s / 1,000 ops |",
        "|---|---|---|---|---|",
    ]
    for name, m in configs.items():
        cells = cells_against(m, base, name == "sessions")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    c = results["session_costs"]
    lines.append("")
    lines.append(
        f"Session layer in one process: handshake {c['handshake_us']:.0f} µs (both ends); a frame sealed "
        f"and opened: {c['tagged_200B_us']:.1f} µs (200 B) and {c['tagged_4096B_us']:.1f} µs (4 KiB) tagged, "
        f"{c['encrypted_200B_us']:.1f} µs and {c['encrypted_4096B_us']:.1f} µs encrypted."
    )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    names = list(results["configs"])
    ms = [results["configs"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.5))
    for ax, (part, key, label) in zip(axes, (
        ("latency", "median_ms", "0/0 read-write median (ms)"),
        ("throughput", "ops_per_s", f"null ops/s, {ms[0]['throughput']['clients']} clients"),
        ("throughput", "cpu_s_per_1000_ops", "replica CPU s per 1,000 ops"),
    ), strict=True):
        ax.bar(names, [m[part][key] for m in ms], color=["tab:gray", "tab:blue", "tab:orange"][: len(names)])
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"sessions, encryption, proactive recovery ({results['machine']})", fontsize=9)
    return save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each latency and throughput run")
    ap.add_argument("--clients", type=int, default=16, help="closed-loop clients for throughput")
    ap.add_argument("--rounds", type=int, default=1, help="measure each configuration this many times, interleaved")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    results: dict = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "seconds": args.seconds,
        "load_average_before": os.getloadavg(),
    }
    print(f"machine: {results['machine']}, load average {results['load_average_before'][0]:.2f}", flush=True)
    results["session_costs"] = session_costs()
    print("session layer: " + ", ".join(f"{k} {v:.1f}" for k, v in results["session_costs"].items()), flush=True)
    names = list(CONFIGS)
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"4 replicas (f = 1, null service) on 127.0.0.1, a fresh cluster each, {args.seconds:g} s runs:",
              flush=True)
        for k in range(args.rounds):
            for name in names[k % len(names):] + names[: k % len(names)]:
                rounds[name].append(measure(Path(tmp) / f"{name}-{k}", CONFIGS[name], name, args))
    results["configs"] = {n: combine(rs) for n, rs in rounds.items()}
    results["load_average_after"] = os.getloadavg()
    md = table(results) + (
        f"\n\nload average (1 min) {results['load_average_before'][0]:.2f} before, "
        f"{results['load_average_after'][0]:.2f} after"
    )
    print()
    print(md)
    write_results(args.out, "security", results, md, plot)


if __name__ == "__main__":
    main()

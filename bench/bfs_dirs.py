"""Large directories on BFS: does a create or a listing cost more as a directory grows?

Mounts BFS on 4 replicas, fills one directory with empty files, and prints the milliseconds per
create over the 100 creates that end at each size in ``--sizes``, and the milliseconds of a full
listing (``os.listdir``, which pages through readdir; the best of three) at that size. Flat figures mean a create
and a readdir page cost the same in a small and in a large directory. Then the same for the
state machine alone (bfs/fs.py in this process, a checkpoint captured every 128 operations, as
the replicas do): microseconds of CPU per create, which the load of a shared machine disturbs
less than the figures through the mount. A measurement, not a test.

    python -m bench.bfs_dirs [--sizes 1000,4000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import msgpack

from bench.andrew import mount, unmount
from bench.micro import machine
from bfs.fs import ROOT, FileSystem
from bft import config as cfg
from bft.core.clients import ClientTable
from bft.core.state import capture
from bft.launch import start_replicas, stop_replicas
from bft.local import free_base_port, wait_for_port

WINDOW = 100


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of sizes") from None
    if sizes[0] < WINDOW or sizes[-1] > 100_000:
        raise argparse.ArgumentTypeError(f"sizes must be between {WINDOW} and 100000")
    return sizes


def fill(directory: Path, sizes: list[int]) -> list[tuple[int, float, float]]:
    """(size, ms per create over the last WINDOW creates up to it, ms to list it)."""
    rows = []
    made = 0
    for size in sizes:
        while made < size - WINDOW:
            (directory / f"file-{made:06d}").touch()
            made += 1
        t0 = time.perf_counter()
        while made < size:
            (directory / f"file-{made:06d}").touch()
            made += 1
        per_create = (time.perf_counter() - t0) * 1000 / WINDOW
        listings = []
        for _ in range(3):  # the best of three: the machine is shared
            t0 = time.perf_counter()
            assert len(os.listdir(directory)) == size
            listings.append((time.perf_counter() - t0) * 1000)
        rows.append((size, per_create, min(listings)))
    return rows


def state_machine(sizes: list[int], spread: bool) -> list[float]:
    """µs of CPU per lookup + create + setattr, with checkpoints, over the WINDOW creates that end
    at each size: all in one directory, or (``spread``) in directories of WINDOW entries each, so
    that what grows with the whole file system shows apart from what grows with a directory."""
    fs, clients, ops = FileSystem(), ClientTable(64), 0
    snapshot = capture(fs, clients, 0, None)

    def call(*op: object) -> list:
        nonlocal ops, snapshot
        ops += 1
        result = msgpack.unpackb(fs.execute(msgpack.packb([op[0], [0, 0, []], *op[1:]]), 0, ops))
        if ops % 128 == 0:
            snapshot = capture(fs, clients, ops, snapshot)  # digests only what changed, as replicas do
        return result

    d = call("mkdir", ROOT, b"big", 0o755)[1][0]
    rows, made = [], 0
    for size in sizes:
        t0 = 0.0
        while made < size:
            if made == size - WINDOW:
                t0 = time.process_time()
            if spread and made % WINDOW == 0:
                d = call("mkdir", ROOT, b"d%06d" % made, 0o755)[1][0]
            name = b"file-%06d" % made
            call("lookup", d, name)
            ino = call("create", d, name, 0o644, True)[1][0]
            call("setattr", ino, [None, None, None, None, -1, -1])
            made += 1
        rows.append((time.process_time() - t0) * 1e6 / WINDOW)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=_sizes, default=[1000, 4000], help="directory sizes to measure at")
    args = ap.parse_args()
    print(f"machine: {machine()}, load {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg.keygen(tmp / "cluster", 1, 2, base_port=free_base_port(4))
        cluster = cfg.load(tmp / "cluster" / "cluster.toml")
        procs = start_replicas(cluster, "bfs", tmp / "cluster" / "logs", "warning")
        try:
            for r in cluster.replicas:
                wait_for_port(r.host, r.port)
            mount(["--config", str(cluster.path)], tmp / "bfs", tmp / "bfs.log")
            try:
                (tmp / "bfs" / "big").mkdir()
                rows = fill(tmp / "bfs" / "big", args.sizes)
            finally:
                unmount(tmp / "bfs")
        finally:
            stop_replicas(procs)
    print("| entries | ms per create | ms to list the directory |\n|---|---|---|")
    for size, per_create, listing in rows:
        print(f"| {size} | {per_create:.2f} | {listing:.1f} |")
    print(f"load after: {os.getloadavg()[0]:.1f}\n")
    print("state machine alone: µs of CPU per create (lookup, create, setattr, checkpoints)\n")
    print(f"| files | in one directory | in directories of {WINDOW} |\n|---|---|---|")
    together, spread = state_machine(args.sizes, False), state_machine(args.sizes, True)
    for size, one, many in zip(args.sizes, together, spread, strict=True):
        print(f"| {size} | {one:.0f} | {many:.0f} |")


if __name__ == "__main__":
    main()

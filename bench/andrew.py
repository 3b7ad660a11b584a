"""The Andrew benchmark, as in the BFS paper: five phases on a file system under test.

1. create the directory tree; 2. copy a source tree into it; 3. stat every file; 4. read every
byte of every file; 5. compile and link (``make``). The source tree is a C program generated here
(70 files, about 200 KB, like the original); ``--scale N`` repeats it N times (like Andrew100).

Targets: BFS on 4 replicas, BFS unreplicated (``bft serve --service bfs``, the paper's BFS-nr),
the local disk, and any directory given with ``--nfs PATH`` (an NFS mount, where the machine has
one). Prints the paper's table (seconds per phase, and the difference against BFS unreplicated)
as Markdown, and writes ``bench/results/andrew.{md,json,png}``. A measurement, not a test.

    python -m bench.andrew [--scale 1] [--nfs /mnt/nfs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.micro import RESULTS, machine, pyplot, save
from bft import config as cfg
from bft.launch import start_replicas, stop_replicas
from bft.local import free_base_port, wait_for_port

PHASES = ["1 mkdir", "2 copy", "3 stat", "4 read", "5 compile"]


def make_source(root: Path) -> None:
    """A small C program: 40 modules, 20 headers, docs, and a Makefile (70 files)."""
    root.mkdir(parents=True)
    for sub in ("src", "include", "doc"):
        (root / sub).mkdir()
    for i in range(20):
        (root / "include" / f"mod{i}.h").write_text(
            f"#ifndef MOD{i}_H\n#define MOD{i}_H\n" + "".join(f"int mod{i}_f{j}(int x);\n" for j in range(40))
            + "#endif\n"
        )
    for i in range(40):
        h = i % 20
        body = "".join(
            f"int mod{h}_f{j}(int x) {{ int y = x * {j + 1}; for (int k = 0; k < {j % 7 + 1}; k++) y += k ^ x;"
            f" return y + {i}; }}\n" if i < 20 else
            f"static int helper{i}_{j}(int x) {{ return mod{h}_f{j}(x) - {j}; }}\n"
            for j in range(40)
        )
        extra = "" if i < 20 else f"int user{i}(int x) {{ return helper{i}_0(x) + helper{i}_39(x); }}\n"
        (root / "src" / f"mod{i}.c").write_text(f'#include "mod{h}.h"\n' + body + extra)
    calls = " + ".join(f"user{i}(argc)" for i in range(20, 40))
    decls = "".join(f"int user{i}(int x);\n" for i in range(20, 40))
    (root / "src" / "main.c").write_text(
        f'#include <stdio.h>\n{decls}int main(int argc, char **argv) {{ printf("%d\\n", {calls}); return 0; }}\n'
    )
    for i in range(9):
        (root / "doc" / f"notes{i}.txt").write_text(f"Notes {i}\n" + "lorem ipsum dolor sit amet\n" * 120)
    objs = " ".join(f"src/mod{i}.o" for i in range(40)) + " src/main.o"
    (root / "Makefile").write_text(
        f"CFLAGS = -O1 -Iinclude\nOBJS = {objs}\nprog: $(OBJS)\n\tcc -o prog $(OBJS)\n"
        "%.o: %.c\n\tcc $(CFLAGS) -c -o $@ $<\n"
    )


def run_phases(source: Path, target: Path, scale: int) -> dict[str, float]:
    files = sorted(p for p in source.rglob("*") if p.is_file())
    dirs = sorted(p for p in source.rglob("*") if p.is_dir())
    trees = [target / f"tree{n}" for n in range(scale)]
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    for tree in trees:
        tree.mkdir()
        for d in dirs:
            (tree / d.relative_to(source)).mkdir()
    times[PHASES[0]] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for tree in trees:
        for f in files:
            shutil.copyfile(f, tree / f.relative_to(source))
    times[PHASES[1]] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for tree in trees:
        for dirpath, dirnames, filenames in os.walk(tree):
            for name in dirnames + filenames:
                os.lstat(os.path.join(dirpath, name))
    times[PHASES[2]] = time.perf_counter() - t0

    t0 = time.perf_counter()
    total = 0
    for tree in trees:
        for dirpath, _, filenames in os.walk(tree):
            for name in filenames:
                with open(os.path.join(dirpath, name), "rb") as fh:
                    total += len(fh.read())
    times[PHASES[3]] = time.perf_counter() - t0
    assert total == scale * sum(f.stat().st_size for f in files)

    t0 = time.perf_counter()
    for tree in trees:
        subprocess.run(["make", "-s", "-C", str(tree)], check=True, stdout=subprocess.DEVNULL)
    times[PHASES[4]] = time.perf_counter() - t0
    out = subprocess.run([str(trees[0] / "prog")], capture_output=True, text=True, check=True)
    assert out.stdout.strip().lstrip("-").isdigit()
    times["total"] = sum(times[p] for p in PHASES)
    return times


def mount(args: list[str], mountpoint: Path, log: Path) -> None:
    mountpoint.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [sys.executable, "-m", "bfs", "mount", *args, "--log-file", str(log), str(mountpoint)],
        capture_output=True, text=True,
    )
    if out.returncode:
        raise SystemExit(f"bench.andrew: cannot mount BFS: {out.stderr.strip()}")


def unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, capture_output=True)


def table(results: dict[str, dict[str, float]], baseline: str) -> str:
    targets = list(results)
    lines = ["| phase | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for phase in [*PHASES, "total"]:
        cells = []
        for t in targets:
            v, b = results[t][phase], results[baseline][phase]
            cells.append(f"{v:.2f}" if t == baseline else f"{v:.2f} ({(v / b - 1) * 100:+.0f}%)")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, float]], path: Path, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    targets = list(results)
    bottoms = [0.0] * len(targets)
    for phase in PHASES:
        values = [results[t][phase] for t in targets]
        ax.bar(targets, values, bottom=bottoms, label=phase)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    return save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=1, help="copies of the source tree (Andrew100 is 100)")
    ap.add_argument("--nfs", type=Path, help="a directory on an NFS mount to run the phases in as well")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if shutil.which("cc") is None or shutil.which("make") is None:
        raise SystemExit("bench.andrew: phase 5 needs cc and make (Debian: apt-get install build-essential)")
    results: dict[str, dict[str, float]] = {}
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "source"
        make_source(source)

        def measure(name: str, target: Path) -> None:
            print(f"{name}: running the five phases in {target} ...", flush=True)
            results[name] = run_phases(source, target, args.scale)
            row = ", ".join(f"{p.split()[1]} {results[name][p]:.2f}s" for p in PHASES)
            print(f"  {row}; total {results[name]['total']:.2f}s", flush=True)

        # BFS on 4 replicas
        cfg.keygen(tmp / "cluster", 1, 2, base_port=free_base_port(4))
        cluster = cfg.load(tmp / "cluster" / "cluster.toml")
        procs = start_replicas(cluster, "bfs", tmp / "cluster" / "logs", "warning")
        try:
            for r in cluster.replicas:
                wait_for_port(r.host, r.port)
            mount(["--config", str(cluster.path)], tmp / "bfs", tmp / "bfs.log")
            try:
                measure("BFS (4 replicas)", tmp / "bfs")
            finally:
                unmount(tmp / "bfs")
        finally:
            stop_replicas(procs)

        # BFS unreplicated
        port = free_base_port(1)
        server = subprocess.Popen(
            [sys.executable, "-m", "bft", "serve", "--service", "bfs", "--port", str(port)], stdout=subprocess.DEVNULL
        )
        try:
            wait_for_port("127.0.0.1", port)
            mount(["--unreplicated", f"127.0.0.1:{port}"], tmp / "bfs-nr", tmp / "bfs-nr.log")
            try:
                measure("BFS unreplicated", tmp / "bfs-nr")
            finally:
                unmount(tmp / "bfs-nr")
        finally:
            server.terminate()
            server.wait(5)

        local = tmp / "local"
        local.mkdir()
        measure("local disk", local)
        if args.nfs:
            target = args.nfs / f"andrew-{os.getpid()}"
            target.mkdir()
            try:
                measure("NFS", target)
            finally:
                shutil.rmtree(target, ignore_errors=True)
        else:
            print("NFS: not measured (no --nfs PATH given; this machine has no NFS client)", flush=True)

    md = table(results, "BFS unreplicated")
    print()
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "scale": args.scale, "seconds": results}
    (args.out / "andrew.json").write_text(json.dumps(info, indent=2) + "\n")
    (args.out / "andrew.md").write_text(
        f"Machine: {info['machine']}, {info['date']}, scale {args.scale}; percentages against BFS unreplicated\n\n"
        f"{md}\n"
    )
    if plot(results, args.out / "andrew.png", f"Andrew benchmark, scale {args.scale} ({info['machine']})"):
        print(f"\nwrote {args.out / 'andrew.md'}, andrew.json and andrew.png")


if __name__ == "__main__":
    main()

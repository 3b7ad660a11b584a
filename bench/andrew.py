"""The Andrew benchmark, as in the BFS paper: five phases on a file system under test.

1. create the directory tree; 2. copy a source tree into it; 3. stat every file; 4. read every
byte of every file; 5. compile and link (``make``). The source tree is a C program generated here
(70 files, about 200 KB, like the original); ``--scale N`` repeats it N times (like Andrew100).

Targets: BFS on 4 replicas with read-only lookups (the default mount) and strict (``--strict``:
every operation ordered), the paper's two BFS columns; BFS unreplicated (``bft serve --service
bfs``, the paper's BFS-nr); the local disk; and any directory given with ``--nfs PATH`` (an NFS
mount, where the machine has one). ``--repeat N`` runs the targets N times in turn (BFS, then
BFS unreplicated, then BFS again, ...), so that a slow minute of this shared machine falls on
one run of one target rather than decides the comparison; each target's run with the median
total goes into the table, and every round's ratio is printed beside it. Each phase prints its
time and, on BFS, the operations the mount sent (ordered and read-only). Prints the paper's
table (seconds per phase, and the difference against BFS unreplicated) as Markdown, the ratios
and the issue's floor, and writes ``bench/results/andrew.{md,json,png}``. A measurement, not a test.

    python -m bench.andrew [--scale 1] [--repeat 1] [--nfs /mnt/nfs]
                           [--durability memory|log|strict] [--param tentative=true ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from bench.micro import RESULTS, machine, pyplot, save
from bfs.cli import ATTR_TIMEOUT_S, WRITE_CACHE_KIB
from bft import config as cfg
from bft.core.params import DEFAULT_PARAMS, DURABILITY_MODES, Params
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


def run_phases(source: Path, target: Path, scale: int, progress: Callable[[str, float], None]) -> dict[str, float]:
    files = sorted(p for p in source.rglob("*") if p.is_file())
    dirs = sorted(p for p in source.rglob("*") if p.is_dir())
    trees = [target / f"tree{n}" for n in range(scale)]
    times: dict[str, float] = {}

    def timed(phase: str, work: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        work()
        times[phase] = time.perf_counter() - t0
        progress(phase, times[phase])

    def mkdirs() -> None:
        for tree in trees:
            tree.mkdir()
            for d in dirs:
                (tree / d.relative_to(source)).mkdir()

    def copy() -> None:
        for tree in trees:
            for f in files:
                shutil.copyfile(f, tree / f.relative_to(source))

    def stat_all() -> None:
        for tree in trees:
            for dirpath, dirnames, filenames in os.walk(tree):
                for name in dirnames + filenames:
                    os.lstat(os.path.join(dirpath, name))

    total = 0

    def read_all() -> None:
        nonlocal total
        for tree in trees:
            for dirpath, _, filenames in os.walk(tree):
                for name in filenames:
                    with open(os.path.join(dirpath, name), "rb") as fh:
                        total += len(fh.read())

    def compile_all() -> None:
        for tree in trees:
            subprocess.run(["make", "-s", "-C", str(tree)], check=True, stdout=subprocess.DEVNULL)

    for phase, work in zip(PHASES, (mkdirs, copy, stat_all, read_all, compile_all), strict=True):
        timed(phase, work)
    assert total == scale * sum(f.stat().st_size for f in files)
    out = subprocess.run([str(trees[0] / "prog")], capture_output=True, text=True, check=True)
    assert out.stdout.strip().lstrip("-").isdigit()
    times["total"] = sum(times[p] for p in PHASES)
    return times


class Mount:
    """``bfs mount`` in the background, with its operation counts read between phases."""

    def __init__(self, args: list[str], mountpoint: Path, log: Path) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoint = mountpoint
        self.stats = log.with_suffix(".stats.json")
        out = subprocess.run(
            [sys.executable, "-m", "bfs", "mount", *args, "--log-file", str(log), "--stats-file", str(self.stats),
             str(mountpoint)],
            capture_output=True, text=True,
        )
        match = re.search(r"\(pid (\d+)\)", out.stdout)
        if out.returncode or match is None:
            raise SystemExit(f"bench.andrew: cannot mount BFS: {out.stderr.strip() or out.stdout.strip()}")
        self.pid = int(match.group(1))
        self.last: Counter[str] = Counter()

    def calls(self) -> Counter[str]:
        """Operations sent since the last call (the mount writes its counts on SIGUSR1)."""
        self.stats.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not self.stats.exists():
            if time.monotonic() > deadline:
                raise SystemExit("bench.andrew: the mount did not write its operation counts")
            time.sleep(0.01)
        now = Counter(json.loads(self.stats.read_text()))
        new, self.last = now - self.last, now
        return new

    def unmount(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False, capture_output=True)


def describe(calls: Counter[str]) -> str:
    ordered = sum(n for k, n in calls.items() if not k.endswith(" ro"))
    top = ", ".join(f"{k} {n}" for k, n in calls.most_common(4))
    return f"{ordered} ordered, {calls.total() - ordered} read-only ({top})"


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


BFS = "BFS (read-only lookups)"
STRICT = "BFS strict"
UNREPLICATED = "BFS unreplicated"
LOCAL = "local disk"
TARGETS = ("bfs", "strict", "unreplicated", "local")
FLOOR = 1.3  # issue 12: BFS at most this times BFS unreplicated at --scale 10


def ratios(results: dict[str, dict[str, float]]) -> list[str]:
    lines = []
    for name in (BFS, STRICT):
        for base in (UNREPLICATED, LOCAL, "NFS"):
            if name in results and base in results:
                lines.append(f"{name} / {base}: {results[name]['total'] / results[base]['total']:.2f}x")
    if BFS in results and UNREPLICATED in results:
        ratio = results[BFS]["total"] / results[UNREPLICATED]["total"]
        lines.append(f"floor ({BFS} at most {FLOOR}x {UNREPLICATED}): {'met' if ratio <= FLOOR else 'NOT met'}")
    return lines


def protocol(durability: str, settings: list[str]) -> Params:
    """The replicas' parameters: the defaults with ``durability`` and each ``KEY=VALUE`` (a TOML
    value, as in cluster.toml's [protocol]); a bad one ends the benchmark with one line."""
    values: dict[str, object] = {"durability": durability}
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep:
            raise SystemExit(f"bench.andrew: --param {setting}: not KEY=VALUE")
        try:
            values[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise SystemExit(f"bench.andrew: --param {setting}: {exc}") from None
    try:
        return replace(DEFAULT_PARAMS, **values)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"bench.andrew: --param: {exc}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=1, help="copies of the source tree (Andrew100 is 100)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every target, taken in turn; the table shows each target's median run")
    ap.add_argument("--nfs", type=Path, help="a directory on an NFS mount to run the phases in as well")
    ap.add_argument("--durability", choices=DURABILITY_MODES, default="memory",
                    help="the replicas' (default memory: the paper's setting, and bft serve has no disk either)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a replica protocol parameter, as in cluster.toml's [protocol] (repeatable)")
    ap.add_argument("--attr-timeout", type=float, default=ATTR_TIMEOUT_S,
                    help=f"the mounts' attribute and name cache, s (default bfs mount's, {ATTR_TIMEOUT_S:g})")
    ap.add_argument("--write-cache-kib", type=int, default=WRITE_CACHE_KIB,
                    help=f"the mounts' write-back cache (default bfs mount's, {WRITE_CACHE_KIB}; 0: none)")
    ap.add_argument("--only", help="comma-separated targets to run: bfs,strict,unreplicated,local (default all)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.scale < 1:
        raise SystemExit("bench.andrew: --scale must be at least 1")
    if args.repeat < 1:
        raise SystemExit("bench.andrew: --repeat must be at least 1")
    only = set((args.only or ",".join(TARGETS)).split(","))
    if only - set(TARGETS):
        raise SystemExit(f"bench.andrew: unknown --only target(s) {sorted(only - set(TARGETS))} (known: {TARGETS})")
    if shutil.which("cc") is None or shutil.which("make") is None:
        raise SystemExit("bench.andrew: phase 5 needs cc and make (Debian: apt-get install build-essential)")
    if args.nfs is not None and not args.nfs.is_dir():
        raise SystemExit(f"bench.andrew: --nfs {args.nfs} is not a directory")
    params = protocol(args.durability, args.param)
    replicas = f"replicas' durability {args.durability}" + "".join(", " + p for p in args.param)
    mount_options = ["--attr-timeout", str(args.attr_timeout), "--write-cache-kib", str(args.write_cache_kib)]
    runs: dict[str, list[tuple[dict[str, float], dict[str, dict[str, int]]]]] = {}
    print(f"machine: {machine()}; scale {args.scale}; {args.repeat} round(s); {replicas}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "source"
        make_source(source)

        def measure(name: str, target: Path, mnt: Mount | None = None) -> None:
            print(f"{name}{round_label}: running the five phases in {target} ...", flush=True)
            counts: dict[str, dict[str, int]] = {}

            def progress(phase: str, seconds: float) -> None:
                line = f"  {phase}: {seconds:.2f} s"
                if mnt is not None:
                    done = mnt.calls()
                    counts[phase] = dict(done)
                    line += f"; {describe(done)}"
                print(line, flush=True)

            times = run_phases(source, target, args.scale, progress)
            runs.setdefault(name, []).append((times, counts))
            print(f"  total {times['total']:.2f} s (load average {os.getloadavg()[0]:.2f})", flush=True)

        def replicated(name: str, extra: list[str]) -> None:
            where = tmp / f"{name.split()[1].strip('()')}-{round_no}"
            cfg.keygen(where, 1, 2, base_port=free_base_port(4), params=params)
            cluster = cfg.load(where / "cluster.toml")
            procs = start_replicas(cluster, "bfs", where / "logs", "warning")
            try:
                for r in cluster.replicas:
                    wait_for_port(r.host, r.port)
                mnt = Mount(["--config", str(cluster.path), *mount_options, *extra], where / "mnt", where / "mount.log")
                try:
                    measure(name, where / "mnt", mnt)
                finally:
                    mnt.unmount()
            finally:
                stop_replicas(procs)

        def unreplicated() -> None:
            port = free_base_port(1)
            server = subprocess.Popen(
                [sys.executable, "-m", "bft", "serve", "--service", "bfs", "--port", str(port)],
                stdout=subprocess.DEVNULL,
            )
            try:
                wait_for_port("127.0.0.1", port)
                where = tmp / f"bfs-nr-{round_no}"
                mnt = Mount(["--unreplicated", f"127.0.0.1:{port}", *mount_options], where / "mnt", where / "mount.log")
                try:
                    measure(UNREPLICATED, where / "mnt", mnt)
                finally:
                    mnt.unmount()
            finally:
                server.terminate()
                server.wait(5)

        def nfs(root: Path) -> None:
            target = root / f"andrew-{os.getpid()}-{round_no}"
            target.mkdir()
            try:
                measure("NFS", target)
            finally:
                shutil.rmtree(target, ignore_errors=True)

        for round_no in range(args.repeat):
            round_label = f" (round {round_no + 1} of {args.repeat})" if args.repeat > 1 else ""
            if "bfs" in only:
                replicated(BFS, [])
            if "strict" in only:
                replicated(STRICT, ["--strict"])
            if "unreplicated" in only:
                unreplicated()
            if "local" in only:
                local = tmp / f"local-{round_no}"
                local.mkdir()
                measure(LOCAL, local)
            if args.nfs:
                nfs(args.nfs)
        if not args.nfs:
            print("NFS: not measured (no --nfs PATH given; this machine has no NFS client)", flush=True)

    # Each target's run with the median total (the lower one of an even count): a table whose
    # phases add up, and ratios of medians.
    median = {name: sorted(done, key=lambda run: run[0]["total"])[(len(done) - 1) // 2] for name, done in runs.items()}
    results = {name: times for name, (times, _) in median.items()}
    calls = {name: counts for name, (_, counts) in median.items() if counts}
    baseline = UNREPLICATED if UNREPLICATED in results else next(iter(results))
    md = table(results, baseline)
    summary = ratios(results)
    if args.repeat > 1 and BFS in runs and UNREPLICATED in runs:
        each = [a[0]["total"] / b[0]["total"] for a, b in zip(runs[BFS], runs[UNREPLICATED], strict=True)]
        summary.insert(0, f"{BFS} / {UNREPLICATED} in each round: " + ", ".join(f"{r:.2f}x" for r in each)
                       + "; below, each target's median run")
    print()
    print(md)
    print()
    print("\n".join(summary))
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "scale": args.scale,
            "repeat": args.repeat, "durability": args.durability, "params": args.param,
            "load_average": os.getloadavg()[0], "seconds": results,
            "rounds": {name: [times for times, _ in done] for name, done in runs.items()},
            "operations": calls}
    (args.out / "andrew.json").write_text(json.dumps(info, indent=2) + "\n")
    (args.out / "andrew.md").write_text(
        f"Machine: {info['machine']}, {info['date']}, scale {args.scale}, {args.repeat} round(s), {replicas}; "
        f"percentages against {baseline}\n\n{md}\n\n"
        + "\n".join(f"- {line}" for line in summary) + "\n"
    )
    if plot(results, args.out / "andrew.png", f"Andrew benchmark, scale {args.scale} ({info['machine']})"):
        print(f"\nwrote {args.out / 'andrew.md'}, andrew.json and andrew.png")


if __name__ == "__main__":
    main()

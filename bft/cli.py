"""The ``bft`` command: keys, replicas, a local cluster, client calls, the baseline, the simulator."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgpack

from bft import config as cfg
from bft.byzantine import CATALOGUE, describe
from bft.crypto import REPLICA
from bft.launch import start_replicas, stop_replicas
from bft.runtime.process import LOG_FORMATS, run_async, setup_logging
from bft.runtime.storage import StorageError
from bft.service import KVService, NullService, make_service, service_names
from bft.sim.casdnet import DELAYS, SKEWS
from bft.sim.faults import FAULT_SETS

log = logging.getLogger("bft")


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def _service(name: str, options: dict):
    """The service ``name`` with its options: the check a command makes before it starts
    anything, so a bad name or option is one line here instead of every replica exiting."""
    try:
        return make_service(name, options)
    except ValueError as exc:
        raise CliError(str(exc)) from None


async def _serve_until_signal(node) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
    except OSError as exc:
        raise CliError(f"cannot listen on {node.host}:{node.port}: {exc.strerror}") from None
    # A bug in our code (node.failure) stops the replica with its traceback and a failing exit
    # status, so the run that hit it fails; it is not logged and carried on from.
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({stopping, node.failure}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    await node.stop()
    if node.failure.done():
        node.failure.result()


# -- commands ---------------------------------------------------------------------------------


def cmd_keygen(a: argparse.Namespace) -> None:
    hosts = a.hosts.split(",") if a.hosts else None
    path = cfg.keygen(a.out, a.f, a.clients, a.host, a.base_port, a.force, hosts=hosts)
    print(f"wrote {path} ({3 * a.f + 1} replicas, {a.clients} clients) and keys in {path.parent / 'keys'}")


def cmd_replica(a: argparse.Namespace) -> None:
    from bft.runtime.node import replica_node

    cluster = cfg.load(a.config)
    options = cluster.services.get(a.service, {})
    _service(a.service, options)
    rewrite = None
    if a.byzantine:
        rewrite = CATALOGUE[a.byzantine]
        log.warning("replica %d is Byzantine (%s): %s", a.id, a.byzantine, describe(a.byzantine))
    data = Path(a.data) if a.data else None
    node = replica_node(cluster, a.id, lambda: make_service(a.service, options), data, rewrite)
    run_async(_serve_until_signal(node))


def cmd_serve(a: argparse.Namespace) -> None:
    from bft.runtime.node import unreplicated_node

    if a.config:
        cluster = cfg.load(a.config)
        if cluster.f != 0:
            raise CliError(f"{a.config} has f = {cluster.f}; an authenticated server needs f = 0")
        me = cluster.replicas[0]
        node = unreplicated_node(
            me.host, me.port, _service(a.service, {}), cluster.params, cluster.keyring(REPLICA, 0)
        )
        where = f"{me.host}:{me.port} with sessions and tags (clients of {a.config})"
    else:
        if a.port is None:
            raise CliError("serve needs --port (or --config)")
        node = unreplicated_node(a.host, a.port, _service(a.service, {}))
        where = f"{a.host}:{a.port}"
    print(f"serving {a.service} unreplicated on {where}; Ctrl-C stops", flush=True)
    run_async(_serve_until_signal(node))


def _ensure_cluster(directory: Path, f: int, clients: int, base_port: int) -> cfg.Cluster:
    path = directory / "cluster.toml"
    if not path.exists():
        cfg.keygen(directory, f, clients, base_port=base_port)
        print(f"generated keys and {path}")
    cluster = cfg.load(path)
    if cluster.f != f:
        print(f"note: {path} has f = {cluster.f}; using it (pass a fresh --dir for f = {f})")
    return cluster


def _demo(cluster: cfg.Cluster) -> None:
    from client import Client

    async def run() -> None:
        async with Client(cluster, 0) as c:
            await c.wait_connected(10)
            t0 = time.perf_counter()
            for i in range(20):
                await c.invoke(KVService.put(b"greeting-%d" % i, b"hello from the demo"))
            _ok, value = msgpack.unpackb(await c.invoke(KVService.get(b"greeting-7")))
            ms = (time.perf_counter() - t0) * 1000
            # With the read-only optimisation on every result needs 2f+1 matching replies.
            quorum = f"2f+1 = {2 * cluster.f + 1}" if cluster.params.read_only else f"f+1 = {cluster.f + 1}"
            print(f"demo: 20 puts and 1 get agreed by {quorum} replicas in {ms:.0f} ms; "
                  f"get greeting-7 -> {value!r}")
            await asyncio.gather(*(c.invoke(KVService.put(b"concurrent-%d" % i, b"x")) for i in range(50)))
            print("demo: 50 concurrent puts from one client completed")

    run_async(run())


def _mount(cluster: cfg.Cluster, mountpoint: Path, log_file: Path) -> Path:
    mountpoint.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [sys.executable, "-m", "bfs", "--log-level", "info", "mount", "--config", str(cluster.path),
         "--client", "0", "--log-file", str(log_file), str(mountpoint)],
        capture_output=True, text=True,
    )
    if out.returncode:
        raise CliError(out.stderr.strip().removeprefix("bfs: error: ") or "bfs mount failed")
    return mountpoint.resolve()


def _demo_fs(mountpoint: Path) -> None:
    t0 = time.perf_counter()
    (mountpoint / "demo").mkdir(exist_ok=True)
    for i in range(20):
        (mountpoint / "demo" / f"file-{i}.txt").write_text(f"file {i}, replicated by PBFT\n")
    names = sorted(p.name for p in (mountpoint / "demo").iterdir())
    text = (mountpoint / "demo" / "file-7.txt").read_text().strip()
    ms = (time.perf_counter() - t0) * 1000
    print(f"demo: made demo/ with {len(names)} files through the mount in {ms:.0f} ms; file-7.txt says {text!r}")


def cmd_up(a: argparse.Namespace) -> None:
    directory = Path(a.dir)
    cluster = _ensure_cluster(directory, a.f, a.clients, a.base_port)
    _service(a.service, cluster.services.get(a.service, {}))
    procs = start_replicas(cluster, a.service, directory / "logs", a.log_level, log_format=a.log_format)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    ports = ", ".join(f"{r.host}:{r.port}" for r in cluster.replicas)
    print(f"started {cluster.n} replicas (f = {cluster.f}, service {a.service}) on {ports}")
    print(f"logs in {directory / 'logs'}; status: bft status --config {cluster.path}")
    mounted: Path | None = None
    try:
        if a.mount:
            mounted = _mount(cluster, Path(a.mount), directory / "logs" / "bfs-mount.log")
        if a.demo:
            time.sleep(0.5)
            _demo_fs(mounted) if mounted else _demo(cluster)
        if mounted:
            print(f"BFS is mounted on {mounted}: use it with any program (ls, cp, tar, git, make ...)")
        else:
            print(f"try: bft invoke --config {cluster.path} --client 0 put greeting hello")
        print("stop with Ctrl-C (or SIGTERM)", flush=True)
        reported: set[int] = set()
        while not stopping:
            for i, p in enumerate(procs):
                if p.poll() is not None and i not in reported:
                    reported.add(i)
                    print(f"replica {i} exited with status {p.returncode}; see {directory / 'logs'}", flush=True)
            if len(reported) == len(procs):
                break
            time.sleep(0.2)
    finally:
        if mounted is not None:
            subprocess.run(["fusermount3", "-u", str(mounted)], check=False)
            print(f"unmounted {mounted}")
        stop_replicas(procs)
        print("stopped all replicas")


def cmd_invoke(a: argparse.Namespace) -> None:
    from client import Client, QuorumTimeout

    cluster = cfg.load(a.config)
    if a.op == "put":
        if len(a.args) != 2:
            raise CliError("put needs KEY VALUE")
        op, read_only = KVService.put(os.fsencode(a.args[0]), os.fsencode(a.args[1])), False
    elif a.op in ("get", "del"):
        if len(a.args) != 1:
            raise CliError(f"{a.op} needs KEY")
        key = os.fsencode(a.args[0])  # the bytes given, even those not valid in the locale's encoding
        op = KVService.get(key) if a.op == "get" else KVService.delete(key)
        read_only = a.op == "get" and cluster.params.read_only
    else:
        size = a.args[0] if a.args else "0"
        limit = NullService.RESULT_BYTES_MAX
        if len(a.args) > 1 or not (size.isascii() and size.isdigit() and len(size) <= len(str(limit))):
            raise CliError(f"null takes an optional RESULT_BYTES, at most {limit}")
        op, read_only = NullService.op(min(int(size), limit)), False

    async def run() -> bytes:
        async with Client(cluster, a.client) as c:
            return await c.invoke(op, read_only, timeout=a.timeout)

    try:
        result = run_async(run())
    except QuorumTimeout as exc:
        raise CliError(str(exc)) from None
    if a.op == "null":
        print(f"ok ({len(result)} result bytes)")
        return
    try:
        ok, value = msgpack.unpackb(result)
    except (ValueError, TypeError):
        raise CliError(f"the cluster's service does not speak kv (result {result[:32]!r})") from None
    if not ok:
        raise CliError(f"the service refused: {value}")
    print(value.decode(errors="replace") if isinstance(value, bytes) else "(none)")


def cmd_status(a: argparse.Namespace) -> None:
    from bft.statustable import collect, table

    cluster = cfg.load(a.config)
    if a.id is not None and a.id >= cluster.n:
        raise CliError(f"--id {a.id}: the cluster has replicas 0 to {cluster.n - 1}")
    rows = collect(cluster, a.timeout, a.id)
    print(json.dumps(rows, indent=2) if a.json else table(rows))
    # Non-zero when a replica asked for did not answer as one: a health check, with --id.
    if any(row["error"] for row in rows):
        sys.exit(1)


def cmd_compare(a: argparse.Namespace) -> None:
    from bft.sim.compare import compare
    from bft.sim.comparetable import HEADER, hindsight, hindsight_table, line, plot

    seeds = range(a.first_seed, a.first_seed + (3 if a.seeds is None else a.seeds))
    if not seeds:
        raise CliError("--seeds must be at least 1")
    print(f"{len(seeds)} seeds per point (from {a.first_seed}); 4 nodes, node 3 crashes at 1 s; epsilon 2 ms")
    print(HEADER)
    rows = compare(a.compare, seeds, a.delays, a.skews, progress=lambda r: print(line(r), flush=True))
    if "casd" in a.compare:
        print("\nthe learned Delta against the best fixed Delta in hindsight (the fastest that broke nothing)")
        print(hindsight_table(hindsight(rows)))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if plot(rows, out):
        print(f"\nwrote {out}")
    else:
        print("\nno chart: install matplotlib (pip install -e '.[bench]')")


def cmd_sim(a: argparse.Namespace) -> None:
    if a.compare:
        cmd_compare(a)
        return
    from bft.sim.simulator import run_seed

    if a.seeds is None:
        a.seeds = 200

    seeds = [a.seed] if a.seed is not None else range(a.first_seed, a.first_seed + a.seeds)
    failures = []
    injected: Counter[str] = Counter()
    events: Counter[str] = Counter()
    gap, heal = (0, -1, 0), (0, -1, 0)  # (longest wait in ms, its seed, the bound it was held to)
    held = 0  # seeds with Byzantine replicas alone, whose clients are held to the progress bound
    t0 = time.monotonic()
    for i, seed in enumerate(seeds, 1):
        r = run_seed(seed, f=a.f, faults=a.faults, ops_per_client=a.ops)
        injected.update(k.rsplit(" ", 1)[0] for k in r.injected)
        events.update(r.events)
        if r.gap_bound_ms is not None:
            held += 1
            gap = max(gap, (r.longest_gap_ms, seed, r.gap_bound_ms))
        heal = max(heal, (r.longest_heal_ms, seed, r.heal_bound_ms or 0))
        if not r.ok:
            failures.append(r)
            replay = f"bft sim --seed {seed} --f {a.f} --faults {a.faults} --ops {a.ops}"
            print(f"\nseed {seed} FAILED: {r.error}\n  replay: {replay}")
        if sys.stdout.isatty() or a.seed is not None or i == len(seeds):
            end = "\n" if not sys.stdout.isatty() or i == len(seeds) else ""
            line = f"{i}/{len(seeds)} seeds, {len(failures)} failed, {time.monotonic() - t0:.1f} s"
            print("\r" + line, end=end, flush=True)
    print("faults injected: " + (", ".join(f"{k} {n}" for k, n in sorted(injected.items())) or "none"))
    if events:
        print("what they did: " + ", ".join(f"{k} {n}" for k, n in sorted(events.items())))
    if held:
        print(
            f"longest a client waited while faults lasted, in the {held} seeds with Byzantine replicas alone: "
            f"{gap[0]} ms (seed {gap[1]}, bound {gap[2]} ms)"
        )
    print(f"longest a request took after the faults healed: {heal[0]} ms (seed {heal[1]}, bound {heal[2]} ms)")
    if failures:
        raise CliError(f"{len(failures)} of {len(seeds)} seeds failed: {', '.join(str(r.seed) for r in failures)}")
    print(f"all {len(seeds)} seeds passed (f = {a.f}, faults = {a.faults}): 0 violations")


# -- parser -----------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return v


def _names(allowed: tuple[str, ...], what: str):
    def parse(text: str) -> list[str]:
        names = [t for t in text.split(",") if t]
        unknown = [t for t in names if t not in allowed]
        if unknown or not names:
            bad = ",".join(unknown) or repr(text)
            raise argparse.ArgumentTypeError(f"unknown {what} {bad} (choose from {','.join(allowed)})")
        return list(dict.fromkeys(names))

    return parse


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < v < 86_400:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 86400 seconds")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bft", description="PBFT replication: keys, replicas, clients, simulator.")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=LOG_FORMATS, help="text for people, json for programs")
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("keygen", help="write cluster.toml and key files")
    k.add_argument("--f", type=_positive, default=1, help="faults tolerated; n = 3f+1 replicas")
    k.add_argument("--clients", type=_positive, default=4, help="authorised clients")
    k.add_argument("--out", required=True, help="directory for cluster.toml and keys/")
    k.add_argument("--host", default="127.0.0.1", help="the host of every replica (a local cluster)")
    k.add_argument("--hosts", help="comma-separated host of each replica, in id order (a real cluster)")
    k.add_argument("--base-port", type=_positive, default=7000, help="replica i listens on base+i, admin on base+100+i")
    k.add_argument("--force", action="store_true", help="replace an existing cluster")
    k.set_defaults(func=cmd_keygen)

    lies = "\n".join(f"  {name:<22} {describe(name)}" for name in CATALOGUE)
    r = sub.add_parser(
        "replica", help="run one replica process", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Byzantine behaviours (--byzantine), the catalogue of bft/byzantine.py:\n{lies}",
    )
    r.add_argument("--config", required=True)
    r.add_argument("--id", type=_positive, required=True)
    r.add_argument("--service", default="kv", choices=service_names())
    r.add_argument("--data", help="data directory for stable checkpoints (default: data/replica-ID beside the config)")
    r.add_argument("--log-file")
    r.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"])
    r.add_argument("--log-format", default=argparse.SUPPRESS, choices=LOG_FORMATS)
    r.add_argument(
        "--byzantine", metavar="BEHAVIOUR", choices=list(CATALOGUE),
        help="lie: rewrite or delay what this replica sends with BEHAVIOUR (listed below), for tests and demos",
    )
    r.set_defaults(func=cmd_replica)

    u = sub.add_parser("up", help="run a local cluster of 3f+1 replica processes until Ctrl-C")
    u.add_argument("--dir", required=True, help="cluster directory (keys are generated if missing)")
    u.add_argument("--f", type=_positive, default=1)
    u.add_argument("--clients", type=_positive, default=4)
    u.add_argument("--base-port", type=_positive, default=7000)
    u.add_argument("--service", default="kv", choices=service_names())
    u.add_argument("--demo", action="store_true", help="run a short demo workload once the cluster is up")
    u.add_argument("--mount", metavar="DIR", help="with --service bfs: mount the file system on DIR")
    u.set_defaults(func=cmd_up, log_level="info")

    i = sub.add_parser("invoke", help="run one operation and print the agreed result")
    i.add_argument("--config", required=True)
    i.add_argument("--client", type=_positive, default=0)
    i.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for a quorum")
    i.add_argument("op", choices=["put", "get", "del", "null"])
    i.add_argument("args", nargs="*")
    i.set_defaults(func=cmd_invoke)

    s = sub.add_parser("serve", help="run a service unreplicated (the benchmarks' baseline)")
    s.add_argument("--service", default="null", choices=service_names())
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_positive)
    s.add_argument(
        "--config", help="a cluster of f = 0 (bft keygen --f 0): serve as its replica 0, authenticated as replicas are"
    )
    s.set_defaults(func=cmd_serve)

    st = sub.add_parser("status", help="print each replica's view, primary, executed and stable checkpoint")
    st.add_argument("--config", required=True)
    st.add_argument("--timeout", type=_seconds, default=2.0)
    st.add_argument("--id", type=_positive, help="only this replica (exit status 1 unless it answers)")
    st.add_argument("--json", action="store_true", help="one JSON object per replica, for programs")
    st.set_defaults(func=cmd_status)

    m = sub.add_parser("sim", help="run the deterministic simulator over seeds")
    m.add_argument("--seeds", type=_positive, help="seeds to run (default 200; with --compare, 3 per point)")
    m.add_argument("--first-seed", type=_positive, default=0)
    m.add_argument("--seed", type=_positive, help="replay one seed")
    m.add_argument("--f", type=_positive, default=1)
    which = m.add_mutually_exclusive_group()
    which.add_argument(
        "--faults", default="all", choices=FAULT_SETS,
        help="byzantine: the fault budget spent on Byzantine replicas (bft/byzantine.py, bft/sim/liars.py), "
        "beside partitions, restarts from disk and slow checkpoint writes; liars: Byzantine replicas alone, "
        "with a bound on how long a client may wait; mixed: all of it, crashes too",
    )
    which.add_argument(
        "--byzantine", dest="faults", action="store_const", const="byzantine", help="the same as --faults byzantine"
    )
    m.add_argument("--ops", type=_positive, default=150, help="operations per simulated client")
    m.add_argument(
        "--compare", type=_names(("casd", "pbft"), "protocol"), metavar="casd,pbft",
        help="run CASD atomic broadcast and PBFT on the same seeded workloads over a sweep of Delta and of "
        "delay and skew distributions; print a table and write a chart (--out)",
    )
    m.add_argument("--delays", type=_names(tuple(DELAYS), "delay distribution"), help="with --compare: "
                   f"delay distributions, comma-separated (default all: {','.join(DELAYS)})")
    m.add_argument("--skews", type=_names(tuple(SKEWS), "skew distribution"), help="with --compare: "
                   f"clock skew distributions (default all: {','.join(SKEWS)})")
    m.add_argument("--out", default="casd-vs-pbft.png", help="with --compare: the chart's path")
    m.set_defaults(func=cmd_sim)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level if args.command != "up" else "warning", getattr(args, "log_file", None),
                  args.log_format)
    try:
        args.func(args)
    except (cfg.ConfigError, CliError, StorageError) as exc:
        print(f"bft: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        os._exit(0)


if __name__ == "__main__":
    main()

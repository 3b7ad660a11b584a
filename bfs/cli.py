"""The ``bfs`` command: mount the replicated file system with FUSE; ``bfs df``: its use and limits."""

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
from pathlib import Path

from bfs.writeback import WRITE_CACHE_BYTES
from bft import config as cfg
from bft.runtime.process import run_async, setup_logging

log = logging.getLogger("bfs")

WRITE_CACHE_KIB = WRITE_CACHE_BYTES // 1024
# An NFS client's acregmin: what another mount changed shows in stat and names within this, and
# in what a file open reads at once (close-to-open, which no longer waits on this timeout).
ATTR_TIMEOUT_S = 3.0

# Mount options passed on to the kernel (libfuse knows them), as `bfs mount -o` and in fstab.
KERNEL_OPTIONS = frozenset({
    "ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime",
    "norelatime", "strictatime", "sync", "async", "dirsync", "allow_other", "allow_root",
})
# What mount(8) and fstab add for themselves, meaningless to the file system.
MOUNT_ONLY_OPTIONS = frozenset({"defaults", "auto", "noauto", "_netdev", "nofail", "user", "users", "nouser", "owner"})


class MountError(Exception):
    pass


def _require_pyfuse3() -> None:
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        raise MountError(
            f"mounting needs pyfuse3 ({exc}): pip install 'bft-bfs[fuse]', which builds against FUSE 3 "
            "(Debian: apt-get install fuse3 libfuse3-dev pkg-config)"
        ) from None


def _check_mountpoint(path: Path) -> None:
    if not path.exists():
        raise MountError(f"mount point {path} does not exist")
    if not path.is_dir():
        raise MountError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mount point (unmount it with: fusermount3 -u {path})")
    if not Path("/dev/fuse").exists():
        raise MountError("no /dev/fuse on this machine: load the fuse module or run where FUSE is available")


def _make_client(a: argparse.Namespace):
    from client import Client

    if a.unreplicated:
        host, _, port = a.unreplicated.rpartition(":")
        if not host or not port.isdigit():
            raise MountError(f"--unreplicated wants HOST:PORT, not {a.unreplicated!r}")
        return Client.unreplicated(host, int(port), a.client)
    if not a.config:
        raise MountError("give --config CLUSTER.toml (or --unreplicated HOST:PORT)")
    return Client(cfg.load(a.config), a.client)


async def _serve(a: argparse.Namespace, mountpoint: Path) -> None:
    import pyfuse3
    import pyfuse3.asyncio

    from bfs.mount import BfsOperations
    from client import QuorumTimeout

    pyfuse3.asyncio.enable()
    client = _make_client(a)
    await client.start()
    try:
        try:
            await client.wait_connected(a.timeout)
            ops = BfsOperations(client, a.attr_timeout, not a.strict, a.write_cache_kib * 1024)
            me = [os.geteuid(), os.getegid(), []]
            await asyncio.wait_for(ops._call("getattr", me, pyfuse3.ROOT_INODE), a.timeout)
            await asyncio.wait_for(ops.start(me), a.timeout)
            # Files this client id kept open past their unlink in a run that died: free them.
            await asyncio.wait_for(ops._call("reclaim", me), a.timeout)
        except (QuorumTimeout, TimeoutError, pyfuse3.FUSEError):
            raise MountError("the cluster does not answer (are the replicas up, with the bfs service?)") from None
        # The replicas check every operation's permissions, as an NFS server does; the kernel
        # checks too (default_permissions), from the attributes it caches, for what never reaches
        # the mount: opening a FIFO or device, and search permission on cached path components.
        options = set(pyfuse3.default_options) | {"fsname=bfs", "subtype=bfs", "default_permissions"}
        options |= set(a.options)
        if os.geteuid() == 0:
            options.add("allow_other")
        try:
            pyfuse3.init(ops, str(mountpoint), options)
        except RuntimeError as exc:
            raise MountError(f"cannot mount on {mountpoint}: {exc}") from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, pyfuse3.terminate)
        if a.stats_file:
            loop.add_signal_handler(signal.SIGUSR1, _write_stats, ops, a.stats_file)
        log.info("mounted BFS on %s", mountpoint)
        try:
            await pyfuse3.main()
        finally:
            pyfuse3.close(unmount=True)
    finally:
        await client.close()


def _write_stats(ops, path: str) -> None:
    """The operations sent so far, by name (" ro": on the read-only path), for the benchmark."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(dict(sorted(ops.calls.items())), fh)
    os.replace(tmp, path)


def cmd_mount(a: argparse.Namespace) -> None:
    _require_pyfuse3()
    mountpoint = Path(a.mountpoint).resolve()
    _check_mountpoint(mountpoint)
    if a.foreground:
        print(f"mounting BFS on {mountpoint}; Ctrl-C unmounts", flush=True)
        run_async(_serve(a, mountpoint))
        return
    # Background: run ourselves in the foreground in a new session and wait for the mount.
    argv = [sys.executable, "-m", "bfs", "--log-level", a.log_level, "mount", "--foreground",
            "--client", str(a.client), "--timeout", str(a.timeout), "--attr-timeout", str(a.attr_timeout),
            "--write-cache-kib", str(a.write_cache_kib)]
    if a.strict:
        argv.append("--strict")
    if a.stats_file:
        argv += ["--stats-file", str(Path(a.stats_file).resolve())]
    if a.options:
        argv += ["-o", ",".join(a.options)]
    argv += ["--config", str(Path(a.config).resolve())] if a.config else ["--unreplicated", a.unreplicated]
    if a.log_file:
        argv += ["--log-file", a.log_file]
    child = subprocess.Popen(
        [*argv, str(mountpoint)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True,
    )
    deadline = time.monotonic() + a.timeout + 5
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
            print(f"BFS mounted on {mountpoint} (pid {child.pid}); unmount with: fusermount3 -u {mountpoint}")
            return
        if child.poll() is not None:
            lines = child.stderr.read().decode(errors="replace").strip().splitlines()
            raise MountError(lines[-1].removeprefix("bfs: error: ") if lines else "the mount process exited")
        time.sleep(0.05)
    child.terminate()
    raise MountError(f"no mount appeared on {mountpoint} within {a.timeout + 5:.0f} s")


async def _usage(a: argparse.Namespace) -> dict[str, int]:
    """The file system's statfs figures, agreed by 2f+1 replicas (the read-only path)."""
    import msgpack

    from bfs.fs import decode_result
    from client import QuorumTimeout

    client = _make_client(a)
    await client.start()
    me = [os.geteuid(), os.getegid(), []]
    results = []
    try:
        await client.wait_connected(a.timeout)
        for name in ("fsstat", "fsinfo"):
            answer = decode_result(await client.invoke(msgpack.packb([name, me]), True, timeout=a.timeout))
            if answer is None or answer[0] or type(answer[1]) is not list:
                raise MountError(f"the cluster's {name} reply is not a BFS result (does it run the bfs service?)")
            results.append(answer[1])
    except QuorumTimeout:
        raise MountError("the cluster does not answer (are the replicas up, with the bfs service?)") from None
    finally:
        await client.close()
    (total, free, inodes, inodes_free, block), (_, _, _, file_max, name_max) = results
    return {"bytes": total, "bytes_used": total - free, "bytes_free": free, "inodes": inodes,
            "inodes_used": inodes - inodes_free, "inodes_free": inodes_free, "block_bytes": block,
            "file_bytes_max": file_max, "name_bytes_max": name_max}


def cmd_df(a: argparse.Namespace) -> None:
    """What ``df`` on a mount shows, and the limits statfs cannot, without mounting."""
    u = run_async(_usage(a))
    if a.json:
        print(json.dumps(u))
        return
    use = f"{u['bytes_used'] * 100 // max(1, u['bytes'])}%"
    rows = [("Filesystem", "1K-blocks", "Used", "Available", "Use%", "Inodes", "IUsed", "IFree", "NameMax", "FileMax"),
            ("bfs", str(u["bytes"] // 1024), str(u["bytes_used"] // 1024), str(u["bytes_free"] // 1024), use,
             str(u["inodes"]), str(u["inodes_used"]), str(u["inodes_free"]), str(u["name_bytes_max"]),
             str(u["file_bytes_max"]))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(" ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= v <= 3600:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 3600 seconds")
    return v


def _kib(text: str) -> int:
    if not text.isdigit() or int(text) > 1 << 30:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of KiB from 0 to {1 << 30}")
    return int(text)


def _kernel_options(text: str) -> list[str]:
    options = [o for o in text.split(",") if o]
    unknown = [o for o in options if o not in KERNEL_OPTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown mount option {unknown[0]!r} (known: {', '.join(sorted(KERNEL_OPTIONS))})")
    return options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bfs", description="BFS: a Byzantine-fault-tolerant file system over PBFT.")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="mount BFS with FUSE (in the background unless --foreground)")
    m.add_argument("mountpoint")
    m.add_argument("--config", help="cluster.toml of a cluster running the bfs service")
    m.add_argument("--client", type=int, default=0, help="client id (its key must be in the cluster's keys/)")
    m.add_argument("--unreplicated", metavar="HOST:PORT", help="mount a 'bft serve --service bfs' server instead")
    m.add_argument("--foreground", action="store_true")
    m.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for the cluster")
    m.add_argument("--attr-timeout", type=_seconds, default=ATTR_TIMEOUT_S,
                   help=f"seconds attributes and names are cached (default {ATTR_TIMEOUT_S:g}; "
                        "opens revalidate regardless)")
    m.add_argument("--strict", action="store_true",
                   help="order every operation (the paper's BFS-strict); by default lookups, attributes, "
                        "access, readlink, readdir, reads and statfs take PBFT's read-only path")
    m.add_argument("--write-cache-kib", type=_kib, default=WRITE_CACHE_KIB, metavar="KIB",
                   help="written data the mount holds until close, fsync or this bound sends it "
                        f"(default {WRITE_CACHE_KIB}; 0: every write sent at once)")
    m.add_argument("--stats-file", help="on SIGUSR1, write the operations sent so far here (JSON)")
    m.add_argument("-o", dest="options", type=_kernel_options, default=[], metavar="OPT,...",
                   help="kernel mount options: ro, nodev, nosuid, noexec, allow_other, ...")
    m.add_argument("--log-file")
    m.set_defaults(func=cmd_mount)
    d = sub.add_parser("df", help="the file system's size, use and limits, as 2f+1 replicas agree (no mount)")
    d.add_argument("--config", help="cluster.toml of a cluster running the bfs service")
    d.add_argument("--client", type=int, default=0, help="client id (its key must be in the cluster's keys/)")
    d.add_argument("--unreplicated", metavar="HOST:PORT", help="ask a 'bft serve --service bfs' server instead")
    d.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for the cluster")
    d.add_argument("--json", action="store_true", help="one JSON object (bytes and inodes) instead of a table")
    d.set_defaults(func=cmd_df)
    return p


def helper_argv(argv: list[str]) -> list[str]:
    """``mount -t fuse.bfs SOURCE DIR -o OPTS`` (and fstab) runs ``mount.fuse.bfs SOURCE DIR [-sfnv]
    [-o OPTS]``: the ``bfs mount`` arguments that mean the same. The options are ``config=PATH``
    (else SOURCE, when it is a file, is the cluster.toml), ``client=N``, ``attr_timeout=S``,
    ``unreplicated=HOST:PORT``, ``log_file=PATH``, ``write_cache_kib=N``, ``strict`` and kernel
    options; mount(8)'s own are ignored."""
    positional, options = [], []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options += next(it, "").split(",")
        elif arg.startswith("-o"):
            options += arg[2:].split(",")
        elif arg in ("-s", "-f", "-n", "-v"):
            continue  # sloppy, fake, no mtab, verbose: nothing for us to do
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise MountError("usage: mount.fuse.bfs SOURCE MOUNTPOINT [-o config=CLUSTER.toml,client=N,...]")
    source, mountpoint = positional
    out, kernel = ["mount", mountpoint], []
    named = {"config": "--config", "client": "--client", "attr_timeout": "--attr-timeout",
             "unreplicated": "--unreplicated", "log_file": "--log-file", "timeout": "--timeout",
             "write_cache_kib": "--write-cache-kib"}
    for option in filter(None, options):
        key, eq, value = option.partition("=")
        if key in named and eq:
            out += [named[key], value]
        elif option == "strict":
            out.append("--strict")
        elif option in KERNEL_OPTIONS:
            kernel.append(option)
        elif option not in MOUNT_ONLY_OPTIONS and not option.startswith(("x-", "comment=")):
            raise MountError(f"unknown mount option {option!r} (bfs takes config=, client=, attr_timeout=, "
                             f"unreplicated=, log_file=, timeout=, write_cache_kib=, strict and "
                             f"{', '.join(sorted(KERNEL_OPTIONS))})")
    if "--config" not in out and "--unreplicated" not in out and Path(source).is_file():
        out += ["--config", source]
    return out + (["-o", ",".join(kernel)] if kernel else [])


def mount_helper() -> None:
    """The ``mount.fuse.bfs`` entry point (link it into /sbin for ``mount -t fuse.bfs``)."""
    try:
        argv = helper_argv(sys.argv[1:])
    except MountError as exc:
        print(f"mount.fuse.bfs: {exc}", file=sys.stderr)
        sys.exit(2)
    main(argv)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, getattr(args, "log_file", None))
    try:
        args.func(args)
    except (MountError, cfg.ConfigError) as exc:
        print(f"bfs: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

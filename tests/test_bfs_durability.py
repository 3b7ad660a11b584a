"""BFS durability through a real FUSE mount: files, directories, a rename and an unlink, each
acknowledged (the system call returned, after fsync and close); then kill -9 of all four replicas
while a background writer goes on, a restart of all four from their data directories, and every
acknowledged change is there, exactly as it was acknowledged, through the old mount and a new one.

What the mount does while the cluster is down (found out, and relied on below): it stays
mounted; every operation waits for a quorum up to ``bfs.mount.OP_TIMEOUT_S`` (60 s) and then
fails with EIO; a stat of the mount point (``os.path.ismount``) waits as long. Once the replicas
are back the client reconnects and resends, and the operations in flight complete. So the test
touches the mount only from the writer (a process of its own) until the cluster is up again, and teardown
detaches every mount lazily (``fusermount3 -u -z``) and ends its process, whatever state it is in.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bft.core.params import Params
from bft.local import LocalCluster

from .conftest import require

pytestmark = pytest.mark.integration

Op = Callable[[Path], object]


@pytest.fixture(autouse=True)
def _fuse_and_root() -> None:
    require(Path("/dev/fuse").exists(), "no /dev/fuse on this machine")
    require(shutil.which("fusermount3") is not None, "fusermount3 is not installed (Debian package fuse3)")
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        require(False, f"pyfuse3 does not import: {exc}")
    require(os.geteuid() == 0, "mounting FUSE here needs root")


class Mounts:
    """The test's mounts, each with the pid of its FUSE process, taken down at the end however
    they are: lazily detached, then the process asked to stop, then killed."""

    def __init__(self, cluster_path: Path) -> None:
        self.cluster_path = cluster_path
        self.pids: dict[Path, int] = {}

    def mount(self, mountpoint: Path, client: int) -> Path:
        mountpoint.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(
            [sys.executable, "-m", "bfs", "--log-level", "info", "mount", "--config", str(self.cluster_path),
             "--client", str(client), "--attr-timeout", "0.2", "--log-file", f"{mountpoint}.log", str(mountpoint)],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        pid = re.search(r"\(pid (\d+)\)", out.stdout)
        assert pid is not None, out.stdout
        self.pids[mountpoint] = int(pid.group(1))
        return mountpoint

    def alive(self, mountpoint: Path) -> bool:
        return _running(self.pids[mountpoint])

    def close(self) -> None:
        for mountpoint, pid in self.pids.items():
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, capture_output=True)
            for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                if not _running(pid):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + wait_s
                while _running(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie: the mount's parent has exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] != "Z"


@pytest.fixture
def bfs(tmp_path: Path) -> Iterator[tuple[LocalCluster, Mounts]]:
    params = Params(checkpoint_interval=32, log_window=64, durability="strict")
    lc = LocalCluster(tmp_path / "cluster", 1, "bfs", params)
    mounts = Mounts(lc.cluster.path)
    try:
        yield lc, mounts
    finally:
        mounts.close()
        lc.stop()


# -- the operations, applied alike to the mount and to a reference directory -----------------


def write_file(name: str, data: bytes, mode: str = "wb") -> Op:
    def op(root: Path) -> None:
        with open(root / name, mode) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return op


def mkdir(name: str) -> Op:
    return lambda root: os.mkdir(root / name)


def rename(src: str, dst: str) -> Op:
    return lambda root: os.rename(root / src, root / dst)


def unlink(name: str) -> Op:
    return lambda root: os.unlink(root / name)


def rmdir(name: str) -> Op:
    return lambda root: os.rmdir(root / name)


def chmod(name: str, mode: int) -> Op:
    return lambda root: os.chmod(root / name, mode)


def symlink(target: str, name: str) -> Op:
    return lambda root: os.symlink(target, root / name)


def fsync_dir(name: str) -> Op:
    def op(root: Path) -> None:
        fd = os.open(root / name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    return op


def content(i: int, size: int) -> bytes:
    """Distinct, position-dependent bytes: a block written to the wrong place or file shows."""
    unit = f"<file {i} at %08d>".encode()
    out = b"".join(unit % k for k in range(0, size, len(unit) + 8))
    return out[:size]


def tree(root: Path) -> dict[str, tuple]:
    """Everything under ``root``: kind, permission bits and contents (or link target)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def describe_difference(got: dict[str, tuple], want: dict[str, tuple]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    details = [f"{k}: {got[k][:2]} {len(got[k][-1])} bytes, expected {want[k][:2]} {len(want[k][-1])} bytes"
               for k in wrong[:5]]
    return f"missing {missing}, unexpected {extra}, different {wrong}: {details}"


class Writer:
    """Writes bg-0, bg-1, ... one acknowledged file at a time until told to stop; a file that
    was in flight when the cluster died completes (or fails) once it is back.

    A process of its own, not a thread of the test's: a process forked while one of its threads
    holds a file open on the mount closes its copy of the descriptor at exec, and a close is a
    flush that waits for the replicas. The replicas' restart would wait for the writer's file,
    which waits for the replicas, until the mount's operation timeout (found in CI)."""

    def __init__(self, mnt: Path, ref: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.stop, self._acked, self._errno = ctx.Event(), ctx.Value("i", 0), ctx.Value("i", 0)
        self.process = ctx.Process(target=_write_files, args=(mnt, ref, self.stop, self._acked, self._errno),
                                   daemon=True)

    @property
    def acked(self) -> int:
        return self._acked.value

    @property
    def error(self) -> str | None:
        code = self._errno.value
        return None if code == 0 else f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"

    def is_alive(self) -> bool:
        return self.process.is_alive()


def _write_files(mnt: Path, ref: Path, stop, acked, error) -> None:
    i = 0
    while not stop.is_set():
        op = write_file(f"bg/bg-{i}", content(1000 + i, 3000 + 7000 * (i % 4)))
        try:
            op(mnt)
        except OSError as exc:
            error.value = exc.errno or -1
            return
        op(ref)
        acked.value += 1
        i += 1


def restart_all(lc: LocalCluster) -> None:
    """All four at once: each restart is mostly a Python start-up, so in parallel it is quicker."""
    threads = [threading.Thread(target=lc.restart, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.timeout(240)
def test_acknowledged_changes_survive_kill_9_of_every_replica(bfs, tmp_path: Path) -> None:
    lc, mounts = bfs
    mnt = mounts.mount(tmp_path / "mnt", 0)
    ref = tmp_path / "ref"
    ref.mkdir()

    def both(op: Op) -> None:
        op(mnt)  # acknowledged when this returns: a quorum of replicas has it on disk
        op(ref)

    # Acknowledged changes of every kind, enough of them to pass a checkpoint or two.
    for d in ("docs", "docs/sub", "tmp", "bg", "empty-then-removed"):
        both(mkdir(d))
    for i in range(24):
        both(write_file(f"docs/f{i}", content(i, [0, 1, 100, 4095, 4097, 16 * 1024, 40_000, 150_000][i % 8])))
    both(write_file("docs/sub/deep", content(100, 20_000)))
    both(write_file("docs/f3", content(101, 500)))  # rewritten shorter (O_TRUNC)
    both(write_file("docs/f4", content(102, 9_000), "ab"))  # appended to
    both(rename("docs/f5", "docs/sub/moved"))  # across directories
    both(rename("docs/f6", "docs/f7"))  # replacing an existing file
    both(unlink("docs/f8"))
    both(rmdir("empty-then-removed"))
    both(chmod("docs/f9", 0o600))
    both(symlink("sub/deep", "docs/link"))
    both(fsync_dir("docs"))
    both(rename("tmp", "docs/sub/tmp-renamed"))  # a directory, across directories
    assert tree(mnt) == tree(ref)
    for _ in range(100):  # past a checkpoint everywhere, so that the logs were truncated too
        stable = [lc.status(i)["stable_checkpoint"] for i in range(4)]
        if min(stable) >= 32:
            break
        time.sleep(0.05)
    assert min(stable) >= 32, stable

    writer = Writer(mnt, ref)
    writer.process.start()
    deadline = time.monotonic() + 30
    while writer.acked < 5 and writer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writer.acked >= 5 and writer.error is None, (writer.acked, writer.error)

    # kill -9 all four at once, while the writer is in the middle of its next file
    started = time.monotonic()
    killers = [threading.Thread(target=lc.kill, args=(i,)) for i in range(4)]
    for t in killers:
        t.start()
    for t in killers:
        t.join()
    writer.stop.set()
    killed = time.monotonic()
    acked_at_kill = writer.acked
    # From here until the cluster is back, nothing but the writer touches the mount: every
    # operation would wait for a quorum (up to 60 s), even a stat of the mount point.
    time.sleep(0.5)
    assert mounts.alive(mnt), "the mount process died with the cluster"
    restart_all(lc)
    outage = f"kill -9 took {killed - started:.1f} s, the restart {time.monotonic() - killed:.1f} s"

    # The writer's file in flight completes once the replicas are back: the mount rode it out.
    writer.process.join(90)
    assert not writer.is_alive(), f"the writer is still stuck in the mount 90 s after the restart ({outage})"
    assert writer.error is None, f"the writer's file in flight failed: {writer.error} ({outage})"
    assert writer.acked in (acked_at_kill, acked_at_kill + 1)

    # Every acknowledged change is there, as acknowledged: through the mount that lived through
    # the outage, and through a fresh one (a new client, nothing cached in its kernel).
    want = tree(ref)
    got = tree(mnt)
    assert got == want, describe_difference(got, want)
    fresh = mounts.mount(tmp_path / "mnt2", 1)
    got = tree(fresh)
    assert got == want, describe_difference(got, want)

    # And the file system serves new writes, seen from both mounts.
    for i, m in enumerate((mnt, fresh)):
        for op in (
            write_file(f"after-{i}", content(2000 + i, 30_000)),
            rename("docs/f10", "docs/f10-renamed") if i == 0 else unlink("docs/f10-renamed"),
            mkdir(f"after-dir-{i}"),
        ):
            op(m)
            op(ref)
        time.sleep(0.3)  # the attribute cache timeout: the other mount may hold old names
    want = tree(ref)
    for m in (mnt, fresh):
        got = tree(m)
        assert got == want, describe_difference(got, want)

    # The replicas agree again, and they resumed from their own disks rather than refetching.
    for _ in range(100):
        statuses = [lc.status(i) for i in range(4)]
        if len({(s["executed"], s["stable_checkpoint"], s["stable_digest"]) for s in statuses}) == 1:
            break
        time.sleep(0.1)
    assert len({(s["executed"], s["stable_checkpoint"], s["stable_digest"]) for s in statuses}) == 1, [
        {k: s[k] for k in ("replica", "view", "executed", "stable_checkpoint")} for s in statuses
    ]
    assert not any(s.get("data_problems") for s in statuses), [s.get("data_problems") for s in statuses]
    assert sum(s["stats"].get("replayed-batches", 0) for s in statuses) > 0

"""The write-back cache and both lookup modes through real FUSE mounts of one real 4-replica BFS
cluster: read-your-writes, close-to-open between mounts, fsync against a killed mount, errors at
write and at close, the bound on cached bytes, and what each mode sends on the read-only path."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bft import config as cfg
from bft.launch import start_replicas, stop_replicas
from bft.local import free_base_port, wait_for_port

from .conftest import require
from .test_bfs_mount import _fuse_missing, unmount
from .test_bfs_posix import USER

pytestmark = pytest.mark.integration

FILE_BYTES_MAX = 4 << 20
BOUND_KIB = 256


def mount(cluster: Path, point: Path, client: int, *extra: str) -> int:
    """``bfs mount`` in the background; the mount process's pid."""
    point.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [sys.executable, "-m", "bfs", "mount", "--config", str(cluster), "--client", str(client), *extra, str(point)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return int(re.search(r"\(pid (\d+)\)", out.stdout).group(1))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A cluster whose files may hold 4 MiB, and its directory for mounts."""
    missing = _fuse_missing()
    require(missing is None, str(missing))
    require(os.geteuid() == 0, "switching to an unprivileged user needs root")
    tmp = tmp_path_factory.mktemp("cache")
    path = cfg.keygen(tmp / "cluster", 1, 8, base_port=free_base_port(4),
                      services={"bfs": {"file_bytes_max": FILE_BYTES_MAX}})
    procs = start_replicas(cfg.load(path), "bfs", tmp / "logs", "warning")
    try:
        for r in cfg.load(path).replicas:
            wait_for_port(r.host, r.port)
        yield path, tmp
    finally:
        stop_replicas(procs)


@pytest.fixture(scope="module")
def mounts(cluster: tuple[Path, Path]) -> Iterator[dict[str, Path]]:
    """``a``: the defaults; ``b``: another client whose kernel caches attributes for 60 s, longer
    than the module runs, so what it sees after another mount's close is close-to-open, not an
    expired cache; ``small``: a write-back cache of 256 KiB."""
    path, tmp = cluster
    points = {name: tmp / name for name in ("a", "b", "small")}
    try:
        mount(path, points["a"], 0)
        mount(path, points["b"], 1, "--attr-timeout", "60")
        mount(path, points["small"], 2, "--write-cache-kib", str(BOUND_KIB))
        (points["a"] / "shared").mkdir(mode=0o777)
        os.chmod(points["a"] / "shared", 0o777)
        yield {name: p / "shared" for name, p in points.items()}
    finally:
        for p in points.values():
            unmount(p)


def test_read_your_writes_and_the_size_before_close(mounts: dict[str, Path]) -> None:
    a, b = mounts["a"], mounts["b"]
    data = bytearray(os.urandom(300_000))
    fd = os.open(a / "ryw", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for off in range(0, len(data), 70_000):
            os.pwrite(fd, data[off:off + 70_000], off)
        os.pwrite(fd, b"OVERWRITE", 1000)  # over cached data
        data[1000:1009] = b"OVERWRITE"
        os.pwrite(fd, b"tail", 400_000)  # past a hole
        data += bytes(400_000 - len(data)) + b"tail"
        assert os.fstat(fd).st_size == os.stat(a / "ryw").st_size == len(data)
        assert os.pread(fd, len(data) + 10, 0) == bytes(data)
        assert os.pread(fd, 20, 995) == bytes(data[995:1015])
        # Nothing was sent but the create: another mount sees an empty file until the close.
        assert os.stat(b / "ryw").st_size == 0 and (b / "ryw").read_bytes() == b""
    finally:
        os.close(fd)
    # Close-to-open: b's kernel holds the old attributes for 60 s, yet an open after a's close
    # reads everything.
    with open(b / "ryw", "rb") as fh:
        assert fh.read() == bytes(data)
        assert os.fstat(fh.fileno()).st_size == len(data)
    with open(a / "ryw", "r+b") as fh:  # and again, for a file b has open pages of
        fh.write(b"second")
    with open(b / "ryw", "rb") as fh:
        assert fh.read(6) == b"second"


def test_fsync_returns_once_the_replicas_hold_the_data(cluster: tuple[Path, Path], mounts: dict[str, Path]) -> None:
    path, tmp = cluster
    point = tmp / "doomed"
    pid = mount(path, point, 3)
    try:
        (point / "shared" / "synced").write_bytes(b"")
        fd = os.open(point / "shared" / "synced", os.O_WRONLY)
        os.write(fd, b"committed " * 1000)
        os.fsync(fd)
        os.write(fd, b"lost")  # neither fsync'd nor closed: the mount's crash loses it
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(OSError):  # the mount is gone: what close says is the kernel's
            os.close(fd)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False, capture_output=True)
    assert (mounts["b"] / "synced").read_bytes() == b"committed " * 1000


def as_user_until(directory: Path, before: str, after: str, between) -> list[str]:
    """Run ``before`` as uid 1000 in ``directory``, then ``between()`` here, then ``after`` in
    the same process; the child's printed words. ``e(fn, *args)`` gives "ok" or the errno."""
    code = (
        "import errno, os, sys\n"
        f"os.chdir({str(directory)!r})\n"
        f"os.setgroups([]); os.setresgid({USER}, {USER}, {USER}); os.setresuid({USER}, {USER}, {USER})\n"
        "def e(fn, *args):\n"
        "    try:\n        fn(*args)\n        return 'ok'\n"
        "    except OSError as exc:\n        return errno.errorcode[exc.errno]\n"
        f"{before}\nprint('ready', flush=True)\nsys.stdin.readline()\n{after}\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        between()
        out, err = child.communicate("go\n", timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    return out.split()


def test_errors_come_at_write_where_known_else_at_close(mounts: dict[str, Path]) -> None:
    a, small = mounts["a"], mounts["small"]
    # Past the cluster's file size limit: known at write, nothing cached.
    with open(a / "big", "wb") as fh:
        with pytest.raises(OSError) as exc:
            os.pwrite(fh.fileno(), b"x", FILE_BYTES_MAX)
        assert exc.value.errno == errno.EFBIG
        # Straddling it: what fits is written, as on Linux (a short count).
        assert os.pwrite(fh.fileno(), b"xyz", FILE_BYTES_MAX - 1) == 1
    assert (a / "big").stat().st_size == FILE_BYTES_MAX
    # Root's files, writable by all until another mount takes the permission away while the
    # user's writes wait in the cache.
    for name in ("at-close", "at-write"):
        (a / name).write_bytes(b"")
        os.chmod(a / name, 0o666)

    def revoke() -> None:
        for name in ("at-close", "at-write"):
            os.chmod(mounts["b"] / name, 0o644)

    words = as_user_until(
        small,
        "c = os.open('at-close', os.O_WRONLY); os.write(c, b'x' * 1000)\n"
        "w = os.open('at-write', os.O_WRONLY); os.write(w, b'y' * 48 * 4096)",
        # 'at-close' fails at close; 'at-write' at the write that passes the bound, whose flush
        # of the file fails (page-aligned, so one FUSE write: an unaligned one starts with the
        # rest of a page, which succeeds, and the kernel reports that short count instead);
        # its close has nothing left to report.
        "print(e(os.close, c)); print(e(os.write, w, b'z' * 25 * 4096)); print(e(os.close, w))",
        revoke,
    )
    assert words == ["EACCES", "EACCES", "ok"]
    assert (a / "at-close").read_bytes() == b"" and (a / "at-write").read_bytes() == b""


def test_cached_bytes_stay_within_the_bound(mounts: dict[str, Path]) -> None:
    small, b = mounts["small"], mounts["b"]
    data = os.urandom(2 << 20)
    first = open(small / "bounded", "wb")  # noqa: SIM115 (kept open across the checks)
    try:
        for off in range(0, len(data), 128 * 1024):
            first.write(data[off:off + 128 * 1024])
            first.flush()
        # All but at most the bound went to the replicas while the file is open.
        with open(b / "bounded", "rb") as fh:
            sent = fh.read()
        assert len(data) - BOUND_KIB * 1024 <= len(sent) < len(data)
        assert sent == data[:len(sent)]
    finally:
        first.close()
    with open(b / "bounded", "rb") as fh:
        assert fh.read() == data


def calls(pid: int, stats: Path) -> dict[str, int]:
    stats.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not stats.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return json.loads(stats.read_text())


@pytest.mark.parametrize("strict", [False, True], ids=["read-only-lookups", "strict"])
def test_lookup_modes(cluster: tuple[Path, Path], mounts: dict[str, Path], strict: bool) -> None:
    path, tmp = cluster
    point, stats = tmp / f"mode-{strict}", tmp / f"mode-{strict}.json"
    pid = mount(path, point, 4 + strict, "--stats-file", str(stats), *(["--strict"] if strict else []))
    try:
        work = point / "shared" / f"mode-{strict}"
        work.mkdir()
        (work / "f").write_text("data")
        os.symlink("f", work / "l")
        assert sorted(os.listdir(work)) == ["f", "l"] and os.readlink(work / "l") == "f"
        assert (work / "l").read_text() == "data" and os.stat(work / "f").st_size == 4
        assert os.access(work / "f", os.R_OK)
        sent = calls(pid, stats)
    finally:
        unmount(point)
    read_only = {k.removesuffix(" ro") for k in sent if k.endswith(" ro")}
    ordered = {k for k in sent if not k.endswith(" ro")}
    assert {"mkdir", "create_open", "writev", "symlink"} <= ordered
    if strict:
        assert not read_only and {"lookup", "readdir", "readlink", "access"} <= ordered
    else:
        assert {"lookup", "readdir", "readlink", "access"} <= read_only
        assert not ordered & {"lookup", "readdir", "readlink", "read", "access", "getattr"}


def test_a_name_made_elsewhere_is_found_once_the_attribute_timeout_passes(mounts: dict[str, Path]) -> None:
    """A directory this mount made, or listed, answers "no such name" from the names it knows for
    at most the attribute timeout (3 s by default) from when it asked; its own creates count at
    once. ``small`` stands for another machine's mount."""
    a, elsewhere = mounts["a"], mounts["small"]
    t0 = time.monotonic()
    (a / "names").mkdir()
    assert not (a / "names" / "x").exists()  # answered from the directory this mount made
    (a / "names" / "mine").write_text("1")
    assert (a / "names" / "mine").read_text() == "1"
    (elsewhere / "names" / "x").write_text("2")
    time.sleep(max(0.0, t0 + 3.2 - time.monotonic()))
    assert (a / "names" / "x").read_text() == "2"  # past the timeout: asked again
    assert sorted(os.listdir(a / "names")) == ["mine", "x"]  # listed whole: known again
    t1 = time.monotonic()
    (elsewhere / "names" / "y").write_text("3")
    time.sleep(max(0.0, t1 + 3.2 - time.monotonic()))
    assert (a / "names" / "y").exists()

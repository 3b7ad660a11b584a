"""BFS through a real FUSE mount on a real 4-replica cluster: POSIX behaviour, data integrity,
real programs, two mounts, and a replica killed in the middle of a workload."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bft.core.params import Params
from bft.local import LocalCluster

from .conftest import require


def _fuse_missing() -> str | None:
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse on this machine"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 does not import: {exc}"
    return None


pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _fuse_present() -> None:
    missing = _fuse_missing()
    require(missing is None, str(missing))


@pytest.fixture
def root() -> None:
    require(os.geteuid() == 0, "switching to an unprivileged user needs root")


def mount(cluster_path: Path, mountpoint: Path, client: int, attr_timeout: float = 0.2) -> None:
    mountpoint.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [sys.executable, "-m", "bfs", "mount", "--config", str(cluster_path), "--client", str(client),
         "--attr-timeout", str(attr_timeout), str(mountpoint)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr


def unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, capture_output=True)


@pytest.fixture
def bfs(tmp_path: Path) -> Iterator[tuple[LocalCluster, Path]]:
    lc = LocalCluster(tmp_path / "cluster", 1, "bfs", Params(checkpoint_interval=64, log_window=128))
    mnt = tmp_path / "mnt"
    try:
        mount(lc.cluster.path, mnt, 0)
        yield lc, mnt
    finally:
        unmount(mnt)
        lc.stop()


def expect_errno(code: int, fn, *args) -> None:
    with pytest.raises(OSError) as exc:
        fn(*args)
    assert exc.value.errno == code, f"{fn.__name__}{args}: {exc.value}"


def test_posix_behaviour(bfs) -> None:
    _, mnt = bfs
    f = mnt / "a.txt"
    f.write_bytes(b"hello")
    with open(f, "ab") as fh:
        fh.write(b" world")
    assert f.read_bytes() == b"hello world"
    os.truncate(f, 5)
    assert f.read_bytes() == b"hello"
    os.rename(f, mnt / "b.txt")
    expect_errno(errno.ENOENT, os.stat, f)
    os.link(mnt / "b.txt", mnt / "hard")
    assert os.stat(mnt / "hard").st_nlink == 2
    os.symlink("b.txt", mnt / "sym")
    assert os.readlink(mnt / "sym") == "b.txt" and (mnt / "sym").read_bytes() == b"hello"
    os.chmod(mnt / "b.txt", 0o600)
    assert os.stat(mnt / "b.txt").st_mode & 0o777 == 0o600
    os.utime(mnt / "b.txt", ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(mnt / "b.txt").st_mtime_ns == 2_000_000_000
    os.mkdir(mnt / "d")
    expect_errno(errno.EEXIST, os.mkdir, mnt / "d")
    (mnt / "d" / "x").write_text("x")
    expect_errno(errno.ENOTEMPTY, os.rmdir, mnt / "d")
    expect_errno(errno.ENOTDIR, os.listdir, mnt / "b.txt")
    expect_errno(errno.EISDIR, open, mnt / "d", "w")
    expect_errno(errno.EINVAL, os.rename, mnt / "d", mnt / "d" / "inside")
    deep = mnt.joinpath(*[f"level{i}" for i in range(30)])
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("deep")
    big = mnt / "big"
    big.mkdir()
    for i in range(600):  # two readdir pages of 512 (test_bfs_posix lists one that changes)
        (big / f"entry-{i:04d}").touch()
    assert sorted(os.listdir(big)) == [f"entry-{i:04d}" for i in range(600)]
    shutil.rmtree(mnt / "level0")
    shutil.rmtree(big)
    assert sorted(os.listdir(mnt)) == ["b.txt", "d", "hard", "sym"]
    os.mkfifo(mnt / "fifo")
    assert (mnt / "fifo").is_fifo()


def test_permissions_for_an_unprivileged_user(root, bfs) -> None:
    _, mnt = bfs
    (mnt / "root-only").write_text("secret")
    os.chmod(mnt / "root-only", 0o600)
    os.mkdir(mnt / "shared")
    os.chmod(mnt / "shared", 0o777)
    # Start inside the mount: the test's own temporary directories are root's alone.
    code = (
        "import os, sys\n"
        f"os.chdir({str(mnt)!r})\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n    open('root-only').read()\nexcept PermissionError:\n    print('denied')\n"
        "open('shared/mine', 'w').write('ok')\n"
        "print(os.stat('shared/mine').st_uid)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["denied", "65534"]


@pytest.mark.timeout(300)  # the slowest test by far: 200 MiB through FUSE and 4 replicas
def test_data_integrity_of_a_large_and_a_sparse_file(bfs) -> None:
    _, mnt = bfs
    data = os.urandom(1 << 20) * 200  # 200 MiB, written in the kernel's large chunks
    with open(mnt / "large", "wb") as fh:
        fh.write(data)
    assert hashlib.sha256((mnt / "large").read_bytes()).digest() == hashlib.sha256(data).digest()
    with open(mnt / "sparse", "wb") as fh:
        fh.seek(10 << 20)
        fh.write(b"end")
    content = (mnt / "sparse").read_bytes()
    assert len(content) == (10 << 20) + 3 and content[:-3] == bytes(10 << 20) and content[-3:] == b"end"


def test_real_programs(bfs, tmp_path: Path) -> None:
    missing = [tool for tool in ("tar", "git", "cc", "make") if shutil.which(tool) is None]
    require(not missing, f"not installed: {', '.join(missing)}")
    _, mnt = bfs
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.txt").write_text(f"file {i}\n" * 100)
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="src")
    subprocess.run(["tar", "-xf", str(archive), "-C", str(mnt)], check=True)
    assert sorted(os.listdir(mnt / "src")) == sorted(os.listdir(src))
    repo = mnt / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x"}
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "first"]):
        (repo / "file").write_text("content\n")
        subprocess.run(["git", *cmd], cwd=repo, check=True, env=env)
    log = subprocess.run(["git", "log", "--oneline"], cwd=repo, check=True, capture_output=True, text=True)
    assert "first" in log.stdout
    proj = mnt / "c"
    proj.mkdir()
    (proj / "hello.c").write_text('#include <stdio.h>\nint main(void){puts("hi from bfs");return 0;}\n')
    (proj / "Makefile").write_text("hello: hello.c\n\tcc -o hello hello.c\n")
    subprocess.run(["make", "-s"], cwd=proj, check=True)
    assert subprocess.run([str(proj / "hello")], capture_output=True, text=True).stdout == "hi from bfs\n"
    db = sqlite3.connect(mnt / "db.sqlite")
    db.execute("create table t (k integer primary key, v text)")
    db.executemany("insert into t values (?, ?)", [(i, f"v{i}") for i in range(500)])
    db.commit()
    assert db.execute("select count(*), max(v) from t").fetchone() == (500, "v99")
    db.close()


def test_two_mounts_see_each_others_closed_files(bfs, tmp_path: Path) -> None:
    lc, mnt = bfs
    other = tmp_path / "mnt2"
    mount(lc.cluster.path, other, 1)
    try:
        (mnt / "shared.txt").write_text("written through mount one")
        time.sleep(0.3)  # the attribute cache timeout
        assert (other / "shared.txt").read_text() == "written through mount one"
        (other / "shared.txt").write_text("and changed through mount two")
        time.sleep(0.3)
        assert (mnt / "shared.txt").read_text() == "and changed through mount two"
    finally:
        unmount(other)


@pytest.mark.parametrize("victim", [3, 0], ids=["backup", "primary"])
def test_workload_survives_a_killed_replica(bfs, victim: int) -> None:
    lc, mnt = bfs
    expected = {}
    for i in range(60):
        if i == 20:
            lc.kill(victim)
        data = f"file {i} ".encode() * 500
        (mnt / f"w{i}").write_bytes(data)
        expected[f"w{i}"] = data
    for name, data in expected.items():
        assert (mnt / name).read_bytes() == data


def test_model_check_against_a_local_directory(bfs, tmp_path: Path) -> None:
    """Random sequences of file operations applied to the mount and to a local directory, the
    two compared after every step (hypothesis stateful testing)."""
    from hypothesis import settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

    _, mnt = bfs
    names = st.sampled_from(["a", "b", "c", "d/e", "d/f"])
    data = st.binary(max_size=3000)
    offsets = st.integers(0, 40_000)
    roots = {"mnt": mnt / "model", "ref": tmp_path / "model-ref"}

    def both(fn) -> tuple[object, object]:
        out = {}
        for side, root in roots.items():
            try:
                out[side] = ("ok", fn(root))
            except OSError as exc:
                out[side] = ("err", exc.errno)
        return out["mnt"], out["ref"]

    class Model(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            for root in roots.values():
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir()
                (root / "d").mkdir()

        @rule(name=names, payload=data)
        def write(self, name: str, payload: bytes) -> None:
            a, b = both(lambda r: (r / name).write_bytes(payload))
            assert a == b

        @rule(name=names, payload=data, offset=offsets)
        def pwrite(self, name: str, payload: bytes, offset: int) -> None:
            def op(r: Path) -> int:
                fd = os.open(r / name, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    return os.pwrite(fd, payload, offset)
                finally:
                    os.close(fd)
            a, b = both(op)
            assert a == b

        @rule(name=names, size=offsets)
        def truncate(self, name: str, size: int) -> None:
            a, b = both(lambda r: os.truncate(r / name, size))
            assert a == b

        @rule(src=names, dst=names)
        def rename(self, src: str, dst: str) -> None:
            a, b = both(lambda r: os.rename(r / src, r / dst))
            assert a == b

        @rule(name=names)
        def remove(self, name: str) -> None:
            a, b = both(lambda r: os.unlink(r / name))
            assert a == b

        @rule(name=names)
        def read(self, name: str) -> None:
            a, b = both(lambda r: (r / name).read_bytes())
            assert a == b

        @invariant()
        def same_tree(self) -> None:
            def listing(r: Path) -> list:
                return sorted(
                    (str(p.relative_to(r)), p.is_dir(), p.stat().st_size if p.is_file() else 0)
                    for p in r.rglob("*")
                )
            a, b = both(listing)
            assert a == b

    Model.TestCase.settings = settings(max_examples=15, stateful_step_count=15, deadline=None)
    Model.TestCase().runTest()

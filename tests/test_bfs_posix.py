"""POSIX behaviours a local file system has, through a real FUSE mount of a real 4-replica BFS
cluster, as root and as an unprivileged user (a child process that drops to uid 1000)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bft import config as cfg
from bft.core.params import Params
from bft.launch import start_replicas, stop_replicas
from bft.local import LocalCluster, free_base_port, wait_for_port

from .conftest import require
from .test_bfs_mount import _fuse_missing, expect_errno, mount, unmount

pytestmark = pytest.mark.integration

USER = 1000


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cluster and mount for the module, with the kernel caching names and attributes for
    2 s, longer than any step below: what a cache must not hide is seen at once."""
    missing = _fuse_missing()
    require(missing is None, str(missing))
    require(os.geteuid() == 0, "switching to an unprivileged user needs root")
    tmp = tmp_path_factory.mktemp("posix")
    lc = LocalCluster(tmp / "cluster", 1, "bfs", Params(checkpoint_interval=64, log_window=128))
    point = tmp / "mnt"
    try:
        mount(lc.cluster.path, point, 0, attr_timeout=2.0)
        yield point
    finally:
        unmount(point)
        lc.stop()


@pytest.fixture
def work(mnt: Path, request: pytest.FixtureRequest) -> Path:
    """A directory of its own for each test, writable by everyone."""
    d = mnt / request.node.name.replace("[", "-").replace("]", "")
    d.mkdir()
    d.chmod(0o777)
    return d


def as_user(directory: Path, code: str) -> list[str]:
    """Run ``code`` as uid and gid 1000 (no supplementary groups) in ``directory``; its printed
    lines. The child starts as root, so it can enter the test's private temporary directory,
    and drops its privileges before running ``code``. ``e(fn, *args)`` gives "ok" or the errno."""
    prelude = (
        "import errno, os, socket, stat, sys\n"
        f"os.chdir({str(directory)!r})\n"
        f"os.setgroups([]); os.setresgid({USER}, {USER}, {USER}); os.setresuid({USER}, {USER}, {USER})\n"
        "def e(fn, *args):\n"
        "    try:\n        fn(*args)\n        return 'ok'\n"
        "    except OSError as exc:\n        return errno.errorcode[exc.errno]\n"
    )
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_device_nodes_fifos_and_sockets_are_stored(work: Path) -> None:
    os.mknod(work / "null", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(work / "disk", 0o640 | stat.S_IFBLK, os.makedev(8, 17))
    os.mkfifo(work / "fifo", 0o620)
    st = os.stat(work / "null")
    assert stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644 and st.st_rdev == os.makedev(1, 3)
    st = os.stat(work / "disk")
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (8, 17)
    assert stat.S_ISFIFO(os.stat(work / "fifo").st_mode)
    with socket.socket(socket.AF_UNIX) as server:  # bind makes the socket's node through the mount
        server.bind(str(work / "sock"))
        server.listen()
        assert stat.S_ISSOCK(os.stat(work / "sock").st_mode)
    # an unprivileged user: no devices (EPERM), but FIFOs and sockets, and a socket that works
    lines = as_user(work, (
        "print(e(os.mknod, 'mine', 0o600 | stat.S_IFCHR, os.makedev(1, 3)))\n"
        "os.mkfifo('myfifo', 0o600)\n"
        "s = socket.socket(socket.AF_UNIX); s.bind('mysock'); s.listen()\n"
        "c = socket.socket(socket.AF_UNIX); c.connect('mysock'); a, _ = s.accept()\n"
        "c.sendall(b'ping'); print(a.recv(4).decode())\n"
        "print(stat.S_ISSOCK(os.stat('mysock').st_mode), os.stat('myfifo').st_uid)\n"
    ))
    assert lines == ["EPERM", "ping", "True", str(USER)]
    assert sorted(os.listdir(work)) == ["disk", "fifo", "myfifo", "mysock", "null", "sock"]
    for name in os.listdir(work):
        os.unlink(work / name)


def test_fifo_opens_and_search_permission_are_checked_despite_caches(work: Path) -> None:
    os.mkfifo(work / "closed", 0o600)
    os.mkfifo(work / "open", 0o666)
    (work / "d").mkdir(mode=0o777)
    (work / "d" / "f").write_text("data")
    (work / "d" / "f").chmod(0o666)
    code = (
        "print(e(os.open, 'closed', os.O_RDONLY | os.O_NONBLOCK), e(os.open, 'open', os.O_RDONLY | os.O_NONBLOCK))\n"
        "print(e(os.truncate, 'd/f', 2))\n"
    )
    assert as_user(work, code) == ["EACCES", "ok", "ok"]  # d/f is now in the kernel's caches
    (work / "d").chmod(0o644)  # no search permission for the user
    assert as_user(work, "print(e(os.truncate, 'd/f', 1), e(os.stat, 'd/f'))\n") == ["EACCES", "EACCES"]
    (work / "d").chmod(0o755)
    assert (work / "d" / "f").read_text() == "da"


def test_ownership_setuid_and_times(work: Path) -> None:
    for name in ("theirs", "prog"):
        (work / name).write_text("root's")
    (work / "theirs").chmod(0o666)
    (work / "prog").chmod(0o6777)
    before = os.stat(work / "theirs").st_mtime_ns
    time.sleep(0.01)
    lines = as_user(work, (
        # chown, even to the current owner and group, is the owner's (or root's)
        "print(e(os.chown, 'theirs', 0, 0), e(os.chown, 'theirs', -1, 0))\n"
        "open('mine', 'w').close(); print(e(os.chown, 'mine', 1000, 1000), e(os.chown, 'mine', -1, 0))\n"
        # a write by a non-owner who may write succeeds and clears setuid and setgid
        "fd = os.open('prog', os.O_WRONLY | os.O_APPEND); print(os.write(fd, b'+')); os.close(fd)\n"
        "print(oct(stat.S_IMODE(os.stat('prog').st_mode)))\n"
        # "now" is any writer's; an explicit time the owner's
        "print(e(os.utime, 'theirs'), e(os.utime, 'theirs', (1, 1)), e(os.utime, 'mine', (1, 2)))\n"
        "print(os.stat('theirs').st_mtime_ns, os.stat('mine').st_mtime)\n"
    ))
    assert lines[:7] == ["EPERM", "EPERM", "ok", "EPERM", "1", "0o777", "ok"]
    assert lines[7:9] == ["EPERM", "ok"] and lines[10] == "2.0"
    assert before < int(lines[9]) < time.time_ns() + 5 * 10**9
    assert (work / "prog").read_text() == "root's+"
    os.utime(work / "theirs", ns=(5, 7))  # root may set any time
    assert os.stat(work / "theirs").st_mtime_ns == 7


def test_extended_attributes_as_root_and_as_a_user(work: Path) -> None:
    (work / "roots").write_text("r")
    os.setxattr(work / "roots", "user.note", b"root's note")
    os.setxattr(work / "roots", "trusted.t", b"t")
    lines = as_user(work, (
        "print(os.getxattr('roots', 'user.note').decode().replace(' ', '_'), os.listxattr('roots'))\n"
        "print(e(os.setxattr, 'roots', 'user.note', b'mine'), e(os.getxattr, 'roots', 'trusted.t'))\n"
        "open('mine', 'w').close(); os.setxattr('mine', 'user.a', b'1')\n"
        "print(os.listxattr('mine'), e(os.setxattr, 'mine', 'trusted.a', b'1'))\n"
    ))
    assert lines == ["root's_note", "['user.note']", "EACCES", "ENODATA", "['user.a']", "EPERM"]
    assert sorted(os.listxattr(work / "roots")) == ["trusted.t", "user.note"]


def test_read_only_files_refuse_truncation_but_not_their_creators_handle(work: Path) -> None:
    lines = as_user(work, (
        "open('ro', 'w').write('abc'); os.chmod('ro', 0o444)\n"
        "open('wo', 'w').write('abc'); os.chmod('wo', 0o477)\n"
        "print(e(os.truncate, 'ro', 0), e(os.open, 'wo', os.O_RDONLY | os.O_TRUNC))\n"
        # git writes its objects through the handle of a create with mode 0444
        "fd = os.open('obj', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o444)\n"
        "os.write(fd, b'object data'); os.ftruncate(fd, 6); os.fsync(fd); os.close(fd)\n"
        "print(open('obj').read(), e(os.open, 'obj', os.O_WRONLY), os.stat('ro').st_size, os.stat('wo').st_size)\n"
    ))
    assert lines == ["EACCES", "EACCES", "object", "EACCES", "3", "3"]
    os.truncate(work / "ro", 1)  # root may
    assert (work / "ro").read_text() == "a"


def test_an_open_file_outlives_unlink_and_rename_over(work: Path) -> None:
    free_before = os.statvfs(work).f_bfree
    data = os.urandom(1 << 20)
    with open(work / "big", "w+b") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())  # out of the mount's write-back cache: the replicas hold its space
        os.unlink(work / "big")
        assert os.fstat(fh.fileno()).st_nlink == 0 and os.fstat(fh.fileno()).st_size == len(data)
        assert os.pread(fh.fileno(), 100, 5000) == data[5000:5100]
        fh.write(b"more")  # still writable
        assert os.statvfs(work).f_bfree < free_before  # its space is held while open
        assert "big" not in os.listdir(work)
    deadline = time.monotonic() + 10  # the kernel sends release after close returns
    while os.statvfs(work).f_bfree < free_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.statvfs(work).f_bfree == free_before  # released at the last close
    lines = as_user(work, (
        "open('new', 'w').write('new'); h = open('old', 'w+'); h.write('old'); h.flush()\n"
        "os.rename('new', 'old'); print(os.pread(h.fileno(), 3, 0).decode(), os.fstat(h.fileno()).st_nlink)\n"
        "print(open('old').read()); h.close()\n"
        "d = open('dup', 'w+'); d2 = open('dup'); os.unlink('dup'); d.close()\n"
        "print(os.fstat(d2.fileno()).st_size, e(os.stat, 'dup')); d2.close()\n"
    ))
    assert lines == ["old", "0", "new", "0", "ENOENT"]


def test_large_directory_listing_while_it_changes(work: Path) -> None:
    names = [f"entry-{i:05d}" for i in range(700)]
    for name in names:
        (work / name).touch()
    assert sorted(os.listdir(work)) == names
    with os.scandir(work) as it:  # removing what was listed does not disturb the listing
        seen = []
        for entry in it:
            seen.append(entry.name)
            if len(seen) % 2:
                os.unlink(entry.path)
    assert sorted(seen) == names
    assert sorted(os.listdir(work)) == [n for n in names if n not in set(seen[::2])]
    expect_errno(errno.ENOENT, os.stat, work / seen[0])


@pytest.fixture
def helper_installed() -> Iterator[None]:
    """/sbin/mount.fuse.bfs pointing at this checkout's helper, as the README says to install
    it, for the test's duration (mount(8) looks for helpers in /sbin only)."""
    missing = _fuse_missing()
    require(missing is None, str(missing))
    require(os.geteuid() == 0, "mount(8) with a helper in /sbin needs root")
    require(shutil.which("mount") and shutil.which("umount"), "mount(8) is not installed (util-linux)")
    link, target = Path("/sbin/mount.fuse.bfs"), Path(sys.executable).parent / "mount.fuse.bfs"
    previous = os.readlink(link) if link.is_symlink() else None
    require(previous is not None or not link.exists(), f"{link} is a file of someone else's")
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    try:
        yield
    finally:
        link.unlink()
        if previous is not None:
            link.symlink_to(previous)


def test_mount_helper_fstab_statfs_xattrs_and_fallocate(helper_installed: None, tmp_path: Path) -> None:
    cluster = cfg.load(cfg.keygen(tmp_path / "cluster", 1, 2, base_port=free_base_port(4),
                                  services={"bfs": {"name_max": 100, "bytes_max": 1 << 30}}))
    procs = start_replicas(cluster, "bfs", tmp_path / "logs", "warning")
    point = tmp_path / "mnt"
    point.mkdir()
    try:
        for r in cluster.replicas:
            wait_for_port(r.host, r.port)
        options = f"config={cluster.path},client=1,attr_timeout=0.5,nodev,_netdev"
        out = subprocess.run(["mount", "-t", "fuse.bfs", "-o", options, "bfs", str(point)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        try:
            st = os.statvfs(point)
            assert st.f_namemax == 100 and st.f_blocks * st.f_frsize == 1 << 30  # the configured limits
            expect_errno(errno.ENAMETOOLONG, (point / ("n" * 101)).touch)
            (point / ("n" * 100)).write_text("x")
            name = point / ("n" * 100)
            os.setxattr(name, "user.k", b"v")
            expect_errno(errno.EEXIST, os.setxattr, name, "user.k", b"w", os.XATTR_CREATE)
            expect_errno(errno.ENODATA, os.setxattr, name, "user.j", b"w", os.XATTR_REPLACE)
            assert os.getxattr(name, "user.k") == b"v" and os.listxattr(name) == ["user.k"]
            expect_errno(errno.EOPNOTSUPP, os.setxattr, name, "system.posix_acl_access", b"")  # ACL-free
            os.removexattr(name, "user.k")
            expect_errno(errno.ENODATA, os.getxattr, name, "user.k")
            with open(point / "f", "wb") as fh:
                libc = ctypes.CDLL(None, use_errno=True)
                assert libc.fallocate(fh.fileno(), 0, ctypes.c_int64(0), ctypes.c_int64(4096)) == -1
                assert ctypes.get_errno() == errno.EOPNOTSUPP
                os.posix_fallocate(fh.fileno(), 0, 4096)  # glibc falls back to writing zeros
            assert (point / "f").read_bytes() == bytes(4096)
        finally:
            assert subprocess.run(["umount", str(point)], capture_output=True).returncode == 0
        fstab = tmp_path / "fstab"
        fstab.write_text(f"bfs {point} fuse.bfs config={cluster.path},client=0,ro,noauto 0 0\n")
        out = subprocess.run(["mount", "-T", str(fstab), str(point)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        try:
            assert (point / "f").stat().st_size == 4096 and os.statvfs(point).f_flag & os.ST_RDONLY
            expect_errno(errno.EROFS, (point / "g").touch)
            # bfs df: the same figures without a mount, and the limits statfs cannot carry.
            df = subprocess.run([sys.executable, "-m", "bfs", "df", "--config", str(cluster.path), "--client", "1",
                                 "--json"], capture_output=True, text=True, timeout=60)
            assert df.returncode == 0, df.stderr
            usage, st = json.loads(df.stdout), os.statvfs(point)
            assert usage["name_bytes_max"] == 100 and usage["bytes"] == 1 << 30
            assert (usage["inodes"], usage["inodes_free"], usage["inodes_used"]) == (st.f_files, st.f_ffree, 3)
            assert usage["bytes_free"] // usage["block_bytes"] == st.f_bfree and usage["bytes_used"] > 0
        finally:
            assert subprocess.run(["umount", str(point)], capture_output=True).returncode == 0
        out = subprocess.run(["mount", "-t", "fuse.bfs", "-o", f"config={cluster.path},bogus", "bfs", str(point)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "unknown mount option 'bogus'" in out.stderr
    finally:
        subprocess.run(["fusermount3", "-u", str(point)], capture_output=True)
        stop_replicas(procs)

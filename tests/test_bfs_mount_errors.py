"""Which caller a failed write-back reports to, and what replies that cross a flush leave, through
the mount's handlers (bfs.mount) over a real bfs.fs.FileSystem, with the PBFT client replaced by
one that executes at once (and may hold a reply back): a unit test of the mount alone. (The same
through a real FUSE mount and replicas: test_bfs_cache_mount.py.)"""

from __future__ import annotations

import asyncio
import errno
import os
import types

import msgpack
import pyfuse3
import pytest

from bfs import mount
from bfs.fs import ROOT, FileSystem

ROOT_CREDS = [0, 0, []]


class Executes:
    """Stands in for the client: runs each operation on one state machine at once."""

    def __init__(self, fs: FileSystem) -> None:
        self.fs, self.t = fs, 1000
        self.core = types.SimpleNamespace(params=types.SimpleNamespace(op_bytes_max=8 << 20))
        self.hold: dict[str, asyncio.Event] = {}  # name -> released: executed now, answered then

    async def invoke(self, op: bytes, read_only: bool, timeout: float) -> bytes:
        self.t += 1
        result = self.fs.execute(op, 7, self.t)
        name = msgpack.unpackb(op)[0]
        if name in self.hold:
            await self.hold[name].wait()
        return result


def elsewhere(fs: FileSystem, name: str, *args: object) -> list:
    """An operation by root through another mount."""
    return msgpack.unpackb(fs.execute(msgpack.packb([name, ROOT_CREDS, *args]), 9, 10**9))


def ctx(uid: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(uid=uid, gid=uid, pid=os.getpid(), umask=0o22)


def chmod(mode: int) -> tuple[pyfuse3.EntryAttributes, types.SimpleNamespace]:
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = mode
    fields = dict.fromkeys(("update_uid", "update_gid", "update_size", "update_atime", "update_mtime"), False)
    return attr, types.SimpleNamespace(update_mode=True, **fields)


@pytest.fixture(autouse=True)
def _no_proc_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyfuse3, "get_sup_groups", lambda pid: [])


def test_a_chmod_after_a_refused_write_back_goes_on_and_the_writer_hears_of_it() -> None:
    """Bob writes Alice's file, made 0644 elsewhere meanwhile; root's chmod through this mount
    sends Bob's cached bytes first, which the replicas refuse. The chmod must not fail with Bob's
    error, nor eat it: Bob's close reports EACCES (second reader's finding)."""

    async def run() -> None:
        fs = FileSystem()
        ops = mount.BfsOperations(Executes(fs), attr_timeout=3.0)
        await ops.start(ROOT_CREDS)
        elsewhere(fs, "setattr", ROOT, [0o777, None, None, None, None, None])
        _, entry = await ops.create(ROOT, b"f", 0o666, os.O_RDWR, ctx(1000))  # Alice's
        bob = ops._handle(entry.st_ino, [1001, 1001, []], True)  # Bob's open for writing
        elsewhere(fs, "setattr", entry.st_ino, [0o644, None, None, None, None, None])
        await ops.write(bob, 0, b"data")
        attrs = await ops.setattr(entry.st_ino, *chmod(0o600), None, ctx(0))
        assert attrs.st_mode & 0o777 == 0o600
        with pytest.raises(pyfuse3.FUSEError) as refused:
            await ops.flush(bob)
        assert refused.value.errno == errno.EACCES
        assert elsewhere(fs, "getattr", entry.st_ino)[1][6] == 0  # nothing was written

    asyncio.run(run())


async def _mounted(fs: FileSystem) -> mount.BfsOperations:
    ops = mount.BfsOperations(Executes(fs), attr_timeout=3.0)
    await ops.start(ROOT_CREDS)
    elsewhere(fs, "setattr", ROOT, [0o777, None, None, None, None, None])
    return ops


def test_a_refused_write_back_reaches_every_handle_open_then_once_each() -> None:
    """Two handles on a file whose write-back the replicas refuse: each one's close reports it,
    once (Linux's error sequence per file), and a handle opened after it hears nothing (second
    reader's finding: the second close reported success for the lost data)."""

    async def run() -> None:
        fs = FileSystem()
        ops = await _mounted(fs)
        alice, entry = await ops.create(ROOT, b"f", 0o666, os.O_RDWR, ctx(1000))
        bob = [1001, 1001, []]
        first, second = (ops._handle(entry.st_ino, bob, True) for _ in range(2))  # Bob's opens
        elsewhere(fs, "setattr", entry.st_ino, [0o644, None, None, None, None, None])
        await ops.write(first, 0, b"data")
        with pytest.raises(pyfuse3.FUSEError) as refused:
            await ops.fsync(first, False)
        assert refused.value.errno == errno.EACCES
        later = ops._handle(entry.st_ino, bob, True)
        await ops.flush(first)  # heard already
        await ops.flush(later)  # opened after it
        with pytest.raises(pyfuse3.FUSEError):
            await ops.flush(alice.fh)  # open then: as on Linux, every descriptor on the file hears
        with pytest.raises(pyfuse3.FUSEError) as refused:
            await ops.write(second, 0, b"more")
        assert refused.value.errno == errno.EACCES  # and that write wrote nothing
        await ops.flush(second)
        assert ops.cache.files == {} and elsewhere(fs, "getattr", entry.st_ino)[1][6] == 0
        for fh in (alice.fh, first, second, later):
            await ops.release(fh)
        assert ops.cache.failures == {}  # forgotten with the last handle

    asyncio.run(run())


def test_the_next_open_after_a_refused_write_back_drops_the_kernels_pages() -> None:
    """A getattr after the refusal tells the kernel the same size and mtime it heard before; the
    next open must still not keep the pages that hold the refused bytes."""

    async def run() -> None:
        fs = FileSystem()
        ops = await _mounted(fs)
        info, entry = await ops.create(ROOT, b"f", 0o666, os.O_RDWR, ctx(1000))
        await ops.write(info.fh, 0, b"kept")
        await ops.flush(info.fh)
        await ops.release(info.fh)
        fh = (await ops.open(entry.st_ino, os.O_RDWR, ctx(1001))).fh  # Bob's
        elsewhere(fs, "setattr", entry.st_ino, [0o644, None, None, None, None, None])
        await ops.write(fh, 0, b"lost")
        with pytest.raises(pyfuse3.FUSEError):
            await ops.flush(fh)
        await ops.release(fh)
        ops.attrs.drop_all()
        await ops.getattr(entry.st_ino, ctx(1000))
        assert (await ops.open(entry.st_ino, os.O_RDONLY, ctx(1000))).keep_cache is False
        assert (await ops.open(entry.st_ino, os.O_RDONLY, ctx(1000))).keep_cache is True

    asyncio.run(run())


def test_replies_that_cross_a_flush_keep_this_mounts_own_writes() -> None:
    """A read and a getattr answered before a flush of the file committed, but handled after it:
    the read still sees this mount's bytes and the getattr does not shrink the file (second
    reader's finding: the overlay was taken when the cache entry was gone)."""

    async def run() -> None:
        fs = FileSystem()
        ops = await _mounted(fs)
        info, entry = await ops.create(ROOT, b"f", 0o666, os.O_RDWR, ctx(1000))
        await ops.write(info.fh, 0, b"new bytes")
        ops.attrs.drop_all()
        released = asyncio.Event()
        ops.client.hold = {"read": released, "getattr": released}
        read = asyncio.create_task(ops.read(info.fh, 0, 100))
        stat = asyncio.create_task(ops.getattr(entry.st_ino, ctx(1000)))
        await asyncio.sleep(0)
        await ops.fsync(info.fh, False)  # committed, and gone from the cache
        assert ops.cache.files == {}
        released.set()
        assert await read == b"new bytes" and (await stat).st_size == 9

    asyncio.run(run())


def test_an_open_for_reading_serves_the_first_read_unless_this_mount_changed_the_file_since() -> None:
    """An open for reading revalidates and fetches the first block in one operation, which the
    first read takes; a write through another handle, or a truncation, in between sends that
    read to the replicas; bytes this mount had not sent at the open, and sent before the read
    (a background flush), are still laid over it."""

    async def run() -> None:
        fs = FileSystem()
        ops = await _mounted(fs)
        info, entry = await ops.create(ROOT, b"f", 0o666, os.O_RDWR, ctx(1000))
        await ops.write(info.fh, 0, b"0123456789")
        await ops.flush(info.fh)
        ino, sent = entry.st_ino, ops.calls.copy()
        reader = (await ops.open(ino, os.O_RDONLY, ctx(1000))).fh
        assert await ops.read(reader, 2, 4096) == b"23456789"
        assert ops.calls - sent == {"open_read ro": 1}  # no read sent
        assert await ops.read(reader, 0, 3) == b"012"  # later reads ask
        assert (ops.calls - sent)["read ro"] == 1
        # Written through another handle after the open: the prefetched bytes are not served.
        reader = (await ops.open(ino, os.O_RDONLY, ctx(1000))).fh
        await ops.write(info.fh, 0, b"AB")
        await ops.fsync(info.fh, False)  # sent: no longer laid over any read
        assert await ops.read(reader, 0, 4096) == b"AB23456789"
        # Unsent at the open and sent before the read: laid over the prefetched bytes all the same.
        await ops.write(info.fh, 8, b"YZ")
        reader = (await ops.open(ino, os.O_RDONLY, ctx(1000))).fh
        await ops.fsync(info.fh, False)
        assert ops.cache.files == {}
        elsewhere(fs, "write", ino, 4, b"??")  # another mount, after the open: not seen yet
        assert await ops.read(reader, 0, 4096) == b"AB234567YZ"
        # Truncated through this mount in between: asked again.
        reader = (await ops.open(ino, os.O_RDONLY, ctx(1000))).fh
        attr = pyfuse3.EntryAttributes()
        attr.st_size = 3
        fields = dict.fromkeys(("update_uid", "update_gid", "update_mode", "update_atime", "update_mtime"), False)
        await ops.setattr(ino, attr, types.SimpleNamespace(update_size=True, **fields), None, ctx(1000))
        assert await ops.read(reader, 0, 4096) == b"AB2"

    asyncio.run(run())


def test_an_unlink_with_more_files_open_than_a_remove_names_keeps_the_one_removed() -> None:
    """With more than KEEP_MAX files open on the mount, the one unlinked (or renamed over) is
    still among those the remove asks the replicas to keep (second reader's finding: past the
    first KEEP_MAX inode numbers it was freed under its open handle)."""

    async def run() -> None:
        fs = FileSystem()
        ops = await _mounted(fs)
        handles = [(await ops.create(ROOT, b"f%d" % k, 0o644, os.O_RDWR, ctx(0)))[0].fh
                   for k in range(mount.KEEP_MAX + 20)]
        last = ops.handles[handles[-1]].inode
        await ops.unlink(ROOT, b"f%d" % (len(handles) - 1), ctx(0))
        await ops.rename(ROOT, b"f0", ROOT, b"f%d" % (len(handles) - 2), 0, ctx(0))
        over = ops.handles[handles[-2]].inode
        assert {last, over} <= ops.kept
        for ino in (last, over):
            assert elsewhere(fs, "getattr", ino)[0] == 0  # still there for its handle
        await ops.release(handles[-1])
        assert elsewhere(fs, "getattr", last)[0] == errno.ESTALE  # freed at the last close

    asyncio.run(run())


def test_a_name_not_among_a_directorys_known_names_is_not_found_without_asking() -> None:
    """A directory made here, or listed whole by a readdir, answers "no such name" for a name
    not in it without a lookup, for the attribute timeout from when it was asked (a name made
    elsewhere since is as unseen as under the kernel's own cache of a name not found); names
    made here count at once; a remove or rename through this mount forgets every directory's."""

    async def run() -> None:
        fs = FileSystem()
        ops = mount.BfsOperations(Executes(fs), attr_timeout=0.5)
        await ops.start(ROOT_CREDS)
        elsewhere(fs, "setattr", ROOT, [0o777, None, None, None, None, None])
        d = (await ops.mkdir(ROOT, b"d", 0o755, ctx(1000))).st_ino
        before = ops.calls.copy()
        missing = await ops.lookup(d, b"x.gch", ctx(1000))
        assert missing.st_ino == 0 and 0 < missing.entry_timeout <= 0.5
        assert ops.calls == before  # not asked
        info, made = await ops.create(d, b"f", 0o644, os.O_RDWR, ctx(1000))
        assert (await ops.lookup(d, b"f", ctx(1000))).st_ino == made.st_ino  # asked: it is there
        elsewhere(fs, "create", d, b"g", 0o644, False)
        assert (await ops.lookup(d, b"g", ctx(1000))).st_ino == 0  # within the timeout
        await asyncio.sleep(0.5)
        assert (await ops.lookup(d, b"g", ctx(1000))).st_ino != 0  # asked again
        # Listed whole: a name not in the page is not found without asking.
        fh = await ops.opendir(d, ctx(1000))
        entries, eof = await ops._readdir_page(ops.handles[fh], 0)
        assert eof and {e[0] for e in entries} == {b"f", b"g"}
        before = ops.calls.copy()
        assert (await ops.lookup(d, b"h", ctx(1000))).st_ino == 0 and ops.calls == before
        await ops.unlink(d, b"f", ctx(1000))
        before = ops.calls.copy()
        assert (await ops.lookup(d, b"h", ctx(1000))).st_ino == 0
        assert ops.calls - before == {"lookup ro": 1}  # forgotten at the remove: asked
        await ops.release(info.fh)

    asyncio.run(run())


def test_reads_of_a_file_created_here_are_its_unsent_writes_until_some_are_sent() -> None:
    """Through the handle of the create that made the file, a read is this mount's unsent writes
    over an empty file, without asking (assemblers read back pages of the object they write),
    until this mount sends any of its bytes (or changes its size) or the attribute timeout
    passes; then the replicas are asked again. A create that found the file is asked at once."""

    async def run() -> None:
        fs = FileSystem()
        ops = await _mounted(fs)
        info, entry = await ops.create(ROOT, b"a.o", 0o644, os.O_RDWR | os.O_CREAT, ctx(1000))
        ino, before = entry.st_ino, ops.calls.copy()
        await ops.write(info.fh, 0, b"ELF")
        await ops.write(info.fh, 8192, b"end")
        elsewhere(fs, "write", ino, 100, b"??")  # another mount's, while this one holds it new
        assert await ops.read(info.fh, 0, 4096) == b"ELF" + bytes(4093)
        assert await ops.read(info.fh, 4096, 8192) == bytes(4096) + b"end"
        assert await ops.read(info.fh, 9000, 4096) == b""
        assert ops.calls == before  # nothing asked
        await ops.fsync(info.fh, False)  # sent: the replicas hold the file now
        data = await ops.read(info.fh, 0, 4096)
        assert data[:3] == b"ELF" and data[100:102] == b"??" and ops.calls - before == {"writev": 1, "read ro": 1}
        await ops.release(info.fh)
        again, _ = await ops.create(ROOT, b"a.o", 0o644, os.O_RDWR | os.O_CREAT, ctx(1000))
        before = ops.calls.copy()
        assert (await ops.read(again.fh, 0, 3)) == b"ELF" and ops.calls - before == {"read ro": 1}
        await ops.release(again.fh)

    asyncio.run(run())


def test_a_create_of_a_name_made_elsewhere_since_it_was_listed_opens_it_as_open_would() -> None:
    """The kernel sends create (not lookup and open) for a name the mount said is missing; if
    another mount made it in the meantime, O_TRUNC must still truncate it and the open's own
    access decide (a reviewer's finding: the old tail survived the truncating open)."""

    async def run() -> None:
        fs = FileSystem()
        ops = await _mounted(fs)
        d = (await ops.mkdir(ROOT, b"d", 0o777, ctx(1000))).st_ino
        f = elsewhere(fs, "create", d, b"f", 0o644, False)[1][0]
        elsewhere(fs, "write", f, 0, b"another mount's long contents")
        assert (await ops.lookup(d, b"f", ctx(1000))).st_ino == 0  # from the names made here
        info, entry = await ops.create(d, b"f", 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, ctx(0))
        assert entry.st_ino == f and entry.st_size == 0
        await ops.write(info.fh, 0, b"x\n")
        await ops.release(info.fh)
        assert elsewhere(fs, "read", f, 0, 100)[1] == [b"x\n", True]
        reader, _ = await ops.create(d, b"f", 0o644, os.O_RDONLY | os.O_CREAT, ctx(1001))  # not the owner
        assert await ops.read(reader.fh, 0, 100) == b"x\n"  # asked: not a file made by this create
        await ops.release(reader.fh)
        # A name longer than the file system takes is refused by the replicas, not "not found".
        with pytest.raises(pyfuse3.FUSEError) as long:
            await ops.lookup(d, b"n" * (ops.name_max + 1), ctx(1000))
        assert long.value.errno == errno.ENAMETOOLONG

    asyncio.run(run())

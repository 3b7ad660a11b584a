"""Which caller a failed write-back reports to, through the mount's handlers (bfs.mount) over a
real bfs.fs.FileSystem, with the PBFT client replaced by one that executes at once: a unit test
of the mount alone. (The same through a real FUSE mount and replicas: test_bfs_cache_mount.py.)"""

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

    async def invoke(self, op: bytes, read_only: bool, timeout: float) -> bytes:
        self.t += 1
        return self.fs.execute(op, 7, self.t)


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

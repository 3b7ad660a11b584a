"""The FUSE mount: kernel calls become BFS operations invoked through the PBFT client.

pyfuse3's low-level API is inode-based, like NFS handles, so inode numbers pass through unchanged
and a renamed open file just works; its handlers are coroutines that await the asyncio client
directly, many in flight at once. Read-only operations (getattr, lookup, read, readdir, readlink,
access, statfs) take the read-only path.

Caching is NFS-like: the kernel keeps attributes and name lookups for ``attr_timeout`` seconds,
and drops a file's cached pages when it is opened, so a file written and closed through one mount
is read afresh through another once its attributes expire (close-to-open consistency).
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import msgpack
import pyfuse3

from bfs.fs import BLOCK, KIND_BITS
from client import Client, QuorumTimeout

log = logging.getLogger("bfs.mount")

OP_TIMEOUT_S = 60.0


class BfsOperations(pyfuse3.Operations):
    def __init__(self, client: Client, attr_timeout: float = 1.0, read_only_path: bool = True) -> None:
        super().__init__()
        self.client = client
        self.attr_timeout = attr_timeout
        self.read_only_path = read_only_path
        # Open files and directories: handle -> (inode, the opener's credentials). FUSE does
        # not say who reads or writes through a handle; the opener is who the server checks.
        self.handles: dict[int, tuple[int, list]] = {}
        self.next_handle = 1

    @staticmethod
    def _creds(ctx: pyfuse3.RequestContext) -> list:
        try:
            groups = sorted(pyfuse3.get_sup_groups(ctx.pid))[:32]
        except (OSError, ValueError):
            groups = []
        return [ctx.uid, ctx.gid, groups]

    def _handle(self, inode: int, creds: list) -> int:
        fh = self.next_handle
        self.next_handle += 1
        self.handles[fh] = (inode, creds)
        return fh

    async def _call(self, name: str, ctx: pyfuse3.RequestContext | list, *args: object) -> object:
        creds = ctx if isinstance(ctx, list) else self._creds(ctx)
        op = msgpack.packb([name, creds, *args])
        read_only = self.read_only_path and name in READ_ONLY
        try:
            result = await self.client.invoke(op, read_only, timeout=OP_TIMEOUT_S)
        except QuorumTimeout:
            log.error("%s: no quorum of replicas answered", name)
            raise pyfuse3.FUSEError(errno.EIO) from None
        code, value = _result(name, result)
        if code:
            raise pyfuse3.FUSEError(code)
        return value

    def _entry(self, attrs: list) -> pyfuse3.EntryAttributes:
        ino, kind, mode, nlink, uid, gid, size, atime, mtime, ctime, gen = attrs
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = gen
        e.st_mode = KIND_BITS[kind] | mode
        e.st_nlink = nlink
        e.st_uid, e.st_gid = uid, gid
        e.st_size = size
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = atime, mtime, ctime
        e.st_blksize = BLOCK
        e.st_blocks = (size + 511) // 512
        e.attr_timeout = self.attr_timeout
        e.entry_timeout = self.attr_timeout
        return e

    # -- names and attributes ---------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._call("lookup", ctx, parent_inode, name))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._call("getattr", ctx, inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        changes = [
            stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
            attr.st_uid if fields.update_uid else None,
            attr.st_gid if fields.update_gid else None,
            attr.st_size if fields.update_size else None,
            attr.st_atime_ns if fields.update_atime else None,
            attr.st_mtime_ns if fields.update_mtime else None,
        ]
        return self._entry(await self._call("setattr", ctx, inode, changes))

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        try:
            await self._call("access", ctx, inode, mode)
        except pyfuse3.FUSEError as exc:
            if exc.errno == errno.EACCES:
                return False
            raise
        return True

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._call("readlink", ctx, inode)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        total, free, files, ffree, bsize = await self._call("fsstat", ctx)
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = bsize
        s.f_blocks, s.f_bfree, s.f_bavail = total // bsize, free // bsize, free // bsize
        s.f_files, s.f_ffree, s.f_favail = files, ffree, ffree
        s.f_namemax = 255
        return s

    # -- creating and removing --------------------------------------------------------------

    async def create(self, parent_inode, name, mode, flags, ctx):
        creds = self._creds(ctx)
        attrs = await self._call("create", creds, parent_inode, name, stat.S_IMODE(mode), bool(flags & os.O_EXCL))
        return pyfuse3.FileInfo(fh=self._handle(attrs[0], creds)), self._entry(attrs)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext):
        return self._entry(await self._call("mkdir", ctx, parent_inode, name, stat.S_IMODE(mode)))

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if stat.S_ISREG(mode):
            return self._entry(await self._call("create", ctx, parent_inode, name, stat.S_IMODE(mode), True))
        if not stat.S_ISFIFO(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # no device files on a network file system
        return self._entry(await self._call("mknod", ctx, parent_inode, name, stat.S_IMODE(mode)))

    async def symlink(self, parent_inode, name, target, ctx):
        return self._entry(await self._call("symlink", ctx, parent_inode, name, target))

    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._entry(await self._call("link", ctx, inode, new_parent_inode, new_name))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._call("remove", ctx, parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._call("rmdir", ctx, parent_inode, name)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if flags & pyfuse3.RENAME_NOREPLACE:
            try:
                await self._call("lookup", ctx, parent_inode_new, name_new)
            except pyfuse3.FUSEError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                raise pyfuse3.FUSEError(errno.EEXIST)
        await self._call("rename", ctx, parent_inode_old, name_old, parent_inode_new, name_new)

    # -- file contents ----------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        creds = self._creds(ctx)
        mask = {os.O_RDONLY: 4, os.O_WRONLY: 2, os.O_RDWR: 6}.get(flags & os.O_ACCMODE)
        if mask is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self._call("access", creds, inode, mask)
        if flags & os.O_TRUNC:
            # libfuse 3 passes O_TRUNC on to open (atomic_o_trunc) instead of a setattr first.
            await self._call("setattr", creds, inode, [None, None, None, 0, None, None])
        # keep_cache=False drops the kernel's cached pages: close-to-open consistency.
        return pyfuse3.FileInfo(fh=self._handle(inode, creds), keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        inode, creds = self.handles[fh]
        data, _eof = await self._call("read", creds, inode, off, size)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        inode, creds = self.handles[fh]
        await self._call("write", creds, inode, off, bytes(buf))
        return len(buf)

    async def flush(self, fh: int) -> None:
        return None  # every write's reply was agreed by a quorum: nothing is buffered here

    async def release(self, fh: int) -> None:
        self.handles.pop(fh, None)

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    # -- directories ------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        creds = self._creds(ctx)
        await self._call("access", creds, inode, 4)
        return self._handle(inode, creds)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets 1 and 2 follow "." and ".."; an entry with BFS cookie c ends at offset c + 2.
        inode, creds = self.handles[fh]
        if start_id < 2:
            # The kernel takes only the type from these; getattr needs no search permission.
            attrs = await self._call("getattr", creds, inode)
            for offset, name in ((1, b"."), (2, b"..")):
                if start_id < offset and not pyfuse3.readdir_reply(token, name, self._entry(attrs), offset):
                    return
        cookie = max(0, start_id - 2)
        while True:
            entries, eof = await self._call("readdir", creds, inode, cookie, 512)
            for name, attrs, next_cookie in entries:
                if not pyfuse3.readdir_reply(token, name, self._entry(attrs), next_cookie + 2):
                    return
                cookie = next_cookie
            if eof or not entries:
                return

    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)


def _result(name: str, result: bytes) -> tuple[int, object]:
    """``[errno, value]``, as BFS answers. Anything else (a cluster running another service)
    becomes EIO here: an exception other than FUSEError out of a handler would end the mount."""
    try:
        reply = msgpack.unpackb(result)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        reply = None
    if type(reply) is not list or len(reply) != 2 or type(reply[0]) is not int or reply[0] < 0:
        log.error("%s: the cluster's reply is not a BFS result (does it run the bfs service?)", name)
        raise pyfuse3.FUSEError(errno.EIO)
    return reply[0], reply[1]


READ_ONLY = frozenset({"getattr", "lookup", "access", "readlink", "read", "readdir", "fsstat"})

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

import bisect
import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field

import msgpack
import pyfuse3

from bfs.fs import BLK, BLOCK, CHR, FIFO, KEEP_MAX, KIND_BITS, SOCK
from client import Client, QuorumTimeout

log = logging.getLogger("bfs.mount")

OP_TIMEOUT_S = 60.0
# pyfuse3 turns the kernel's "set to now" (utimensat UTIME_NOW, touch) into its own clock reading
# taken just before it calls setattr, and does not say it did. A time this close to ours is taken
# as "now" and sent as -1, so the replicas use the agreed time and let a writer who is not the
# owner do it; an explicit time that close to now differs from the agreed one by as little.
NOW_WINDOW_NS = 100_000_000
SPECIAL_KINDS = {stat.S_IFIFO: FIFO, stat.S_IFSOCK: SOCK, stat.S_IFCHR: CHR, stat.S_IFBLK: BLK}


@dataclass(slots=True)
class Handle:
    inode: int
    creds: list  # the opener's: FUSE does not say who reads or writes through a handle
    writable: bool
    # A directory's readdir page not yet taken by the kernel, which takes a few dozen entries per
    # call and asks again from the last one it took: [name, attrs, cookie] in cookie order.
    page: list = field(default_factory=list)
    page_eof: bool = False


class BfsOperations(pyfuse3.Operations):
    def __init__(self, client: Client, attr_timeout: float = 1.0, read_only_path: bool = True) -> None:
        super().__init__()
        self.client = client
        self.attr_timeout = attr_timeout
        self.read_only_path = read_only_path
        self.handles: dict[int, Handle] = {}
        self.next_handle = 1
        self.open_count: dict[int, int] = {}  # inode -> handles open on it
        # Files unlinked or renamed over while open here: the replicas keep them until the last
        # handle closes and this mount says "forget" (NFS's silly rename, without the name).
        self.kept: set[int] = set()

    @staticmethod
    def _creds(ctx: pyfuse3.RequestContext) -> list:
        try:
            groups = sorted(pyfuse3.get_sup_groups(ctx.pid))[:32]
        except (OSError, ValueError):
            groups = []
        return [ctx.uid, ctx.gid, groups]

    def _handle(self, inode: int, creds: list, writable: bool = False) -> int:
        fh = self.next_handle
        self.next_handle += 1
        self.handles[fh] = Handle(inode, creds, writable)
        self.open_count[inode] = self.open_count.get(inode, 0) + 1
        return fh

    async def _close(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        left = self.open_count[handle.inode] - 1
        if left:
            self.open_count[handle.inode] = left
            return
        del self.open_count[handle.inode]
        if handle.inode in self.kept:
            self.kept.discard(handle.inode)
            try:
                await self._call("forget", handle.creds, handle.inode)
            except pyfuse3.FUSEError as exc:
                log.warning("forget %d: %s (its space is freed when this mount starts again)", handle.inode, exc)

    def _keep(self) -> list[int]:
        return sorted(self.open_count)[:KEEP_MAX]

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
        ino, kind, mode, nlink, uid, gid, size, atime, mtime, ctime, gen, rdev = attrs
        e = pyfuse3.EntryAttributes()
        e.st_rdev = rdev
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
        clock = time.time_ns()

        def when(update: bool, ns: int) -> int | None:
            if not update:
                return None
            return -1 if 0 <= clock - ns < NOW_WINDOW_NS else ns

        handle = self.handles.get(fh) if fh is not None else None
        changes = [
            stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
            attr.st_uid if fields.update_uid else None,
            attr.st_gid if fields.update_gid else None,
            attr.st_size if fields.update_size else None,
            when(fields.update_atime, attr.st_atime_ns),
            when(fields.update_mtime, attr.st_mtime_ns),
            handle is not None and handle.writable,  # ftruncate: the opener's owner override
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
        name_max = (await self._call("fsinfo", ctx))[4]
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = bsize
        s.f_blocks, s.f_bfree, s.f_bavail = total // bsize, free // bsize, free // bsize
        s.f_files, s.f_ffree, s.f_favail = files, ffree, ffree
        s.f_namemax = name_max
        return s

    # -- extended attributes (pyfuse3 does XATTR_CREATE and XATTR_REPLACE with getxattr) ----

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._call("getxattr", ctx, inode, name)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self._call("listxattr", ctx, inode)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._call("setxattr", ctx, inode, name, bytes(value))

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._call("removexattr", ctx, inode, name)

    # -- creating and removing --------------------------------------------------------------

    async def create(self, parent_inode, name, mode, flags, ctx):
        creds = self._creds(ctx)
        attrs = await self._call("create", creds, parent_inode, name, stat.S_IMODE(mode), bool(flags & os.O_EXCL))
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        return pyfuse3.FileInfo(fh=self._handle(attrs[0], creds, writable)), self._entry(attrs)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext):
        return self._entry(await self._call("mkdir", ctx, parent_inode, name, stat.S_IMODE(mode)))

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if stat.S_ISREG(mode):
            return self._entry(await self._call("create", ctx, parent_inode, name, stat.S_IMODE(mode), True))
        kind = SPECIAL_KINDS.get(stat.S_IFMT(mode))
        if kind is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._entry(await self._call("mknod", ctx, parent_inode, name, kind, stat.S_IMODE(mode), rdev))

    async def symlink(self, parent_inode, name, target, ctx):
        return self._entry(await self._call("symlink", ctx, parent_inode, name, target))

    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._entry(await self._call("link", ctx, inode, new_parent_inode, new_name))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        kept = await self._call("remove", ctx, parent_inode, name, self._keep())
        if kept is not None:
            self.kept.add(kept)

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
        kept = await self._call("rename", ctx, parent_inode_old, name_old, parent_inode_new, name_new, self._keep())
        if kept is not None:
            self.kept.add(kept)

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
        return pyfuse3.FileInfo(fh=self._handle(inode, creds, mask != 4), keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles[fh]
        data, _eof = await self._call("read", h.creds, h.inode, off, size)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        await self._call("write", h.creds, h.inode, off, bytes(buf))
        return len(buf)

    async def flush(self, fh: int) -> None:
        return None  # every write's reply was agreed by a quorum: nothing is buffered here

    async def release(self, fh: int) -> None:
        await self._close(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    # -- directories ------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        creds = self._creds(ctx)
        await self._call("access", creds, inode, 4)
        return self._handle(inode, creds)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets 1 and 2 follow "." and ".."; an entry with BFS cookie c ends at offset c + 2.
        h = self.handles[fh]
        inode, creds = h.inode, h.creds
        if start_id < 2:
            # The kernel takes only the type from these; getattr needs no search permission.
            attrs = await self._call("getattr", creds, inode)
            for offset, name in ((1, b"."), (2, b"..")):
                if start_id < offset and not pyfuse3.readdir_reply(token, name, self._entry(attrs), offset):
                    return
        cookie = max(0, start_id - 2)
        while True:
            entries, eof = await self._readdir_page(h, cookie)
            for name, attrs, next_cookie in entries:
                if not pyfuse3.readdir_reply(token, name, self._entry(attrs), next_cookie + 2):
                    return
                cookie = next_cookie
            if eof or not entries:
                return

    async def _readdir_page(self, h: Handle, cookie: int) -> tuple[list, bool]:
        """The entries after ``cookie``: the rest of the page fetched last if it reaches that
        far (the kernel goes on from where it stopped), else a new page from the replicas; from
        the start (opendir, rewinddir) always a new one."""
        cookies = [c for _, _, c in h.page]
        at = bisect.bisect_right(cookies, cookie)
        if cookie and h.page and at and cookies[at - 1] == cookie and (at < len(cookies) or h.page_eof):
            return h.page[at:], h.page_eof
        h.page, h.page_eof = await self._call("readdir", h.creds, h.inode, cookie, 512)
        return h.page, h.page_eof

    async def releasedir(self, fh: int) -> None:
        await self._close(fh)


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


READ_ONLY = frozenset({"getattr", "lookup", "access", "readlink", "read", "readdir", "fsstat", "fsinfo",
                       "getxattr", "listxattr"})

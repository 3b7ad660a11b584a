"""The FUSE mount: kernel calls become BFS operations invoked through the PBFT client.

pyfuse3's low-level API is inode-based, like NFS handles, so inode numbers pass through unchanged
and a renamed open file just works; its handlers are coroutines that await the asyncio client
directly, many in flight at once. Read-only operations (bfs.fs.READ_ONLY_OPS) take PBFT's read-only
path unless the mount is strict (``read_only_path`` False: every operation ordered).

Caching is NFS-like (README, "Caching and consistency"): written data waits in a bounded
write-back cache (bfs/writeback.py) until close, fsync or the bound sends it; the kernel keeps
attributes and names for ``attr_timeout`` seconds; an open asks the replicas for the file's
attributes and drops the kernel's cached pages, so what another mount wrote and closed before
the open is what it reads (close-to-open consistency).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
import time
from collections import Counter

import msgpack
import pyfuse3

from bfs.attrcache import ENTRIES_MAX, AttrCache
from bfs.fs import BLK, BLOCK, CHR, FIFO, KEEP_MAX, KIND_BITS, READ_ONLY_OPS, SOCK, decode_result
from bfs.mountdirs import DirsAndXattrs, Handle, Prefetch
from bfs.writeback import WRITE_CACHE_BYTES, FlushError, WriteBack, overlay
from client import Client, QuorumTimeout

log = logging.getLogger("bfs.mount")

OP_TIMEOUT_S = 60.0
# pyfuse3 turns the kernel's "set to now" (utimensat UTIME_NOW, touch) into its own clock reading
# taken just before it calls setattr, and does not say it did. A time this close to ours is taken
# as "now" and sent as -1, so the replicas use the agreed time and let a writer who is not the
# owner do it; an explicit time that close to now differs from the agreed one by as little.
NOW_WINDOW_NS = 100_000_000
SPECIAL_KINDS = {stat.S_IFIFO: FIFO, stat.S_IFSOCK: SOCK, stat.S_IFCHR: CHR, stat.S_IFBLK: BLK}
ACCESS_MASKS = {os.O_RDONLY: 4, os.O_WRONLY: 2, os.O_RDWR: 6}  # open's access mode as R_OK | W_OK
# A writev's bytes besides its data: the name, credentials (up to 32 groups), inode and headers.
WRITEV_HEADER_BYTES = 1024


class BfsOperations(DirsAndXattrs, pyfuse3.Operations):
    def __init__(self, client: Client, attr_timeout: float = 1.0, read_only_path: bool = True,
                 write_cache_bytes: int = WRITE_CACHE_BYTES) -> None:
        super().__init__()
        self.client = client
        self.attr_timeout = attr_timeout
        # False: every operation ordered (the paper's BFS-strict); True: READ_ONLY_OPS on PBFT's
        # read-only path (its "read-only lookups").
        self.read_only_path = read_only_path
        self.write_cache_bytes = write_cache_bytes
        self.cache: WriteBack | None = None  # made by start(), which learns the file size limit
        self.name_max = 0  # learned by start(); till then every lookup asks
        self.calls: Counter[str] = Counter()  # "name" ordered, "name ro" on the read-only path
        self.attrs = AttrCache(attr_timeout)
        self.handles: dict[int, Handle] = {}
        self.next_handle = 1
        self.open_count: dict[int, int] = {}  # inode -> handles open on it
        # Files unlinked or renamed over while open here: the replicas keep them until the last
        # handle closes and this mount says "forget" (NFS's silly rename, without the name).
        self.kept: set[int] = set()
        # inode -> a stamp (unique in this mount) of the last change this mount made to the file's
        # bytes or size: an open's prefetched first bytes serve the first read only if none came
        # in between.
        self.changes: dict[int, int] = {}
        # inode -> a stamp of the last change of its bytes or size this mount sent the replicas
        # (a writev, a setattr): while none was, they hold of a file created here only what this
        # mount has not yet sent, as far as this mount need know.
        self.sent: dict[int, int] = {}
        self._stamps = itertools.count(1)

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
        self.handles[fh] = Handle(inode, creds, writable, heard=self.cache.sample())
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
        self.cache.forget(handle.inode)
        if handle.inode in self.kept:
            self.kept.discard(handle.inode)
            try:
                await self._call("forget", handle.creds, handle.inode)
            except pyfuse3.FUSEError as exc:
                log.warning("forget %d: %s (its space is freed when this mount starts again)", handle.inode, exc)

    async def _keep(self, ctx: pyfuse3.RequestContext, parent_inode: int, name: bytes) -> list[int]:
        """The files open here that a remove or rename of ``name`` must not free. Past KEEP_MAX
        open files, the one the name is looked up as (if open) and as many others as fit: a
        rename elsewhere between that lookup and the remove is the only way to miss it."""
        if len(self.open_count) <= KEEP_MAX:
            return list(self.open_count)
        try:
            ino = (await self._call("lookup", ctx, parent_inode, name))[0]
        except pyfuse3.FUSEError:
            ino = None  # the remove or rename itself reports what is wrong with the name
        first = [ino] if ino in self.open_count else []
        return first + [i for i in self.open_count if i != ino][:KEEP_MAX - len(first)]

    async def start(self, creds: list) -> None:
        """Make the write-back cache, which refuses writes past the file size limit itself."""
        info = await self._call("fsinfo", creds)
        file_bytes_max, self.name_max = info[3], info[4]
        writev_bytes_max = self.client.core.params.op_bytes_max - WRITEV_HEADER_BYTES
        self.cache = WriteBack(self._writev, self.write_cache_bytes, writev_bytes_max, file_bytes_max)

    async def _writev(self, creds: list, inode: int, extents: list[tuple[int, bytes]]) -> None:
        self._stamp(self.sent, inode)
        try:
            self._note(await self._call("writev", creds, inode, extents))
        except pyfuse3.FUSEError as exc:
            self.attrs.distrust(inode)  # the next open drops the kernel's pages of it
            raise FlushError(exc.errno) from None

    async def _flush(self, h: Handle) -> None:
        """Send the file's cached writes; raise a write-back failure this handle has not
        heard of (this flush's, or an earlier one's while it was open)."""
        await self.cache.flush(h.inode)
        self._report(h)

    def _report(self, h: Handle) -> None:
        code, h.heard = self.cache.check(h.inode, h.heard)
        if code:
            raise pyfuse3.FUSEError(code)

    async def _flush_before(self, inode: int) -> None:
        """Send the cached writes before a change that must follow them (setattr, O_TRUNC). Their
        failure is the writers', reported to their handles: the change goes on, and its caller,
        maybe another user, does not get a writer's error."""
        await self.cache.flush(inode)

    def _stamp(self, table: dict[int, int], inode: int) -> None:
        """Mark a change of the file in ``changes`` or ``sent``. Stamps never repeat, so a table
        started again empty (past ENTRIES_MAX files) only sends some reads to the replicas."""
        if len(table) >= ENTRIES_MAX:
            table.clear()
        table[inode] = next(self._stamps)

    def _current(self, table: dict[int, int], inode: int) -> int:
        """The file's stamp in ``table``, for a comparison later: one it has, or a new one (an
        absent entry read as 0 could match again after the table is started again)."""
        if inode not in table:
            self._stamp(table, inode)
        return table[inode]

    def _note(self, attrs: list) -> None:
        self.attrs.note(attrs, time.monotonic())

    async def _call(self, name: str, ctx: pyfuse3.RequestContext | list, *args: object) -> object:
        creds = ctx if isinstance(ctx, list) else self._creds(ctx)
        op = msgpack.packb([name, creds, *args])
        read_only = self.read_only_path and name in READ_ONLY_OPS
        self.calls[f"{name} ro" if read_only else name] += 1
        try:
            result = await self.client.invoke(op, read_only, timeout=OP_TIMEOUT_S)
        except QuorumTimeout:
            log.error("%s: no quorum of replicas answered", name)
            raise pyfuse3.FUSEError(errno.EIO) from None
        code, value = _result(name, result)
        if code:
            raise pyfuse3.FUSEError(code)
        return value

    def _entry(self, attrs: list, fresh_s: float | None = None) -> pyfuse3.EntryAttributes:
        """``fresh_s``: the attributes are this mount's cached ones, good for that much longer
        (the kernel must not keep them past the mount's timeout); else they come from a reply."""
        ino, kind, mode, nlink, uid, gid, size, atime, mtime, ctime, gen, rdev = attrs
        e = pyfuse3.EntryAttributes()
        e.st_rdev = rdev
        e.st_ino = ino
        e.generation = gen
        e.st_mode = KIND_BITS[kind] | mode
        e.st_nlink = nlink
        e.st_uid, e.st_gid = uid, gid
        if fresh_s is None:
            self._note(attrs)
        self.attrs.told(attrs)
        if self.cache is not None:
            size = self.cache.size(ino, size)  # with this mount's unsent writes
        e.st_size = size
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = atime, mtime, ctime
        e.st_blksize = BLOCK
        e.st_blocks = (size + 511) // 512
        e.attr_timeout = self.attr_timeout if fresh_s is None else fresh_s
        e.entry_timeout = self.attr_timeout
        return e

    # -- names and attributes ---------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # The kernel keeps "no such name" as long as a name (compilers look for many headers
        # where they are not); a create through this mount replaces it at once.
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = self.attr_timeout
        # A name too long is the replicas' to refuse (ENAMETOOLONG), not "not found".
        left = self.attrs.missing(parent_inode, name, time.monotonic()) if len(name) <= self.name_max else None
        if left is not None:  # not among the directory's names as listed or made here
            e.entry_timeout = left
            return e
        try:
            return self._entry(await self._call("lookup", ctx, parent_inode, name))
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOENT:
                raise
        return e

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        hit = self.attrs.get(inode, time.monotonic())
        if hit is not None:
            return self._entry(*hit)
        attrs = await self._call("getattr", ctx, inode)
        # A reply noted while this one was awaited (a writev's, say) may be the newer: this
        # getattr may have been answered before that writev, and its size would shrink the file.
        hit = self.attrs.get(inode, time.monotonic())
        return self._entry(*hit) if hit is not None else self._entry(attrs)

    async def setattr(self, inode, attr, fields, fh, ctx):
        self._stamp(self.changes, inode)
        # Cached writes go first: a truncation, chmod, chown or utimes after them stays after.
        await self._flush_before(inode)
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
        self._stamp(self.sent, inode)
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

    # -- creating and removing --------------------------------------------------------------

    async def create(self, parent_inode, name, mode, flags, ctx):
        creds, mask = self._creds(ctx), _access_mask(flags)
        self.attrs.named(parent_inode, name)
        # The kernel found no such name (it may be another mount's since): the replicas open a
        # file that is there as open() would, the open's access checked and O_TRUNC applied.
        *attrs, new, parent = await self._call("create_open", creds, parent_inode, name, stat.S_IMODE(mode),
                                               bool(flags & os.O_EXCL), mask, bool(flags & os.O_TRUNC))
        self._note(parent)
        ino = attrs[0]
        fh = self._handle(ino, creds, mask != 4)
        if new:  # the kernel asks for security.capability before the first write
            self.attrs.note_no_xattr(ino, None, time.monotonic())
            self.handles[fh].empty = (self._current(self.sent, ino), time.monotonic() + self.attr_timeout)
        elif flags & os.O_TRUNC:
            self._stamp(self.changes, ino)
            self._stamp(self.sent, ino)
        return pyfuse3.FileInfo(fh=fh), self._entry(attrs)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext):
        self.attrs.named(parent_inode, name)
        asked = time.monotonic()
        *attrs, parent = await self._call("mkdir", ctx, parent_inode, name, stat.S_IMODE(mode))
        self._note(parent)
        self.attrs.listed(attrs[0], [], asked)  # new, so empty
        return self._entry(attrs)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self.attrs.named(parent_inode, name)
        if stat.S_ISREG(mode):
            *attrs, _, parent = await self._call("create", ctx, parent_inode, name, stat.S_IMODE(mode), True)
            self._note(parent)
        else:
            kind = SPECIAL_KINDS.get(stat.S_IFMT(mode))
            if kind is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            attrs = await self._call("mknod", ctx, parent_inode, name, kind, stat.S_IMODE(mode), rdev)
            self.attrs.drop(parent_inode)
        return self._entry(attrs)

    async def symlink(self, parent_inode, name, target, ctx):
        self.attrs.named(parent_inode, name)
        attrs = await self._call("symlink", ctx, parent_inode, name, target)
        self.attrs.drop(parent_inode)
        return self._entry(attrs)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        self.attrs.named(new_parent_inode, new_name)
        attrs = await self._call("link", ctx, inode, new_parent_inode, new_name)
        self.attrs.drop(new_parent_inode)
        return self._entry(attrs)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.attrs.drop_all()
        kept = await self._call("remove", ctx, parent_inode, name, await self._keep(ctx, parent_inode, name))
        if kept is not None:
            self.kept.add(kept)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.attrs.drop_all()
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
        self.attrs.drop_all()
        keep = await self._keep(ctx, parent_inode_new, name_new)
        kept = await self._call("rename", ctx, parent_inode_old, name_old, parent_inode_new, name_new, keep)
        if kept is not None:
            self.kept.add(kept)

    # -- file contents ----------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        creds, mask = self._creds(ctx), _access_mask(flags)
        prefetch = None
        if mask == 4 and not flags & os.O_TRUNC:
            # The revalidation and the first read in one round (most opens for reading read):
            # what this mount had not yet sent is overlaid at the read, as a read's reply is.
            before, changes = self.cache.pending(inode), self._current(self.changes, inode)
            attrs, data, eof = await self._call("open_read", creds, inode, PREFETCH_BYTES)
            prefetch = Prefetch(data, eof, before, changes)
        else:
            attrs = await self._call("access", creds, inode, mask)
        if flags & os.O_TRUNC:
            # libfuse 3 passes O_TRUNC on to open (atomic_o_trunc) instead of a setattr first.
            self._stamp(self.changes, inode)
            await self._flush_before(inode)
            self._stamp(self.sent, inode)
            attrs = await self._call("setattr", creds, inode, [None, None, None, 0, None, None])
        self._note(attrs)
        changed = self.attrs.stale(attrs)
        if changed:
            # Changed since the kernel last heard (through another mount): it must ask again
            # before it trusts its size, or it would read what was written only up to the old.
            with contextlib.suppress(OSError):  # raised when the kernel holds nothing of it
                pyfuse3.invalidate_inode(inode, attr_only=True)
        # Close-to-open consistency: the kernel's cached pages are kept only while the file's
        # size and mtime are what the kernel last heard.
        fh = self._handle(inode, creds, mask != 4)
        self.handles[fh].prefetch = prefetch
        return pyfuse3.FileInfo(fh=fh, keep_cache=not changed)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles[fh]
        if h.empty is not None:
            sent, until = h.empty
            if sent == self.sent.get(h.inode, 0) and time.monotonic() < until:
                # Made by this handle's create and nothing of it sent since: its bytes are this
                # mount's unsent writes (assemblers read back pages of the object they write).
                return self._own_writes(h.inode, (), off, size, b"", True)
            h.empty = None
        prefetch, h.prefetch = h.prefetch, None  # the first read only: later ones ask
        if prefetch is not None and prefetch.changes == self.changes.get(h.inode, 0):
            data, eof = prefetch.data, prefetch.eof
            if off + size <= len(data) or eof:
                data, eof = data[off:off + size], eof and off + size >= len(data)
                return self._own_writes(h.inode, prefetch.unsent, off, size, data, eof)
        before = self.cache.pending(h.inode)
        data, eof = await self._call("read", h.creds, h.inode, off, size)
        return self._own_writes(h.inode, before, off, size, data, eof)

    def _own_writes(self, inode: int, before: tuple, off: int, size: int, data: bytes, eof: bool) -> bytes:
        """``data`` as read from the replicas at ``off``, with what this mount wrote and had not
        sent (``before``: what was unsent when the read was asked) laid over it."""
        pending = (*before, *self.cache.pending(inode))
        if pending:  # read your own writes
            data = overlay(pending, off, size, data, off + len(data) if eof else off + size)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        self._stamp(self.changes, h.inode)
        self._report(h)  # before the data is taken: a write that fails writes nothing
        try:
            taken = await self.cache.write(h.inode, h.creds, off, bytes(buf))
        except FlushError as exc:
            raise pyfuse3.FUSEError(exc.code) from None
        self._report(h)  # a flush this write made, of this file, failed: its bytes are lost too
        return taken

    async def flush(self, fh: int) -> None:
        # Every close(2) of a descriptor open for writing, as NFS clients do: its errors are close's.
        h = self.handles[fh]
        if h.writable:
            await self._flush(h)

    async def release(self, fh: int) -> None:
        h = self.handles.get(fh)
        if h is not None and h.writable:
            try:
                await self._flush(h)  # written through mmap after the last close(2)
            except pyfuse3.FUSEError as exc:
                log.warning("writing inode %d at its last close: %s", h.inode, os.strerror(exc.errno))
        await self._close(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._flush(self.handles[fh])  # returns once the replicas agreed on it

def _access_mask(flags: int) -> int:
    """An open's access mode as R_OK | W_OK."""
    mask = ACCESS_MASKS.get(flags & os.O_ACCMODE)
    if mask is None:
        raise pyfuse3.FUSEError(errno.EINVAL)
    return mask


def _result(name: str, result: bytes) -> tuple[int, object]:
    """``(errno, value)``, as BFS answers. Anything else (a cluster running another service)
    becomes EIO here: an exception other than FUSEError out of a handler would end the mount."""
    answer = decode_result(result)
    if answer is None:
        log.error("%s: the cluster's reply is not a BFS result (does it run the bfs service?)", name)
        raise pyfuse3.FUSEError(errno.EIO)
    return answer


# What an open for reading fetches with its revalidation: one block, a whole source file.
PREFETCH_BYTES = BLOCK

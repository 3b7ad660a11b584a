"""The mount's directory listing and extended attributes: handlers of ``BfsOperations`` that
need only its ``_call``, ``_handle``, ``_entry`` and caches, kept apart to keep bfs/mount.py small."""

from __future__ import annotations

import bisect
import errno
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyfuse3

from bfs.attrcache import AttrCache


class Prefetch(NamedTuple):
    """An open for reading's first bytes, for the first read (``BfsOperations.read``)."""

    data: bytes
    eof: bool
    unsent: tuple  # this mount's writes of the file not yet sent when they were asked for
    changes: int  # the file's change stamp then (``BfsOperations.changes``)


@dataclass(slots=True)
class Handle:
    inode: int
    creds: list  # the opener's: FUSE does not say who reads or writes through a handle
    writable: bool
    # A directory's readdir page not yet taken by the kernel, which takes a few dozen entries per
    # call and asks again from the last one it took: [name, attrs, cookie] in cookie order.
    page: list = field(default_factory=list)
    page_eof: bool = False
    attrs: list | None = None  # a directory's, from opendir: readdir's "." without a getattr
    heard: int = 0  # the number of the last write-back failure of its file reported to it
    prefetch: Prefetch | None = None
    # Made by a create of a new file: (BfsOperations.sent of it then, monotonic time), till when
    # others' writes to it may go unseen through this handle (its attribute timeout).
    empty: tuple[int, float] | None = None


class DirsAndXattrs:
    """Mixed into ``BfsOperations``, which provides what is declared here."""

    attrs: AttrCache
    handles: dict[int, Handle]
    _call: Callable[..., Awaitable[Any]]
    _handle: Callable[..., int]
    _entry: Callable[..., pyfuse3.EntryAttributes]
    _close: Callable[[int], Awaitable[None]]

    # -- extended attributes (pyfuse3 does XATTR_CREATE and XATTR_REPLACE with getxattr) ----

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        now = time.monotonic()
        if self.attrs.xattr_absent(inode, name, now):
            raise pyfuse3.FUSEError(errno.ENODATA)
        try:
            return await self._call("getxattr", ctx, inode, name)
        except pyfuse3.FUSEError as exc:
            if exc.errno == errno.ENODATA:
                self.attrs.note_no_xattr(inode, name, now)
            raise

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self._call("listxattr", ctx, inode)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.attrs.drop_xattrs(inode)
        self.attrs.drop(inode)
        await self._call("setxattr", ctx, inode, name, bytes(value))

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.attrs.drop_xattrs(inode)
        self.attrs.drop(inode)
        await self._call("removexattr", ctx, inode, name)

    # -- directories ------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        creds = self._creds(ctx)
        attrs = await self._call("access", creds, inode, 4)
        fh = self._handle(inode, creds)
        self.handles[fh].attrs = attrs
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets 1 and 2 follow "." and ".."; an entry with BFS cookie c ends at offset c + 2.
        h = self.handles[fh]
        inode, creds = h.inode, h.creds
        if start_id < 2:
            # The kernel takes only the type from these (opendir's attributes will do).
            attrs = h.attrs or await self._call("getattr", creds, inode)
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
        asked = time.monotonic()
        h.page, h.page_eof = await self._call("readdir", h.creds, h.inode, cookie, 512)
        # All of it: no create, remove or rename here changed the directory meanwhile, as the
        # kernel holds the directory locked against them while it reads it.
        if not cookie and h.page_eof:
            self.attrs.listed(h.inode, [name for name, _, _ in h.page], asked)
        return h.page, h.page_eof

    async def releasedir(self, fh: int) -> None:
        await self._close(fh)

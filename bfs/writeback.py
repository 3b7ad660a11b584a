"""The mount's write-back cache, as an NFSv3 client keeps one: written bytes stay here, per file,
until ``close``, ``fsync`` or the bound on cached bytes sends them, as few ordered ``writev``
operations as the request size limit allows (adjacent and overlapping writes coalesced).

``Extents`` is the pure part (byte ranges of one file); ``WriteBack`` owns every file's dirty
ranges, the bound, and the order of flushes, and leaves sending to the ``send`` it is given.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from bfs.fs import WRITEV_EXTENTS_MAX

# What one extent adds to a writev besides its bytes: msgpack's array header, offset and bin
# header are at most 1 + 9 + 5.
EXTENT_OVERHEAD_BYTES = 16
WRITE_CACHE_BYTES = 64 * 1024 * 1024  # a mount's default bound


class FlushError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(errno.errorcode.get(code, str(code)))
        self.code = code


@dataclass(slots=True)
class Extents:
    """Byte ranges of one file, sorted, neither overlapping nor touching; a later write wins."""

    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    datas: list[bytearray] = field(default_factory=list)
    nbytes: int = 0

    def add(self, offset: int, data: bytes) -> int:
        """Cache ``data`` at ``offset``; returns how many more bytes are held now."""
        if not data:
            return 0
        end = offset + len(data)
        i = bisect.bisect_left(self.ends, offset)  # the first range ending at or after offset
        j = bisect.bisect_right(self.starts, end) - 1  # the last starting at or before end
        if i > j:
            self.starts.insert(i, offset)
            self.ends.insert(i, end)
            self.datas.insert(i, bytearray(data))
            self.nbytes += len(data)
            return len(data)
        held = sum(len(self.datas[k]) for k in range(i, j + 1))
        start = min(self.starts[i], offset)
        if i == j and self.starts[i] <= offset:
            # Appending to or overwriting inside one range, the common case: no copy of it.
            buf = self.datas[i]
            rel = offset - start
            buf[rel:rel + len(data)] = data
        else:
            buf = bytearray(max(self.ends[j], end) - start)
            for k in range(i, j + 1):
                buf[self.starts[k] - start:self.ends[k] - start] = self.datas[k]
            buf[offset - start:end - start] = data
        self.starts[i:j + 1] = [start]
        self.ends[i:j + 1] = [start + len(buf)]
        self.datas[i:j + 1] = [buf]
        self.nbytes += len(buf) - held
        return len(buf) - held

    @property
    def end(self) -> int:
        return self.ends[-1] if self.ends else 0

    def overlay(self, offset: int, buf: bytearray) -> None:
        """Copy the cached bytes that fall in [offset, offset + len(buf)) over ``buf``."""
        stop = offset + len(buf)
        k = bisect.bisect_right(self.ends, offset)
        while k < len(self.starts) and self.starts[k] < stop:
            lo, hi = max(offset, self.starts[k]), min(stop, self.ends[k])
            buf[lo - offset:hi - offset] = self.datas[k][lo - self.starts[k]:hi - self.starts[k]]
            k += 1

    def groups(self, capacity: int) -> Iterator[list[tuple[int, bytes]]]:
        """The ranges as writev argument lists, each costing at most ``capacity`` bytes (data
        plus EXTENT_OVERHEAD_BYTES a piece) and holding at most WRITEV_EXTENTS_MAX ranges (the
        replicas refuse more: many small scattered writes reach that long before the bytes); a
        range is split where a list fills, so every list but the last is full and their number
        is the fewest the limits allow. One at a time: only the writev being sent is a copy."""
        if capacity <= EXTENT_OVERHEAD_BYTES:
            raise ValueError(f"a writev of {capacity} bytes holds no data")
        group: list[tuple[int, bytes]] = []
        room = capacity
        for start, data in zip(self.starts, self.datas, strict=True):
            pos = 0
            while pos < len(data):
                if room <= EXTENT_OVERHEAD_BYTES or len(group) == WRITEV_EXTENTS_MAX:
                    yield group
                    group, room = [], capacity
                take = min(len(data) - pos, room - EXTENT_OVERHEAD_BYTES)
                group.append((start + pos, bytes(data[pos:pos + take])))
                room -= take + EXTENT_OVERHEAD_BYTES
                pos += take
        if group:
            yield group


Send = Callable[[list, int, list[tuple[int, bytes]]], Awaitable[None]]  # raises FlushError


@dataclass(slots=True)
class _File:
    creds: list  # the writer's: the replicas check its permission at each writev
    dirty: Extents = field(default_factory=Extents)
    sending: list[Extents] = field(default_factory=list)  # taken by a flush, not yet answered
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class WriteBack:
    """Dirty data of every open file, at most ``bytes_max`` in all (0: every write at once).

    A failed write-back drops its data, as NFS clients do, and is reported as Linux reports one
    (an error sequence per file): to every handle open on the file when it failed, once each, at
    that handle's next write, fsync or close. The caller's handle keeps the sequence number of
    the last failure it heard of: ``sample`` at open, ``check`` after each flush."""

    def __init__(self, send: Send, bytes_max: int, writev_bytes_max: int, file_bytes_max: int) -> None:
        self.send = send
        self.bytes_max = bytes_max
        self.writev_bytes_max = writev_bytes_max
        self.file_bytes_max = file_bytes_max
        self.files: dict[int, _File] = {}
        self.nbytes = 0  # cached, across files: dirty and being sent
        self.failed = 0  # failures so far, numbering them
        self.failures: dict[int, tuple[int, int]] = {}  # inode -> (number, errno) of its latest

    def sample(self) -> int:
        """What a handle opened now has heard: it reports no failure from before its open."""
        return self.failed

    def check(self, ino: int, heard: int) -> tuple[int, int]:
        """(errno, heard now) for a handle that heard of failures up to number ``heard``:
        errno 0 when the file's write-back failed at no time since."""
        number, code = self.failures.get(ino, (0, 0))
        return (code, number) if number > heard else (0, heard)

    def forget(self, ino: int) -> None:
        """The file's last handle closed: no one is left to hear of its failures."""
        self.failures.pop(ino, None)

    async def write(self, ino: int, creds: list, offset: int, data: bytes) -> int:
        """Cache a write and return how many bytes it took: as Linux does, one straddling the
        file size limit takes what fits, and one at or past it raises FlushError(EFBIG). A
        flush this makes (a writer change, or the bound) that fails is recorded, for ``check``."""
        if data and offset >= self.file_bytes_max:
            raise FlushError(errno.EFBIG)
        data = data[:self.file_bytes_max - offset]
        f = self.files.get(ino)
        while f is not None and f.creds != creds:  # one writer's credentials per writev
            if not f.dirty.nbytes and not f.sending:
                f.creds = creds
                break
            await self.flush(ino)
            f = self.files.get(ino)
        if f is None:
            f = self.files[ino] = _File(creds)
        self.nbytes += f.dirty.add(offset, data)
        # Memory pressure: the largest files' data goes until the cache is within its bound,
        # counting what is being sent; when all of it is, the writer waits for the replicas.
        while self.nbytes > self.bytes_max and self.files:
            ino = max(self.files, key=lambda i: (self.files[i].dirty.nbytes, bool(self.files[i].sending)))
            await self.flush(ino)
        return len(data)

    async def flush(self, ino: int) -> None:
        """Send the file's dirty data and return once the replicas committed it, or failed:
        then the data is dropped and the failure recorded."""
        f = self.files.get(ino)
        if f is None:
            return
        try:
            async with f.lock:  # one file's flushes go in order: a later write wins at the replicas
                taken, f.dirty = f.dirty, Extents()
                f.sending.append(taken)
                try:
                    for group in taken.groups(self.writev_bytes_max):
                        await self.send(f.creds, ino, group)
                finally:
                    f.sending.remove(taken)
                    self.nbytes -= taken.nbytes
        except FlushError as exc:
            self.failed += 1
            self.failures[ino] = (self.failed, exc.code)
        finally:
            # Forgotten once clean; a flush still waiting for the lock then finds nothing to send.
            if not (f.dirty.nbytes or f.sending or f.lock.locked()) and self.files.get(ino) is f:
                del self.files[ino]

    def size(self, ino: int, size: int) -> int:
        """The file's size with its cached data, from the replicas' ``size``."""
        return max((size, *(e.end for e in self.pending(ino))))

    def pending(self, ino: int) -> tuple[Extents, ...]:
        """The file's cached data, oldest first: a read takes it before it asks the replicas
        and again after, as a flush may commit and drop some in between."""
        f = self.files.get(ino)
        return () if f is None else (*f.sending, f.dirty)


def overlay(pending: tuple[Extents, ...], offset: int, count: int, data: bytes, size: int) -> bytes:
    """What a read of ``count`` bytes at ``offset`` sees: the replicas' ``data`` (of a file of
    ``size`` bytes there) with this mount's ``pending`` writes over it, later ones winning."""
    length = max(0, min(offset + count, max((size, *(e.end for e in pending)))) - offset)
    buf = bytearray(data[:length])
    buf += bytes(length - len(buf))
    for extents in pending:
        extents.overlay(offset, buf)
    return bytes(buf)

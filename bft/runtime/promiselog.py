"""A replica's promise log: what it said that constrains what it may say later, and the batches it
committed, written before the messages they cover leave (``bft.core.promises`` says which records
and why; to this module they are opaque bytes, each with the sequence number it concerns).

Records are buffered by ``append`` and written by ``commit``, once per event-loop iteration: one
``os.write`` on a file opened with O_APPEND, then one ``os.fsync`` if asked (durability "strict").
That is the group commit: one fsync covers every promise the iteration made.

File format (``promises.log``; integers big-endian)::

    header  magic b"bft-plog" | version u32 | salt u64 | crc32 of the previous 20 bytes u32
    record  length u32 | seq u64 | head crc u32 | crc u32 | payload (length bytes)

``seq`` is the record's sequence number, 2**64 - 1 standing for None (view records). It is stored
so that truncation after a restart needs nothing from the caller: ``load`` returns the payloads,
and the log already knows which of them a later ``truncate`` keeps. The head crc covers length
and seq, so a length is trusted only once it checks; the crc covers length, seq and payload. Both
are crc32, seeded with the two halves of the file's salt (random, new with every rewrite).

Why crc32 and not blake2b: the threat is a torn write or a damaged sector, not an adversary with
access to the disk (who could rewrite the file anyway). Two independent 32-bit checks pass on
garbage with probability about 2**-64; crc32 detects every burst of up to 32 bits; it costs a
quarter of blake2b (0.28 against 1.4 ms per MiB here, which matters for a 16 MiB batch record
hashed on the event loop). The salt makes records that are not this file's own fail their checks:
a record embedded in some payload, or blocks of an earlier log file, never look intact.

Reading back (``load``): a crash in the middle of a write leaves a torn tail, normal after a
kill or a power cut; the file is truncated there, with a warning. Damage is anything else, and
``LogDamaged`` is raised: a bad header, a head that checks but gives a length above the limit, or
a bad record with an intact record after it. Precisely, a bad record at offset X is a torn tail
when no intact record starts after it:

- fewer bytes left than a record head, or a head that checks and a payload that runs past the
  end of the file: torn (the length is trusted, nothing after X can be a record);
- a head that checks and a crc that does not: torn if the next record position is the end of
  the file, or if no intact record starts there or later (zeros, as some file systems leave
  when they extended the file before its data reached the disk), else damaged;
- a head that does not check: its length cannot be trusted, so every later offset is tried;
  damaged if an intact record starts at one of them, else torn.

This scan runs only after a bad record. It costs about 0.3 s per MiB scanned here; a tail of
zeros is recognised at once, and after a kill a torn tail is at most the last group commit. Its
one blind spot: sectors of the last write reaching the disk out of order, so that a record is lost
while a later one of the same write is intact, reads as damage (the replica then refuses to start
rather than forget a promise).

Truncation (``truncate``): after a stable checkpoint at ``stable`` is durably on disk, nothing at
or below it is needed, and of the view records only the latest. The log keeps every record since
the last rewrite in memory (the same bytes as the file; it is a window of about L sequence
numbers), and rewrites the file with write-to-temporary, fsync, rename, fsync-directory (always,
whatever ``fsync`` says: a crash must leave the old file or the new one, never an empty one). The
temporary file's descriptor, opened with O_APPEND, becomes the log's, so appends continue in the
new file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
import zlib
from collections import Counter
from pathlib import Path

from bft.runtime.storage import StorageError, _fsync_dir

log = logging.getLogger("bft.promiselog")

FORMAT = 1
MAGIC = b"bft-plog"
RECORD_BYTES_MAX = 64 * 1024 * 1024  # above a PRE-PREPARE's frame_bytes_max, with room to spare
SEQ_NONE = 2**64 - 1

_HEADER = struct.Struct(">8sIQI")  # magic, version, salt, crc32 of the first three
_HEAD = struct.Struct(">IQII")  # length, seq, head crc, crc
_LENGTH_SEQ = struct.Struct(">IQ")
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC


class LogDamaged(StorageError):
    """The promise log holds something a crash cannot explain; one line naming the file."""


def _encode_header(salt: int) -> bytes:
    start = _HEADER.pack(MAGIC, FORMAT, salt, 0)[:-4]
    return start + zlib.crc32(start).to_bytes(4, "big")


def _encode(salt: int, seq: int | None, record: bytes) -> tuple[bytes, bytes]:
    length_seq = _LENGTH_SEQ.pack(len(record), SEQ_NONE if seq is None else seq)
    head_crc = zlib.crc32(length_seq, salt >> 32)
    crc = zlib.crc32(record, zlib.crc32(length_seq, salt & 0xFFFF_FFFF))
    return length_seq + struct.pack(">II", head_crc, crc), record


def _write_all(fd: int, data: bytes) -> int:
    """Write ``data`` and return the number of os.write calls: one, unless the kernel wrote short
    (a signal, a full disk), and then the rest follows at once; we are the file's only writer."""
    view = memoryview(data)
    writes = 0
    while view:
        view = view[os.write(fd, view) :]
        writes += 1
    return writes


class _Reader:
    """Checks records of one file's contents; knows nothing of truncation or of what to raise."""

    def __init__(self, data: bytes, salt: int) -> None:
        self.data = data
        self.salt_head, self.salt_body = salt >> 32, salt & 0xFFFF_FFFF

    def head(self, offset: int) -> tuple[int, int] | None:
        """(length, seq) of the record head at ``offset`` if its crc checks, else None."""
        length, seq, head_crc, _ = _HEAD.unpack_from(self.data, offset)
        if zlib.crc32(self.data[offset : offset + _LENGTH_SEQ.size], self.salt_head) != head_crc:
            return None
        return length, seq

    def body_ok(self, offset: int, length: int) -> bool:
        data = self.data
        crc = _HEAD.unpack_from(data, offset)[3]
        body = zlib.crc32(data[offset : offset + _LENGTH_SEQ.size], self.salt_body)
        return zlib.crc32(data[offset + _HEAD.size : offset + _HEAD.size + length], body) == crc

    def intact(self, offset: int) -> bool:
        """Whether a whole, checking record starts at ``offset``."""
        size = len(self.data)
        if offset + _HEAD.size > size:
            return False
        length = _LENGTH_SEQ.unpack_from(self.data, offset)[0]
        if length > RECORD_BYTES_MAX or offset + _HEAD.size + length > size:
            return False
        return self.head(offset) is not None and self.body_ok(offset, length)

    def next_intact(self, start: int) -> int | None:
        """The first offset at or after ``start`` where an intact record starts, if any."""
        if self.data.count(0, start) == len(self.data) - start:
            return None  # nothing but zeros: the common torn tail after a power cut
        for offset in range(start, len(self.data) - _HEAD.size + 1):
            if self.intact(offset):
                return offset
        return None


class PromiseLog:
    FILE = "promises.log"

    def __init__(self, directory: Path, fsync: bool) -> None:
        self.directory = directory
        self.path = directory / self.FILE
        self.fsync = fsync
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data directory {directory}: {exc.strerror}") from None
        self.stats: Counter[str] = Counter()
        self._fd: int | None = None  # open from load() until close() or a failed commit
        self._salt = 0
        self._size = 0  # bytes in the file after the last commit that succeeded
        self._entries: list[tuple[int | None, bytes]] = []  # every record in the file, in order
        self._pending: list[tuple[int | None, bytes]] = []
        self._pending_parts: list[bytes] = []
        self._loaded = False

    # -- reading back -----------------------------------------------------------------------

    def load(self) -> list[bytes]:
        """Every intact record in order; must come first, once, before any append."""
        assert not self._loaded, "load() is called once"
        self._loaded = True
        self.path.with_name(self.FILE + ".tmp").unlink(missing_ok=True)  # an interrupted rewrite
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            self._fd = self._rewrite([])
            return []
        self._salt = self._check_header(data)
        reader = _Reader(data, self._salt)
        entries: list[tuple[int | None, bytes]] = []
        offset, size = _HEADER.size, len(data)
        torn = ""
        while offset < size:
            if offset + _HEAD.size > size:
                torn = "short record head"
                break
            head = reader.head(offset)
            if head is None:
                after = reader.next_intact(offset + 1)
                if after is not None:
                    raise self._damaged(offset, f"record head checksum mismatch; an intact record follows at {after}")
                torn = "unreadable record head"
                break
            length, seq = head
            if length > RECORD_BYTES_MAX:
                raise self._damaged(offset, f"record length {length} above the limit {RECORD_BYTES_MAX}")
            end = offset + _HEAD.size + length
            if end > size:
                torn = f"record of {length} bytes cut short"
                break
            if not reader.body_ok(offset, length):
                after = reader.next_intact(end)
                if after is not None:
                    raise self._damaged(offset, f"record checksum mismatch; an intact record follows at {after}")
                torn = "record checksum mismatch at the end of the file"
                break
            entries.append((None if seq == SEQ_NONE else seq, data[offset + _HEAD.size : end]))
            offset = end
        fd = os.open(self.path, _OPEN_FLAGS)
        if torn:
            try:
                os.ftruncate(fd, offset)
                os.fsync(fd)  # before anything is appended after the cut
            except OSError:
                os.close(fd)
                raise
            log.warning(
                "%s: torn tail at offset %d (%s, %d bytes): truncated, %d records kept",
                self.path,
                offset,
                torn,
                size - offset,
                len(entries),
            )
            self.stats["torn_tails"] += 1
            self.stats["torn_bytes"] += size - offset
        self._fd, self._size, self._entries = fd, offset, entries
        return [record for _, record in entries]

    def _check_header(self, data: bytes) -> int:
        if len(data) < _HEADER.size:
            # The file is created whole (write, fsync, rename), so a short header is not a crash.
            raise self._damaged(0, f"file of {len(data)} bytes, shorter than its {_HEADER.size}-byte header")
        magic, version, salt, crc = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise self._damaged(0, f"not a promise log (magic {magic!r}, expected {MAGIC!r})")
        if zlib.crc32(data[: _HEADER.size - 4]) != crc:
            raise self._damaged(0, "header checksum mismatch")
        if version != FORMAT:
            raise self._damaged(0, f"format version {version}, expected {FORMAT}")
        return salt

    def _damaged(self, offset: int, what: str) -> LogDamaged:
        return LogDamaged(f"{self.path}: damaged at offset {offset}: {what}")

    # -- writing ----------------------------------------------------------------------------

    def append(self, record: bytes, seq: int | None) -> None:
        """Buffer one record; nothing is written until ``commit``."""
        assert self._fd is not None, "append() after load() and before close()"
        assert isinstance(record, bytes), type(record)
        assert len(record) <= RECORD_BYTES_MAX, len(record)
        assert seq is None or 0 <= seq < SEQ_NONE, seq
        self._pending.append((seq, record))
        self._pending_parts.extend(_encode(self._salt, seq, record))

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def commit(self) -> None:
        """Write every appended record in one os.write, then fsync if asked: on return they are
        on disk (fsync=True) or in the kernel (fsync=False, surviving a kill but not a power cut).

        An OSError (a full disk, EIO) propagates and leaves the log closed: after a failed fsync
        the kernel may have dropped the dirty pages, and a second fsync may report success, so
        the only safe continuation is a restart that reads the file back."""
        assert self._fd is not None, "commit() after load() and before close()"
        if not self._pending:
            return
        data = b"".join(self._pending_parts)
        try:
            self.stats["writes"] += _write_all(self._fd, data)
            if self.fsync:
                started = time.perf_counter()
                os.fsync(self._fd)
                self.stats["fsyncs"] += 1
                self.stats["fsync_seconds"] += time.perf_counter() - started
        except OSError:
            self._fail()
            raise
        self._size += len(data)
        self._entries.extend(self._pending)
        self.stats["commits"] += 1
        self.stats["records"] += len(self._pending)
        self.stats["bytes"] += len(data)
        self._pending.clear()
        self._pending_parts.clear()

    def _fail(self) -> None:
        fd, self._fd = self._fd, None
        assert fd is not None
        self._pending.clear()
        self._pending_parts.clear()
        with contextlib.suppress(OSError):  # best effort: no half record for the restart to judge
            os.ftruncate(fd, self._size)
        os.close(fd)

    # -- truncation -------------------------------------------------------------------------

    def truncate(self, stable: int) -> None:
        """Keep only the records with seq > ``stable`` and the last record whose seq is None.
        Call it once the checkpoint at ``stable`` is durably on disk, with nothing pending."""
        assert self._fd is not None, "truncate() after load() and before close()"
        assert not self._pending, "truncate() with records appended but not committed"
        last_view = max((i for i, (seq, _) in enumerate(self._entries) if seq is None), default=-1)
        kept = [e for i, e in enumerate(self._entries) if i == last_view or (e[0] is not None and e[0] > stable)]
        if len(kept) == len(self._entries):
            return
        fd = self._rewrite(kept)
        os.close(self._fd)
        self._fd = fd
        self.stats["truncates"] += 1
        self.stats["truncated_records"] += len(self._entries) - len(kept)
        self._entries = kept

    def _rewrite(self, entries: list[tuple[int | None, bytes]]) -> int:
        """Replace the file by one holding ``entries`` under a new salt; its descriptor, for
        appending. A crash leaves the old file or the new one (and maybe a stale temporary)."""
        salt = int.from_bytes(os.urandom(8), "big")
        parts = [_encode_header(salt)]
        for seq, record in entries:
            parts.extend(_encode(salt, seq, record))
        data = b"".join(parts)
        tmp = self.path.with_name(self.FILE + ".tmp")
        fd = os.open(tmp, _OPEN_FLAGS | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._salt, self._size = salt, len(data)
        return fd

    # -- the rest ---------------------------------------------------------------------------

    @property
    def file_bytes(self) -> int:
        return self._size

    def close(self) -> None:
        """Close the file; records appended and not committed are dropped (nothing they cover
        has left)."""
        self._pending.clear()
        self._pending_parts.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

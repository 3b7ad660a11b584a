"""A replica's data directory: its last stable checkpoint, written off the event loop.

Partitions are stored by content (``parts/<digest>``), so a new checkpoint writes only the
partitions that changed since the previous one. The manifest (``checkpoint.msgpack``: sequence
number, root digest, partition digests, certificate) is replaced with write-to-temporary, fsync,
rename, fsync-directory, after its partitions are on disk; a crash therefore leaves the previous
checkpoint or the new one, never a torn one. Partitions no manifest names are removed afterwards.
After a damaged checkpoint was set aside, the next write also reads back the partition files it
would keep and replaces those that differ: a file with the right name and the wrong bytes would
otherwise outlive every later checkpoint, and be found damaged at every restart.
Only the newest checkpoint matters: if one is being written when others arrive, the latest waits
and those in between are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import msgpack

from bft.core.effects import Persist
from bft.core.state import Snapshot

log = logging.getLogger("bft.storage")

FORMAT = 2


class StorageError(Exception):
    pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


class CheckpointStore:
    MANIFEST = "checkpoint.msgpack"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / self.MANIFEST
        self.parts_dir = directory / "parts"
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data directory {directory}: {exc.strerror}") from None
        self._writing: asyncio.Task | None = None
        self._next: Persist | None = None
        self.saved_seq = 0
        # False once a checkpoint read back was damaged: a partition file may then hold other
        # bytes than its name says, and the next write replaces every one that differs.
        self._parts_trusted = True

    def load(self) -> Persist | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            version, seq, root, digests, proof = msgpack.unpackb(data, max_map_len=0, max_ext_len=0)
            if version != FORMAT:
                raise ValueError(f"format {version}, expected {FORMAT}")
            digests = tuple(bytes(d) for d in digests)
            proof = tuple((int(r), bytes(d)) for r, d in proof)
            parts = tuple((self.parts_dir / d.hex()).read_bytes() for d in digests)
        except FileNotFoundError as exc:
            raise StorageError(f"{self.path}: partition file {exc.filename} is missing") from None
        except (OSError, ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise StorageError(f"{self.path} is not a readable checkpoint: {exc}") from None
        self.saved_seq = seq
        return Persist(seq, Snapshot(bytes(root), parts, digests), proof)

    def distrust(self) -> None:
        """The checkpoint on disk was damaged and set aside: it is not persisted, and the
        partition files it left are checked against the next checkpoint before being kept."""
        self.saved_seq = 0
        self._parts_trusted = False

    def save(self, checkpoint: Persist) -> None:
        self._next = checkpoint
        if self._writing is None or self._writing.done():
            self._writing = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._next is not None:
            checkpoint, self._next = self._next, None
            try:
                await loop.run_in_executor(None, self._write, checkpoint)
            except OSError as exc:
                log.error("could not persist checkpoint %d in %s: %s", checkpoint.seq, self.directory, exc)
                continue
            self.saved_seq = checkpoint.seq
            self._parts_trusted = True

    def _write(self, checkpoint: Persist) -> None:
        snap = checkpoint.snapshot
        names = set()
        for d, part in zip(snap.digests, snap.parts, strict=True):
            name = d.hex()
            names.add(name)
            path = self.parts_dir / name
            if not path.exists() or not (self._parts_trusted or _holds(path, part)):
                _write_atomically(path, part)
        _fsync_dir(self.parts_dir)
        manifest = (FORMAT, checkpoint.seq, snap.root, list(snap.digests), list(checkpoint.proof))
        _write_atomically(self.path, msgpack.packb(manifest))
        _fsync_dir(self.directory)
        for entry in os.scandir(self.parts_dir):
            if entry.name not in names:
                os.unlink(entry.path)

    async def flush(self) -> None:
        if self._writing is not None:
            await self._writing

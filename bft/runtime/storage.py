"""A replica's data directory: its last stable checkpoint, written off the event loop.

The partitions a checkpoint adds are appended to one pack file (``packs/<n>``), fsynced once;
then the manifest (``checkpoint.msgpack``: sequence number, root digest, partition digests,
certificate, and where each partition lies: pack, offset, length) is replaced with
write-to-temporary, fsync, rename, fsync-directory. A crash therefore leaves the previous
checkpoint or the new one, never a torn one. Packs the manifest does not name are removed
afterwards. One new file per checkpoint rather than one per changed partition: creating and
deleting a file per partition cost a BFS replica about a third of its CPU in ext4's inode
allocation, and an fsync each (perf, the Andrew benchmark's copy phase).
A pack stays while any partition in it is live. When the packs hold more than twice the live
bytes (plus ``COMPACT_SLACK``), the next checkpoint writes every partition into its pack, so the
directory stays within about twice the state plus one checkpoint's changes. After a damaged
checkpoint was set aside, the next one is written whole too: a pack with the right name and
the wrong bytes would otherwise outlive every later checkpoint.
Only the newest checkpoint matters: if one is being written when others arrive, the latest waits
and those in between are skipped. Format 2 (a file per partition under ``parts/``) is still
read; the next checkpoint is written whole in format 3 and ``parts/`` removed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

import msgpack

from bft.core.effects import Persist
from bft.core.state import Snapshot

log = logging.getLogger("bft.storage")

FORMAT = 3
LEGACY_FORMAT = 2
COMPACT_SLACK = 1 << 20

Where = tuple[int, int, int]  # pack, offset, length


class StorageError(Exception):
    pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, chunks: list[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.writelines(chunks)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class CheckpointStore:
    MANIFEST = "checkpoint.msgpack"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / self.MANIFEST
        self.packs_dir = directory / "packs"
        self.legacy_dir = directory / "parts"
        try:
            self.packs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data directory {directory}: {exc.strerror}") from None
        self._writing: asyncio.Task | None = None
        self._next: Persist | None = None
        self.saved_seq = 0
        # What the manifest on disk names (touched by load, then by the writer thread alone).
        self._where: dict[bytes, Where] = {}
        self._pack_bytes: dict[int, int] = {}
        # False once a checkpoint read back was damaged, or read in the old format: the next
        # checkpoint is written whole.
        self._parts_trusted = True
        self._legacy = self.legacy_dir.exists()  # format 2's parts/: goes at the next checkpoint
        # Pack numbers only grow: a new pack never takes the name of one a manifest may name.
        names = [e.name for e in os.scandir(self.packs_dir)]
        self._last_pack = max((int(n) for n in names if n.isdigit()), default=0)

    def load(self) -> Persist | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            version, seq, root, digests, proof, *rest = msgpack.unpackb(data, max_map_len=0, max_ext_len=0)
            digests = tuple(bytes(d) for d in digests)
            proof = tuple((int(r), bytes(d)) for r, d in proof)
            if version == FORMAT and len(rest) == 1 and len(rest[0]) == len(digests):
                parts = self._read_packs(digests, [(int(p), int(o), int(n)) for p, o, n in rest[0]])
            elif version == LEGACY_FORMAT and not rest:
                parts = tuple((self.legacy_dir / d.hex()).read_bytes() for d in digests)
                self._parts_trusted = False
            else:
                raise ValueError(f"format {version} with {len(rest)} more fields, expected {FORMAT}")
        except FileNotFoundError as exc:
            raise StorageError(f"{self.path}: file {exc.filename} is missing") from None
        except (OSError, ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise StorageError(f"{self.path} is not a readable checkpoint: {exc}") from None
        self.saved_seq = seq
        return Persist(seq, Snapshot(bytes(root), parts, digests), proof)

    def _read_packs(self, digests: tuple[bytes, ...], where: list[Where]) -> tuple[bytes, ...]:
        packs = {p: (self.packs_dir / str(p)).read_bytes() for p in {p for p, _, _ in where}}
        parts = []
        for p, offset, length in where:
            part = packs[p][offset : offset + length]
            if offset < 0 or len(part) != length:
                raise ValueError(f"pack {self.packs_dir / str(p)} is shorter than the manifest says")
            parts.append(part)
        self._where = dict(zip(digests, where, strict=True))
        self._pack_bytes = {p: len(data) for p, data in packs.items()}
        return tuple(parts)

    def distrust(self) -> None:
        """The checkpoint on disk was damaged and set aside: it is not persisted, and the next
        checkpoint is written whole, none of the packs it left trusted."""
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

    def _write(self, checkpoint: Persist) -> None:
        snap = checkpoint.snapshot
        live = sum(map(len, snap.parts))
        whole = not self._parts_trusted or sum(self._pack_bytes.values()) > 2 * live + COMPACT_SLACK
        old = {} if whole else self._where
        where = {d: old[d] for d in snap.digests if d in old}
        pack, chunks, offset = self._last_pack + 1, [], 0
        for d, part in zip(snap.digests, snap.parts, strict=True):
            if d not in where:
                where[d] = (pack, offset, len(part))
                chunks.append(part)
                offset += len(part)
        if chunks:
            _write_atomically(self.packs_dir / str(pack), chunks)
            self._last_pack = pack
            _fsync_dir(self.packs_dir)
        manifest = (FORMAT, checkpoint.seq, snap.root, list(snap.digests), list(checkpoint.proof),
                    [where[d] for d in snap.digests])
        _write_atomically(self.path, [msgpack.packb(manifest)])
        _fsync_dir(self.directory)
        known = {**self._pack_bytes, pack: offset}
        sizes = {p: known[p] for p in {p for p, _, _ in where.values()}}
        self._where, self._pack_bytes, self._parts_trusted = where, sizes, True
        for entry in os.scandir(self.packs_dir):
            if not entry.name.isdigit() or int(entry.name) not in sizes:
                os.unlink(entry.path)
        if self._legacy:
            shutil.rmtree(self.legacy_dir, ignore_errors=True)
            self._legacy = False

    async def flush(self) -> None:
        if self._writing is not None:
            await self._writing

"""A replica's data directory: its last stable checkpoint, written atomically off the event loop.

The file is replaced with write-to-temporary, fsync, rename, fsync-directory, so a crash leaves
either the previous checkpoint or the new one, never a torn file. Only the newest checkpoint
matters: if one is being written when another arrives, the later one waits and the one in
between is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from bft.core.replica import Persist

log = logging.getLogger("bft.storage")


class StorageError(Exception):
    pass


class CheckpointStore:
    FILE = "checkpoint.msgpack"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / self.FILE
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data directory {directory}: {exc.strerror}") from None
        self._writing: asyncio.Task | None = None
        self._next: Persist | None = None
        self.saved_seq = 0

    def load(self) -> Persist | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            saved = Persist.decode(data)
        except ValueError as exc:
            raise StorageError(f"{self.path}: {exc}") from None
        self.saved_seq = saved.seq
        return saved

    def save(self, checkpoint: Persist) -> None:
        self._next = checkpoint
        if self._writing is None or self._writing.done():
            self._writing = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._next is not None:
            checkpoint, self._next = self._next, None
            try:
                await loop.run_in_executor(None, self._write, checkpoint.encode())
            except OSError as exc:
                log.error("could not persist checkpoint %d to %s: %s", checkpoint.seq, self.path, exc)
                continue
            self.saved_seq = checkpoint.seq

    def _write(self, data: bytes) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def flush(self) -> None:
        if self._writing is not None:
            await self._writing

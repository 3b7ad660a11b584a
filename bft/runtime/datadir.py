"""A replica's data directory: its last stable checkpoint (``storage``) and, unless durability
is "memory", its promise log (``promiselog``), read back together when the replica starts.

Damage is reported with its path and never served: a damaged checkpoint is set aside and the
replica starts from its promise log alone (it keeps its promises, and fetches the state by state
transfer); a damaged promise log is set aside too, and the replica starts as one that forgot what
it said (as in "memory" mode it counts among the f faulty ones until it has caught up).
"""

from __future__ import annotations

import logging
from pathlib import Path

from bft.core.effects import Persist
from bft.core.promises import Record, RecordDamaged, decode_record, encode_record
from bft.messages import Limits
from bft.runtime.promiselog import LogDamaged, PromiseLog
from bft.runtime.storage import CheckpointStore, StorageError

log = logging.getLogger("bft.storage")


def _set_aside(path: Path) -> Path:
    aside = path.with_name(path.name + ".damaged")
    if path.exists():
        path.replace(aside)
    return aside


class DataDir:
    def __init__(self, directory: Path, durability: str, limits: Limits) -> None:
        self.directory = directory
        self.limits = limits
        self.checkpoints = CheckpointStore(directory)
        self.promises = None if durability == "memory" else PromiseLog(directory, fsync=durability == "strict")
        self.truncated_to = 0
        self.problems: list[str] = []  # what was found damaged at start, for /status
        self.resumed: dict[str, int] = {}  # where the replica stood once it read all this back

    def load(self) -> tuple[Persist | None, list[Record]]:
        try:
            saved = self.checkpoints.load()
        except StorageError as exc:
            self.damaged(str(exc), self.checkpoints.path)
            saved = None
        records: list[Record] = []
        if self.promises is not None:
            try:
                records = [decode_record(data, self.limits) for data in self.promises.load()]
            except (LogDamaged, RecordDamaged) as exc:
                # A LogDamaged names the file already; a RecordDamaged does not.
                problem = str(exc) if isinstance(exc, LogDamaged) else f"{self.promises.path}: {exc}"
                self.damaged(problem, self.promises.path)
                self.promises = PromiseLog(self.directory, self.promises.fsync)
                self.promises.load()
                records = []
        return saved, records

    def damaged(self, problem: str, path: Path) -> None:
        aside = _set_aside(path)
        if path == self.checkpoints.path:
            self.checkpoints.distrust()
        self.problems.append(problem)
        log.error("%s; set aside as %s, recovering from the other replicas", problem, aside)

    def append(self, record: Record) -> None:
        assert self.promises is not None
        self.promises.append(encode_record(record), record.seq)

    @property
    def pending(self) -> bool:
        return self.promises is not None and self.promises.pending

    def commit(self) -> None:
        """The group commit; then, once a newer checkpoint is on disk, the log's older part goes."""
        assert self.promises is not None
        self.promises.commit()
        saved = self.checkpoints.saved_seq
        if saved > self.truncated_to:
            self.promises.truncate(saved)
            self.truncated_to = saved

    def save(self, checkpoint: Persist) -> None:
        self.checkpoints.save(checkpoint)

    async def close(self) -> None:
        await self.checkpoints.flush()
        if self.promises is not None:
            if self.promises.pending:
                self.promises.commit()
            self.promises.close()

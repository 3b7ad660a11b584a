"""A simulated replica's data directory: its last stable checkpoint and its promise log.

As in the runtime (``bft.runtime.datadir``), the promise log is written before the messages it
covers leave, so here it is appended at once; the checkpoint file is written by a background
writer, one write at a time, the latest checkpoint waiting its turn replacing any older one
waiting, and the log is truncated only once a checkpoint is on disk. A slow disk lands each write
some time after it was handed over; a crash loses what had not landed.
"""

from __future__ import annotations

import random

from bft.core.effects import Persist
from bft.core.promises import Record, decode_record, encode_record
from bft.messages import DEFAULT_LIMITS


class Disk:
    def __init__(self, rng: random.Random | None = None, lag_ms_max: int = 0) -> None:
        self.saved: Persist | None = None
        self.records: list[Record] = []
        self.rng = rng
        self.lag_ms_max = lag_ms_max
        self.writing: tuple[Persist, int] | None = None  # (checkpoint, when it lands)
        self.waiting: Persist | None = None
        self.late = 0  # checkpoint writes that landed after they were handed over
        self.lost = 0  # checkpoint writes a crash lost before they landed

    def promise(self, record: Record) -> None:
        # Through the codec, as the promise log on disk would give it back.
        self.records.append(decode_record(encode_record(record), DEFAULT_LIMITS))

    def checkpoint(self, saved: Persist, now_ms: int) -> None:
        if self.rng is None:
            self._land(saved)
        elif self.writing is None:
            self.writing = (saved, now_ms + self.rng.randint(1, self.lag_ms_max))
        else:
            self.waiting = saved  # replacing an older one: the runtime's writer skips it too

    def advance(self, now_ms: int) -> None:
        while self.writing is not None and self.writing[1] <= now_ms:
            saved, at = self.writing
            self._land(saved)
            self.late += 1
            self.writing = None
            if self.waiting is not None and self.rng is not None:
                self.writing = (self.waiting, at + self.rng.randint(1, self.lag_ms_max))
                self.waiting = None

    def crash(self) -> None:
        self.lost += (self.writing is not None) + (self.waiting is not None)
        self.writing = self.waiting = None

    def _land(self, saved: Persist) -> None:
        # The latest view record stays, as on a real disk.
        self.saved = saved
        views = [r for r in self.records if r.seq is None]
        self.records = [r for r in self.records if r.seq is not None and r.seq > saved.seq] + views[-1:]

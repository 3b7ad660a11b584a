"""What a client has in flight: each operation's request and the replies it got, indexed so that
no submit, reply or abandon walks all of them (a mount keeps many operations in flight)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bft.core.params import DIGEST_REPLY_BYTES_MIN
from bft.messages import Reply, Request, digest


def result_key(reply: Reply) -> bytes:
    """What replies are matched on: a large result by its digest, so a full reply and digest
    replies for the same result agree; a small one (never sent as a digest) by itself."""
    if reply.digest_only:
        return b"D" + reply.result
    if len(reply.result) > DIGEST_REPLY_BYTES_MIN:
        return b"D" + digest(reply.result)
    return b"F" + reply.result


@dataclass(slots=True)
class Pending:
    request: Request
    deadline_ms: int
    timeout_ms: int
    origin: int  # the timestamp the caller knows the operation by
    resent_for_full: bool = False
    awaits_full: bool = False  # a write agreed on by digest, its designated replica's reply not in
    resent: bool = False  # sent again to every replica (which hold it for their view timers)
    replies: dict[int, Reply] = field(default_factory=dict)
    keys: dict[int, bytes] = field(default_factory=dict)  # each reply's result_key, worked out once
    sent_ms: int = 0  # when it was first sent (the adaptive timer's sample)
    unsent: tuple[int, ...] = ()  # read-only: replicas not sent it yet (``_read_targets``)


class InFlight(dict[int, Pending]):
    """Operations by request timestamp; change it through ``track`` and ``forget`` only."""

    __slots__ = ("_by_origin", "_ordered", "falling_back")

    def __init__(self) -> None:
        super().__init__()
        # Ordered requests' timestamps, oldest first; those since gone are pruned lazily.
        self._ordered: deque[int] = deque()
        self._by_origin: dict[int, int] = {}  # the caller's id -> the timestamp it is in flight under
        # Reads that wait for the timestamp window to go the ordered way (``ClientCore._fall_back``).
        self.falling_back: dict[int, Pending] = {}

    def track(self, pending: Pending) -> None:
        ts = pending.request.timestamp
        self[ts] = pending
        self._by_origin[pending.origin] = ts
        if not pending.request.read_only:
            self._ordered.append(ts)  # timestamps only grow: the deque stays sorted

    def forget(self, ts: int) -> None:
        pending = self.pop(ts)
        self.falling_back.pop(ts, None)
        if self._by_origin.get(pending.origin) == ts:
            del self._by_origin[pending.origin]

    def of_origin(self, origin: int) -> int | None:
        """The timestamp of the caller's operation ``origin``, if it is in flight."""
        return self._by_origin.get(origin)

    def oldest_ordered(self) -> int | None:
        ordered = self._ordered
        while ordered and ordered[0] not in self:
            ordered.popleft()
        return ordered[0] if ordered else None

    def clear(self) -> None:
        super().clear()
        self._ordered.clear()
        self._by_origin.clear()
        self.falling_back.clear()

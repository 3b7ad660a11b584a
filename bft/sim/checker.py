"""The simulator's checker: what every run must satisfy, whatever the faults.

- agreement: no two correct replicas execute different batches at the same sequence number, nor
  commit different batches in one slot of one view;
- checkpoints: every checkpoint taken at a sequence number has the same digest everywhere;
- linearisability: every result a client accepted equals the result of executing the committed
  order sequentially on a fresh service; a read-only result (not in the order) must be a value
  the key held at some point of that sequential execution;
- promises: no replica sends two different PRE-PREPAREs, PREPAREs or COMMITs for one slot of one
  view, or two different VIEW-CHANGEs or NEW-VIEWs for one view, across its restarts from disk
  too (the simulator exempts the Byzantine ones, and those restarted wiped).
"""

from __future__ import annotations

import msgpack

from bft.core.clients import ClientTable
from bft.messages import Commit, Message, NewView, Prepare, PrePrepare, ViewChange, encode_payload
from bft.service import KVService


class Violation(AssertionError):
    """A run broke a property the checker holds it to; its seed replays it."""


class Checker:
    def __init__(self, window: int) -> None:
        self.batches: dict[int, PrePrepare] = {}
        self.checkpoints: dict[int, bytes] = {}
        self.committed_slots: dict[tuple[int, int], bytes] = {}
        self.reference = KVService()
        self.reference_clients = ClientTable(window)
        self.reference_time = 0
        self.reference_seq = 0
        self.results: dict[tuple[int, int], bytes] = {}
        self.written: dict[bytes, set[bytes]] = {}
        self.unverified: dict[tuple[int, int], bytes] = {}
        self.unverified_reads: list[tuple[int, bytes, bytes]] = []

    def executed(self, replica: int, pp: PrePrepare) -> None:
        known = self.batches.setdefault(pp.seq, pp)
        if known.digest != pp.digest:
            raise Violation(f"agreement: replica {replica} executed a different batch at seq {pp.seq}")
        while self.reference_seq + 1 in self.batches:
            batch = self.batches[self.reference_seq + 1]
            self.reference_time = max(batch.timestamp, self.reference_time + 1)
            for r in batch.requests:
                if self.reference_clients.is_new(r.client, r.timestamp):
                    cmd = KVService._parse(r.op)
                    if cmd is not None and cmd[0] == "put":
                        self.written.setdefault(cmd[1], set()).add(cmd[2])
                        self.unverified_reads = [
                            (c, k, v) for c, k, v in self.unverified_reads if (k, v) != (cmd[1], cmd[2])
                        ]
                    res = self.reference.execute(r.op, r.client, self.reference_time)
                    self.reference_clients.record(r.client, r.timestamp, res, r.settled)
                    self.results[(r.client, r.timestamp)] = res
                    if (r.client, r.timestamp) in self.unverified:
                        self.completed(r.client, r.timestamp, self.unverified.pop((r.client, r.timestamp)))
            self.reference_seq += 1

    def committed(self, replica: int, view: int, seq: int, d: bytes) -> None:
        if self.committed_slots.setdefault((view, seq), d) != d:
            raise Violation(f"agreement: replica {replica} committed another batch at seq {seq} in view {view}")

    def checkpoint(self, replica: int, seq: int, d: bytes) -> None:
        if self.checkpoints.setdefault(seq, d) != d:
            raise Violation(f"checkpoint: replica {replica} has a different digest at seq {seq}")

    def completed_read(self, client: int, op: bytes, result: bytes) -> None:
        key = KVService._parse(op)[1]
        try:
            ok, value = msgpack.unpackb(result)
        except (ValueError, TypeError, msgpack.ExtraData) as exc:
            raise Violation(f"read-only: client {client} got a malformed result {result!r}") from exc
        if not ok:
            raise Violation(f"read-only: client {client} read {value!r} for {key!r}: an error")
        if value is not None and value not in self.written.get(key, ()):
            # A fallen-back read may have been accepted on tentative replies: the write it saw
            # must commit (the run fails if it never does).
            self.unverified_reads.append((client, key, value))

    def completed(self, client: int, ts: int, result: bytes) -> None:
        if (client, ts) not in self.results:
            # Accepted on 2f+1 tentative replies before any replica committed it: check it
            # when it commits (and fail the run if it never does).
            self.unverified[(client, ts)] = result
            return
        expected = self.results[(client, ts)]
        if expected != result:
            raise Violation(
                f"linearisability: client {client} request {ts} got {result!r}, sequential order gives {expected!r}"
            )


def _promised(msg: Message) -> tuple[tuple, bytes] | None:
    """What a message binds its sender to: (kind, view[, seq]) and what it said there."""
    match msg:
        case PrePrepare() | Prepare() | Commit():
            return (type(msg).__name__, msg.view, msg.seq), msg.digest
        case ViewChange() | NewView():
            return (type(msg).__name__, msg.view), encode_payload(msg)
    return None


class Promises:
    def __init__(self) -> None:
        self.spoken: dict[tuple, bytes] = {}  # (replica, message kind, view[, seq]) -> what it said
        self.twins: dict[tuple, set[bytes]] = {}  # the same, for both instances of a twin

    def said(self, replica: int, msg: Message, restarted: bool) -> None:
        what = _promised(msg)
        if what is None:
            return
        said = self.spoken.setdefault((replica, *what[0]), what[1])
        if said != what[1]:
            why = " (it restarted from its data directory)" if restarted else ""
            raise Violation(f"promise: replica {replica} sent a second, different {what[0]}{why}")

    def twin_said(self, replica: int, msg: Message) -> bool:
        """Whether this is the first time the twins of ``replica`` contradict each other where
        it promised one thing: what Twins makes unmodified code do."""
        what = _promised(msg)
        if what is None:
            return False
        said = self.twins.setdefault((replica, *what[0]), set())
        before = len(said)
        said.add(what[1])
        return before == 1 and len(said) == 2

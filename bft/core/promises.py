"""What a replica must not forget across a restart: its promises, and the batches it committed.

A correct replica never says two different things for one slot of one view, or for one view:
one PRE-PREPARE (primary) or PREPARE (backup) per sequence number and view, one COMMIT, one
VIEW-CHANGE per view, one NEW-VIEW. A replica that restarted and forgot what it said could say
something else, and then it is no longer correct: one restart would use up the fault budget.
So every promise is a ``Promise`` effect that the driver writes to the replica's data directory
before any message after it leaves (``durability`` "log" and "strict"; "strict" also fsyncs),
and ``bft.core.recovery`` rebuilds the replica from its checkpoint and these records.

The records, each with the sequence number it concerns (None for view records; the log keeps
only the latest of those and nothing at or below a stable checkpoint):

- ``Proposed(pp)``: we pre-prepared (as primary) or prepared (as backup) this batch in its view;
  it carries the whole batch, so its requests survive even if every replica restarts.
- ``Prepared(view, seq, digest)``: it prepared here, and we sent COMMIT (our P set).
- ``ViewChangeSent(vc)``: we moved to ``vc.view`` and sent this VIEW-CHANGE.
- ``ViewEntered(nv)``: we entered ``nv.view`` by this NEW-VIEW (sent, as its primary, or accepted).
- ``Committed(seq, digest)``: we executed this committed batch (its requests are in a
  ``Proposed`` or ``Learned`` record); a restart replays these after the checkpoint instead of
  fetching state.
- ``Learned(pp)``: a batch we executed on learning it committed in a view we had left.
- ``Stable(seq, digest, proof)``: our low watermark moved to ``seq`` (the checkpoint file may
  lag behind, or be damaged).
"""

from __future__ import annotations

import msgpack

from bft.messages import (
    DIGEST_BYTES,
    DecodeError,
    Immutable,
    Limits,
    Message,
    NewView,
    PrePrepare,
    ViewChange,
    decode_payload,
    encode_payload,
    frame,
    pack,
    split_frame,
)


class Proposed(Immutable):
    pp: PrePrepare

    @property
    def seq(self) -> int | None:
        return self.pp.seq


class Prepared(Immutable):
    view: int
    seq: int
    digest: bytes


class ViewChangeSent(Immutable):
    vc: ViewChange
    seq = None


class ViewEntered(Immutable):
    nv: NewView
    seq = None


class Committed(Immutable):
    seq: int
    digest: bytes


class Learned(Immutable):
    """A batch we executed on learning it committed in a view we had left (``Learner``): its
    requests, for replay; not a pre-prepare of ours, so it is no Q-set entry."""

    pp: PrePrepare

    @property
    def seq(self) -> int | None:
        return self.pp.seq


class Stable(Immutable):
    """Checkpoint ``seq`` became stable here, with this certificate. The checkpoint itself goes
    to disk off the event loop and may land later (or be damaged): a restart still knows how
    far its window had moved, so its VIEW-CHANGE can name every promise it made above it."""

    seq: int
    digest: bytes
    proof: tuple[tuple[int, bytes], ...]


Record = Proposed | Prepared | ViewChangeSent | ViewEntered | Committed | Learned | Stable


class RecordDamaged(ValueError):
    """A record in a replica's own log does not decode (its checksum matched: a bug, or an
    older format)."""


def _message_bytes(msg: Message) -> bytes:
    return frame(msg, encode_payload(msg), b"")


def _message(data: object, limits: Limits, kind: type) -> Message:
    if type(data) is not bytes:
        raise RecordDamaged("a message record holds no bytes")
    try:
        msg = decode_payload(split_frame(data, limits), limits)
    except DecodeError as exc:
        raise RecordDamaged(f"a message record does not decode: {exc}") from None
    if not isinstance(msg, kind):
        raise RecordDamaged(f"a record holds a {type(msg).__name__}, not a {kind.__name__}")
    return msg


def encode_record(record: Record) -> bytes:
    match record:
        case Proposed(pp):
            assert pp.resolved, "a promise carries the whole batch"
            return pack(("P", _message_bytes(pp)))
        case Prepared(view, seq, d):
            return pack(("C", view, seq, d))
        case ViewChangeSent(vc):
            return pack(("V", _message_bytes(vc)))
        case ViewEntered(nv):
            return pack(("N", _message_bytes(nv)))
        case Committed(seq, d):
            return pack(("X", seq, d))
        case Learned(pp):
            assert pp.resolved, "a learned batch is recorded whole"
            return pack(("L", _message_bytes(pp)))
        case Stable(seq, d, proof):
            return pack(("S", seq, d, [list(p) for p in proof]))
    raise AssertionError(f"not a record: {record!r}")


def _stable(rest: list, limits: Limits) -> Stable:
    if len(rest) != 3 or type(rest[0]) is not int or rest[0] < 0 or type(rest[1]) is not bytes:
        raise RecordDamaged("an S record is malformed")
    proof = rest[2]
    if not isinstance(proof, list) or len(proof) > limits.replicas_max or not all(
        isinstance(p, list) and len(p) == 2 and type(p[0]) is int and type(p[1]) is bytes for p in proof
    ):
        raise RecordDamaged("an S record's certificate is malformed")
    return Stable(rest[0], rest[1], tuple((v, d) for v, d in proof))


def decode_record(data: bytes, limits: Limits) -> Record:
    try:
        fields = msgpack.unpackb(data, max_map_len=0, max_ext_len=0, max_array_len=1024)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise RecordDamaged(f"a record is not msgpack: {exc}") from None
    if not isinstance(fields, list) or not fields:
        raise RecordDamaged("a record is not a list")
    kind, rest = fields[0], fields[1:]
    if kind == "S":
        return _stable(rest, limits)  # a certificate: at most one vote per replica
    if kind in ("C", "X"):
        ints = rest[:-1]
        if not all(type(i) is int and i >= 0 for i in ints) or type(rest[-1]) is not bytes:
            raise RecordDamaged(f"a {kind} record is malformed")
        if len(rest[-1]) != DIGEST_BYTES or len(ints) != (2 if kind == "C" else 1):
            raise RecordDamaged(f"a {kind} record is malformed")
        return Prepared(*ints, rest[-1]) if kind == "C" else Committed(ints[0], rest[-1])
    if len(rest) != 1:
        raise RecordDamaged(f"a {kind!r} record is malformed")
    if kind == "P":
        return Proposed(_message(rest[0], limits, PrePrepare))
    if kind == "L":
        return Learned(_message(rest[0], limits, PrePrepare))
    if kind == "V":
        return ViewChangeSent(_message(rest[0], limits, ViewChange))
    if kind == "N":
        return ViewEntered(_message(rest[0], limits, NewView))
    raise RecordDamaged(f"unknown record kind {kind!r}")

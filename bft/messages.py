"""PBFT messages and their one wire codec.

A frame on the wire is::

    header  !BBIH  version, type, sender, auth_len
    auth    auth_len bytes: MAC tags (16 bytes per receiver) or an Ed25519 signature
    payload msgpack array of the message's fields

The MAC or signature covers ``version | type | sender | payload`` (see ``signed_bytes``), so a
receiver can authenticate a frame before it decodes the payload. Decoding is strict: msgpack is
given limits on every container and byte string before it allocates, and every field is checked
for type and range; anything else raises ``DecodeError`` with a short reason that the caller counts.

Requests keep their encoded body (``raw``) and their client's authenticator (``auth``) so the
primary can forward them unchanged inside a pre-prepare and backups can check the client's own
tag (Castro & Liskov, TOCS 2002, section 3.2: authenticators).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field, replace

import msgpack

VERSION = 1
HEADER = struct.Struct("!BBIH")
MAC_BYTES = 16
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32

# Hard limits of the codec itself; the configured limits (protocol parameters) are tighter.
FRAME_BYTES_MAX = 64 * 1024 * 1024
ARRAY_LEN_MAX = 1 << 16
INT_MAX = (1 << 63) - 1
INT_MIN = -(1 << 63)
SENDER_MAX = (1 << 32) - 1  # the frame header holds the sender in 32 bits


class DecodeError(ValueError):
    """A peer sent something that is not a well-formed message; the reason is a short label."""


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


class _FromReplica:
    """Messages sent by a replica name it in their ``replica`` field."""

    __slots__ = ()

    @property
    def sender(self) -> int:
        return self.replica  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Request:
    client: int
    timestamp: int
    op: bytes
    read_only: bool
    # Encoded body, its digest and the client's authenticator travel with the request.
    raw: bytes = field(compare=False, repr=False)
    digest: bytes = field(compare=False, repr=False)
    auth: bytes = field(default=b"", compare=False, repr=False)

    TYPE = 1

    @staticmethod
    def make(client: int, timestamp: int, op: bytes, read_only: bool = False) -> Request:
        raw = msgpack.packb((client, timestamp, op, read_only))
        return Request(client, timestamp, op, read_only, raw, digest(raw))

    def with_auth(self, auth: bytes) -> Request:
        return Request(self.client, self.timestamp, self.op, self.read_only, self.raw, self.digest, auth)

    @property
    def sender(self) -> int:
        return self.client


@dataclass(frozen=True, slots=True)
class PrePrepare(_FromReplica):
    view: int
    seq: int
    timestamp: int  # the primary's proposed batch time (non-deterministic input, agreed here)
    # A large request travels by its digest only: the client sent it to every replica itself
    # ("separate request transmission", TOCS 2002, 5.1.4); backups resolve it before preparing.
    requests: tuple[Request | bytes, ...]
    replica: int
    digest: bytes = field(default=b"", compare=False, repr=False)

    TYPE = 2

    @staticmethod
    def make(view: int, seq: int, timestamp: int, requests: tuple[Request | bytes, ...], replica: int) -> PrePrepare:
        return PrePrepare(view, seq, timestamp, requests, replica, batch_digest(timestamp, requests))

    @property
    def resolved(self) -> bool:
        return all(isinstance(r, Request) for r in self.requests)


def batch_digest(timestamp: int, requests: tuple[Request | bytes, ...]) -> bytes:
    """The digest of a batch: the same whether a request travels inline or by its digest."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(timestamp.to_bytes(8, "big", signed=True))
    for r in requests:
        h.update(r.digest if isinstance(r, Request) else r)
    return h.digest()


# The batch a new primary proposes for a sequence number the view change left empty.
NULL_DIGEST = batch_digest(0, ())


@dataclass(frozen=True, slots=True)
class Batch(_FromReplica):
    """A batch sent to a replica that asked for it by digest (the new primary, condition A3 of
    the view change); the receiver checks the digest, so any replica may send it."""

    seq: int
    timestamp: int
    requests: tuple[Request, ...]
    replica: int
    digest: bytes = field(default=b"", compare=False, repr=False)

    TYPE = 13

    @staticmethod
    def of(pp: PrePrepare, replica: int) -> Batch:
        return Batch(pp.seq, pp.timestamp, pp.requests, replica, pp.digest)


@dataclass(frozen=True, slots=True)
class FetchBatch(_FromReplica):
    seq: int
    digest: bytes
    replica: int

    TYPE = 14


@dataclass(frozen=True, slots=True)
class Prepare(_FromReplica):
    view: int
    seq: int
    digest: bytes
    replica: int

    TYPE = 3


@dataclass(frozen=True, slots=True)
class Commit(_FromReplica):
    view: int
    seq: int
    digest: bytes
    replica: int

    TYPE = 4


@dataclass(frozen=True, slots=True)
class Reply(_FromReplica):
    view: int
    timestamp: int
    client: int
    replica: int
    result: bytes
    tentative: bool = False
    digest_only: bool = False  # ``result`` is the digest of the result (TOCS 2002, 5.1.1)

    TYPE = 5


@dataclass(frozen=True, slots=True)
class Checkpoint(_FromReplica):
    seq: int
    digest: bytes  # state digest after executing seq
    replica: int

    TYPE = 6


@dataclass(frozen=True, slots=True)
class Status(_FromReplica):
    """Periodic summary a replica sends so peers can retransmit what it lacks (the paper's
    implementation recovers lost messages this way rather than trusting the transport)."""

    view: int
    stable: int  # low watermark h
    settled: int  # every sequence number up to it is executed, and committed if re-proposed in this view
    view_changing: bool  # True while it waits for the NEW-VIEW of ``view``
    replica: int

    TYPE = 7


@dataclass(frozen=True, slots=True)
class ViewChange(_FromReplica):
    """Signed VIEW-CHANGE(v+1, h, C, P, Q) of TOCS 2002 section 4.4 (MAC-compatible view change)."""

    view: int
    stable: int
    checkpoints: tuple[tuple[int, bytes], ...]  # C: (seq, state digest)
    prepared: tuple[tuple[int, bytes, int], ...]  # P: (seq, batch digest, view)
    preprepared: tuple[tuple[int, tuple[tuple[bytes, int], ...]], ...]  # Q: seq -> (digest, view)
    replica: int
    # The signed encoding travels with the message so a NEW-VIEW can carry it as proof.
    raw: bytes = field(default=b"", compare=False, repr=False)
    signature: bytes = field(default=b"", compare=False, repr=False)

    TYPE = 8


@dataclass(frozen=True, slots=True)
class NewView(_FromReplica):
    """Signed NEW-VIEW(v+1, V, X): the view changes used, each with its sender's signature so
    every backup can re-run the decision, and the decision taken from them."""

    view: int
    view_changes: tuple[ViewChange, ...]  # V
    checkpoint: tuple[int, bytes]  # chosen stable checkpoint (seq, state digest)
    decisions: tuple[tuple[int, bytes], ...]  # X: (seq, batch digest; NULL_DIGEST for null)
    replica: int

    TYPE = 9


@dataclass(frozen=True, slots=True)
class FetchState(_FromReplica):
    """Ask a replica for its state at checkpoint ``seq``."""

    seq: int
    replica: int

    TYPE = 10


@dataclass(frozen=True, slots=True)
class State(_FromReplica):
    """The manifest of checkpoint ``seq``: its partition digests, msgpack-encoded. The receiver
    checks them against the checkpoint digest it holds a certificate for, then fetches the
    partitions it lacks."""

    seq: int
    manifest: bytes
    replica: int

    TYPE = 11


@dataclass(frozen=True, slots=True)
class FetchPartition(_FromReplica):
    """Asks for the chunk of partition ``index`` of checkpoint ``seq`` that starts at ``offset``."""

    seq: int
    index: int
    offset: int
    replica: int

    TYPE = 15


@dataclass(frozen=True, slots=True)
class Partition(_FromReplica):
    """A chunk of one partition of checkpoint ``seq``: its bytes from ``offset``, of ``total``.
    A partition travels in chunks so that none exceeds a frame, however large it grew; the
    receiver checks the whole partition against the manifest once it has every chunk."""

    seq: int
    index: int
    offset: int
    total: int
    data: bytes
    replica: int

    TYPE = 16


@dataclass(frozen=True, slots=True)
class Hello:
    """A client's first frame on a connection, so replicas know where to send its replies before
    its first request reaches them."""

    client: int

    TYPE = 12

    @property
    def sender(self) -> int:
        return self.client


Message = (
    Request | PrePrepare | Prepare | Commit | Reply | Checkpoint | Status | ViewChange | NewView
    | FetchState | State | Hello | Batch | FetchBatch | FetchPartition | Partition
)
CLIENT_TYPES = frozenset({Request.TYPE, Hello.TYPE})
SIGNED_TYPES = frozenset({ViewChange.TYPE, NewView.TYPE})


def signed_bytes(type_: int, sender: int, payload: bytes) -> bytes:
    return HEADER.pack(VERSION, type_, sender, 0)[:6] + payload


# ---------------------------------------------------------------------------------------------
# Encoding


def _fields(msg: Message) -> tuple:
    match msg:
        case PrePrepare():
            entries = [(r.raw, r.auth) if isinstance(r, Request) else (r,) for r in msg.requests]
            return (msg.view, msg.seq, msg.timestamp, entries, msg.replica)
        case Prepare() | Commit():
            return (msg.view, msg.seq, msg.digest, msg.replica)
        case Reply():
            return (msg.view, msg.timestamp, msg.client, msg.replica, msg.result, msg.tentative, msg.digest_only)
        case Checkpoint():
            return (msg.seq, msg.digest, msg.replica)
        case Status():
            return (msg.view, msg.stable, msg.settled, msg.view_changing, msg.replica)
        case ViewChange():
            return (msg.view, msg.stable, msg.checkpoints, msg.prepared, msg.preprepared, msg.replica)
        case NewView():
            vcs = [(vc.raw or encode_payload(vc), vc.signature) for vc in msg.view_changes]
            return (msg.view, vcs, msg.checkpoint, msg.decisions, msg.replica)
        case Batch():
            return (msg.seq, msg.timestamp, [(r.raw, r.auth) for r in msg.requests], msg.replica)
        case FetchBatch():
            return (msg.seq, msg.digest, msg.replica)
        case FetchState():
            return (msg.seq, msg.replica)
        case State():
            return (msg.seq, msg.manifest, msg.replica)
        case FetchPartition():
            return (msg.seq, msg.index, msg.offset, msg.replica)
        case Partition():
            return (msg.seq, msg.index, msg.offset, msg.total, msg.data, msg.replica)
        case Hello():
            return (msg.client,)
    raise TypeError(f"not a message: {msg!r}")


def encode_payload(msg: Message) -> bytes:
    if isinstance(msg, Request):
        return msg.raw
    return msgpack.packb(_fields(msg))


def frame(msg: Message, payload: bytes, auth: bytes) -> bytes:
    """Assemble one frame (without the transport's length prefix)."""
    if not 0 <= msg.sender <= SENDER_MAX:
        raise ValueError(f"sender id {msg.sender} does not fit the frame header")
    return HEADER.pack(VERSION, msg.TYPE, msg.sender, len(auth)) + auth + payload


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds enforced while decoding, before anything is allocated for the data."""

    frame_bytes_max: int = 16 * 1024 * 1024
    op_bytes_max: int = 8 * 1024 * 1024
    batch_len_max: int = 1024
    snapshot_bytes_max: int = FRAME_BYTES_MAX - 1024


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Envelope:
    """A frame split into its parts, not yet authenticated or decoded."""

    type: int
    sender: int
    auth: bytes
    payload: bytes


def split_frame(data: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    if len(data) > limits.frame_bytes_max:
        raise DecodeError("frame-too-large")
    if len(data) < HEADER.size:
        raise DecodeError("short-frame")
    version, type_, sender, auth_len = HEADER.unpack_from(data)
    if version != VERSION:
        raise DecodeError("bad-version")
    if type_ not in _DECODERS:
        raise DecodeError("unknown-type")
    end = HEADER.size + auth_len
    if end > len(data):
        raise DecodeError("short-frame")
    return Envelope(type_, sender, bytes(data[HEADER.size:end]), bytes(data[end:]))


def _unpack(payload: bytes, limits: Limits) -> list:
    try:
        obj = msgpack.unpackb(
            payload,
            max_bin_len=max(limits.op_bytes_max, limits.snapshot_bytes_max),
            max_str_len=0,
            max_array_len=max(limits.batch_len_max, ARRAY_LEN_MAX),
            max_map_len=0,
            max_ext_len=0,
            use_list=True,
            strict_map_key=True,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError("bad-msgpack") from exc
    if not isinstance(obj, list):
        raise DecodeError("bad-shape")
    return obj


def _int(v: object, lo: int = 0, hi: int = INT_MAX) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise DecodeError("bad-int")
    return v


def _bytes(v: object, max_len: int, exact: int | None = None) -> bytes:
    if type(v) is not bytes or len(v) > max_len or (exact is not None and len(v) != exact):
        raise DecodeError("bad-bytes")
    return v


def _bool(v: object) -> bool:
    if type(v) is not bool:
        raise DecodeError("bad-bool")
    return v


def _list(v: object, length: int | None = None, max_len: int = ARRAY_LEN_MAX) -> list:
    if type(v) is not list or len(v) > max_len or (length is not None and len(v) != length):
        raise DecodeError("bad-shape")
    return v


def _digest(v: object) -> bytes:
    return _bytes(v, DIGEST_BYTES, DIGEST_BYTES)


def decode_request(raw: bytes, auth: bytes, limits: Limits = DEFAULT_LIMITS) -> Request:
    f = _list(_unpack(raw, limits), 4)
    return Request(
        _int(f[0]), _int(f[1]), _bytes(f[2], limits.op_bytes_max), _bool(f[3]), raw, digest(raw), auth
    )


def _requests(v: object, limits: Limits, refs: bool = False) -> tuple[Request | bytes, ...]:
    reqs: list[Request | bytes] = []
    for item in _list(v, max_len=limits.batch_len_max):
        if refs and type(item) is list and len(item) == 1:
            reqs.append(_digest(item[0]))
            continue
        raw, auth = _list(item, 2)
        reqs.append(decode_request(_bytes(raw, limits.frame_bytes_max), _bytes(auth, 4096), limits))
    return tuple(reqs)


def _pre_prepare(f: list, limits: Limits) -> PrePrepare:
    _list(f, 5)
    view, seq, ts = _int(f[0]), _int(f[1]), _int(f[2], INT_MIN, INT_MAX)
    requests = _requests(f[3], limits, refs=True)
    return PrePrepare(view, seq, ts, requests, _int(f[4]), batch_digest(ts, requests))


def _batch(f: list, limits: Limits) -> Batch:
    _list(f, 4)
    seq, ts = _int(f[0]), _int(f[1], INT_MIN, INT_MAX)
    requests = _requests(f[2], limits)
    return Batch(seq, ts, requests, _int(f[3]), batch_digest(ts, requests))


def _view_change(f: list, limits: Limits) -> ViewChange:
    _list(f, 6)
    ckpts = tuple((_int(s), _digest(d)) for s, d in (_list(x, 2) for x in _list(f[2])))
    prepared = tuple((_int(s), _digest(d), _int(v)) for s, d, v in (_list(x, 3) for x in _list(f[3])))
    preprepared = tuple(
        (_int(s), tuple((_digest(d), _int(v)) for d, v in (_list(y, 2) for y in _list(entries))))
        for s, entries in (_list(x, 2) for x in _list(f[4]))
    )
    return ViewChange(_int(f[0]), _int(f[1]), ckpts, prepared, preprepared, _int(f[5]))


def _new_view(f: list, limits: Limits) -> NewView:
    _list(f, 5)
    vcs = []
    for item in _list(f[1], max_len=1024):
        raw, signature = _list(item, 2)
        vc = _view_change(_unpack(_bytes(raw, limits.frame_bytes_max), limits), limits)
        vcs.append(replace(vc, raw=raw, signature=_bytes(signature, SIGNATURE_BYTES)))
    s, d = _list(f[2], 2)
    decisions = tuple((_int(n), _digest(d)) for n, d in (_list(x, 2) for x in _list(f[3])))
    return NewView(_int(f[0]), tuple(vcs), (_int(s), _digest(d)), decisions, _int(f[4]))


_DECODERS = {
    Request.TYPE: None,  # decoded from its raw body, see decode_payload
    PrePrepare.TYPE: _pre_prepare,
    Prepare.TYPE: lambda f, lim: Prepare(
        _int(_list(f, 4)[0]), _int(f[1]), _digest(f[2]), _int(f[3])
    ),
    Commit.TYPE: lambda f, lim: Commit(_int(_list(f, 4)[0]), _int(f[1]), _digest(f[2]), _int(f[3])),
    Reply.TYPE: lambda f, lim: Reply(
        _int(_list(f, 7)[0]), _int(f[1]), _int(f[2]), _int(f[3]), _bytes(f[4], lim.op_bytes_max), _bool(f[5]),
        _bool(f[6]),
    ),
    Checkpoint.TYPE: lambda f, lim: Checkpoint(_int(_list(f, 3)[0]), _digest(f[1]), _int(f[2])),
    Status.TYPE: lambda f, lim: Status(_int(_list(f, 5)[0]), _int(f[1]), _int(f[2]), _bool(f[3]), _int(f[4])),
    ViewChange.TYPE: _view_change,
    NewView.TYPE: _new_view,
    FetchState.TYPE: lambda f, lim: FetchState(_int(_list(f, 2)[0]), _int(f[1])),
    State.TYPE: lambda f, lim: State(
        _int(_list(f, 3)[0]), _bytes(f[1], lim.snapshot_bytes_max), _int(f[2])
    ),
    Hello.TYPE: lambda f, lim: Hello(_int(_list(f, 1)[0])),
    Batch.TYPE: _batch,
    FetchBatch.TYPE: lambda f, lim: FetchBatch(_int(_list(f, 3)[0]), _digest(f[1]), _int(f[2])),
    FetchPartition.TYPE: lambda f, lim: FetchPartition(_int(_list(f, 4)[0]), _int(f[1]), _int(f[2]), _int(f[3])),
    Partition.TYPE: lambda f, lim: Partition(
        _int(_list(f, 6)[0]), _int(f[1]), _int(f[2]), _int(f[3]), _bytes(f[4], lim.snapshot_bytes_max), _int(f[5])
    ),
}


def decode_payload(env: Envelope, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode an envelope's payload; the message's own sender field must match the frame's."""
    if env.type == Request.TYPE:
        msg: Message = decode_request(env.payload, env.auth, limits)
    else:
        msg = _DECODERS[env.type](_unpack(env.payload, limits), limits)
        if isinstance(msg, ViewChange):
            msg = replace(msg, raw=env.payload, signature=env.auth)
    if msg.sender != env.sender:
        raise DecodeError("sender-mismatch")
    return msg


def roundtrip(msg: Message, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Encode and decode without authentication: used by the simulator and tests so every
    simulated delivery exercises the codec."""
    auth = msg.auth if isinstance(msg, Request) else msg.signature if isinstance(msg, ViewChange) else b""
    return decode_payload(split_frame(frame(msg, encode_payload(msg), auth), limits), limits)

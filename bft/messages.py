"""PBFT messages and their one wire codec.

A frame on the wire is::

    header  !BBIH  version, type, sender, auth_len
    auth    auth_len bytes: MAC tags (16 bytes per receiver) or an Ed25519 signature
    payload msgpack array of the message's fields

The MAC or signature covers ``version | type | sender | payload`` (see ``signed_bytes``), so a
receiver can authenticate a frame before it decodes the payload. Decoding is strict: a payload
longer than its type may be within the protocol's bounds is refused unread, every list is checked
against its bound before its elements are unpacked (``bft.bounds``), and every field is checked
for type and range; anything else raises ``DecodeError`` with a short reason that the caller counts.

Requests keep their encoded body (``raw``) and their client's authenticator (``auth``) so the
primary can forward them unchanged inside a pre-prepare and backups can check the client's own
tag (Castro & Liskov, TOCS 2002, section 3.2: authenticators).
"""

from __future__ import annotations

import functools
import hashlib
import struct

import msgspec
from msgspec.structs import replace

from bft.bounds import (
    BOOL_BYTES,
    DEFAULT_LIMITS,
    DIGEST,
    DIGEST_BYTES,
    DIGEST_FIELD_BYTES,
    INT_BYTES_MAX,
    INT_MAX,
    INT_MIN,
    SIGNATURE_BYTES,
    UINT,
    DecodeError,
    Limits,
    Reader,
    array_bytes_max,
    as_bool,
    as_bytes,
    as_digest,
    as_int,
    auth_bytes_max,
    batch_bytes_max,
    bin_bytes_max,
    fields_decoder,
    flat_fields,
    new_view_bytes_max,
    request_bytes_max,
    typed_fields,
    view_change_bytes_max,
)
from bft.bounds import MAC_BYTES as MAC_BYTES  # part of the wire format: importers find it here

VERSION = 1
HEADER = struct.Struct("!BBIH")
SENDER_MAX = (1 << 32) - 1  # the frame header holds the sender in 32 bits
# The same bytes as msgpack.packb for the ints, bytes, bools, strings and arrays of messages
# (test_messages checks it) and of promise-log records (read back with msgpack.unpackb), in a
# quarter of the time: packb builds a Packer for every call.
pack = msgspec.msgpack.encode


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


class Immutable(msgspec.Struct, frozen=True, gc=False):
    """The base of messages, effects and log records: immutable values with slots, as frozen
    dataclasses would be, but built in C. A frozen dataclass's ``__init__`` sets each field
    through ``object.__setattr__``: 0.8 µs for a reply's seven fields against 0.09 µs here, and
    an operation builds about a hundred of them at batch size 1 (bench.cpu). Not tracked by the
    garbage collector (``gc=False``): a value that is never changed cannot hold a cycle."""


def _identity(*names: str) -> tuple:
    """``__eq__``, ``__ne__``, ``__hash__`` and ``__repr__`` over ``names`` alone: what the other
    fields hold (an encoding, its digest, a tag, a signature) is derived from them or proves them,
    and does not make two messages different. ``__ne__`` too: msgspec 0.18.0-0.18.4 answer ``!=``
    with their own comparison of every field."""

    def key(self: object) -> tuple:
        return tuple(getattr(self, n) for n in names)

    def eq(self: object, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return key(self) == key(other)

    def ne(self: object, other: object) -> bool:
        same = eq(self, other)
        return same if same is NotImplemented else not same

    def hash_(self: object) -> int:
        return hash(key(self))

    def repr_(self: object) -> str:
        return f"{type(self).__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

    return eq, ne, hash_, repr_


class _FromReplica(Immutable):
    """Messages sent by a replica name it in their ``replica`` field."""

    @property
    def sender(self) -> int:
        return self.replica  # type: ignore[attr-defined]


class _Flat(_FromReplica, array_like=True):
    """A message whose payload is the array of its fields in order: msgspec encodes it from the
    Struct itself, with no tuple built for it (the messages of every operation are of these)."""


class Request(Immutable):
    client: int
    timestamp: int
    op: bytes
    read_only: bool
    # The replicas asked to reply, one bit each (0: all). A client needs only 2f+1 matching
    # replies (f+1 without the read-only and tentative optimisations); the others' replies
    # cost them a frame each and the client one to read. A resent request is answered by all.
    repliers: int
    # Every ordered request of this client with a lower timestamp has its result at the client,
    # which asks for none of them again: replicas forget those replies (``ClientTable``), so the
    # exactly-once table, part of every checkpoint, holds what clients may still ask for, not
    # ``client_window`` results per client whatever their size. 0: nothing settled.
    settled: int
    # Encoded body, its digest and the client's authenticator travel with the request.
    raw: bytes
    digest: bytes
    auth: bytes = b""

    TYPE = 1
    __eq__, __ne__, __hash__, __repr__ = _identity("client", "timestamp", "op", "read_only", "repliers", "settled")

    @staticmethod
    def make(
        client: int, timestamp: int, op: bytes, read_only: bool = False, repliers: int = 0, settled: int = 0
    ) -> Request:
        raw = pack((client, timestamp, op, read_only, repliers, settled))
        return Request(client, timestamp, op, read_only, repliers, settled, raw, digest(raw))

    def with_auth(self, auth: bytes) -> Request:
        return Request(
            self.client, self.timestamp, self.op, self.read_only, self.repliers, self.settled, self.raw, self.digest,
            auth,
        )

    def asks(self, replica: int) -> bool:
        """Whether ``replica`` is to reply to it."""
        return not self.repliers or bool(self.repliers >> replica & 1)

    def designated(self, n: int) -> int:
        """The replica that sends a large result in full (the others send its digest): taking
        turns with the timestamp, among those asked to reply (TOCS 2002, 5.1.1)."""
        start = (self.client + self.timestamp) % n
        return next((i % n for i in range(start, start + n) if self.asks(i % n)), start)

    @property
    def sender(self) -> int:
        return self.client


class PrePrepare(_FromReplica):
    view: int
    seq: int
    timestamp: int  # the primary's proposed batch time (non-deterministic input, agreed here)
    # A large request travels by its digest only: the client sent it to every replica itself
    # ("separate request transmission", TOCS 2002, 5.1.4); backups resolve it before preparing.
    requests: tuple[Request | bytes, ...]
    replica: int
    digest: bytes = b""

    TYPE = 2
    __eq__, __ne__, __hash__, __repr__ = _identity("view", "seq", "timestamp", "requests", "replica")

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


class Batch(_FromReplica):
    """A batch sent to a replica that asked for it by digest (the new primary, condition A3 of
    the view change); the receiver checks the digest, so any replica may send it."""

    seq: int
    timestamp: int
    requests: tuple[Request, ...]
    replica: int
    digest: bytes = b""

    TYPE = 13
    __eq__, __ne__, __hash__, __repr__ = _identity("seq", "timestamp", "requests", "replica")

    @staticmethod
    def of(pp: PrePrepare, replica: int) -> Batch:
        return Batch(pp.seq, pp.timestamp, pp.requests, replica, pp.digest)


class FetchBatch(_Flat):
    seq: int
    digest: bytes
    replica: int

    TYPE = 14


class Prepare(_Flat):
    view: int
    seq: int
    digest: bytes
    replica: int

    TYPE = 3


class Commit(_Flat):
    view: int
    seq: int
    digest: bytes
    replica: int

    TYPE = 4


class Reply(_Flat):
    view: int
    timestamp: int
    client: int
    replica: int
    result: bytes
    tentative: bool = False
    digest_only: bool = False  # ``result`` is the digest of the result (TOCS 2002, 5.1.1)

    TYPE = 5


class Checkpoint(_Flat):
    seq: int
    digest: bytes  # state digest after executing seq
    replica: int

    TYPE = 6


class Status(_Flat):
    """Periodic summary a replica sends so peers can retransmit what it lacks (the paper's
    implementation recovers lost messages this way rather than trusting the transport)."""

    view: int
    stable: int  # low watermark h
    settled: int  # every sequence number up to it is executed, and committed if re-proposed in this view
    view_changing: bool  # True while it waits for the NEW-VIEW of ``view``
    replica: int

    TYPE = 7


class ViewChange(_FromReplica):
    """Signed VIEW-CHANGE(v+1, h, C, P, Q) of TOCS 2002 section 4.4 (MAC-compatible view change)."""

    view: int
    stable: int
    checkpoints: tuple[tuple[int, bytes], ...]  # C: (seq, state digest)
    prepared: tuple[tuple[int, bytes, int], ...]  # P: (seq, batch digest, view)
    preprepared: tuple[tuple[int, tuple[tuple[bytes, int], ...]], ...]  # Q: seq -> (digest, view)
    replica: int
    # The signed encoding travels with the message so a NEW-VIEW can carry it as proof.
    raw: bytes = b""
    signature: bytes = b""

    TYPE = 8
    __eq__, __ne__, __hash__, __repr__ = _identity(
        "view", "stable", "checkpoints", "prepared", "preprepared", "replica"
    )


class NewView(_FromReplica):
    """Signed NEW-VIEW(v+1, V, X): the view changes used, each with its sender's signature so
    every backup can re-run the decision, and the decision taken from them."""

    view: int
    view_changes: tuple[ViewChange, ...]  # V
    checkpoint: tuple[int, bytes]  # chosen stable checkpoint (seq, state digest)
    decisions: tuple[tuple[int, bytes], ...]  # X: (seq, batch digest; NULL_DIGEST for null)
    replica: int

    TYPE = 9


class FetchState(_Flat):
    """Ask a replica for its state at checkpoint ``seq``."""

    seq: int
    replica: int

    TYPE = 10


class State(_Flat):
    """The manifest of checkpoint ``seq``: its partition digests, msgpack-encoded. The receiver
    checks them against the checkpoint digest it holds a certificate for, then fetches the
    partitions it lacks."""

    seq: int
    manifest: bytes
    replica: int

    TYPE = 11


class FetchPartition(_Flat):
    """Asks for the chunk of partition ``index`` of checkpoint ``seq`` that starts at ``offset``."""

    seq: int
    index: int
    offset: int
    replica: int

    TYPE = 15


class Partition(_Flat):
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


class Suspect(_Flat):
    """A request of ``client`` in a pre-prepare failed its tag and its signature at ``replica``:
    from now on the client's requests are taken only signed (bft.runtime.node)."""

    client: int
    replica: int

    TYPE = 17


Message = (
    Request | PrePrepare | Prepare | Commit | Reply | Checkpoint | Status | ViewChange | NewView
    | FetchState | State | Batch | FetchBatch | FetchPartition | Partition | Suspect
)
SIGNED_TYPES = frozenset({ViewChange.TYPE, NewView.TYPE})


def signed_bytes(type_: int, sender: int, payload: bytes) -> bytes:
    return HEADER.pack(VERSION, type_, sender, 0)[:6] + payload


# ---------------------------------------------------------------------------------------------
# Encoding


def _fields(msg: PrePrepare | ViewChange | NewView | Batch) -> tuple:
    """The fields of a message that is not ``_Flat``, as its payload's array holds them."""
    match msg:
        case PrePrepare():
            entries = [(r.raw, r.auth) if isinstance(r, Request) else (r,) for r in msg.requests]
            return (msg.view, msg.seq, msg.timestamp, entries, msg.replica)
        case ViewChange():
            return (msg.view, msg.stable, msg.checkpoints, msg.prepared, msg.preprepared, msg.replica)
        case NewView():
            vcs = [(vc.raw or encode_payload(vc), vc.signature) for vc in msg.view_changes]
            return (msg.view, vcs, msg.checkpoint, msg.decisions, msg.replica)
        case Batch():
            return (msg.seq, msg.timestamp, [(r.raw, r.auth) for r in msg.requests], msg.replica)
    raise TypeError(f"not a message: {msg!r}")


def encode_payload(msg: Message) -> bytes:
    if isinstance(msg, _Flat):
        return pack(msg)
    if isinstance(msg, Request):
        return msg.raw
    return pack(_fields(msg))


def frame(msg: Message, payload: bytes, auth: bytes) -> bytes:
    """Assemble one frame (without the transport's length prefix)."""
    if not 0 <= msg.sender <= SENDER_MAX:
        raise ValueError(f"sender id {msg.sender} does not fit the frame header")
    return HEADER.pack(VERSION, msg.TYPE, msg.sender, len(auth)) + auth + payload


# ---------------------------------------------------------------------------------------------
# Decoding


class Envelope(Immutable):
    """A frame split into its parts, not yet authenticated or decoded."""

    type: int
    sender: int
    auth: bytes
    payload: bytes


def split_frame(data: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Split a frame, refusing one longer than its type can be within ``limits`` (``bft.bounds``,
    step 1) before anything of it is authenticated or parsed."""
    if len(data) > limits.frame_bytes_max:
        raise DecodeError("frame-too-large")
    if len(data) < HEADER.size:
        raise DecodeError("short-frame")
    version, type_, sender, auth_len = HEADER.unpack_from(data)
    if version != VERSION:
        raise DecodeError("bad-version")
    payload_max, auth_max = _bounds(limits)
    if type_ not in payload_max:
        raise DecodeError("unknown-type")
    end = HEADER.size + auth_len
    if end > len(data):
        raise DecodeError("short-frame")
    if auth_len > auth_max:
        raise DecodeError("auth-too-large")
    if len(data) - end > payload_max[type_]:
        raise DecodeError("payload-too-large")
    return Envelope(type_, sender, bytes(data[HEADER.size:end]), bytes(data[end:]))


# The largest payload of each type within the limits (``bft.bounds``, step 1).
_I, _D = INT_BYTES_MAX, DIGEST_FIELD_BYTES
_PAYLOAD_BYTES_MAX = {
    Request.TYPE: request_bytes_max,
    PrePrepare.TYPE: lambda lim: batch_bytes_max(lim, 3),
    Prepare.TYPE: lambda lim: array_bytes_max(_I, _I, _D, _I),
    Commit.TYPE: lambda lim: array_bytes_max(_I, _I, _D, _I),
    Reply.TYPE: lambda lim: array_bytes_max(_I, _I, _I, _I, bin_bytes_max(lim.op_bytes_max), BOOL_BYTES, BOOL_BYTES),
    Checkpoint.TYPE: lambda lim: array_bytes_max(_I, _D, _I),
    Status.TYPE: lambda lim: array_bytes_max(_I, _I, _I, BOOL_BYTES, _I),
    ViewChange.TYPE: view_change_bytes_max,
    NewView.TYPE: new_view_bytes_max,
    FetchState.TYPE: lambda lim: array_bytes_max(_I, _I),
    State.TYPE: lambda lim: array_bytes_max(_I, bin_bytes_max(lim.snapshot_bytes_max), _I),
    Suspect.TYPE: lambda lim: array_bytes_max(_I, _I),
    Batch.TYPE: lambda lim: batch_bytes_max(lim, 2),
    FetchBatch.TYPE: lambda lim: array_bytes_max(_I, _D, _I),
    FetchPartition.TYPE: lambda lim: array_bytes_max(_I, _I, _I, _I),
    Partition.TYPE: lambda lim: array_bytes_max(_I, _I, _I, _I, bin_bytes_max(lim.chunk_bytes_max), _I),
}


@functools.lru_cache(maxsize=1024)  # a process may hold a Wire per client it runs
def _bounds(limits: Limits) -> tuple[dict[int, int], int]:
    """Each type's largest payload and the largest authenticator within ``limits``: worked out
    once per set of limits, not for every frame."""
    return {t: f(limits) for t, f in _PAYLOAD_BYTES_MAX.items()}, auth_bytes_max(limits)


_REQUEST = fields_decoder(UINT, UINT, bytes, bool, UINT, UINT)
_REQUEST_UNSETTLED = fields_decoder(UINT, UINT, bytes, bool, UINT)  # as encoded before ``settled``
_VOTE = fields_decoder(UINT, UINT, DIGEST, UINT)  # a PREPARE's or a COMMIT's
_REPLY = fields_decoder(UINT, UINT, UINT, UINT, bytes, bool, bool)


def decode_request(raw: bytes, auth: bytes, limits: Limits = DEFAULT_LIMITS) -> Request:
    try:
        client, timestamp, op, read_only, repliers, settled = typed_fields(_REQUEST, raw)
    except DecodeError as exc:
        # An older release's request (a promise log written by it, or its client): nothing settled.
        try:
            client, timestamp, op, read_only, repliers = typed_fields(_REQUEST_UNSETTLED, raw)
        except DecodeError:
            raise exc from None
        settled = 0
    if len(op) > limits.op_bytes_max:
        raise DecodeError("bad-bytes")
    if repliers >> limits.replicas_max:
        raise DecodeError("bad-repliers")
    return Request(client, timestamp, op, read_only, repliers, settled, raw, digest(raw), auth)


def _reply(payload: bytes, lim: Limits) -> Reply:
    f = typed_fields(_REPLY, payload)
    if len(f[4]) > lim.op_bytes_max:
        raise DecodeError("bad-bytes")
    return Reply(*f)


def _requests(r: Reader, lim: Limits, refs: bool = False) -> tuple[Request | bytes, ...]:
    reqs: list[Request | bytes] = []
    raw_max, auth_max = request_bytes_max(lim), auth_bytes_max(lim)
    for _ in range(r.array(lim.batch_len_max, "requests")):
        shape = r.header()
        if refs and shape == 1:
            reqs.append(r.digest())  # a large request, by reference
        elif shape == 2:
            raw, auth = r.blob(raw_max), r.blob(auth_max)
            reqs.append(decode_request(raw, auth, lim))
        else:
            raise DecodeError("bad-shape")
    return tuple(reqs)


def _pre_prepare(r: Reader, lim: Limits) -> PrePrepare:
    view, seq, ts = r.fixed(5).integer(), r.integer(), r.integer(INT_MIN, INT_MAX)
    requests = _requests(r, lim, refs=True)
    return PrePrepare(view, seq, ts, requests, r.integer(), batch_digest(ts, requests))


def _batch(r: Reader, lim: Limits) -> Batch:
    seq, ts = r.fixed(4).integer(), r.integer(INT_MIN, INT_MAX)
    requests = _requests(r, lim)
    return Batch(seq, ts, requests, r.integer(), batch_digest(ts, requests))


def _view_change(r: Reader, lim: Limits) -> ViewChange:
    view, stable = r.fixed(6).integer(), r.integer()
    ckpts = tuple((r.fixed(2).integer(), r.digest()) for _ in range(r.array(lim.checkpoints_max, "checkpoints")))
    prepared = tuple(
        (r.fixed(3).integer(), r.digest(), r.integer()) for _ in range(r.array(lim.window_max, "prepared"))
    )
    preprepared = []
    for _ in range(r.array(lim.window_max, "preprepared")):
        seq = r.fixed(2).integer()
        count = r.array(lim.qset_digests_max, "qset-digests")
        preprepared.append((seq, tuple((r.fixed(2).digest(), r.integer()) for _ in range(count))))
    return ViewChange(view, stable, ckpts, prepared, tuple(preprepared), r.integer())


def _new_view(r: Reader, lim: Limits) -> NewView:
    view = r.fixed(5).integer()
    vcs = []
    for _ in range(r.array(lim.replicas_max, "view-changes")):
        raw, signature = r.fixed(2).blob(view_change_bytes_max(lim)), r.blob(SIGNATURE_BYTES)
        inner = Reader(raw)
        vc = _view_change(inner, lim)
        inner.end()
        vcs.append(replace(vc, raw=raw, signature=signature))
    checkpoint = (r.fixed(2).integer(), r.digest())
    decisions = tuple((r.fixed(2).integer(), r.digest()) for _ in range(r.array(lim.window_max, "decisions")))
    return NewView(view, tuple(vcs), checkpoint, decisions, r.integer())


# The messages of every operation, typed and checked by msgspec (``bft.bounds.typed_fields``).
_TYPED = {
    Prepare.TYPE: lambda payload, lim: Prepare(*typed_fields(_VOTE, payload)),
    Commit.TYPE: lambda payload, lim: Commit(*typed_fields(_VOTE, payload)),
    Reply.TYPE: _reply,
}
# The other messages that are one array of scalars: (arity, the message from its fields).
_FLAT = {
    Checkpoint.TYPE: (3, lambda f, lim: Checkpoint(as_int(f[0]), as_digest(f[1]), as_int(f[2]))),
    Status.TYPE: (5, lambda f, lim: Status(as_int(f[0]), as_int(f[1]), as_int(f[2]), as_bool(f[3]), as_int(f[4]))),
    FetchState.TYPE: (2, lambda f, lim: FetchState(as_int(f[0]), as_int(f[1]))),
    State.TYPE: (3, lambda f, lim: State(as_int(f[0]), as_bytes(f[1], lim.snapshot_bytes_max), as_int(f[2]))),
    Suspect.TYPE: (2, lambda f, lim: Suspect(as_int(f[0]), as_int(f[1]))),
    FetchBatch.TYPE: (3, lambda f, lim: FetchBatch(as_int(f[0]), as_digest(f[1]), as_int(f[2]))),
    FetchPartition.TYPE: (4, lambda f, lim: FetchPartition(as_int(f[0]), as_int(f[1]), as_int(f[2]), as_int(f[3]))),
    Partition.TYPE: (6, lambda f, lim: Partition(
        as_int(f[0]), as_int(f[1]), as_int(f[2]), as_int(f[3]), as_bytes(f[4], lim.chunk_bytes_max), as_int(f[5])
    )),
}
# Messages with lists, read from a stream with each list's bound.
_NESTED = {PrePrepare.TYPE: _pre_prepare, Batch.TYPE: _batch, ViewChange.TYPE: _view_change, NewView.TYPE: _new_view}


def decode_payload(env: Envelope, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode an envelope's payload; the message's own sender field must match the frame's."""
    if env.type == Request.TYPE:
        msg: Message = decode_request(env.payload, env.auth, limits)
    elif env.type in _TYPED:
        msg = _TYPED[env.type](env.payload, limits)
    elif env.type in _FLAT:
        arity, make = _FLAT[env.type]
        msg = make(flat_fields(env.payload, arity), limits)
    else:
        r = Reader(env.payload)
        msg = _NESTED[env.type](r, limits)
        r.end()
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

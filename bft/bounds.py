"""Decoding only what the protocol allows, refused before anything is allocated for the excess.

A peer (a Byzantine replica holds real keys, so its frames authenticate) can make every list of
a message as long as the codec lets it; the protocol itself allows far less: n view changes in a
NEW-VIEW, L entries in a VIEW-CHANGE's P and Q sets, a few digests per Q entry, a batch of
``batch_size_max`` requests. ``Limits`` holds those bounds, and decoding enforces them in two
steps (Aardvark's "decode only what the protocol allows"):

1. Before anything is parsed, and before the frame is authenticated: each message type has a
   largest encoding the bounds allow (added up below and in ``bft.messages`` from the widest
   msgpack encoding of every field), and a longer payload is refused at the cost of a comparison.
   With the default parameters and n = 4, a VIEW-CHANGE takes at most 73 KB and a NEW-VIEW
   305 KB; a 14 MB one is refused unread.
2. The payload is read as a stream (``Reader``): each array's length comes from its header and
   is checked against its bound before one element is unpacked, and where a field is a scalar no
   container is unpacked (msgpack would build whatever nesting a peer puts there: an empty list
   for each byte of the frame). Only a payload too short for that to matter is unpacked at once,
   msgpack's fast way (``flat_fields``). The messages of every operation (requests, prepares,
   commits, replies) are decoded by msgspec against their field types (``typed_fields``): in C,
   a container where a scalar belongs refused as it is met, at any size, and four times faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgpack
import msgspec

DIGEST_BYTES = 32
MAC_BYTES = 16
SIGNATURE_BYTES = 64
INT_MAX = (1 << 63) - 1
INT_MIN = -(1 << 63)
# Hard limits of the codec itself, and the defaults below: wide enough for any cluster.
FRAME_BYTES_MAX = 64 * 1024 * 1024
ARRAY_LEN_MAX = 1 << 16
REPLICAS_MAX = 256

# The widest msgpack encoding of each kind of field: a valid message need not be encoded
# canonically (a small int may come as an int64, a short array with a 32-bit length).
INT_BYTES_MAX = 9
HEADER_BYTES_MAX = 5  # array32 and bin32 headers
BOOL_BYTES = 1


def bin_bytes_max(length_max: int) -> int:
    return HEADER_BYTES_MAX + length_max


def array_bytes_max(*fields: int) -> int:
    """A fixed array of fields of these widest sizes."""
    return HEADER_BYTES_MAX + sum(fields)


def list_bytes_max(count_max: int, each: int) -> int:
    return HEADER_BYTES_MAX + count_max * each


DIGEST_FIELD_BYTES = bin_bytes_max(DIGEST_BYTES)
_I, _D = INT_BYTES_MAX, DIGEST_FIELD_BYTES
# A payload this short makes msgpack build at most this many containers (some 20 KB): it is
# unpacked at once; a longer one is read field by field, which costs a microsecond more.
SMALL_PAYLOAD_BYTES = 256


class DecodeError(ValueError):
    """A peer sent something that is not a well-formed message; the reason is a short label."""


@dataclass(frozen=True, slots=True, eq=False)
class Limits:
    """Bounds enforced while decoding, before anything is allocated for the data. The defaults
    are the codec's own; replicas and clients decode with their cluster's protocol bounds
    (``bft.runtime.wire.limits_of``). Compared and hashed by identity: the bounds worked out
    from them are cached per object (``bft.messages``), and a field-by-field hash for every
    frame cost more than the lookup saved."""

    frame_bytes_max: int = 16 * 1024 * 1024
    op_bytes_max: int = 8 * 1024 * 1024
    batch_len_max: int = 1024
    snapshot_bytes_max: int = FRAME_BYTES_MAX - 1024
    replicas_max: int = REPLICAS_MAX  # n: view changes in a NEW-VIEW, tags in an authenticator
    window_max: int = ARRAY_LEN_MAX  # L: P and Q entries of a VIEW-CHANGE, decisions of a NEW-VIEW
    checkpoints_max: int = ARRAY_LEN_MAX  # C entries of a VIEW-CHANGE (L/K + 2)
    qset_digests_max: int = ARRAY_LEN_MAX  # digests of one Q entry
    chunk_bytes_max: int = FRAME_BYTES_MAX - 1024  # data of one PARTITION


DEFAULT_LIMITS = Limits()


# The largest payloads of the messages with lists or large fields (``bft.messages`` has the rest).


def auth_bytes_max(lim: Limits) -> int:
    """What authenticates a frame or a relayed request: at most a tag per replica and a signature."""
    return lim.replicas_max * MAC_BYTES + SIGNATURE_BYTES


def request_bytes_max(lim: Limits) -> int:
    return array_bytes_max(_I, _I, bin_bytes_max(lim.op_bytes_max), BOOL_BYTES, _I, _I)


def batch_bytes_max(lim: Limits, ints: int) -> int:
    """A PRE-PREPARE (3 ints before its requests) or a BATCH (2), every request inline."""
    inline = array_bytes_max(bin_bytes_max(request_bytes_max(lim)), bin_bytes_max(auth_bytes_max(lim)))
    return array_bytes_max(*(_I,) * ints, list_bytes_max(lim.batch_len_max, inline), _I)


def view_change_bytes_max(lim: Limits) -> int:
    q_entry = array_bytes_max(_I, list_bytes_max(lim.qset_digests_max, array_bytes_max(_D, _I)))
    return array_bytes_max(
        _I,
        _I,
        list_bytes_max(lim.checkpoints_max, array_bytes_max(_I, _D)),
        list_bytes_max(lim.window_max, array_bytes_max(_I, _D, _I)),
        list_bytes_max(lim.window_max, q_entry),
        _I,
    )


def new_view_bytes_max(lim: Limits) -> int:
    signed = array_bytes_max(bin_bytes_max(view_change_bytes_max(lim)), bin_bytes_max(SIGNATURE_BYTES))
    return array_bytes_max(
        _I,
        list_bytes_max(lim.replicas_max, signed),
        array_bytes_max(_I, _D),
        list_bytes_max(lim.window_max, array_bytes_max(_I, _D)),
        _I,
    )


def as_int(v: object, lo: int = 0, hi: int = INT_MAX) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise DecodeError("bad-int")
    return v


def as_bytes(v: object, max_len: int, exact: int | None = None) -> bytes:
    if type(v) is not bytes or len(v) > max_len or (exact is not None and len(v) != exact):
        raise DecodeError("bad-bytes")
    return v


def as_digest(v: object) -> bytes:
    return as_bytes(v, DIGEST_BYTES, DIGEST_BYTES)


def as_bool(v: object) -> bool:
    if type(v) is not bool:
        raise DecodeError("bad-bool")
    return v


# Fields of the typed decoders: an int in as_int's default range, a digest of its exact size.
UINT = Annotated[int, msgspec.Meta(ge=0, le=INT_MAX)]
DIGEST = Annotated[bytes, msgspec.Meta(min_length=DIGEST_BYTES, max_length=DIGEST_BYTES)]
# What msgspec's validation errors name ("Expected `int` >= 0 - at `$[1]`"), as the reasons the
# hand-written checks above give.
_REASONS = {"int": "bad-int", "bytes": "bad-bytes", "bool": "bad-bool", "array": "bad-shape"}


def fields_decoder(*types: object) -> msgspec.msgpack.Decoder:
    """A decoder of one array of exactly these field types (``UINT``, ``DIGEST``, bytes, bool)."""
    return msgspec.msgpack.Decoder(tuple[types])  # type: ignore[valid-type]


def typed_fields(decoder: msgspec.msgpack.Decoder, payload: bytes) -> tuple:
    """The fields of ``payload`` as ``decoder`` types them, or ``DecodeError`` with the reason the
    checks above would give. Bytes fields are bounded by the frame only: check their length."""
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        kind = str(exc).split("`", 2)[1] if "`" in str(exc) else ""
        raise DecodeError(_REASONS.get(kind, "bad-shape")) from exc
    except msgspec.DecodeError as exc:
        raise DecodeError("bad-msgpack") from exc


def flat_fields(payload: bytes, arity: int) -> list:
    """The fields of a message that is one array of ``arity`` scalars (to be checked)."""
    if len(payload) > SMALL_PAYLOAD_BYTES:
        r = Reader(payload).fixed(arity)
        fields = [r.value() for _ in range(arity)]
        r.end()
        return fields
    try:
        fields = msgpack.unpackb(payload, max_array_len=arity, max_map_len=0, max_str_len=0, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise DecodeError("bad-msgpack") from exc
    if type(fields) is not list or len(fields) != arity:
        raise DecodeError("bad-shape")
    return fields


class Reader:
    """One msgpack payload, read field by field (see the module's docstring, step 2)."""

    __slots__ = ("_size", "_unpacker")

    def __init__(self, payload: bytes) -> None:
        self._size = len(payload)
        # No container may be unpacked whole (max_array_len=0, max_map_len=0): arrays are read
        # by their headers; a non-empty one where a scalar belongs is refused unread. A byte
        # string is bounded by the payload, whose length step 1 bounded.
        self._unpacker = msgpack.Unpacker(
            max_buffer_size=max(len(payload), 1),
            max_bin_len=len(payload),
            max_str_len=0,
            max_array_len=0,
            max_map_len=0,
            max_ext_len=0,
        )
        self._unpacker.feed(payload)

    def header(self) -> int:
        """The length of the array that comes next (its elements follow, one read each)."""
        try:
            return self._unpacker.read_array_header()
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise DecodeError("bad-msgpack") from exc

    def fixed(self, length: int) -> Reader:
        """An array of exactly ``length`` fields comes next (read on from the reader returned)."""
        if self.header() != length:
            raise DecodeError("bad-shape")
        return self

    def array(self, count_max: int, what: str) -> int:
        """A list of at most ``count_max`` elements (the protocol's bound) comes next."""
        count = self.header()
        if count > count_max:
            raise DecodeError(f"too-many-{what}")
        return count

    def value(self) -> object:
        try:
            return self._unpacker.unpack()
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise DecodeError("bad-msgpack") from exc

    def integer(self, lo: int = 0, hi: int = INT_MAX) -> int:
        return as_int(self.value(), lo, hi)

    def blob(self, max_len: int, exact: int | None = None) -> bytes:
        return as_bytes(self.value(), max_len, exact)

    def digest(self) -> bytes:
        return as_digest(self.value())

    def flag(self) -> bool:
        return as_bool(self.value())

    def end(self) -> None:
        """Nothing may follow the message."""
        if self._unpacker.tell() != self._size:
            raise DecodeError("bad-msgpack")

"""The message codec: round trips for every message type, fuzzing, and the decoder's limits."""

from __future__ import annotations

import operator
import tracemalloc
import typing
from collections import Counter
from dataclasses import replace

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec.structs import replace as evolve

from bft.bounds import auth_bytes_max
from bft.core.params import DEFAULT_PARAMS
from bft.core.promises import RecordDamaged, Stable, decode_record, encode_record
from bft.messages import (
    DEFAULT_LIMITS,
    DIGEST_BYTES,
    HEADER,
    INT_MAX,
    NULL_DIGEST,
    SIGNATURE_BYTES,
    VERSION,
    Batch,
    Checkpoint,
    Commit,
    DecodeError,
    Envelope,
    FetchBatch,
    FetchPartition,
    FetchState,
    Limits,
    Message,
    NewView,
    Partition,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    State,
    Status,
    Suspect,
    ViewChange,
    _fields,
    batch_digest,
    decode_payload,
    encode_payload,
    frame,
    roundtrip,
    split_frame,
)
from bft.runtime.wire import limits_of

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUNDTRIP = settings(max_examples=60, deadline=None)

# ---------------------------------------------------------------------------------------------
# Strategies

u63 = st.integers(min_value=0, max_value=INT_MAX)
# A message's sender also goes into the frame header, which holds it as an unsigned 32-bit int.
sender_ids = st.integers(min_value=0, max_value=2**32 - 1)
digests = st.binary(min_size=DIGEST_BYTES, max_size=DIGEST_BYTES)
small_bytes = st.binary(max_size=64)
pp_timestamps = st.integers(min_value=-INT_MAX, max_value=INT_MAX)

requests = st.builds(Request.make, sender_ids, u63, small_bytes, st.booleans())
authed_requests = st.builds(lambda r, a: r.with_auth(a), requests, st.binary(max_size=64))


def _tuples(elem: st.SearchStrategy, max_size: int = 4) -> st.SearchStrategy:
    return st.lists(elem, max_size=max_size).map(tuple)


view_changes = st.builds(
    ViewChange,
    u63,
    u63,
    _tuples(st.tuples(u63, digests)),
    _tuples(st.tuples(u63, digests, u63)),
    _tuples(st.tuples(u63, _tuples(st.tuples(digests, u63), 3))),
    sender_ids,
)
signed_view_changes = st.builds(
    lambda vc, sig: ViewChange(
        vc.view, vc.stable, vc.checkpoints, vc.prepared, vc.preprepared, vc.replica, encode_payload(vc), sig
    ),
    view_changes,
    st.binary(min_size=SIGNATURE_BYTES, max_size=SIGNATURE_BYTES),
)
pre_prepares = st.builds(PrePrepare.make, u63, u63, pp_timestamps, _tuples(authed_requests, 5), sender_ids)

STRATEGIES: dict[type, st.SearchStrategy] = {
    Request: authed_requests,
    PrePrepare: pre_prepares,
    Batch: st.builds(Batch.of, pre_prepares, sender_ids),
    FetchBatch: st.builds(FetchBatch, u63, digests, sender_ids),
    Prepare: st.builds(Prepare, u63, u63, digests, sender_ids),
    Commit: st.builds(Commit, u63, u63, digests, sender_ids),
    Reply: st.builds(Reply, u63, u63, u63, sender_ids, small_bytes, st.booleans(), st.booleans()),
    Checkpoint: st.builds(Checkpoint, u63, digests, sender_ids),
    Status: st.builds(Status, u63, u63, u63, st.booleans(), sender_ids),
    ViewChange: view_changes | signed_view_changes,
    NewView: st.builds(
        NewView,
        u63,
        _tuples(view_changes | signed_view_changes, 3),
        st.tuples(u63, digests),
        _tuples(st.tuples(u63, digests | st.just(NULL_DIGEST))),
        sender_ids,
    ),
    FetchState: st.builds(FetchState, u63, sender_ids),
    State: st.builds(State, u63, st.binary(max_size=256), sender_ids),
    Suspect: st.builds(Suspect, u63, sender_ids),
    FetchPartition: st.builds(FetchPartition, u63, u63, u63, sender_ids),
    Partition: st.builds(Partition, u63, u63, u63, u63, st.binary(max_size=256), sender_ids),
}
ALL_TYPES = list(typing.get_args(Message))
TYPE_CODES = sorted(cls.TYPE for cls in ALL_TYPES)
messages = st.one_of(*STRATEGIES.values())


def _frame(msg: Message, auth: bytes = b"") -> bytes:
    if isinstance(msg, Request):
        auth = auth or msg.auth
    if isinstance(msg, ViewChange):
        auth = auth or msg.signature
    return frame(msg, encode_payload(msg), auth)


def _decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    return decode_payload(split_frame(data, limits), limits)


def _reason(data: bytes, limits: Limits = DEFAULT_LIMITS) -> str:
    with pytest.raises(DecodeError) as exc_info:
        _decode(data, limits)
    return str(exc_info.value)


def _raw_frame(type_: int, sender: int, payload: bytes, auth: bytes = b"", version: int = VERSION) -> bytes:
    return HEADER.pack(version, type_, sender, len(auth)) + auth + payload


# ---------------------------------------------------------------------------------------------
# Round trips


def test_strategies_cover_every_message_type():
    assert set(STRATEGIES) == set(ALL_TYPES)
    assert len({cls.TYPE for cls in ALL_TYPES}) == len(ALL_TYPES)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@ROUNDTRIP
@given(data=st.data())
def test_roundtrip(cls, data):
    msg = data.draw(STRATEGIES[cls])
    out = roundtrip(msg)
    assert type(out) is type(msg)
    assert out == msg
    assert out.sender == msg.sender
    if isinstance(msg, Request):
        assert out.raw == msg.raw
        assert out.digest == msg.digest
        assert out.auth == msg.auth
    if isinstance(msg, PrePrepare | Batch):
        assert out.digest == msg.digest == batch_digest(msg.timestamp, msg.requests)
        assert len(out.requests) == len(msg.requests)
        for got, sent in zip(out.requests, msg.requests, strict=True):
            assert got.raw == sent.raw
            assert got.digest == sent.digest
            assert got.auth == sent.auth
    if isinstance(msg, ViewChange):
        # The decoder keeps the signed encoding and the signature (the frame's auth).
        assert out.raw == encode_payload(msg)
        assert out.signature == msg.signature
    if isinstance(msg, NewView):
        for got, sent in zip(out.view_changes, msg.view_changes, strict=True):
            assert type(got) is ViewChange
            assert got == sent
            assert got.raw == (sent.raw or encode_payload(sent))
            assert got.signature == sent.signature


@FUZZ
@given(msg=messages, auth=st.binary(max_size=80))
def test_split_frame_recovers_header_and_auth(msg, auth):
    data = frame(msg, encode_payload(msg), auth)
    env = split_frame(data)
    assert env == Envelope(msg.TYPE, msg.sender, auth, encode_payload(msg))


@FUZZ
@given(msg=messages)
def test_encoding_is_msgpacks(msg):
    # The encoder is msgspec's, for speed; what it writes must stay msgpack-python's bytes, which
    # older releases wrote and the promise logs on disk hold.
    if isinstance(msg, Request):
        expected = msg.raw
    elif isinstance(msg, PrePrepare | ViewChange | NewView | Batch):
        expected = msgpack.packb(_fields(msg))
    else:  # the others are the array of their fields, in order
        expected = msgpack.packb(msgspec.structs.astuple(msg))
    assert encode_payload(msg) == expected
    if isinstance(msg, Request):
        assert msg.raw == msgpack.packb((msg.client, msg.timestamp, msg.op, msg.read_only, msg.repliers, msg.settled))


@FUZZ
@given(req=requests, auth=st.binary(max_size=128))
def test_request_keeps_raw_and_auth(req, auth):
    req = req.with_auth(auth)
    assert encode_payload(req) == req.raw
    out = roundtrip(req)
    assert out == req
    assert out.auth == auth
    assert out.raw == req.raw


@FUZZ
@given(req=requests, auth=st.binary(min_size=1, max_size=64))
def test_what_proves_a_message_does_not_make_it_another(req, auth):
    # Its encoding, digest, tag and signature are left out of ==, != and hash; what it says is not.
    tagged = req.with_auth(auth)
    assert tagged == req and operator.ne(tagged, req) is False and hash(tagged) == hash(req)
    other = evolve(req, timestamp=req.timestamp + 1)
    assert other != req and operator.eq(other, req) is False
    vc = ViewChange(1, 0, (), (), (), 2)
    signed = evolve(vc, raw=encode_payload(vc), signature=auth)
    assert signed == vc and operator.ne(signed, vc) is False and hash(signed) == hash(vc)
    assert evolve(vc, stable=1) != vc
    assert "auth" not in repr(tagged) and "signature" not in repr(signed)


@FUZZ
@given(reqs=_tuples(requests, 4), auths=st.lists(st.binary(max_size=64), min_size=4, max_size=4), ts=pp_timestamps)
def test_pre_prepare_carries_each_client_authenticator(reqs, auths, ts):
    reqs = tuple(r.with_auth(a) for r, a in zip(reqs, auths, strict=False))
    pp = PrePrepare.make(3, 7, ts, reqs, 1)
    out = roundtrip(pp)
    assert [r.auth for r in out.requests] == [r.auth for r in reqs]
    assert out.digest == pp.digest


def test_batch_of_pre_prepare_keeps_digest():
    pp = PrePrepare.make(2, 9, 77, (Request.make(0, 1, b"a"), Request.make(1, 1, b"b")), 2)
    batch = Batch.of(pp, 3)
    out = roundtrip(batch)
    assert out == batch
    assert out.sender == 3
    assert (out.seq, out.timestamp, out.requests) == (pp.seq, pp.timestamp, pp.requests)
    assert out.digest == pp.digest


def test_new_view_carries_signed_view_changes_verbatim():
    vc = ViewChange(4, 128, ((128, bytes(32)),), (), (), 2)
    # A non-canonical but valid encoding of the same view change (a uint64 for the view).
    raw = b"\x96\xcf" + (4).to_bytes(8, "big") + encode_payload(vc)[2:]
    assert raw != encode_payload(vc)
    carried = ViewChange(4, 128, ((128, bytes(32)),), (), (), 2, raw, b"s" * SIGNATURE_BYTES)
    nv = NewView(4, (carried, vc), (128, bytes(32)), ((129, NULL_DIGEST),), 0)
    out = roundtrip(nv)
    assert out == nv
    assert out.view_changes[0].raw == raw  # exactly the bytes that were signed
    assert out.view_changes[0].signature == b"s" * SIGNATURE_BYTES
    assert out.view_changes[1].raw == encode_payload(vc)
    assert out.view_changes[1].signature == b""


def test_batch_digest_depends_on_timestamp_and_order():
    a, b = Request.make(0, 1, b"a"), Request.make(1, 1, b"b")
    d = PrePrepare.make(0, 1, 5, (a, b), 0).digest
    assert len(d) == DIGEST_BYTES
    assert PrePrepare.make(0, 1, 6, (a, b), 0).digest != d
    assert PrePrepare.make(0, 1, 5, (b, a), 0).digest != d
    assert PrePrepare.make(9, 9, 5, (a, b), 2).digest == d  # view, seq and primary are not in it


def test_negative_pre_prepare_timestamp_roundtrips():
    pp = PrePrepare.make(0, 1, -INT_MAX, (Request.make(0, 0, b"x"),), 0)
    out = roundtrip(pp)
    assert out == pp
    assert out.timestamp == -INT_MAX
    assert out.digest == pp.digest


# ---------------------------------------------------------------------------------------------
# Fuzzing: anything a peer sends either decodes or raises DecodeError


def _decode_or_reject(data: bytes) -> Message | None:
    try:
        env = split_frame(data)
        msg = decode_payload(env)
    except DecodeError:
        return None
    # Whatever decodes is a well-formed message consistent with its header, and stable.
    assert env.type == type(msg).TYPE
    assert msg.sender == env.sender
    assert roundtrip(msg) == msg
    return msg


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data):
    _decode_or_reject(data)


@FUZZ
@given(
    version=st.sampled_from([VERSION, VERSION, VERSION, 0, 2, 255]),
    type_=st.integers(0, 16),
    sender=st.integers(0, 3),
    auth=st.binary(max_size=32),
    auth_len_delta=st.sampled_from([0, 0, 0, 1, 100]),
    payload=st.binary(max_size=200),
)
def test_fuzz_random_payload_behind_plausible_header(version, type_, sender, auth, auth_len_delta, payload):
    data = HEADER.pack(version, type_, sender, len(auth) + auth_len_delta) + auth + payload
    _decode_or_reject(data)


msgpack_values = st.recursive(
    st.one_of(
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.binary(max_size=40),
        st.just(bytes(DIGEST_BYTES)),
        st.booleans(),
        st.none(),
        st.floats(allow_nan=False),
        st.text(max_size=3),
    ),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=2), children, max_size=2),
    max_leaves=16,
)


@FUZZ
@given(type_=st.sampled_from(TYPE_CODES), sender=st.integers(0, 3), fields=st.lists(msgpack_values, max_size=7))
def test_fuzz_random_msgpack_payloads_behind_every_types_header(type_, sender, fields):
    _decode_or_reject(_raw_frame(type_, sender, msgpack.packb(fields)))


def _edit(tree: object, data: st.DataObject) -> object:
    """``tree`` (a decoded payload) with one node, at any depth, replaced, removed or added."""
    if not isinstance(tree, list) or not tree or data.draw(st.integers(0, 3)) == 0:
        return data.draw(msgpack_values)
    out = list(tree)
    i = data.draw(st.integers(0, len(out) - 1))
    action = data.draw(st.sampled_from(["descend", "descend", "remove", "add"]))
    if action == "descend":
        out[i] = _edit(out[i], data)
    elif action == "remove":
        del out[i]
    else:
        out.insert(i, data.draw(msgpack_values))
    return out


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_fuzz_structured_payloads_of_every_type(cls):
    """A valid payload of each message type with up to three of its fields, at any depth,
    replaced by random values, removed or added to: the decoder's field checks of every type
    are reached. The run must have produced both messages of this type and rejections."""
    outcomes: Counter[str] = Counter()

    @FUZZ
    @given(msg=STRATEGIES[cls], edits=st.integers(0, 3), data=st.data())
    def fuzz(msg: Message, edits: int, data: st.DataObject) -> None:
        tree = msgpack.unpackb(encode_payload(msg))
        for _ in range(edits):
            tree = _edit(tree, data)
        auth = msg.auth if isinstance(msg, Request) else msg.signature if isinstance(msg, ViewChange) else b""
        decoded = _decode_or_reject(_raw_frame(cls.TYPE, msg.sender, msgpack.packb(tree), auth))
        if decoded is None:
            outcomes["rejected"] += 1
            assert edits, "an unedited payload must decode"
        else:
            outcomes[type(decoded).__name__] += 1
            assert edits or decoded == msg

    fuzz()
    assert outcomes[cls.__name__] and outcomes["rejected"], dict(outcomes)


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(min_value=0)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(1, 8)),
)


def _mutate(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        i = op[1] % (len(buf) + 1) if op[0] != "append" else 0
        if op[0] == "flip" and buf:
            buf[i % len(buf)] ^= op[2]
        elif op[0] == "truncate":
            del buf[i:]
        elif op[0] == "append":
            buf += op[1]
        elif op[0] == "insert":
            buf[i:i] = op[2]
        elif op[0] == "delete":
            del buf[i:i + op[2]]
    return bytes(buf)


@FUZZ
@given(msg=messages, auth=st.binary(max_size=48), ops=st.lists(mutations, min_size=1, max_size=4))
def test_fuzz_mutated_valid_frames(msg, auth, ops):
    data = _frame(msg, auth)
    _decode_or_reject(data)  # the unmutated frame decodes
    assert _decode(data) == msg
    _decode_or_reject(_mutate(data, ops))


@FUZZ
@given(msg=messages, data=st.data())
def test_fuzz_every_truncation_is_rejected_or_decodes(msg, data):
    frame_ = _frame(msg)
    cut = data.draw(st.integers(0, len(frame_) - 1))
    # Cutting into the header is always a short frame; cutting the payload never yields a message.
    if cut < HEADER.size:
        assert _reason(frame_[:cut]) == "short-frame"
    else:
        _decode_or_reject(frame_[:cut])
        with pytest.raises(DecodeError):
            _decode(frame_[:cut])


@FUZZ
@given(msg=messages, extra=st.binary(min_size=1, max_size=16))
def test_trailing_bytes_after_payload_are_rejected(msg, extra):
    with pytest.raises(DecodeError):
        _decode(_frame(msg) + extra)


# ---------------------------------------------------------------------------------------------
# Limits and malformed frames


def test_request_op_at_limit_accepted_and_over_limit_rejected():
    limit = DEFAULT_LIMITS.op_bytes_max
    ok = Request.make(1, 1, b"\x00" * limit)
    assert roundtrip(ok) == ok
    too_big = Request.make(1, 1, b"\x00" * (limit + 1))
    assert _reason(_frame(too_big)) == "bad-bytes"


def test_op_limit_with_configured_limits_also_applies_inside_pre_prepare_and_reply():
    limits = Limits(frame_bytes_max=1 << 16, op_bytes_max=100, batch_len_max=8, snapshot_bytes_max=1000)
    assert roundtrip(Request.make(0, 0, b"x" * 100), limits).op == b"x" * 100
    with pytest.raises(DecodeError):
        roundtrip(Request.make(0, 0, b"x" * 101), limits)
    with pytest.raises(DecodeError):
        roundtrip(PrePrepare.make(0, 1, 0, (Request.make(0, 0, b"x" * 101),), 0), limits)
    with pytest.raises(DecodeError):
        roundtrip(Reply(0, 0, 0, 1, b"r" * 101, False), limits)
    with pytest.raises(DecodeError):
        roundtrip(State(1, b"s" * 1001, 0), limits)
    assert roundtrip(State(1, b"s" * 1000, 0), limits).manifest == b"s" * 1000


def test_frame_larger_than_limit_is_rejected_before_anything_else():
    limit = DEFAULT_LIMITS.frame_bytes_max
    with pytest.raises(DecodeError, match=r"^frame-too-large$"):
        split_frame(b"\xff" * (limit + 1))  # garbage header: the size check comes first
    big = State(1, b"s" * limit, 0)
    with pytest.raises(DecodeError, match=r"^frame-too-large$"):
        split_frame(_frame(big))


def test_frame_of_exactly_the_limit_is_accepted():
    def state_frame(size: int) -> bytes:
        return _frame(State(5, b"s" * size, 2))

    base = len(state_frame(1000)) - 1000  # same msgpack bin16 header for both sizes
    limits = Limits(frame_bytes_max=3000, op_bytes_max=100, batch_len_max=4, snapshot_bytes_max=60000)
    exact = state_frame(3000 - base)
    assert len(exact) == 3000
    assert _decode(exact, limits) == State(5, b"s" * (3000 - base), 2)
    assert _reason(state_frame(3001 - base), limits) == "frame-too-large"


def test_batch_longer_than_limit_is_rejected():
    req = Request.make(0, 0, b"")
    n = DEFAULT_LIMITS.batch_len_max
    full = PrePrepare.make(0, 1, 0, (req,) * n, 0)
    assert len(roundtrip(full).requests) == n
    assert _reason(_frame(PrePrepare.make(0, 1, 0, (req,) * (n + 1), 0))) == "too-many-requests"

    limits = Limits(batch_len_max=3)
    assert len(roundtrip(PrePrepare.make(0, 1, 0, (req,) * 3, 0), limits).requests) == 3
    with pytest.raises(DecodeError):
        roundtrip(PrePrepare.make(0, 1, 0, (req,) * 4, 0), limits)
    assert len(roundtrip(Batch.of(PrePrepare.make(0, 1, 0, (req,) * 3, 0), 2), limits).requests) == 3
    with pytest.raises(DecodeError):
        roundtrip(Batch.of(PrePrepare.make(0, 1, 0, (req,) * 4, 0), 2), limits)


@pytest.mark.parametrize("type_", [0, 12, 18, 100, 255])
def test_unknown_type_byte(type_):
    assert _reason(_raw_frame(type_, 0, msgpack.packb([0]))) == "unknown-type"


@pytest.mark.parametrize("version", [0, VERSION + 1, 255])
def test_bad_version(version):
    good = _frame(Suspect(7, 3))
    assert _decode(good) == Suspect(7, 3)
    assert _reason(bytes([version]) + good[1:]) == "bad-version"


@pytest.mark.parametrize("cut", range(HEADER.size))
def test_short_header(cut):
    assert _reason(_frame(Suspect(7, 3))[:cut]) == "short-frame"


def test_auth_length_beyond_frame_is_short():
    data = _raw_frame(Suspect.TYPE, 3, b"", auth=b"a" * 10)[: HEADER.size + 9]
    assert _reason(data) == "short-frame"


VIEW_CHANGE = ViewChange(1, 0, ((0, bytes(32)),), ((3, bytes(32), 0),), ((3, ((bytes(32), 0),)),), 1)
SAMPLES = [
    Request.make(1, 2, b"op"),
    PrePrepare.make(0, 1, 7, (Request.make(1, 2, b"op"),), 1),
    Prepare(0, 1, bytes(32), 1),
    Commit(0, 1, bytes(32), 1),
    Reply(0, 2, 5, 1, b"r", True),
    Checkpoint(128, bytes(32), 1),
    Status(0, 0, 3, True, 1),
    VIEW_CHANGE,
    NewView(1, (VIEW_CHANGE, evolve(VIEW_CHANGE, replica=2)), (0, bytes(32)), ((1, NULL_DIGEST), (2, bytes(32))), 1),
    Batch.of(PrePrepare.make(0, 1, 7, (Request.make(1, 2, b"op"),), 0), 1),
    FetchBatch(1, bytes(32), 1),
    FetchState(128, 1),
    State(128, b"manifest", 1),
    Suspect(7, 1),
    FetchPartition(128, 3, 0, 1),
    Partition(128, 3, 0, 9, b"partition", 1),
]


def test_samples_cover_every_type():
    assert {type(m) for m in SAMPLES} == set(ALL_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_sender_mismatch(msg):
    assert roundtrip(msg) == msg
    payload = encode_payload(msg)
    assert _reason(_raw_frame(msg.TYPE, msg.sender + 1, payload)) == "sender-mismatch"


def _fields_of(msg: Message) -> list:
    return msgpack.unpackb(encode_payload(msg))


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_wrong_arity_is_rejected(msg):
    f = _fields_of(msg)
    short = f[:-2] if isinstance(msg, Request) else f[:-1]  # a request without settled is the old encoding
    for bad in (short, [*f, 0], []):
        with pytest.raises(DecodeError):
            decode_payload(Envelope(msg.TYPE, msg.sender, b"", msgpack.packb(bad)))


def _replace(fields: list, index: int, value: object) -> list:
    out = list(fields)
    out[index] = value
    return out


PREPARE = [0, 1, bytes(32), 2]
REQUEST = [1, 2, b"op", False, 0, 0]
REPLY = [0, 2, 5, 1, b"r", True, False]
VC_FIELDS = [1, 0, [], [], [], 2]
AUTH_MAX = auth_bytes_max(DEFAULT_LIMITS)  # a tag per replica and a signature

BAD_PAYLOADS = {
    # strings where bytes or ints belong
    "str-digest": (Prepare.TYPE, 2, msgpack.packb(_replace(PREPARE, 2, "x" * 32))),
    "empty-str-digest": (Prepare.TYPE, 2, msgpack.packb(_replace(PREPARE, 2, ""))),
    "str-view": (Prepare.TYPE, 2, msgpack.packb(_replace(PREPARE, 0, "0"))),
    "str-op": (Request.TYPE, 1, msgpack.packb(_replace(REQUEST, 2, "op"))),
    "str-result": (Reply.TYPE, 1, msgpack.packb(_replace(REPLY, 4, "r"))),
    # maps
    "map-payload": (Prepare.TYPE, 2, msgpack.packb({"view": 0})),
    "empty-map-payload": (Prepare.TYPE, 2, msgpack.packb({})),
    "map-field": (Prepare.TYPE, 2, msgpack.packb(_replace(PREPARE, 0, {}))),
    "map-request": (Request.TYPE, 1, msgpack.packb({"client": 1})),
    # wrong int types and ranges
    "bool-view": (Prepare.TYPE, 2, msgpack.packb(_replace(PREPARE, 0, True))),
    "float-view": (Prepare.TYPE, 2, msgpack.packb(_replace(PREPARE, 0, 0.0))),
    "nil-view": (Prepare.TYPE, 2, msgpack.packb(_replace(PREPARE, 0, None))),
    "negative-view": (Prepare.TYPE, 2, msgpack.packb(_replace(PREPARE, 0, -1))),
    "view-2**63": (Prepare.TYPE, 2, msgpack.packb(_replace(PREPARE, 0, 2**63))),
    "bool-sender": (Suspect.TYPE, 1, msgpack.packb([7, True])),
    "bytes-client": (Request.TYPE, 1, msgpack.packb(_replace(REQUEST, 0, b"\x01"))),
    "int-read-only": (Request.TYPE, 1, msgpack.packb(_replace(REQUEST, 3, 0))),
    "bool-repliers": (Request.TYPE, 1, msgpack.packb(_replace(REQUEST, 4, True))),
    "request-without-repliers": (Request.TYPE, 1, msgpack.packb(REQUEST[:4])),
    "bool-settled": (Request.TYPE, 1, msgpack.packb(_replace(REQUEST, 5, False))),
    "negative-settled": (Request.TYPE, 1, msgpack.packb(_replace(REQUEST, 5, -1))),
    "int-tentative": (Reply.TYPE, 1, msgpack.packb(_replace(REPLY, 5, 1))),
    # wrong shapes
    "short-digest": (Prepare.TYPE, 2, msgpack.packb(_replace(PREPARE, 2, bytes(31)))),
    "long-digest": (Prepare.TYPE, 2, msgpack.packb(_replace(PREPARE, 2, bytes(33)))),
    "list-digest": (Prepare.TYPE, 2, msgpack.packb(_replace(PREPARE, 2, [0] * 32))),
    "scalar-payload": (Suspect.TYPE, 1, msgpack.packb(1)),
    "bytes-payload": (Suspect.TYPE, 1, msgpack.packb(b"\x01")),
    "empty-payload": (Suspect.TYPE, 1, b""),
    "ext-type": (Suspect.TYPE, 1, msgpack.packb([7, msgpack.ExtType(1, b"\x01")])),
    "truncated-msgpack": (Prepare.TYPE, 2, msgpack.packb(PREPARE)[:-1]),
    "int-view-changing": (Status.TYPE, 1, msgpack.packb([0, 0, 3, 1, 1])),
    "null-checkpoint-digest": (NewView.TYPE, 1, msgpack.packb([1, [], [0, b""], [], 1])),
    "decision-digest-31": (NewView.TYPE, 1, msgpack.packb([1, [], [0, bytes(32)], [[1, bytes(31)]], 1])),
    "decision-digest-empty": (NewView.TYPE, 1, msgpack.packb([1, [], [0, bytes(32)], [[1, b""]], 1])),
    "nv-vc-not-bytes": (NewView.TYPE, 1, msgpack.packb([1, [[VC_FIELDS, b""]], [0, bytes(32)], [], 1])),
    "nv-vc-garbage": (NewView.TYPE, 1, msgpack.packb([1, [[b"\xc1", b""]], [0, bytes(32)], [], 1])),
    "nv-vc-is-a-prepare": (NewView.TYPE, 1, msgpack.packb([1, [[msgpack.packb(PREPARE), b""]], [0, bytes(32)], [], 1])),
    "nv-vc-signature-too-long": (
        NewView.TYPE, 1, msgpack.packb([1, [[msgpack.packb(VC_FIELDS), bytes(65)]], [0, bytes(32)], [], 1])
    ),
    "nv-vc-entry-arity": (NewView.TYPE, 1, msgpack.packb([1, [[msgpack.packb(VC_FIELDS)]], [0, bytes(32)], [], 1])),
    "batch-request-not-bytes": (Batch.TYPE, 1, msgpack.packb([1, 0, [[REQUEST, b""]], 1])),
    "batch-negative-seq": (Batch.TYPE, 1, msgpack.packb([-1, 0, [], 1])),
    "fetch-batch-short-digest": (FetchBatch.TYPE, 1, msgpack.packb([1, bytes(31), 1])),
    "vc-entry-arity": (ViewChange.TYPE, 1, msgpack.packb([1, 0, [[0]], [], [], 1])),
    "pp-request-not-bytes": (PrePrepare.TYPE, 1, msgpack.packb([0, 1, 0, [[REQUEST, b""]], 1])),
    "pp-request-str": (PrePrepare.TYPE, 1, msgpack.packb([0, 1, 0, [["x", b""]], 1])),
    "pp-auth-too-long": (
        PrePrepare.TYPE, 1, msgpack.packb([0, 1, 0, [[msgpack.packb(REQUEST), bytes(AUTH_MAX + 1)]], 1])
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PAYLOADS))
def test_malformed_payload_is_rejected(case):
    type_, sender, payload = BAD_PAYLOADS[case]
    with pytest.raises(DecodeError) as exc_info:
        decode_payload(Envelope(type_, sender, b"", payload))
    assert str(exc_info.value) in {"bad-msgpack", "bad-shape", "bad-int", "bad-bytes", "bad-bool"}


def test_request_asking_replicas_beyond_n_is_rejected():
    four = replace(DEFAULT_LIMITS, replicas_max=4)
    ok = Request.make(1, 2, b"op", repliers=0b1011)
    assert decode_payload(Envelope(Request.TYPE, 1, b"", ok.raw), four) == ok
    assert [ok.asks(i) for i in range(4)] == [True, True, False, True]
    with pytest.raises(DecodeError, match="bad-repliers"):
        decode_payload(Envelope(Request.TYPE, 1, b"", msgpack.packb(_replace(REQUEST, 4, 1 << 4))), four)


def test_designated_replica_is_one_asked():
    # Turns with the timestamp among the replicas asked; all asked when none is named.
    assert [Request.make(0, ts, b"").designated(4) for ts in range(4)] == [0, 1, 2, 3]
    assert [Request.make(0, ts, b"", repliers=0b1101).designated(4) for ts in range(4)] == [0, 2, 2, 3]


def test_bad_payload_controls_are_valid():
    # The malformed payloads above differ from these in one field only.
    assert decode_payload(Envelope(Prepare.TYPE, 2, b"", msgpack.packb(PREPARE))) == Prepare(0, 1, bytes(32), 2)
    assert decode_payload(Envelope(Request.TYPE, 1, b"", msgpack.packb(REQUEST))) == Request.make(1, 2, b"op")
    # As an older release encoded it (its promise logs, its clients): nothing settled.
    old = decode_payload(Envelope(Request.TYPE, 1, b"", msgpack.packb(REQUEST[:5])))
    assert old == Request.make(1, 2, b"op") and old.settled == 0 and old.raw == msgpack.packb(REQUEST[:5])
    assert decode_payload(Envelope(Reply.TYPE, 1, b"", msgpack.packb(REPLY))) == Reply(0, 2, 5, 1, b"r", True)
    ok_pp = [0, 1, 0, [[msgpack.packb(REQUEST), bytes(AUTH_MAX)]], 1]
    assert len(decode_payload(Envelope(PrePrepare.TYPE, 1, b"", msgpack.packb(ok_pp))).requests) == 1
    assert decode_payload(Envelope(PrePrepare.TYPE, 1, b"", msgpack.packb([0, 1, -INT_MAX, [], 1]))).timestamp == (
        -INT_MAX
    )
    ok_nv = [1, [[msgpack.packb(VC_FIELDS), bytes(64)]], [0, bytes(32)], [[1, NULL_DIGEST]], 1]
    nv = decode_payload(Envelope(NewView.TYPE, 1, b"", msgpack.packb(ok_nv)))
    assert nv.view_changes == (ViewChange(1, 0, (), (), (), 2),)
    assert decode_payload(Envelope(Status.TYPE, 1, b"", msgpack.packb([0, 0, 3, False, 1]))).view_changing is False


def test_int_fields_accept_full_63_bit_range():
    msg = Status(INT_MAX, INT_MAX, INT_MAX, False, 2**32 - 1)
    assert roundtrip(msg) == msg
    assert roundtrip(Reply(INT_MAX, INT_MAX, INT_MAX, 0, b"", False)).client == INT_MAX


def test_header_sender_is_32_bit():
    assert _frame(Suspect(7, 2**32 - 1))[2:6] == b"\xff\xff\xff\xff"
    assert _reason(_raw_frame(Suspect.TYPE, 2**32 - 1, msgpack.packb([7, 2**32]))) == "sender-mismatch"


# ---------------------------------------------------------------------------------------------
# The protocol's bounds (bft.bounds): a message at every bound decodes; one over is refused, by
# its length before it is parsed, or at the header of the list that is too long

TIGHT = Limits(
    frame_bytes_max=1 << 20, op_bytes_max=40, batch_len_max=3, snapshot_bytes_max=50, replicas_max=4,
    window_max=3, checkpoints_max=2, qset_digests_max=2, chunk_bytes_max=30,
)
TIGHT_AUTH = auth_bytes_max(TIGHT)
D32 = bytes(range(32))


def _widest(obj: object) -> bytes:
    """``obj`` with every value in msgpack's widest encoding: valid, and as long as it can be."""
    if type(obj) is bool:
        return b"\xc3" if obj else b"\xc2"
    if type(obj) is int:
        return b"\xd3" + obj.to_bytes(8, "big", signed=True)
    if type(obj) is bytes:
        return b"\xc6" + len(obj).to_bytes(4, "big") + obj
    assert type(obj) is list
    return b"\xdd" + len(obj).to_bytes(4, "big") + b"".join(map(_widest, obj))


def _full_request(ts: int) -> list:
    return [7, ts, b"o" * TIGHT.op_bytes_max, True, 0, ts]


def _vc(replica: int = 2, c: int = 0, p: int = 0, q: int = 0, digests: int = 1) -> list:
    return [
        5, 0, [[128 * i, D32] for i in range(c)], [[s, D32, 1] for s in range(1, p + 1)],
        [[s, [[D32, 1]] * digests] for s in range(1, q + 1)], replica,
    ]


def _full_vc(replica: int) -> list:
    return _vc(replica, TIGHT.checkpoints_max, TIGHT.window_max, TIGHT.window_max, TIGHT.qset_digests_max)


_FULL_BATCH = [[_widest(_full_request(t)), bytes(TIGHT_AUTH)] for t in range(1, TIGHT.batch_len_max + 1)]
_DECISIONS = [[s, D32] for s in range(1, TIGHT.window_max + 1)]
# Every type at every bound of TIGHT: (sender, fields); each is encoded the widest way.
AT_EVERY_BOUND = {
    Request: (7, _full_request(1)),
    PrePrepare: (2, [0, 1, -5, _FULL_BATCH, 2]),
    Batch: (2, [1, -5, _FULL_BATCH, 2]),
    Prepare: (2, [0, 1, D32, 2]),
    Commit: (2, [0, 1, D32, 2]),
    Reply: (2, [0, 1, 7, 2, b"r" * TIGHT.op_bytes_max, True, False]),
    Checkpoint: (2, [128, D32, 2]),
    Status: (2, [1, 2, 3, True, 2]),
    ViewChange: (2, _full_vc(2)),
    NewView: (1, [1, [[_widest(_full_vc(i)), bytes(SIGNATURE_BYTES)] for i in range(4)], [0, D32], _DECISIONS, 1]),
    FetchState: (2, [128, 2]),
    State: (2, [128, b"m" * TIGHT.snapshot_bytes_max, 2]),
    Suspect: (2, [7, 2]),
    FetchBatch: (2, [1, D32, 2]),
    FetchPartition: (2, [128, 3, 0, 2]),
    Partition: (2, [128, 3, 0, 30, b"p" * TIGHT.chunk_bytes_max, 2]),
}


def test_at_every_bound_covers_every_type():
    assert set(AT_EVERY_BOUND) == set(ALL_TYPES)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_a_message_at_every_bound_decodes_and_a_byte_more_is_refused_unread(cls):
    """The largest payload a type may have is exact: every list at its bound, every field at its
    widest encoding, fits; one more byte does not (so the bound is no looser than it must be)."""
    sender, fields = AT_EVERY_BOUND[cls]
    payload, auth = _widest(fields), bytes(TIGHT_AUTH)
    msg = _decode(_raw_frame(cls.TYPE, sender, payload, auth), TIGHT)
    assert type(msg) is cls
    assert msgpack.unpackb(encode_payload(msg)) == fields
    assert _reason(_raw_frame(cls.TYPE, sender, payload + b"\x00", auth), TIGHT) == "payload-too-large"
    assert _reason(_raw_frame(cls.TYPE, sender, payload, auth + b"\x00"), TIGHT) == "auth-too-large"


def _requests_of(count: int) -> list:
    return [[msgpack.packb([7, t, b"", False, 0, 0]), b""] for t in range(count)]


def _new_view_of(count: int) -> list:
    return [1, [[msgpack.packb(_vc(i)), bytes(SIGNATURE_BYTES)] for i in range(count)], [0, D32], [], 1]


# (what, type, sender, bound, fields with that many elements)
LIST_BOUNDS = [
    ("requests", PrePrepare, 2, TIGHT.batch_len_max, lambda k: [0, 1, 0, _requests_of(k), 2]),
    ("requests", Batch, 2, TIGHT.batch_len_max, lambda k: [1, 0, _requests_of(k), 2]),
    ("checkpoints", ViewChange, 2, TIGHT.checkpoints_max, lambda k: _vc(c=k)),
    ("prepared", ViewChange, 2, TIGHT.window_max, lambda k: _vc(p=k)),
    ("preprepared", ViewChange, 2, TIGHT.window_max, lambda k: _vc(q=k)),
    ("qset-digests", ViewChange, 2, TIGHT.qset_digests_max, lambda k: _vc(q=1, digests=k)),
    ("view-changes", NewView, 1, TIGHT.replicas_max, _new_view_of),
    ("decisions", NewView, 1, TIGHT.window_max, lambda k: [1, [], [0, D32], [[s, D32] for s in range(1, k + 1)], 1]),
]


@pytest.mark.parametrize(("what", "cls", "sender", "bound", "make"), LIST_BOUNDS, ids=lambda x: str(x))
def test_a_list_at_its_bound_decodes_and_one_longer_is_refused_at_its_header(what, cls, sender, bound, make):
    assert type(_decode(_raw_frame(cls.TYPE, sender, msgpack.packb(make(bound))), TIGHT)) is cls
    # Encoded compactly, one element more still fits the type's length: the list's header stops it.
    assert _reason(_raw_frame(cls.TYPE, sender, msgpack.packb(make(bound + 1))), TIGHT) == f"too-many-{what}"


# (type, sender, fields with a byte string of the given length, that string's bound)
BYTES_BOUNDS = [
    (Request, 7, lambda k: [7, 1, b"o" * k, False, 0, 1], TIGHT.op_bytes_max),
    (Reply, 2, lambda k: [0, 1, 7, 2, b"r" * k, False, False], TIGHT.op_bytes_max),
    (State, 2, lambda k: [128, b"m" * k, 2], TIGHT.snapshot_bytes_max),
    (Partition, 2, lambda k: [128, 3, 0, 99, b"p" * k, 2], TIGHT.chunk_bytes_max),
]


@pytest.mark.parametrize(("cls", "sender", "make", "bound"), BYTES_BOUNDS, ids=lambda x: getattr(x, "__name__", ""))
def test_a_byte_string_at_its_bound_decodes_and_one_longer_is_refused(cls, sender, make, bound):
    assert type(_decode(_raw_frame(cls.TYPE, sender, msgpack.packb(make(bound))), TIGHT)) is cls
    assert _reason(_raw_frame(cls.TYPE, sender, msgpack.packb(make(bound + 1))), TIGHT) == "bad-bytes"


def test_a_nested_list_where_a_scalar_belongs_is_refused_before_it_is_built():
    """A REPLY whose result is a list of a million empty lists: msgpack.unpackb would build them
    all (some 70 MB for this 1 MB frame); the typed decoder refuses the list at its header, where
    the result's bytes belong."""
    nested = b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x90" * (1 << 20)
    data = _raw_frame(Reply.TYPE, 2, b"\x97\x00\x01\x07\x02" + nested + b"\xc2\xc2")
    tracemalloc.start()
    try:
        assert _reason(data) == "bad-bytes"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data)  # copies of the payload (split, and read), not a list per byte


def test_a_new_view_of_copies_is_refused_by_its_length_before_it_is_parsed():
    vc = ViewChange(1, 0, (), tuple((s, D32, 0) for s in range(1, 257)), (), 2, b"", bytes(SIGNATURE_BYTES))
    data = _frame(NewView(1, (vc,) * 1024, (0, D32), (), 1))
    assert len(data) > 1 << 20
    assert _reason(data, CLUSTER_LIMITS) == "payload-too-large"
    assert _reason(data) == "too-many-view-changes"  # within the codec's own limits, at the list's header


CLUSTER_LIMITS = limits_of(DEFAULT_PARAMS, 4)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@ROUNDTRIP
@given(data=st.data())
def test_roundtrip_within_a_clusters_limits(cls, data):
    msg = data.draw(STRATEGIES[cls])
    assert roundtrip(msg, CLUSTER_LIMITS) == msg


def test_a_checkpoint_certificate_on_disk_holds_at_most_one_vote_per_replica():
    votes = tuple((i, D32) for i in range(TIGHT.replicas_max))
    assert decode_record(encode_record(Stable(128, D32, votes)), TIGHT).proof == votes
    with pytest.raises(RecordDamaged):
        decode_record(encode_record(Stable(128, D32, (*votes, (9, D32)))), TIGHT)

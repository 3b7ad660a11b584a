"""Authenticators, signatures and Wire: what each node accepts and what it drops, and why."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from bft import config
from bft.crypto import CLIENT, REPLICA, Keyring, PrivateKeys, mac
from bft.messages import (
    HEADER,
    MAC_BYTES,
    NULL_DIGEST,
    SIGNATURE_BYTES,
    Batch,
    Checkpoint,
    Commit,
    FetchBatch,
    FetchState,
    Limits,
    NewView,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    State,
    Status,
    ViewChange,
    encode_payload,
    frame,
    signed_bytes,
)
from bft.runtime.wire import Wire

N = 4
CLIENTS = 2
D = bytes(range(32))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = config.keygen(tmp_path_factory.mktemp("cluster"), f=1, clients=CLIENTS, base_port=17000)
    return config.load(path)


@pytest.fixture(scope="module")
def keyrings(cluster):
    rings = {(REPLICA, i): cluster.keyring(REPLICA, i) for i in range(N)}
    rings.update({(CLIENT, c): cluster.keyring(CLIENT, c) for c in range(CLIENTS)})
    return rings


class Nodes:
    """Fresh Wires (with fresh drop counters) for every replica and client of the cluster."""

    def __init__(self, cluster, keyrings) -> None:
        self.cluster = cluster
        self.keyrings = keyrings
        self.replicas = [Wire(keyrings[(REPLICA, i)], Limits(), Counter()) for i in range(N)]
        self.clients = [Wire(keyrings[(CLIENT, c)], Limits(), Counter()) for c in range(CLIENTS)]

    def stranger(self, kind: str, node_id: int) -> Wire:
        """A node using a fresh key pair that is not the one in the configuration."""
        replicas = {r.id: r.keys for r in self.cluster.replicas}
        ring = Keyring((kind, node_id), PrivateKeys.generate(), replicas, dict(self.cluster.clients))
        return Wire(ring, Limits(), Counter())


@pytest.fixture
def nodes(cluster, keyrings):
    return Nodes(cluster, keyrings)


def _flip(data: bytes, index: int, mask: int = 1) -> bytes:
    buf = bytearray(data)
    buf[index] ^= mask
    return bytes(buf)


def _auth_range(data: bytes) -> tuple[int, int]:
    auth_len = HEADER.unpack_from(data)[3]
    return HEADER.size, HEADER.size + auth_len


# ---------------------------------------------------------------------------------------------
# Accepted traffic


def test_keyrings_know_their_peers(keyrings):
    r0, c0 = keyrings[(REPLICA, 0)], keyrings[(CLIENT, 0)]
    assert all(r0.knows((REPLICA, i)) for i in range(1, N))
    assert not r0.knows((REPLICA, 0))
    assert all(r0.knows((CLIENT, c)) for c in range(CLIENTS))
    assert all(c0.knows((REPLICA, i)) for i in range(N))
    assert not c0.knows((CLIENT, 1))  # clients only talk to replicas


@pytest.mark.parametrize("sign", [False, True], ids=["tagged", "signed"])
@pytest.mark.parametrize("client", range(CLIENTS))
def test_client_request_is_accepted_by_every_replica(nodes, client, sign):
    req = Request.make(client, 17, b"put k v")
    data = nodes.clients[client].seal(req, sign=sign)
    start, end = _auth_range(data)
    # One tag per replica, then, if the client signs it, its signature.
    assert end - start == N * MAC_BYTES + (SIGNATURE_BYTES if sign else 0)
    for wire in nodes.replicas:
        got = wire.open(data)
        assert got == req
        assert got.raw == req.raw
        assert got.digest == req.digest
        assert got.auth == data[start:end]
        assert wire.dropped == Counter()


BROADCASTS = [
    Prepare(3, 9, D, 0),
    Commit(3, 9, D, 0),
    Checkpoint(128, D, 0),
    Status(3, 0, 9, False, 0),
    FetchBatch(9, D, 0),
    FetchState(128, 0),
    State(128, b"snapshot", 0),
]


@pytest.mark.parametrize("msg", BROADCASTS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("sender", range(N))
def test_replica_broadcast_is_accepted_by_every_other_replica(nodes, msg, sender):
    msg = replace(msg, replica=sender)
    data = nodes.replicas[sender].seal(msg)
    for i, wire in enumerate(nodes.replicas):
        got = wire.open(data)
        if i == sender:
            # Our own slot of the authenticator is empty: a looped-back frame is not trusted.
            assert got is None
            assert wire.dropped == Counter({"bad-authentication": 1})
        else:
            assert got == msg
            assert not wire.dropped


@pytest.mark.parametrize("dest", [1, 2, 3])
def test_point_to_point_is_accepted_by_its_destination_only(nodes, dest):
    msg = Commit(0, 5, D, 0)
    data = nodes.replicas[0].seal(msg, dest)
    for i, wire in enumerate(nodes.replicas):
        got = wire.open(data)
        if i == dest:
            assert got == msg
            assert not wire.dropped
        else:
            assert got is None
            assert wire.dropped == Counter({"bad-authentication": 1})


def test_point_to_point_and_broadcast_tags_agree_in_the_destination_slot(nodes):
    msg = Status(1, 0, 4, True, 2)
    broadcast = nodes.replicas[2].seal(msg)
    direct = nodes.replicas[2].seal(msg, 3)
    slot = slice(HEADER.size + 3 * MAC_BYTES, HEADER.size + 4 * MAC_BYTES)
    assert len(direct) == len(broadcast)
    assert direct[slot] == broadcast[slot]
    assert direct[HEADER.size:slot.start] == bytes(3 * MAC_BYTES)


@pytest.mark.parametrize("replica", range(N))
def test_reply_is_accepted_by_its_client_only(nodes, replica):
    reply = Reply(2, 17, 1, replica, b"result", False)
    data = nodes.replicas[replica].seal(reply)
    start, end = _auth_range(data)
    assert end - start == MAC_BYTES
    assert nodes.clients[1].open(data) == reply
    assert not nodes.clients[1].dropped
    assert nodes.clients[0].open(data) is None
    assert nodes.clients[0].dropped == Counter({"bad-authentication": 1})
    for wire in nodes.replicas:
        assert wire.open(data) is None
        assert wire.dropped == Counter({"unexpected-type": 1})


def test_over_sessions_a_replica_message_needs_no_tag_but_must_come_on_its_senders_session(cluster, keyrings):
    """The session's frame tag and its bound principal stand in for per-message tags; what
    travels further (a client's request, relayed or in a pre-prepare) keeps its authenticator."""
    replicas = [Wire(keyrings[(REPLICA, i)], Limits(), Counter(), sessions=True) for i in range(N)]
    client = Wire(keyrings[(CLIENT, 1)], Limits(), Counter(), sessions=True)
    data = replicas[0].seal(Prepare(0, 1, D, 0))
    assert _auth_range(data)[0] == _auth_range(data)[1]  # no tags at all
    assert replicas[2].open(data, (REPLICA, 0)) == Prepare(0, 1, D, 0)
    for peer in (None, (REPLICA, 3), (CLIENT, 0)):  # no session, or another's
        assert replicas[2].open(data, peer) is None
    assert replicas[2].dropped == Counter({"bad-authentication": 3})
    reply = replicas[3].seal(Reply(0, 7, 1, 3, b"r"))
    assert client.open(reply, (REPLICA, 3)) == Reply(0, 7, 1, 3, b"r")
    assert client.open(reply, (REPLICA, 2)) is None
    # A request: on its client's session as it is; relayed by a replica, by its tags.
    req = Request.make(1, 5, b"op")
    sealed = client.seal(req)
    assert replicas[0].open(sealed, (CLIENT, 1)) == req
    assert replicas[0].open(sealed, (REPLICA, 2)) == req
    assert replicas[0].open(_flip(sealed, HEADER.size), (REPLICA, 2)) is None  # its tag for 0 broken
    replicas[0].suspects.add(1)  # a suspect's requests need its signature, on any session
    assert replicas[0].open(sealed, (CLIENT, 1)) is None
    assert replicas[0].open(client.seal(req, sign=True), (CLIENT, 1)) == req


def test_client_drops_replica_to_replica_traffic(nodes):
    for data in (nodes.replicas[0].seal(Prepare(0, 1, D, 0)), nodes.clients[1].seal(Request.make(1, 1, b""))):
        assert nodes.clients[0].open(data) is None
    assert nodes.clients[0].dropped == Counter({"unexpected-type": 2})


def test_pre_prepare_relays_client_requests(nodes):
    reqs = tuple(_client_request(nodes, c, 1, b"op%d" % c) for c in range(CLIENTS))
    pp = PrePrepare.make(0, 1, 1234, reqs, 0)
    data = nodes.replicas[0].seal(pp)
    for wire in nodes.replicas[1:]:
        got = wire.open(data)
        assert got == pp
        assert got.digest == pp.digest
        assert [r.auth for r in got.requests] == [r.auth for r in reqs]
        assert not wire.dropped


# ---------------------------------------------------------------------------------------------
# Forged and corrupted frames


def test_flipped_payload_bit_is_rejected(nodes):
    data = nodes.replicas[0].seal(Prepare(1, 2, D, 0))
    bad = _flip(data, len(data) - 1)
    assert nodes.replicas[1].open(bad) is None
    assert nodes.replicas[1].dropped == Counter({"bad-authentication": 1})

    req = nodes.clients[0].seal(Request.make(0, 5, b"op"))
    assert nodes.replicas[2].open(_flip(req, len(req) - 3)) is None
    assert nodes.replicas[2].dropped == Counter({"bad-authentication": 1})


def test_flipped_tag_bit_is_rejected(nodes):
    data = nodes.replicas[0].seal(Prepare(1, 2, D, 0))
    own_slot = HEADER.size + 2 * MAC_BYTES
    bad = _flip(data, own_slot + 5, 0x80)
    assert nodes.replicas[2].open(bad) is None
    assert nodes.replicas[2].dropped == Counter({"bad-authentication": 1})
    # Other receivers check other slots and still accept the frame.
    assert nodes.replicas[1].open(bad) == Prepare(1, 2, D, 0)


def test_truncated_authenticator_is_rejected(nodes):
    msg = Prepare(1, 2, D, 0)
    payload = encode_payload(msg)
    full = nodes.keyrings[(REPLICA, 0)].authenticator(Prepare.TYPE, payload)
    data = frame(msg, payload, full[: 3 * MAC_BYTES])  # replica 3's slot is missing
    assert nodes.replicas[1].open(data) == msg
    assert nodes.replicas[3].open(data) is None
    assert nodes.replicas[3].dropped == Counter({"bad-authentication": 1})


@settings(max_examples=200, deadline=None)
@given(bit=st.integers(min_value=0))
def test_any_single_bit_flip_outside_other_slots_is_rejected(cluster, keyrings, bit):
    nodes = Nodes(cluster, keyrings)
    msg = Commit(4, 11, D, 0)
    data = nodes.replicas[0].seal(msg)
    bit %= len(data) * 8
    bad = _flip(data, bit // 8, 1 << (bit % 8))
    receiver = nodes.replicas[1]
    got = receiver.open(bad)
    auth_start = HEADER.size
    own = range(auth_start + MAC_BYTES, auth_start + 2 * MAC_BYTES)
    in_other_slot = auth_start <= bit // 8 < auth_start + N * MAC_BYTES and bit // 8 not in own
    if in_other_slot:
        assert got == msg
        assert not receiver.dropped
    else:
        assert got is None
        assert sum(receiver.dropped.values()) == 1
        assert set(receiver.dropped) <= {"bad-version", "unknown-type", "unexpected-type", "short-frame",
                                         "auth-too-large", "payload-too-large", "bad-authentication"}


def _reframe(data: bytes, sender: int) -> bytes:
    version, type_, _, auth_len = HEADER.unpack_from(data)
    return HEADER.pack(version, type_, sender, auth_len) + data[HEADER.size:]


def test_claiming_another_sender_is_rejected(nodes):
    # A replica frame re-labelled as coming from another replica (payload left as it was).
    data = nodes.replicas[0].seal(Prepare(1, 2, D, 0))
    assert nodes.replicas[1].open(_reframe(data, 2)) is None
    assert nodes.replicas[1].open(_reframe(data, 77)) is None  # not a replica at all
    assert nodes.replicas[1].dropped == Counter({"bad-authentication": 2})

    # A replica that fills in another replica's id throughout, keeping its own keys.
    forged = nodes.replicas[0].seal(Prepare(1, 2, D, 3))
    assert nodes.replicas[1].open(forged) is None
    assert nodes.replicas[1].dropped["bad-authentication"] == 3

    # Client 0 claiming to be client 1 in the request and the header.
    req = nodes.clients[0].seal(Request.make(1, 5, b"op"))
    assert nodes.replicas[2].open(req) is None
    assert nodes.replicas[2].open(_reframe(nodes.clients[0].seal(Request.make(0, 5, b"op")), 1)) is None
    assert nodes.replicas[2].dropped == Counter({"bad-authentication": 2})


def test_client_key_not_in_config_is_rejected(nodes):
    for stranger in (nodes.stranger(CLIENT, 99), nodes.stranger(CLIENT, 0)):
        cid = stranger.keyring.me[1]
        data = stranger.seal(Request.make(cid, 1, b"op"))  # its tags and its signature: the wrong key
        for wire in nodes.replicas:
            assert wire.open(data) is None
    for wire in nodes.replicas:
        assert wire.dropped == Counter({"bad-authentication": 2})


def test_replica_key_not_in_config_is_rejected(nodes):
    impostor = nodes.stranger(REPLICA, 0)
    data = impostor.seal(Prepare(0, 1, D, 0))
    for wire in nodes.replicas[1:]:
        assert wire.open(data) is None
        assert wire.dropped == Counter({"bad-authentication": 1})
    reply = impostor.seal(Reply(0, 1, 0, 0, b"r"))
    assert nodes.clients[0].open(reply) is None
    assert nodes.clients[0].dropped == Counter({"bad-authentication": 1})


def test_authentication_comes_before_decoding(nodes):
    # A malformed payload from an unauthenticated sender counts as an authentication failure...
    junk = HEADER.pack(1, Prepare.TYPE, 0, 4 * MAC_BYTES) + bytes(4 * MAC_BYTES) + b"\xc1"
    assert nodes.replicas[1].open(junk) is None
    assert nodes.replicas[1].dropped == Counter({"bad-authentication": 1})
    # ...and one with a valid tag is counted as the decode error it is.
    ring = nodes.keyrings[(REPLICA, 0)]
    payload = b"\x94\x00\x01\xa1x\x00"  # [0, 1, "x", 0]: a string where the digest belongs
    data = HEADER.pack(1, Prepare.TYPE, 0, 4 * MAC_BYTES) + ring.authenticator(Prepare.TYPE, payload) + payload
    assert nodes.replicas[1].open(data) is None
    assert nodes.replicas[1].dropped == Counter({"bad-authentication": 1, "bad-bytes": 1})


def test_authenticated_sender_mismatch_is_dropped(nodes):
    # Replica 0's valid tag over a payload that names replica 3 as the sender.
    ring = nodes.keyrings[(REPLICA, 0)]
    payload = encode_payload(Prepare(1, 2, D, 3))
    data = HEADER.pack(1, Prepare.TYPE, 0, 4 * MAC_BYTES) + ring.authenticator(Prepare.TYPE, payload) + payload
    assert nodes.replicas[1].open(data) is None
    assert nodes.replicas[1].dropped == Counter({"sender-mismatch": 1})


def test_header_problems_are_counted_by_reason(nodes):
    wire = nodes.replicas[1]
    good = nodes.replicas[0].seal(Prepare(1, 2, D, 0))
    assert wire.open(good[:5]) is None
    assert wire.open(bytes([9]) + good[1:]) is None
    assert wire.open(good[:1] + bytes([200]) + good[2:]) is None
    assert wire.open(b"\x00" * (Limits().frame_bytes_max + 1)) is None
    assert wire.dropped == Counter({"short-frame": 1, "bad-version": 1, "unknown-type": 1, "frame-too-large": 1})


def _client_request(nodes: Nodes, client: int, timestamp: int, op: bytes, sign: bool = True) -> Request:
    """A request as the primary holds it: sealed (and signed) by its client, opened by replica 0."""
    req = nodes.replicas[0].open(nodes.clients[client].seal(Request.make(client, timestamp, op), sign=sign))
    assert isinstance(req, Request)
    assert len(req.auth) == N * MAC_BYTES + (SIGNATURE_BYTES if sign else 0)
    return req


def test_a_request_whose_tag_fails_is_checked_by_its_signature(nodes):
    req = _client_request(nodes, 1, 3, b"op")
    # Replica 2's tag corrupted (its session with the client is newer, say); the signature holds.
    good = _client_request(nodes, 0, 1, b"fine")
    pp = PrePrepare.make(0, 1, 99, (good, req.with_auth(_flip_bytes(req.auth, 2 * MAC_BYTES))), 0)
    data = nodes.replicas[0].seal(pp)
    assert nodes.replicas[2].open(data) == pp
    assert nodes.replicas[2].stats["requests-checked-by-signature"] == 1 and not nodes.replicas[2].dropped
    for i in (1, 3):  # their tags are intact: no signature checked
        assert nodes.replicas[i].open(data) == pp and not nodes.replicas[i].stats


def test_a_request_nobody_can_check_is_held_by_reference_not_the_whole_pre_prepare(nodes):
    """Its tag and its signature fail at replica 2 (a faulty client's "big MAC", or a forgery by
    the primary): the pre-prepare is taken with that request as its digest, to be resolved from
    an authentic copy, and the client is reported (bft.runtime.node makes it a suspect)."""
    req = _client_request(nodes, 1, 3, b"op")
    bad = req.with_auth(_flip_bytes(_flip_bytes(req.auth, 2 * MAC_BYTES), N * MAC_BYTES))
    good = _client_request(nodes, 0, 1, b"fine")
    pp = PrePrepare.make(0, 1, 99, (good, bad), 0)
    data = nodes.replicas[0].seal(pp)
    got = nodes.replicas[2].open(data)
    assert got == PrePrepare(0, 1, 99, (good, req.digest), 0) and got.digest == pp.digest
    assert nodes.replicas[2].unverifiable == [1]
    assert nodes.replicas[2].stats["unauthentic-requests-held"] == 1
    assert nodes.replicas[1].open(data) == pp  # its tag is fine


def test_an_unsigned_request_tagged_with_a_key_retired_by_recovery_is_held_but_its_client_not_suspected(
    nodes, cluster
):
    """Clients sign only where a tag may not do (``ClientCore.must_sign``). A request tagged just
    before replica 2's proactive recovery retired its keys reaches it in a pre-prepare: it is
    held like any request it cannot check, but its client is correct and stays trusted."""
    req = _client_request(nodes, 1, 3, b"op", sign=False)
    nodes.replicas[2].keyring = cluster.keyring(REPLICA, 2)  # its own: the fixture's are shared
    nodes.replicas[2].keyring.forget_session_keys()
    data = nodes.replicas[0].seal(PrePrepare.make(0, 1, 99, (req,), 0))
    assert nodes.replicas[2].open(data).requests == (req.digest,)
    assert nodes.replicas[2].stats["unauthentic-requests-held"] == 1
    assert nodes.replicas[2].unverifiable == []
    # A tag that never was good is a faulty client's, whether or not keys were retired.
    bad = req.with_auth(_flip_bytes(req.auth, 2 * MAC_BYTES))
    data = nodes.replicas[0].seal(PrePrepare.make(0, 1, 99, (bad,), 0))
    assert nodes.replicas[2].open(data).requests == (req.digest,)
    assert nodes.replicas[2].unverifiable == [1]


def test_a_request_naming_a_client_id_no_header_can_hold_is_held_not_a_crash(nodes):
    """Found by bench.fuzz: a request inside a pre-prepare names its client in its own body, with
    no header bound; checking its signature once raised a struct error that stopped the replica."""
    for client in (1 << 32, (1 << 63) - 1):
        req = Request.make(client, 1, b"op").with_auth(bytes(N * MAC_BYTES + SIGNATURE_BYTES))
        data = nodes.replicas[3].seal(PrePrepare.make(0, 1, 7, (req,), 3))
        assert nodes.replicas[1].open(data).requests == (req.digest,)


def test_unknown_or_unsigned_requests_are_held_in_a_pre_prepare_and_refused_in_a_batch(nodes):
    stranger = nodes.stranger(CLIENT, 99)
    unknown = Request.make(99, 1, b"op")
    unknown = unknown.with_auth(stranger.keyring.request_auth(Request.TYPE, unknown.raw))
    untagged = Request.make(0, 1, b"op")
    for req in (unknown, untagged):
        data = nodes.replicas[0].seal(PrePrepare.make(0, 1, 0, (req,), 0))
        assert nodes.replicas[1].open(data).requests == (req.digest,)
        data = nodes.replicas[0].seal(Batch(1, 0, (req,), 0))
        assert nodes.replicas[1].open(data) is None
    assert nodes.replicas[1].unverifiable == [99, 0]
    assert nodes.replicas[1].dropped == Counter({"bad-request-authentication": 2})


# ---------------------------------------------------------------------------------------------
# Signatures


def _view_change(replica: int) -> ViewChange:
    return ViewChange(5, 128, ((128, D),), ((130, D, 4),), ((131, ((D, 4), (bytes(32), 3))),), replica)


def _new_view(replica: int) -> NewView:
    # The sender's own view change travels unsigned here: Wire.seal signs it.
    return NewView(5, (_view_change(replica),), (128, D), ((129, D), (130, NULL_DIGEST)), replica)


@pytest.mark.parametrize("make", [_view_change, _new_view], ids=["ViewChange", "NewView"])
@pytest.mark.parametrize("sender", range(N))
def test_signed_messages_verify_at_every_other_replica(nodes, make, sender):
    msg = make(sender)
    data = nodes.replicas[sender].seal(msg)
    start, end = _auth_range(data)
    assert end - start == SIGNATURE_BYTES
    for i, wire in enumerate(nodes.replicas):
        # A signature convinces anyone, the signer included (it may be relayed back to it).
        assert wire.open(data) == msg, i
        assert not wire.dropped


@pytest.mark.parametrize("make", [_view_change, _new_view], ids=["ViewChange", "NewView"])
def test_corrupted_signature_is_rejected(nodes, make):
    data = nodes.replicas[1].seal(make(1))
    start, end = _auth_range(data)
    for index in (start, end - 1):
        for wire in (nodes.replicas[0], nodes.replicas[2]):
            assert wire.open(_flip(data, index)) is None
    assert nodes.replicas[0].open(_flip(data, len(data) - 1)) is None  # signed payload changed
    assert nodes.replicas[0].dropped == Counter({"bad-authentication": 3})
    assert nodes.replicas[2].dropped == Counter({"bad-authentication": 2})


@pytest.mark.parametrize("make", [_view_change, _new_view], ids=["ViewChange", "NewView"])
def test_signature_from_a_different_replica_is_rejected(nodes, make):
    # Replica 1 signs a message that names replica 2 as its sender (a NEW-VIEW carrying replica
    # 1's own view change, since sealing refuses to sign another replica's).
    claimed = make(2) if make is _view_change else replace(_new_view(1), replica=2)
    forged = nodes.replicas[1].seal(claimed)
    # Replica 1's genuine signature, moved onto a frame and payload that name replica 2.
    genuine = nodes.replicas[1].seal(make(1))
    start, end = _auth_range(genuine)
    moved = frame(make(2), encode_payload(make(2)), genuine[start:end])
    for wire in (nodes.replicas[0], nodes.replicas[3]):
        assert wire.open(forged) is None
        assert wire.open(moved) is None
        assert wire.open(_reframe(genuine, 2)) is None
        assert wire.dropped == Counter({"bad-authentication": 3})


def _collected_view_changes(nodes: Nodes, primary: int) -> tuple[ViewChange, ...]:
    """The view changes of the other replicas as the new primary received them."""
    out = []
    for i in range(N):
        if i != primary:
            vc = nodes.replicas[primary].open(nodes.replicas[i].seal(_view_change(i)))
            assert isinstance(vc, ViewChange)
            assert len(vc.signature) == SIGNATURE_BYTES
            assert vc.raw == encode_payload(_view_change(i))
            out.append(vc)
    return tuple(out)


def test_new_view_carries_verifiable_view_changes(nodes):
    primary = 1
    vcs = (*_collected_view_changes(nodes, primary), _view_change(primary))
    nv = NewView(5, vcs, (128, D), ((129, D),), primary)
    data = nodes.replicas[primary].seal(nv)
    for i in (0, 2, 3):
        got = nodes.replicas[i].open(data)
        assert got == nv
        assert not nodes.replicas[i].dropped
        ring = nodes.keyrings[(REPLICA, i)]
        for vc in got.view_changes:
            assert ring.check_signature(vc.replica, ViewChange.TYPE, vc.raw, vc.signature)


def _flip_bytes(b: bytes, index: int) -> bytes:
    return b[:index] + bytes([b[index] ^ 1]) + b[index + 1:]


def test_sealing_refuses_to_sign_another_replicas_view_change(nodes):
    with pytest.raises(ValueError, match="no signature to forward"):
        nodes.replicas[1].seal(NewView(5, (_view_change(3),), (128, D), ((129, D),), 1))


def test_new_view_with_bad_view_change_signature_is_dropped(nodes):
    primary = 1
    vc0, vc2, vc3 = _collected_view_changes(nodes, primary)
    bad = [
        # a corrupted signature
        replace(vc0, signature=_flip_bytes(vc0.signature, 10)),
        # replica 2's signature on replica 3's view change
        replace(vc3, signature=vc2.signature),
        # a view change the primary made up for replica 3, signed with the primary's own key
        replace(_view_change(3), raw=encode_payload(_view_change(3)), signature=bytes(SIGNATURE_BYTES)),
        # a signature that is too short
        replace(vc2, signature=vc2.signature[:-1]),
    ]
    for forged in bad:
        other = vc0 if forged.replica == 2 else vc2  # one view change per replica: the shape is fine
        data = nodes.replicas[primary].seal(NewView(5, (forged, other), (128, D), ((129, D),), primary))
        assert nodes.replicas[0].open(data) is None
    assert nodes.replicas[0].dropped == Counter({"bad-view-change-signature": len(bad)})


def test_batch_relays_client_requests(nodes):
    reqs = (_client_request(nodes, 0, 4, b"a"), _client_request(nodes, 1, 4, b"b"))
    batch = Batch.of(PrePrepare.make(2, 40, 5, reqs, 2), 3)
    data = nodes.replicas[3].seal(batch, 2)
    got = nodes.replicas[2].open(data)
    assert got == batch
    assert got.digest == batch.digest
    assert not nodes.replicas[2].dropped

    # Its tag for replica 2 and its signature corrupted: nothing vouches for it.
    corrupted = replace(reqs[1], auth=_flip_bytes(_flip_bytes(reqs[1].auth, 2 * MAC_BYTES), N * MAC_BYTES))
    bad = Batch.of(PrePrepare.make(2, 40, 5, (reqs[0], corrupted), 2), 3)
    assert nodes.replicas[2].open(nodes.replicas[3].seal(bad, 2)) is None
    assert nodes.replicas[2].dropped == Counter({"bad-request-authentication": 1})


def test_signature_checks_at_the_keyring(keyrings):
    r0, r1 = keyrings[(REPLICA, 0)], keyrings[(REPLICA, 1)]
    payload = encode_payload(_view_change(0))
    sig = r0.sign(ViewChange.TYPE, payload)
    assert len(sig) == SIGNATURE_BYTES
    assert r1.check_signature(0, ViewChange.TYPE, payload, sig)
    assert not r1.check_signature(0, NewView.TYPE, payload, sig)  # the type is signed too
    assert not r1.check_signature(1, ViewChange.TYPE, payload, sig)
    assert not r1.check_signature(9, ViewChange.TYPE, payload, sig)  # unknown replica
    assert not r1.check_signature(0, ViewChange.TYPE, payload, sig[:-1])
    assert not r1.check_signature(0, ViewChange.TYPE, payload, sig + b"\x00")


# ---------------------------------------------------------------------------------------------
# Pairwise MAC keys


def test_pairwise_keys_are_directional(keyrings):
    # Client 0 and replica 0 share an id, so both directions MAC exactly the same bytes.
    c0, r0 = keyrings[(CLIENT, 0)], keyrings[(REPLICA, 0)]
    payload = b"same bytes"
    up = c0.tag_for((REPLICA, 0), Request.TYPE, payload)
    down = r0.tag_for((CLIENT, 0), Request.TYPE, payload)
    assert len(up) == len(down) == MAC_BYTES
    assert up != down
    assert r0.check_tag((CLIENT, 0), Request.TYPE, payload, up, 0)
    assert not r0.check_tag((CLIENT, 0), Request.TYPE, payload, down, 0)
    assert c0.check_tag((REPLICA, 0), Request.TYPE, payload, down, 0)
    assert not c0.check_tag((REPLICA, 0), Request.TYPE, payload, up, 0)


@pytest.mark.parametrize(("a", "b"), [(0, 1), (1, 3), (2, 0)])
def test_replica_pair_keys_differ_per_direction(keyrings, a, b):
    ka, kb = keyrings[(REPLICA, a)], keyrings[(REPLICA, b)]
    data = signed_bytes(Prepare.TYPE, 0, b"identical bytes")
    a_to_b = mac(ka._out[(REPLICA, b)], data)
    b_to_a = mac(kb._out[(REPLICA, a)], data)
    assert a_to_b != b_to_a
    # Each direction's key is shared by exactly its two ends.
    assert ka._out[(REPLICA, b)] == kb._in[(REPLICA, a)]
    assert kb._out[(REPLICA, a)] == ka._in[(REPLICA, b)]
    assert ka._out[(REPLICA, b)] != ka._in[(REPLICA, b)]


def test_tags_bind_the_message_type(keyrings):
    c0, r2 = keyrings[(CLIENT, 0)], keyrings[(REPLICA, 2)]
    auth = c0.authenticator(Request.TYPE, b"payload")
    assert len(auth) == N * MAC_BYTES
    assert r2.check_tag((CLIENT, 0), Request.TYPE, b"payload", auth, 2)
    assert not r2.check_tag((CLIENT, 0), Prepare.TYPE, b"payload", auth, 2)
    assert not r2.check_tag((CLIENT, 0), Request.TYPE, b"payload", auth, 1)  # someone else's slot
    assert not r2.check_tag((CLIENT, 0), Request.TYPE, b"payload", auth[: 2 * MAC_BYTES + 15], 2)


def test_replica_authenticator_leaves_own_slot_empty(keyrings):
    auth = keyrings[(REPLICA, 1)].authenticator(Commit.TYPE, b"p")
    slots = [auth[i * MAC_BYTES:(i + 1) * MAC_BYTES] for i in range(N)]
    assert slots[1] == bytes(MAC_BYTES)
    assert len(set(slots)) == N


def test_new_view_of_copies_is_rejected_by_its_shape_before_any_signature_check(nodes, monkeypatch):
    primary = 1
    vc0, vc2, _ = _collected_view_changes(nodes, primary)
    ring = nodes.keyrings[(REPLICA, 0)]
    checked = []
    real = ring.check_signature
    monkeypatch.setattr(ring, "check_signature", lambda *a: checked.append(a) or real(*a))
    later = nodes.replicas[primary].open(nodes.replicas[3].seal(replace(_view_change(3), view=6)))
    shapes = [
        (vc0,) * 1000,  # one signed view change, a thousand times
        (vc0, vc2, later),  # a genuine one, for another view
    ]
    for vcs in shapes:
        data = nodes.replicas[primary].seal(NewView(5, vcs, (128, D), ((129, D),), primary))
        assert nodes.replicas[0].open(data) is None
    # More view changes than replicas: the decoder stops at the list's header (bft.bounds).
    assert nodes.replicas[0].dropped == Counter({"too-many-view-changes": 1, "malformed-new-view": 1})
    assert len(checked) == 2  # the frames' own signatures only, none of the copies'

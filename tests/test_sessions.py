"""Sessions (bft/runtime/session.py): the handshake and frame protection by themselves, then what
they change for real replica processes: nothing recorded can be played back, frames travel only
between the principals that proved themselves, and unauthenticated peers hold bounded resources."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections import Counter
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bft.config import Cluster
from bft.core.params import Params
from bft.crypto import CLIENT, REPLICA, Keyring, PrivateKeys
from bft.local import LocalCluster
from bft.messages import DEFAULT_LIMITS, SIGNATURE_BYTES, Prepare, Reply, Request, frame
from bft.runtime.session import HANDSHAKE_BYTES_MAX, Session, SessionError
from bft.runtime.wire import Wire
from bft.service import KVService
from client import Client

from .sessionconn import StreamSession, framed
from .test_integration import Recorder, value_of
from .test_integration import workload as shared_workload

KEYS = {i: PrivateKeys.generate() for i in range(4)}
CLIENT_KEYS = PrivateKeys.generate()
PUBLIC = {i: k.public() for i, k in KEYS.items()}
CLIENTS = {7: CLIENT_KEYS.public()}


def ring(kind: str, node: int, private: PrivateKeys | None = None) -> Keyring:
    own = private or (KEYS[node] if kind == REPLICA else CLIENT_KEYS)
    return Keyring((kind, node), own, PUBLIC, CLIENTS)


def pair(
    encrypt: bool = False, initiator: tuple[str, int] = (CLIENT, 7), responder: int = 0
) -> tuple[Session, Session]:
    a = Session(ring(*initiator), expect=responder, encrypt=encrypt)
    b = Session(ring(REPLICA, responder))
    finish = a.receive_handshake(b.receive_handshake(a.initiate()))
    assert b.receive_handshake(finish) is None
    return a, b


@pytest.mark.parametrize("encrypt", [False, True])
@pytest.mark.parametrize("initiator", [(CLIENT, 7), (REPLICA, 2)])
def test_handshake_proves_both_ends_and_frames_flow_both_ways(encrypt, initiator) -> None:
    a, b = pair(encrypt, initiator)
    assert a.peer == (REPLICA, 0) and b.peer == initiator
    for i in range(3):
        assert b.open(a.seal(b"to %d" % i)) == b"to %d" % i
        assert a.open(b.seal(b"back %d" % i)) == b"back %d" % i
    sealed = a.seal(b"secret payload")
    assert (b"secret payload" in sealed) is not encrypt


@pytest.mark.parametrize("encrypt", [False, True])
def test_replayed_reordered_dropped_or_altered_frames_fail(encrypt) -> None:
    for attack in ("replay", "reorder", "drop", "flip", "cut"):
        a, b = pair(encrypt)
        first, second = a.seal(b"one"), a.seal(b"two")
        if attack == "replay":
            b.open(first)
            bad = first
        elif attack == "reorder" or attack == "drop":
            bad = second
        elif attack == "flip":
            bad = bytes([first[0] ^ 1]) + first[1:]
        else:
            bad = first[:-1]
        with pytest.raises(SessionError):
            b.open(bad)


def test_a_frame_of_one_session_fails_on_another_between_the_same_two() -> None:
    a1, b1 = pair()
    _a2, b2 = pair()
    assert b1.open(a1.seal(b"x")) == b"x"
    with pytest.raises(SessionError):
        b2.open(a1.seal(b"x"))


def test_the_initiator_refuses_a_replica_other_than_the_one_it_expects() -> None:
    a = Session(ring(CLIENT, 7), expect=1)
    impostor = Session(ring(REPLICA, 0))
    init = a.initiate()
    with pytest.raises(SessionError):  # replica 0 is not the one this INIT was for
        impostor.receive_handshake(init)
    # Replica 0 answering as itself an INIT rewritten for it: its signature is not replica 1's.
    rewritten = msgpack.packb([*msgpack.unpackb(init)[:3], 0, *msgpack.unpackb(init)[4:]])
    with pytest.raises(SessionError):
        a.receive_handshake(impostor.receive_handshake(rewritten))


def test_a_principal_not_in_the_config_or_without_its_key_is_refused() -> None:
    stranger = Keyring((CLIENT, 9), PrivateKeys.generate(), PUBLIC, CLIENTS)
    with pytest.raises(SessionError):
        Session(ring(REPLICA, 0)).receive_handshake(Session(stranger, expect=0).initiate())
    # Client 7's id with another key: the INIT passes (it carries no proof), the FINISH does not.
    forger = Keyring((CLIENT, 7), PrivateKeys.generate(), PUBLIC, {7: CLIENT_KEYS.public()})
    a, b = Session(forger, expect=0), Session(ring(REPLICA, 0))
    finish = a.receive_handshake(b.receive_handshake(a.initiate()))
    with pytest.raises(SessionError):
        b.receive_handshake(finish)
    assert b.peer is None


def test_a_recorded_handshake_does_not_complete_again() -> None:
    a, b = Session(ring(CLIENT, 7), expect=0), Session(ring(REPLICA, 0))
    init = a.initiate()
    finish = a.receive_handshake(b.receive_handshake(init))
    b.receive_handshake(finish)
    replayed = Session(ring(REPLICA, 0))
    replayed.receive_handshake(init)  # answered: the replica cannot tell yet
    with pytest.raises(SessionError):
        replayed.receive_handshake(finish)  # signed over another transcript
    assert not replayed.established


@given(st.binary(max_size=HANDSHAKE_BYTES_MAX))
def test_hostile_handshake_bytes_only_ever_raise_session_error(data) -> None:
    for session in (Session(ring(REPLICA, 0)), Session(ring(CLIENT, 7), expect=0)):
        if session.expect is not None:
            session.initiate()
        with contextlib.suppress(SessionError):
            session.receive_handshake(data)
        assert not session.established


# -- real replica processes ---------------------------------------------------------------------


async def _tap_primary(cluster: Cluster) -> tuple[Cluster, Recorder]:
    """The cluster as a client sees it with a recorder on its link to the primary."""
    primary = cluster.replicas[0]
    recorder = Recorder(primary.host, primary.port)
    tapped = replace(cluster, replicas=(replace(primary, port=await recorder.start()), *cluster.replicas[1:]))
    return tapped, recorder


async def _dropped(lc: LocalCluster, replica: int, reason: str, at_least: int) -> int:
    for _ in range(100):
        count = lc.status(replica)["dropped"].get(reason, 0)
        if count >= at_least:
            return count
        await asyncio.sleep(0.05)
    raise AssertionError(f"replica {replica} counted {count} {reason!r}, expected {at_least}")


async def test_frames_without_a_handshake_are_refused_and_the_replica_serves_on(local_cluster) -> None:
    lc = local_cluster
    target = lc.cluster.replicas[1]
    before = lc.status(1)["dropped"]
    attacks = [
        os.urandom(64),  # no framing at all
        framed(os.urandom(200)),  # random frame
        framed(b"\x01\x03" + os.urandom(30)),  # a protocol header before any handshake
        struct.pack("!I", HANDSHAKE_BYTES_MAX + 1) + b"x" * 10,  # more than a handshake may send
    ]
    for data in attacks:
        with socket.create_connection((target.host, target.port)) as s:
            s.sendall(data)
            s.settimeout(5)
            assert s.recv(1) == b""  # closed by the replica
    refused = before.get("bad-handshake", 0) + before.get("frame-too-large", 0) + 4
    for _ in range(100):
        now = lc.status(1)["dropped"]
        if now.get("bad-handshake", 0) + now.get("frame-too-large", 0) >= refused:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"not all refusals counted: {now}")
    async with Client(lc.cluster, 0) as c:
        await c.wait_connected()
        assert value_of(await c.invoke(KVService.put(b"k", b"v"))) is None


async def test_inside_a_session_frames_must_come_from_its_peer(local_cluster) -> None:
    """Client 0's own keys, a session of its own: what it sends there as someone else is dropped."""
    lc = local_cluster
    cluster = lc.cluster
    target = cluster.replicas[1]
    own = cluster.keyring(CLIENT, 0)
    conn = await StreamSession.open(target.host, target.port, own, 1)
    try:
        before = lc.status(1)["dropped"]
        payload = msgpack.packb((0, 1, bytes(32), 2))  # a prepare claiming replica 2, a client's tag
        conn.send(frame(Prepare(0, 1, bytes(32), 2), payload, own.authenticator(Prepare.TYPE, payload)))
        other = Request.make(1, 1, KVService.put(b"k", b"x"))  # client 1's genuine request
        other = other.with_auth(cluster.keyring(CLIENT, 1).request_auth(Request.TYPE, other.raw))
        conn.send(frame(other, other.raw, other.auth))
        await conn.writer.drain()
        await _dropped(lc, 1, "bad-authentication", before.get("bad-authentication", 0) + 1)
        await _dropped(lc, 1, "not-from-session-peer", before.get("not-from-session-peer", 0) + 1)
        # Its own request on its own session is served, and the reply comes back on it.
        mine = Request.make(0, 1, KVService.put(b"own", b"y"))
        mine = mine.with_auth(own.request_auth(Request.TYPE, mine.raw))
        conn.send(frame(mine, mine.raw, mine.auth))
        opener = Wire(own, DEFAULT_LIMITS, Counter(), sessions=True)
        reply = None
        for _ in range(20):  # the backup relays it, the primary orders it, the backup replies
            data = await conn.receive(5)
            assert data is not None, "no reply on the session its request came on"
            reply = opener.open(data, (REPLICA, 1))  # the session's tag vouches for it
            if isinstance(reply, Reply) and reply.timestamp == 1:
                break
        assert isinstance(reply, Reply) and (reply.client, reply.replica) == (0, 1)
    finally:
        conn.close()


async def test_a_recorded_client_stream_replayed_elsewhere_gets_nothing(local_cluster) -> None:
    """Everything client 0 sent to the primary, captured on its link and replayed on new
    connections to the primary and to a backup: before sessions, a replayed HELLO re-pointed the
    client's replies to the replayer. Now the primary answers the replayed INIT and refuses its
    FINISH (signed over another transcript), the backup refuses an INIT meant for the primary,
    the replayer receives nothing but one ACCEPT, and the client carries on."""
    lc = local_cluster
    cluster = lc.cluster
    tapped, recorder = await _tap_primary(cluster)
    try:
        async with Client(tapped, 0) as c:
            await c.wait_connected()
            assert value_of(await c.invoke(KVService.put(b"k", b"first"))) is None
            assert value_of(await c.invoke(KVService.put(b"k", b"second"))) == b"first"
            stream = b"".join(framed(f) for f in recorder.frames)
            executed = lc.status(0)["stats"]["executed-requests"]
            for target in (0, 1):
                before = lc.status(target)["dropped"].get("bad-handshake", 0)
                r = cluster.replicas[target]
                reader, writer = await asyncio.open_connection(r.host, r.port)
                writer.write(stream)
                got = b""
                while chunk := await asyncio.wait_for(reader.read(1 << 16), 5):
                    got += chunk
                writer.close()
                if target == 0:
                    (size,) = struct.unpack_from("!I", got)
                    assert len(got) == 4 + size < HANDSHAKE_BYTES_MAX  # one ACCEPT, then closed
                else:
                    assert got == b""  # an INIT for replica 0: refused at once
                await _dropped(lc, target, "bad-handshake", before + 1)
            assert value_of(await c.invoke(KVService.put(b"k", b"third"))) == b"second"
            assert lc.status(0)["stats"]["executed-requests"] == executed + 1
    finally:
        await recorder.close()


async def test_a_request_sent_again_by_its_client_is_not_executed_again(local_cluster) -> None:
    """A client that resends a request on a new session of its own (as after a restart) gets the
    cached reply while the request is inside its exactly-once window, and nothing once past it."""
    lc = local_cluster
    cluster = lc.cluster
    own = cluster.keyring(CLIENT, 0)
    opener = Wire(own, DEFAULT_LIMITS, Counter(), sessions=True)
    backup = cluster.replicas[1]

    def request(ts: int, value: bytes) -> bytes:
        req = Request.make(0, ts, KVService.put(b"k", value))
        req = req.with_auth(own.request_auth(Request.TYPE, req.raw))
        return frame(req, req.raw, req.auth)

    async def reply_to(conn: StreamSession, ts: int) -> Reply:
        while (data := await conn.receive(5)) is not None:
            reply = opener.open(data, (REPLICA, 1))
            if isinstance(reply, Reply) and reply.timestamp == ts:
                return reply
        raise AssertionError(f"no reply for timestamp {ts}")

    conn = await StreamSession.open(backup.host, backup.port, own, 1)
    conn.send(request(100, b"first"))
    assert value_of((await reply_to(conn, 100)).result) is None
    conn.close()
    before = lc.status(1)
    conn = await StreamSession.open(backup.host, backup.port, own, 1)
    try:
        conn.send(request(100, b"first"))
        assert value_of((await reply_to(conn, 100)).result) is None  # the cached reply
        after = lc.status(1)
        assert after["stats"]["retransmitted-replies"] == before["stats"].get("retransmitted-replies", 0) + 1
        assert after["stats"]["executed-requests"] == before["stats"]["executed-requests"]
        window = cluster.params.client_window
        for ts in range(101, 102 + window):
            conn.send(request(ts, b"v%d" % ts))
        await reply_to(conn, 101 + window)
        before = lc.status(1)
        conn.send(request(100, b"first"))
        await conn.writer.drain()
        await _dropped(lc, 1, "old-timestamp", before["dropped"].get("old-timestamp", 0) + 1)
        assert lc.status(1)["stats"]["executed-requests"] == before["stats"]["executed-requests"]
    finally:
        conn.close()


async def test_unauthenticated_connections_are_bounded_per_address_in_all_and_in_time(tmp_path) -> None:
    """At most 16 waiting handshakes from one address, 64 in all (the oldest gives way), 5 s each."""
    lc = LocalCluster(tmp_path / "cluster", 1, "kv", Params(checkpoint_interval=8, log_window=16))
    try:
        target = lc.cluster.replicas[1]

        def idle(source: str, count: int) -> list[socket.socket]:
            address = (target.host, target.port)
            return [socket.create_connection(address, source_address=(source, 0)) for _ in range(count)]

        # One address holding idle connections gets 16 of them, and locks nobody else out.
        held = idle("127.0.0.2", 20)
        try:
            await _dropped(lc, 1, "unauthenticated-connections-refused", 4)
            async with Client(lc.cluster, 0) as c:
                await c.wait_connected()
                assert value_of(await c.invoke(KVService.put(b"k", b"v"))) is None
            # Four addresses take all 64 places; a fifth's connections push the oldest out, and so
            # does a client's, which gets in at once rather than after the deadline.
            for source in ("127.0.0.3", "127.0.0.4", "127.0.0.5"):
                held += idle(source, 16)
            await asyncio.sleep(0.2)
            held += idle("127.0.0.6", 10)
            await _dropped(lc, 1, "unauthenticated-connections-evicted", 10)
            async with Client(lc.cluster, 1) as c:
                await asyncio.wait_for(c._peers[1].connected.wait(), 2.0)  # the attacked replica's session
                assert value_of(await c.invoke(KVService.put(b"k", b"w"))) == b"v"
            # And the deadline closes the idle ones that kept their place.
            await _dropped(lc, 1, "handshake-timeout", 40)
        finally:
            for s in held:
                s.close()
    finally:
        lc.stop()


async def test_an_encrypting_cluster_serves_and_its_frames_are_opaque(tmp_path) -> None:
    lc = LocalCluster(tmp_path / "cluster", 1, "kv", Params(checkpoint_interval=8, log_window=16, encrypt=True))
    try:
        tapped, recorder = await _tap_primary(lc.cluster)
        try:
            async with Client(tapped, 0) as c:
                await c.wait_connected()
                for i in range(20):
                    await c.invoke(KVService.put(b"plain-key", b"plain-value-%d" % i))
                assert value_of(await c.invoke(KVService.get(b"plain-key"))) == b"plain-value-19"
            assert len(recorder.frames) > 20
            assert not any(b"plain-value" in f for f in recorder.frames)
        finally:
            await recorder.close()
    finally:
        lc.stop()


# -- request keys and proactive recovery ---------------------------------------------------------


def test_request_tags_follow_the_session_keys_and_a_refresh_forgets_them(tmp_path) -> None:
    """A client's tags for replica 0 use the key its latest session exported; replica 0 takes that
    one and the one before it, and after a proactive recovery none: a tag it made with a key an
    intruder could have read then fails, and only the client's signature still convinces."""
    from bft import config

    cluster = config.load(config.keygen(tmp_path, f=1, clients=1, base_port=17100))
    client, replica = cluster.keyring(CLIENT, 0), cluster.keyring(REPLICA, 0)
    wire = Wire(replica, DEFAULT_LIMITS, Counter())

    def tagged(ts: int) -> bytes:
        req = Request.make(0, ts, b"op")
        return frame(req, req.raw, client.request_auth(Request.TYPE, req.raw))

    def fresh_session() -> None:
        a, b = Session(client, expect=0), Session(replica)
        b.receive_handshake(a.receive_handshake(b.receive_handshake(a.initiate())))
        client.use_session_key((REPLICA, 0), a.request_key)
        replica.use_session_key(b.peer, b.request_key)

    static = tagged(1)
    fresh_session()
    first = tagged(2)
    fresh_session()
    second = tagged(3)
    for data in (static, first, second):  # static: the "previous" of the first session
        assert wire.open(data) is not None
    assert wire.stats["requests-checked-by-signature"] == 1  # the static one, two sessions on
    replica.forget_session_keys()
    for data in (first, second):
        assert wire.open(data) is not None  # by signature only
    assert wire.stats["requests-checked-by-signature"] == 3
    req = Request.make(0, 9, b"op")
    unsigned = frame(req, req.raw, client.authenticator(Request.TYPE, req.raw) + bytes(SIGNATURE_BYTES))
    assert wire.open(unsigned) is None and wire.dropped["bad-authentication"] == 1


async def test_proactive_recovery_refreshes_every_replica_in_turn_and_clients_go_on(tmp_path) -> None:
    """A period of 2 s: every 0.5 s a replica closes all its sessions, forgets its request keys
    and audits its state, while two clients write and read; each replica recovers, every result
    is right, and a session opened before a replica's recovery is closed by it."""
    params = Params(checkpoint_interval=8, log_window=16, recovery_period_s=2)
    lc = LocalCluster(tmp_path / "cluster", 1, "kv", params)
    try:
        cluster = lc.cluster
        backup = cluster.replicas[1]
        old = await StreamSession.open(backup.host, backup.port, cluster.keyring(CLIENT, 3), 1)
        async with Client(cluster, 0) as a, Client(cluster, 1) as b:
            await asyncio.gather(a.wait_connected(), b.wait_connected())
            loop = asyncio.get_running_loop()
            end = loop.time() + 3.0
            rounds = 0
            while loop.time() < end:
                await asyncio.gather(
                    shared_workload(a, b"a%d" % rounds, 40), shared_workload(b, b"b%d" % rounds, 40)
                )
                rounds += 1
        assert await old.read_raw(5) is None  # replica 1 closed it when it recovered
        statuses = [lc.status(i) for i in range(cluster.n)]
        assert all(s["proactive_recoveries"] >= 1 for s in statuses), [s["proactive_recoveries"] for s in statuses]
        assert all(s["stats"].get("state-audits", 0) >= 1 for s in statuses)
        assert all(s["stats"].get("divergences", 0) == 0 for s in statuses)
        assert rounds >= 1 and all(p.poll() is None for p in lc.procs)
    finally:
        lc.stop()

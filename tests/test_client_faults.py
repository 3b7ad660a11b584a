"""The client core under a lying or crashed replica: faults cost what they must and no more."""

from __future__ import annotations

from dataclasses import replace

from bft.core.client import ASK_ALL_HOLD_MS, SILENT_AFTER, ClientCore
from bft.core.effects import Broadcast, Send
from bft.messages import Reply, Request, digest
from bft.service import KVService

from .test_core import PARAMS


def test_a_liar_among_the_first_replies_does_not_send_a_read_down_the_ordered_path() -> None:
    client = ClientCore(5, 1, PARAMS, first_timestamp=100)
    client.submit(KVService.get(b"k"), 0, read_only=True)
    client.take_outbox()
    client.on_reply(Reply(0, 100, 5, 0, b"a"), 1)
    client.on_reply(Reply(0, 100, 5, 3, b"lie"), 1)
    client.on_reply(Reply(0, 100, 5, 1, b"a"), 1)  # 2f+1 replies, no quorum yet, one may come
    assert client.take_outbox() == [] and client.stats["read-only-fallbacks"] == 0
    client.on_reply(Reply(0, 100, 5, 2, b"a"), 1)
    assert client.take_completed() == [(100, b"a")]


def test_a_read_falls_back_at_once_when_the_replica_that_could_agree_is_known_dead() -> None:
    client = ClientCore(5, 1, PARAMS, first_timestamp=100)
    now = 0
    for ts in range(100, 103):  # replica 3 misses three results in a row: it is not awaited
        client.submit(KVService.get(b"k"), now, read_only=True)
        for r in range(3):
            client.on_reply(Reply(0, ts, 5, r, b"a"), now + 1)
        now += PARAMS.request_timeout_ms
    client.take_outbox()
    client.take_completed()
    req = client.submit(KVService.get(b"k"), now, read_only=True)
    client.take_outbox()
    client.on_reply(Reply(0, req.timestamp, 5, 0, b"a"), now + 1)
    client.on_reply(Reply(0, req.timestamp, 5, 1, b"b"), now + 1)  # a write in between
    client.on_reply(Reply(0, req.timestamp, 5, 2, b"a"), now + 1)
    [fallback] = client.take_outbox()
    assert not fallback.msg.read_only and client.stats["read-only-fallbacks"] == 1


def test_a_late_designated_replica_is_waited_for_a_little_and_a_dead_one_costs_one_resend() -> None:
    """Digest replies: the designated replica sends the full result, the others its digest. Once
    a quorum agrees on the digest, a designated replica that has been answering is waited for a
    tenth of the request timeout (a resend makes every replica send the full result); one that
    missed the last SILENT_AFTER results is resent past at once."""
    client = ClientCore(5, 1, PARAMS, first_timestamp=100)
    result = b"x" * 1000
    now = 0

    def digests_from_all_but_designated() -> tuple[Request, int]:
        req = client.submit(KVService.put(b"k", b"v"), now)
        client.take_outbox()
        designated = (5 + req.timestamp) % 4
        for r in range(4):
            if r != designated:
                client.on_reply(Reply(0, req.timestamp, 5, r, digest(result), False, True), now + 1)
        return req, designated

    req, designated = digests_from_all_but_designated()
    assert client.take_outbox() == []  # it has been answering: wait for it
    wait = PARAMS.request_timeout_ms // 10
    assert client.tick(now + wait) == []
    assert client.tick(now + 1 + wait) == [Broadcast(req)]
    assert client.stats["resent-for-full-result"] == 1 and client.stats["retransmissions"] == 0
    assert client.timeout_ms() == PARAMS.request_timeout_ms  # no backoff: a quorum answered
    client.on_reply(Reply(0, req.timestamp, 5, (designated + 1) % 4, result), now + 2 + wait)
    assert client.take_completed() == [(100, result)]

    # Requests 101-103 are designated to replicas 2, 3 and 0; replica 1 answers none of them
    # (nor request 100, answered in full by replica 2 after the resend).
    for ts in range(101, 104):
        now += ASK_ALL_HOLD_MS + PARAMS.request_timeout_ms  # past the resend's hold: a quorum asked
        client.submit(KVService.put(b"k", b"v"), now)
        for r in (0, 2, 3):
            full = (5 + ts) % 4 == r
            client.on_reply(Reply(0, ts, 5, r, result if full else digest(result), False, not full), now + 1)
    # Missed: 100 (resent to all), and 102 and 103, which asked it (101 asked 2, 3 and 0).
    assert len(client.take_completed()) == 3 and client.misses[1] == SILENT_AFTER
    client.take_outbox()
    now += ASK_ALL_HOLD_MS + PARAMS.request_timeout_ms
    req = client.submit(KVService.put(b"k", b"v"), now)  # 104: its turn would be replica 1's
    assert not req.asks(1) and req.designated(4) == 2  # a silent replica is neither asked nor designated
    client.take_outbox()
    for r in (0, 2, 3):
        full = r == 2
        client.on_reply(Reply(0, req.timestamp, 5, r, result if full else digest(result), False, not full), now + 1)
    assert client.take_completed() == [(104, result)] and client.take_outbox() == []
    assert client.stats["resent-for-full-result"] == 1


def test_a_silent_designated_replica_is_resent_past_at_once_when_all_replicas_reply() -> None:
    """Without ``replies_from_quorum`` every replica replies and the designated one takes its
    turn: one that missed the last SILENT_AFTER results is resent past at once."""
    client = ClientCore(5, 1, replace(PARAMS, replies_from_quorum=False), first_timestamp=101)
    result = b"x" * 1000
    now = 0
    for ts in range(101, 104):  # designated to replicas 2, 3 and 0; replica 1 answers none
        now += PARAMS.request_timeout_ms
        assert client.submit(KVService.put(b"k", b"v"), now).repliers == 0
        for r in (0, 2, 3):
            full = (5 + ts) % 4 == r
            client.on_reply(Reply(0, ts, 5, r, result if full else digest(result), False, not full), now + 1)
    assert len(client.take_completed()) == 3 and client.misses[1] == SILENT_AFTER
    client.take_outbox()
    now += PARAMS.request_timeout_ms
    req = client.submit(KVService.put(b"k", b"v"), now)  # 104: designated to replica 1
    client.take_outbox()
    for r in (0, 2, 3):
        client.on_reply(Reply(0, req.timestamp, 5, r, digest(result), False, True), now + 1)
    assert client.take_outbox() == [Broadcast(req)]  # at once, no tenth of a timeout
    assert client.stats["resent-for-full-result"] == 1


def test_writes_ask_2f_plus_1_replicas_in_turn_and_a_disagreement_asks_all_at_once() -> None:
    """A write asks the replies its result needs (2f+1 with the read-only optimisation), the
    replica left out taking turns; if those asked all answer and disagree (a liar among them)
    the request goes to every replica at once, not at the time-out, every replica is asked for
    a while, and the liar counts as missing: after SILENT_AFTER such results it is left out."""
    client = ClientCore(5, 1, PARAMS, first_timestamp=100)
    asked = [client.submit(KVService.put(b"k", b"v"), 0) for _ in range(4)]
    assert [[r for r in range(4) if req.asks(r)] for req in asked] == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert [req.designated(4) for req in asked] == [1, 2, 3, 0]
    f1 = ClientCore(5, 1, replace(PARAMS, read_only=False))
    assert bin(f1.submit(b"op", 0).repliers).count("1") == 2  # f+1 suffice without read-only
    client = ClientCore(5, 1, PARAMS, first_timestamp=101)  # asks 2, 3 and 0 first
    now = 0
    while client.misses[3] < SILENT_AFTER:  # replica 3 lies whenever it is asked
        req = client.submit(KVService.put(b"k", b"v"), now)
        assert req.asks(3) and (req.repliers == 0) == (req.timestamp > 101)  # all, once they disagreed
        client.take_outbox()
        for r in range(4):
            if req.asks(r):
                client.on_reply(Reply(0, req.timestamp, 5, r, b"lie" if r == 3 else b"ok"), now + 1)
        if req.timestamp == 101:
            assert client.take_outbox() == [Broadcast(req)]
            client.on_reply(Reply(0, req.timestamp, 5, 1, b"ok"), now + 2)  # the one not asked
        assert client.take_completed() == [(req.timestamp, b"ok")]
        now += 10
    assert client.stats["resent-for-disagreement"] == 1
    now += ASK_ALL_HOLD_MS
    assert [r for r in range(4) if client.submit(KVService.put(b"k", b"v"), now).asks(r)] == [0, 1, 2]


def test_a_client_signs_only_where_a_tag_may_not_do_and_for_a_while_after_each_resend() -> None:
    """Signing costs the client more than the rest of a request: ordinary first sends go with
    tags alone; broadcasts of writes (large ones, resends), which backups hold and relay, are
    signed; after a resend everything is, for a period that doubles while resends go on."""
    always = ClientCore(0, 1, replace(PARAMS, sign_every_request=True))
    assert always.must_sign(Send(0, Request.make(0, 1, b"op")), 0)
    c = ClientCore(0, 1, PARAMS)  # the default
    assert not PARAMS.sign_every_request
    c.submit(KVService.put(b"k", b"v"), 0)
    (first,) = c.take_outbox()
    assert not c.must_sign(first, 0)
    c.submit(KVService.get(b"k"), 0, read_only=True)
    reads = c.take_outbox()  # to 2f+1 replicas, each answering on its own session
    assert len(reads) == 3 and all(isinstance(e, Send) and not c.must_sign(e, 0) for e in reads)
    c.submit(KVService.put(b"big", bytes(PARAMS.large_request_bytes + 1)), 0)
    (large,) = c.take_outbox()  # its first copies go to all, each kept by its replica alone
    assert isinstance(large, Broadcast) and not c.must_sign(large, 0)
    late = PARAMS.request_timeout_ms + 1
    sent = c.tick(late)  # the writes resent to all, the read sent to the fourth replica too
    assert len(sent) == 3 and all(c.must_sign(e, late) for e in sent)
    fourth = ({0, 1, 2, 3} - {e.to for e in reads}).pop()
    assert Send(fourth, reads[0].msg) in sent and c.stats["read-only-widened"] == 1
    hold = c.sign_until_ms - late
    assert hold > 0 and c.must_sign(first, late + hold - 1) and not c.must_sign(first, late + hold)
    # Resent again right after the period: still suspect, most likely; sign twice as long.
    c.inflight.clear()
    c.submit(KVService.put(b"k", b"w"), late + hold)
    c.take_outbox()
    again = late + hold + PARAMS.request_timeout_ms + 1
    c.tick(again)
    assert c.sign_until_ms - again == 2 * hold


def test_reads_go_to_2f_plus_1_replicas_in_turn_and_leave_a_silent_one_out() -> None:
    client = ClientCore(5, 1, PARAMS, first_timestamp=100)
    left_out = []
    for _ in range(4):
        req = client.submit(KVService.get(b"k"), 0, read_only=True)
        sent = client.take_outbox()
        assert len(sent) == 3 and all(isinstance(e, Send) and e.msg == req for e in sent)
        left_out.append(({0, 1, 2, 3} - {e.to for e in sent}).pop())
        client.abandon(req.timestamp)
    assert sorted(left_out) == [0, 1, 2, 3]  # each replica spared a quarter of the reads
    client.misses[2] = 3  # replica 2 missed its last three results: likely down
    for _ in range(4):
        req = client.submit(KVService.get(b"k"), 0, read_only=True)
        assert 2 not in {e.to for e in client.take_outbox()}
        client.abandon(req.timestamp)


def test_a_write_f_plus_1_replicas_answered_is_resent_without_back_off() -> None:
    """Executed (f+1 agree) but short of the 2f+1 it needs: a reply was lost or contradicted,
    not a sign of a slow cluster, so the resend does not double the time-out."""
    client = ClientCore(5, 1, PARAMS, first_timestamp=100)
    req = client.submit(KVService.put(b"k", b"v"), 0)
    client.take_outbox()
    asked = [r for r in range(4) if req.asks(r)]
    for r in asked[:2]:
        client.on_reply(Reply(0, req.timestamp, 5, r, b"ok"), 1)
    timeout = client.inflight[req.timestamp].timeout_ms
    for k in (1, 2, 3):
        assert client.tick(k * timeout) == [Broadcast(req)]
        assert client.inflight[req.timestamp].timeout_ms == timeout
    assert client.stats["resent-for-lost-replies"] == 3 and client.stats["retransmissions"] == 0
    client.on_reply(Reply(0, req.timestamp, 5, asked[2], b"ok"), 3 * timeout + 1)
    assert client.take_completed() == [(100, b"ok")]

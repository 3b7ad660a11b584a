"""The protocol core driven by hand through a fake link: no sockets, no clock, no randomness."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from msgspec.structs import replace as evolve

from bft.core.client import ClientCore
from bft.core.clients import ClientTable
from bft.core.effects import Broadcast, Executed, Persist, Promise, ReplyTo, Send
from bft.core.params import Params
from bft.core.promises import Proposed
from bft.core.replica import Replica
from bft.core.unreplicated import Unreplicated
from bft.messages import (
    Batch,
    Checkpoint,
    Commit,
    FetchPartition,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    State,
    Status,
    digest,
)
from bft.service import KVService, NullService

PARAMS = Params(checkpoint_interval=4, log_window=8, batch_size_max=8, inflight_max=1, client_window=4)
NOW = 1_000_000


class Link:
    """Delivers every replica's outbox to its destinations until the network is quiet.

    ``cut`` replicas neither send nor receive; ``drop`` filters individual deliveries."""

    def __init__(self, f: int = 1, params: Params = PARAMS) -> None:
        self.replicas = [Replica(i, f, params, KVService) for i in range(3 * f + 1)]
        self.replies: list[Reply] = []
        self.cut: set[int] = set()
        self.drop = lambda src, dst, msg: False
        self.queue: list[tuple[int, int, object]] = []
        self.persisted: dict[int, Persist] = {}
        self.records: dict[int, list] = {}  # each replica's promise log
        self.params = params
        self.f = f

    def post(self, src: int, effects: list) -> None:
        for effect in effects:
            match effect:
                case Persist():
                    self.persisted[src] = effect
                case Promise(record):
                    self.records.setdefault(src, []).append(record)
                case ReplyTo(_, reply):
                    self.replies.append(reply)
                case Broadcast(msg):
                    self.queue += [(src, j, msg) for j in range(len(self.replicas)) if j != src]
                case Send(to, msg):
                    self.queue.append((src, to, msg))
                case Executed():
                    pass
                case _:
                    raise AssertionError(f"unknown effect {effect!r}")

    def run(self, now: int = NOW) -> None:
        while self.queue:
            src, dst, msg = self.queue.pop(0)
            if src in self.cut or dst in self.cut or self.drop(src, dst, msg):
                continue
            self.post(dst, self.replicas[dst].step(msg, now))

    def request(self, req: Request, to: int = 0, now: int = NOW) -> None:
        self.post(to, self.replicas[to].step(req, now))
        self.run(now)

    def restart(self, i: int, from_disk: bool = True, params: Params | None = None) -> Replica:
        """Replica ``i`` stops and starts again: from its data directory, or wiped."""
        replica = Replica(i, self.f, params or self.params, KVService)
        if from_disk:
            replica.recover(self.persisted.get(i), list(self.records.get(i, [])))
        else:
            self.persisted.pop(i, None)
            self.records.pop(i, None)
        self.replicas[i] = replica
        self.post(i, replica.take_outbox())
        return replica

    def tick(self, now: int) -> None:
        for i, r in enumerate(self.replicas):
            if i not in self.cut:
                self.post(i, r.tick(now))
        self.run(now)


def put(client: int, ts: int, key: bytes, value: bytes) -> Request:
    return Request.make(client, ts, KVService.put(key, value))


def results(link: Link, client: int, ts: int) -> dict[int, bytes]:
    return {r.replica: r.result for r in link.replies if r.client == client and r.timestamp == ts}


def test_normal_case_executes_everywhere_and_replies_from_all() -> None:
    link = Link()
    link.request(put(7, 1, b"k", b"v"))
    assert all(r.executed == 1 for r in link.replicas)
    assert set(results(link, 7, 1)) == {0, 1, 2, 3}
    assert {msgpack.unpackb(v)[1] for v in results(link, 7, 1).values()} == {None}
    link.request(Request.make(7, 2, KVService.get(b"k")))
    assert {msgpack.unpackb(v)[1] for v in results(link, 7, 2).values()} == {b"v"}


def test_one_silent_backup_does_not_stop_progress() -> None:
    link = Link()
    link.cut = {3}
    for ts in range(1, 6):
        link.request(put(1, ts, b"k%d" % ts, b"v"))
    assert [r.executed for r in link.replicas[:3]] == [5, 5, 5]
    assert link.replicas[3].executed == 0


def test_two_silent_backups_stop_progress_but_not_safety() -> None:
    link = Link()
    link.cut = {2, 3}
    link.request(put(1, 1, b"k", b"v"))
    assert all(r.executed == 0 for r in link.replicas)
    assert link.replies == []


def test_primary_batches_while_its_window_is_full() -> None:
    link = Link()
    held: list = []
    link.drop = lambda src, dst, msg: isinstance(msg, Commit) and (held.append((src, dst, msg)) or True)
    link.request(put(1, 1, b"a", b"1"))  # seq 1 in flight: its commits are held back
    for ts in range(2, 6):
        link.request(put(1, ts, b"a", b"%d" % ts))
    assert link.replicas[0].normal.next_seq == 2 and len(link.replicas[0].normal.pending) == 4
    link.drop = lambda src, dst, msg: False
    link.queue += held
    link.run()
    primary = link.replicas[0]
    assert primary.stats["batches"] == 2 and primary.stats["batched-requests"] == 5
    assert all(r.executed == 2 for r in link.replicas)


def test_requests_that_arrive_together_go_in_one_batch() -> None:
    """The runtime hands the core the requests of one event-loop iteration at once: with its
    window free the primary orders them together, where one at a time the first went alone."""
    one_by_one, together = Link(), Link()
    burst = [put(c, 1, b"k%d" % c, b"v") for c in range(1, 5)]
    for req in burst:
        one_by_one.post(0, one_by_one.replicas[0].step(req, NOW))
    together.post(0, together.replicas[0].step_requests(burst, NOW))
    for link in (one_by_one, together):
        link.run()
        assert all(r.stats["executed-requests"] == 4 for r in link.replicas)
        assert {(q.client, q.replica) for q in link.replies} == {(c, i) for c in range(1, 5) for i in range(4)}
    assert one_by_one.replicas[0].stats["batches"] == 2  # the first alone, then the other three
    assert together.replicas[0].stats["batches"] == 1 and together.replicas[0].stats["batched-requests"] == 4


def test_a_large_request_kept_by_body_resolves_its_pre_prepare_without_holding_the_view_timer() -> None:
    """Its client's first copies, unsigned: the primary orders it, each backup keeps the body it
    was sent (``Replica.keep_body``) to resolve the pre-prepare's digest, and no backup holds it
    for a view change the primary could not have avoided."""
    link = Link()
    big = put(1, 1, b"big", bytes(link.params.large_request_bytes + 1))
    for i in (1, 2, 3):
        link.post(i, link.replicas[i].keep_body(big, NOW))
        assert link.replicas[i].timer.deadline_ms is None and not link.replicas[i].timer.waiting
    link.request(big)
    assert all(r.stats["executed-requests"] == 1 for r in link.replicas)
    assert {q.replica for q in link.replies if q.client == 1} == {0, 1, 2, 3}


def test_retransmitted_request_gets_cached_reply_and_old_one_is_dropped() -> None:
    link = Link()
    link.request(put(1, 10, b"k", b"first"))
    link.replies.clear()
    link.request(put(1, 10, b"k", b"first"), to=2)  # retransmission to a backup
    assert results(link, 1, 10) == {2: msgpack.packb([True, None])}
    for ts in range(11, 16):
        link.request(put(1, ts, b"k", b"%d" % ts))
    executed = link.replicas[0].stats["executed-requests"]
    link.request(put(1, 10, b"k", b"replayed"))  # now older than the window: dropped
    assert link.replicas[0].dropped["old-timestamp"] == 1
    assert link.replicas[0].stats["executed-requests"] == executed


def test_only_the_replicas_a_request_asks_reply_and_one_the_client_sent_it_to() -> None:
    link = Link()
    link.request(Request.make(1, 1, KVService.put(b"k", b"v"), repliers=0b0111))
    assert all(r.executed == 1 for r in link.replicas) and set(results(link, 1, 1)) == {0, 1, 2}
    # Sent to backup 3 by the client itself (it resends to all after a time-out), which may be
    # waiting for replicas it did not ask: 3 replies too.
    link.request(Request.make(1, 2, KVService.put(b"k", b"w"), repliers=0b0011), to=3)
    assert all(r.executed == 2 for r in link.replicas) and set(results(link, 1, 2)) == {0, 1, 3}
    link.replies.clear()
    link.request(Request.make(1, 2, KVService.put(b"k", b"w"), repliers=0b0011), to=2)  # executed: cached
    assert set(results(link, 1, 2)) == {2}


def test_duplicate_in_two_batches_executes_once() -> None:
    link = Link()
    primary = link.replicas[0]
    req = put(1, 1, b"k", b"v")
    for seq in (1, 2):
        primary.normal.pending.append(req)
        primary.normal.propose(NOW + seq)
        link.post(0, primary.take_outbox())
        link.run()
    assert all(r.executed == 2 and r.stats["executed-requests"] == 2 for r in link.replicas)
    assert len(results(link, 1, 1)) == 4  # one reply per replica, not two


def test_backup_rejects_pre_prepare_with_bad_timestamp() -> None:
    link = Link()
    backup = link.replicas[1]
    pp = PrePrepare.make(0, 1, NOW + PARAMS.clock_skew_max_ms + 1, (put(1, 1, b"k", b"v"),), 0)
    assert backup.step(pp, NOW) == []
    assert backup.dropped["bad-timestamp"] == 1
    ok = PrePrepare.make(0, 1, NOW, (put(1, 1, b"k", b"v"),), 0)
    backup.step(ok, NOW)
    older = PrePrepare.make(0, 2, NOW - 1, (put(1, 2, b"k", b"v"),), 0)
    assert backup.step(older, NOW) == []
    assert backup.dropped["non-monotonic-timestamp"] == 1


def test_backup_ignores_equivocation_and_messages_not_from_primary() -> None:
    backup = Link().replicas[1]
    a = PrePrepare.make(0, 1, NOW, (put(1, 1, b"k", b"a"),), 0)
    b = PrePrepare.make(0, 1, NOW, (put(1, 1, b"k", b"b"),), 0)
    out = backup.step(a, NOW)
    assert out == [Promise(Proposed(a)), Broadcast(Prepare(0, 1, a.digest, 1))]  # persist, then send
    assert backup.step(b, NOW) == []
    assert backup.dropped["conflicting-pre-prepare"] == 1
    assert backup.step(evolve(a, replica=2), NOW) == []
    assert backup.dropped["not-from-primary"] == 1
    assert backup.step(Prepare(0, 1, a.digest, 0), NOW) == []
    assert backup.dropped["prepare-from-primary"] == 1
    assert backup.step(Commit(0, PARAMS.log_window + 1, a.digest, 2), NOW) == []
    assert backup.dropped["out-of-window"] == 1


def test_conflicting_prepares_do_not_make_a_certificate() -> None:
    backup = Link().replicas[1]
    a = PrePrepare.make(0, 1, NOW, (put(1, 1, b"k", b"a"),), 0)
    backup.step(a, NOW)
    backup.step(Prepare(0, 1, bytes(32), 2), NOW)
    backup.step(Prepare(0, 1, bytes(32), 3), NOW)
    assert not backup.normal.log[1].prepared
    out = backup.step(Prepare(0, 1, a.digest, 3), NOW)  # replica 3 already voted: its first vote stands
    assert out == [] and not backup.normal.log[1].prepared


def test_checkpoints_become_stable_and_collect_the_log() -> None:
    link = Link()
    for ts in range(1, 10):
        link.request(put(1, ts, b"k%d" % ts, b"v"))
    for r in link.replicas:
        assert r.executed == 9
        assert r.stable == 8
        assert min(r.normal.log) > 8 and len(r.normal.log) == 1
        assert set(r.checkpoints.own) == {8}
    digests = {r.checkpoints.own[8].root for r in link.replicas}
    assert len(digests) == 1


def test_primary_stops_at_the_high_watermark_until_a_checkpoint_is_stable() -> None:
    link = Link()
    link.drop = lambda src, dst, msg: isinstance(msg, Checkpoint)
    for ts in range(1, 13):
        link.request(put(1, ts, b"k", b"%d" % ts))
    primary = link.replicas[0]
    assert primary.executed == PARAMS.log_window and primary.stable == 0
    assert len(primary.normal.pending) == 4
    link.drop = lambda src, dst, msg: False
    link.tick(NOW + 1_000)  # status messages make peers resend their checkpoints
    assert primary.stable == 8
    assert primary.executed == 9 and primary.stats["executed-requests"] == 12  # the 4 waiting, in one batch


def test_lost_messages_are_recovered_by_status_exchange() -> None:
    link = Link()
    link.drop = lambda src, dst, msg: dst == 2 and not isinstance(msg, Status)
    link.request(put(1, 1, b"k", b"v"))
    assert link.replicas[2].executed == 0
    link.drop = lambda src, dst, msg: False
    link.tick(NOW + 1_000)
    assert link.replicas[2].executed == 1


def test_lagging_replica_catches_up_by_state_transfer_and_resists_a_liar() -> None:
    link = Link()
    link.cut = {3}
    for ts in range(1, 11):
        link.request(put(1, ts, b"k%d" % ts, b"v%d" % ts))
    assert link.replicas[0].stable == 8
    lagging = link.replicas[3]
    link.cut = set()
    bogus = msgpack.packb([bytes(32)] * 257)
    lagging.step(State(8, bogus, 1), NOW)  # unrequested: dropped
    assert lagging.dropped["unrequested-state"] == 1
    # Replica 1 lies in everything it sends for the transfer; replicas 0 and 2 are honest.
    honest_on_partition = link.replicas[1].transfer.on_fetch_partition

    def lying_partition(fp, now):
        honest_on_partition(fp, now)
        sent = link.replicas[1].outbox.pop()
        lie = bytes([sent.msg.data[0] ^ 1]) + sent.msg.data[1:] if sent.msg.data else b"x"
        link.replicas[1].outbox.append(Send(sent.to, evolve(sent.msg, data=lie, total=len(lie))))

    link.replicas[1].handlers[FetchPartition] = lying_partition
    link.tick(NOW + 1_000)  # learns the certified checkpoint from peers' checkpoint messages
    assert lagging.transfer.target is not None and lagging.transfer.target[0] == 8
    lagging.step(State(8, bogus, 1), NOW + 1_000)
    assert lagging.dropped["state-digest-mismatch"] == 1
    for t in range(2_000, 6_000, 200):
        link.tick(NOW + t)
    assert lagging.executed == 10
    assert lagging.stats["state-transfers"] == 1
    assert lagging.service.items() == link.replicas[0].service.items()
    assert lagging.dropped["partition-digest-mismatch"] >= 1  # the liar was asked, caught, left
    # Only the partitions it lacked were fetched, not all 257.
    assert 0 < lagging.stats["state-transfer-partitions"] <= 10


def test_client_needs_f_plus_1_matching_replies_and_learns_the_view() -> None:
    client = ClientCore(5, 1, replace(PARAMS, read_only=False), first_timestamp=100)
    req = client.submit(KVService.get(b"k"), 0)
    assert client.take_outbox() == [Send(0, req)]
    client.on_reply(Reply(0, 100, 5, 0, b"lie"), 1)
    client.on_reply(Reply(9, 100, 5, 1, b"truth"), 1)
    assert client.take_completed() == []
    client.on_reply(Reply(4, 100, 5, 2, b"truth"), 1)
    assert client.take_completed() == [(100, b"truth")]
    assert client.view == 4  # a lone replica claiming view 9 does not move the client
    client.on_reply(Reply(4, 100, 5, 3, b"truth"), 1)
    assert client.dropped["unexpected-reply"] == 1


def test_with_read_only_optimisation_every_result_needs_2f_plus_1() -> None:
    client = ClientCore(5, 1, PARAMS, first_timestamp=100)  # read_only is on by default
    client.submit(KVService.put(b"k", b"v"), 0)
    client.on_reply(Reply(0, 100, 5, 0, b"ok"), 1)
    client.on_reply(Reply(0, 100, 5, 1, b"ok"), 1)
    assert client.take_completed() == []
    client.on_reply(Reply(0, 100, 5, 2, b"ok"), 1)
    assert client.take_completed() == [(100, b"ok")]


def test_tentative_replies_need_2f_plus_1() -> None:
    client = ClientCore(5, 1, replace(PARAMS, read_only=False, tentative=True), first_timestamp=100)
    client.submit(KVService.put(b"k", b"v"), 0)
    client.on_reply(Reply(0, 100, 5, 0, b"ok", tentative=True), 1)
    client.on_reply(Reply(0, 100, 5, 1, b"ok", tentative=True), 1)
    assert client.take_completed() == []
    client.on_reply(Reply(0, 100, 5, 2, b"ok", tentative=True), 1)
    assert client.take_completed() == [(100, b"ok")]


def test_client_resends_to_all_on_timeout_with_backoff() -> None:
    client = ClientCore(5, 1, PARAMS)
    req = client.submit(b"op", 0)
    client.take_outbox()
    assert client.tick(PARAMS.request_timeout_ms - 1) == []
    assert client.tick(PARAMS.request_timeout_ms) == [Broadcast(req)]
    assert client.tick(2 * PARAMS.request_timeout_ms) == []
    assert client.tick(3 * PARAMS.request_timeout_ms) == [Broadcast(req)]


def test_client_window_is_a_timestamp_range() -> None:
    client = ClientCore(5, 1, replace(PARAMS, read_only=False), first_timestamp=1)
    for _ in range(PARAMS.client_window):
        client.submit(b"op", 0)
    assert not client.can_submit()
    for ts in range(2, PARAMS.client_window + 1):  # all but the oldest complete
        for r in range(2):
            client.on_reply(Reply(0, ts, 5, r, b""), 0)
    assert not client.can_submit()  # the oldest still pins the window
    for r in range(2):
        client.on_reply(Reply(0, 1, 5, r, b""), 0)
    assert client.can_submit()


def test_unreplicated_core_is_exactly_once() -> None:
    server = Unreplicated(PARAMS, NullService())
    req = Request.make(1, 1, NullService.op(10))
    [sent] = server.step(req, NOW)
    assert sent.client == 1 and sent.reply.result == bytes(10)
    server.step(req, NOW)
    assert server.stats["executed-requests"] == 1


@pytest.mark.parametrize("f", [1, 2])
def test_replica_sets_scale_with_f(f: int) -> None:
    link = Link(f)
    link.cut = set(range(1, f + 1))
    link.request(put(1, 1, b"k", b"v"))
    live = [r for i, r in enumerate(link.replicas) if i not in link.cut]
    assert all(r.executed == 1 for r in live)
    assert len(results(link, 1, 1)) == 2 * f + 1


def test_read_only_request_runs_at_once_outside_the_order() -> None:
    link = Link()
    link.request(put(1, 1, b"k", b"v"))
    ro = Request.make(2, 1, KVService.get(b"k"), read_only=True)
    for i in range(4):
        link.post(i, link.replicas[i].step(ro, NOW))
    assert {msgpack.unpackb(v)[1] for v in results(link, 2, 1).values()} == {b"v"}
    assert all(r.executed == 1 and r.stats["read-only-requests"] == 1 for r in link.replicas)
    assert all(r.execution.clients.cached(2, 1) is None for r in link.replicas)  # not in the exactly-once table
    write = Request.make(2, 2, KVService.put(b"k", b"w"), read_only=True)
    assert link.replicas[1].step(write, NOW) == []
    assert link.replicas[1].dropped["not-read-only"] == 1


def test_read_only_client_needs_2f_plus_1_and_falls_back_when_replies_disagree() -> None:
    client = ClientCore(5, 1, PARAMS, first_timestamp=100)
    req = client.submit(KVService.get(b"k"), 0, read_only=True)
    assert client.take_outbox() == [Send(i, req) for i in range(3)]  # 2f+1 replicas, in turn
    client.on_reply(Reply(0, 100, 5, 0, b"a"), 1)
    client.on_reply(Reply(0, 100, 5, 1, b"a"), 1)
    assert client.take_completed() == []  # f+1 is not enough for a read-only result
    client.on_reply(Reply(0, 100, 5, 2, b"b"), 1)  # those three cannot agree: ask the fourth
    assert client.take_outbox() == [Send(3, req)] and client.stats["read-only-widened"] == 1
    client.on_reply(Reply(0, 100, 5, 3, b"c"), 1)  # now no 2f+1 can agree: fall back
    [sent] = client.take_outbox()
    dest, ordered = sent.to, sent.msg
    assert dest == 0 and not ordered.read_only and ordered.timestamp == 101
    assert client.stats["read-only-fallbacks"] == 1
    client.on_reply(Reply(0, 100, 5, 2, b"a"), 2)  # a late read-only reply no longer counts
    for r in range(3):  # the ordered fallback needs 2f+1 too with the optimisation on
        client.on_reply(Reply(0, 101, 5, r, b"a"), 2)
    assert client.take_completed() == [(100, b"a")]  # reported under the caller's timestamp


def test_read_only_client_falls_back_on_timeout() -> None:
    client = ClientCore(5, 1, PARAMS, first_timestamp=100)
    req = client.submit(KVService.get(b"k"), 0, read_only=True)
    client.take_outbox()
    widen = PARAMS.request_timeout_ms // 10  # the three asked first are slow: ask the fourth
    assert client.tick(widen - 1) == [] and client.tick(widen) == [Send(3, req)]
    assert client.sign_until_ms < widen  # not a resend: no signing period
    [sent] = client.tick(widen + PARAMS.request_timeout_ms)
    dest, ordered = sent.to, sent.msg
    assert dest == 0 and not ordered.read_only


def test_a_read_only_fallback_goes_before_new_operations() -> None:
    """Seed 241 (Byzantine): a read that could not agree waited for room in the timestamp window
    to fall back, and its busy client took the room each time it opened, for 8 s."""
    client = ClientCore(5, 1, PARAMS, first_timestamp=100)
    client.submit(KVService.get(b"k"), 0, read_only=True)
    for i in range(PARAMS.client_window):
        client.submit(KVService.put(b"k", b"%d" % i), 0)
    client.take_outbox()
    assert not client.can_submit()
    [widened] = client.tick(PARAMS.request_timeout_ms // 10)  # the read to the fourth replica too
    assert widened.msg.timestamp == 100 and widened.msg.read_only
    late = PARAMS.request_timeout_ms // 10 + PARAMS.request_timeout_ms
    resent = client.tick(late)
    assert [e.msg.timestamp for e in resent] == list(range(101, 101 + PARAMS.client_window))  # writes only:
    assert not client.can_submit()  # the read waits to fall back, and nothing goes before it
    for r in range(3):
        client.on_reply(Reply(0, 101, 5, r, b"ok"), late + 1)
    [sent] = client.take_outbox()  # the write's completion made room: the fallback takes it
    assert not sent.msg.read_only and sent.msg.timestamp == 100 + PARAMS.client_window + 1
    assert client.stats["read-only-fallbacks"] == 1


def test_stable_checkpoints_are_persisted_and_a_restart_resumes_from_them() -> None:
    link = Link()
    for ts in range(1, 11):
        link.request(put(1, ts, b"k%d" % ts, b"v%d" % ts))
    saved = link.persisted[2]
    assert saved.seq == 8 and len({r for r, _ in saved.proof}) >= 3
    restarted = Replica(2, 1, PARAMS, KVService)
    restarted.recover(saved, [])  # the checkpoint alone, as with durability = "memory"
    assert restarted.executed == 8 and restarted.stable == 8
    link.replicas[2] = restarted
    link.tick(NOW + 1_000)  # status exchange brings it the rest of the log
    assert restarted.executed == 10
    assert restarted.service.items() == link.replicas[0].service.items()
    snap = saved.snapshot
    damaged = evolve(saved, snapshot=replace(snap, parts=(snap.parts[0] + b"x", *snap.parts[1:])))
    with pytest.raises(ValueError, match="damaged"):
        Replica(2, 1, PARAMS, KVService).recover(damaged, [])


def test_digest_replies_one_full_result_and_digests_from_the_others() -> None:
    link = Link()
    big = b"v" * 1000
    link.request(put(1, 1, b"k", big))
    link.replies.clear()
    req = Request.make(1, 2, KVService.get(b"k"))
    link.request(req)
    replies = [r for r in link.replies if r.timestamp == 2]
    full = [r for r in replies if not r.digest_only]
    assert len(replies) == 4 and [r.replica for r in full] == [(1 + 2) % 4]
    assert all(r.result == digest(full[0].result) for r in replies if r.digest_only)
    client = ClientCore(1, 1, PARAMS, first_timestamp=2)
    client.submit(KVService.get(b"k"), 0)
    for r in sorted(replies, key=lambda r: r.digest_only, reverse=True):  # digests first
        client.on_reply(r, 1)
    assert client.take_completed() == [(2, msgpack.packb([True, big]))]
    link.replies.clear()
    link.request(req, to=0)  # a retransmission gets the full result, whoever answers
    assert [r.digest_only for r in link.replies] == [False]


def test_client_waits_for_the_full_result_behind_agreeing_digests() -> None:
    client = ClientCore(1, 1, replace(PARAMS, read_only=False), first_timestamp=5)
    client.submit(b"op", 0)
    result = b"r" * 1000
    client.on_reply(Reply(0, 5, 1, 0, digest(result), digest_only=True), 1)
    client.on_reply(Reply(0, 5, 1, 1, digest(result), digest_only=True), 1)
    assert client.take_completed() == []  # f+1 agree, but nobody sent the result itself
    client.on_reply(Reply(0, 5, 1, 2, b"x" * 1000), 1)  # a liar's full result does not match
    assert client.take_completed() == []
    client.on_reply(Reply(0, 5, 1, 3, result), 1)
    assert client.take_completed() == [(5, result)]


def test_large_requests_travel_apart_from_their_batch() -> None:
    params = replace(PARAMS, large_request_bytes=100)
    link = Link(params=params)
    big = put(1, 1, b"k", b"v" * 500)
    client = ClientCore(1, 1, params, first_timestamp=1)
    sent = client.submit(big.op, 0)
    assert client.take_outbox() == [Broadcast(sent)]  # a large request goes to every replica
    # Replica 3 does not get the body from the client; the others do.
    sent_pp = []
    link.drop = lambda src, dst, msg: isinstance(msg, PrePrepare) and (sent_pp.append(msg) or True)
    for i in (1, 2, 0):
        link.request(big, to=i)
    assert sent_pp and all(r == big.digest for pp in sent_pp for r in pp.requests)  # by digest only
    link.drop = lambda src, dst, msg: False
    link.queue += [(0, j, pp) for pp in sent_pp[:1] for j in (1, 2, 3)]
    link.run()
    assert [r.executed for r in link.replicas] == [1, 1, 1, 0]
    assert 1 in link.replicas[3].large.unresolved
    link.tick(NOW + 1_000)  # replica 3 fetches the batch from the primary and catches up
    assert link.replicas[3].executed == 1 and not link.replicas[3].large.unresolved


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40), st.integers(0, 45)), max_size=200))
def test_the_exactly_once_table_keeps_exactly_the_window_whatever_the_order(records) -> None:
    """Pruned through a heap per client; the same entries as the rule says: once a client has
    more than ``window`` cached, every timestamp at or below newest - window goes, and so does
    every one below the highest watermark its requests settled (never past a request itself)."""
    table, model, newest, below = ClientTable(4), {}, {}, {}
    for client, ts, settled in records:
        table.record(client, ts, b"%d" % ts, settled)
        row = model.setdefault(client, {})
        row[ts] = b"%d" % ts
        newest[client] = max(ts, newest.get(client, ts))
        if len(row) > 4:
            row = model[client] = {t: v for t, v in row.items() if t > newest[client] - 4}
        below[client] = max(min(settled, ts), below.get(client, 0))
        model[client] = {t: v for t, v in row.items() if t >= below[client]}
        assert table.too_old(client, below[client] - 1) and not table.cached(client, below[client] - 1)
    rows = sorted((c, newest[c], below[c], sorted(r.items())) for c, r in model.items())
    assert table.encode() == msgpack.packb(rows)
    again = ClientTable(4)
    again.restore(table.encode())
    for client, ts, settled in records[:20]:
        again.record(client, ts + 50, b"x", settled + 50)
        table.record(client, ts + 50, b"x", settled + 50)
    assert again.encode() == table.encode()


def test_a_client_table_from_before_settled_restores_with_nothing_settled() -> None:
    table = ClientTable(4)
    table.restore(msgpack.packb([(1, 5, [(4, b"four"), (5, b"five")])]))
    assert table.cached(1, 4) == b"four" and not table.too_old(1, 4)
    assert table.encode() == msgpack.packb([(1, 5, 0, [(4, b"four"), (5, b"five")])])
    for bad in ([(1, 5)], [(1, 5, 0, [], 9)], [7]):
        with pytest.raises(ValueError, match="malformed client table"):
            ClientTable(4).restore(msgpack.packb(bad))


def test_a_client_that_settles_what_it_never_got_only_loses_those_requests() -> None:
    """A faulty client's watermark is its own business: it can make its own unexecuted
    requests too old (at every replica alike), never reach past the request carrying it, and
    never touch another client's entries."""
    link = Link()
    link.request(put(2, 1, b"other", b"v"))
    link.request(Request.make(1, 5, KVService.put(b"k", b"five"), settled=99))  # past itself: capped at 5
    link.request(Request.make(1, 6, KVService.put(b"k", b"six")))
    link.request(Request.make(1, 3, KVService.put(b"k", b"three")))  # below what 5 settled
    assert link.replicas[0].dropped["old-timestamp"] == 1
    link.request(put(2, 2, b"other", b"w"))
    tables = {r.execution.clients.encode() for r in link.replicas}
    assert len(tables) == 1  # every replica the same
    rows = {c: (top, settled, [ts for ts, _ in got]) for c, top, settled, got in msgpack.unpackb(tables.pop())}
    assert rows == {1: (6, 5, [5, 6]), 2: (2, 0, [1, 2])}
    reads = {r.execution.service.execute(KVService.get(b"k"), 0, 0) for r in link.replicas}
    assert [msgpack.unpackb(v) for v in reads] == [[True, b"six"]]  # three never ran


def test_a_closed_loop_client_leaves_one_reply_in_the_table() -> None:
    """A client with one operation at a time settles each request's predecessors: its row in the
    checkpointed table holds its latest reply, not ``client_window`` of them."""
    link = Link()
    client = ClientCore(1, 1, link.replicas[0].params)
    for i in range(10):
        req = client.submit(KVService.put(b"k", b"%d" % i), NOW)
        assert req.settled == req.timestamp  # nothing older in flight
        link.request(req)
        for reply in link.replies:
            client.on_reply(reply, NOW)
        link.replies.clear()
        assert [ts for ts, _ in client.take_completed()] == [req.timestamp]
    for replica in link.replicas:
        [(who, newest, settled, replies)] = msgpack.unpackb(replica.execution.clients.encode())
        assert (who, newest, settled, [ts for ts, _ in replies]) == (1, 10, 10, [10])


def test_a_batch_is_taken_only_for_the_seq_and_digest_asked_for() -> None:
    """Besides every request in it proving its client (the wire), a batch is taken only for the
    (seq, digest) the replica asked for. Unasked, or asked for another digest: dropped."""
    replica = Link().replicas[1]
    forged = PrePrepare.make(0, 1, NOW, (put(1, 1, b"k", b"forged"),), 0)
    replica.step(Batch.of(forged, 3), NOW)
    assert replica.dropped["unrequested-batch"] == 1
    replica.view_change.wanted_batches.add((1, digest(b"the certified batch")))
    replica.step(Batch.of(forged, 3), NOW)
    assert replica.dropped["unrequested-batch"] == 2 and not replica.view_change.batches


def test_a_request_a_backup_cannot_check_resolves_once_f_plus_1_replicas_vouch_for_its_batch() -> None:
    """A backup that lost the key its client tagged with (a restart) holds the request by digest
    and keeps the body aside (``offer_unverified``). The primary's pre-prepare alone is one voice,
    a prepare from another backup the second: f+1, one of them correct and checked the request,
    so the backup takes the batch and the slot commits everywhere. A body whose digest the batch
    does not name resolves nothing."""
    link = Link()
    req = put(1, 1, b"k", b"v")
    pps: list[PrePrepare] = []
    link.drop = lambda src, dst, msg: dst == 3 and ((isinstance(msg, PrePrepare) and pps.append(msg)) or True)
    link.request(req)
    [pp] = pps
    backup = link.replicas[3]
    held = evolve(pp, requests=(req.digest,))
    link.post(3, backup.offer_unverified([put(1, 1, b"k", b"forged")], NOW))
    link.post(3, backup.step(held, NOW))
    assert 1 in backup.large.unresolved and not link.queue  # the primary alone: one voice
    link.post(3, backup.offer_unverified([req], NOW))
    assert 1 in backup.large.unresolved and not link.queue  # still one, whatever bodies it has
    link.drop = lambda src, dst, msg: False
    link.post(3, backup.step(Prepare(0, 1, pp.digest, 1), NOW))  # the second voice
    assert 1 not in backup.large.unresolved and backup.stats["requests-resolved-unverified"] == 1
    link.run()
    link.tick(NOW + 1_000)  # the commits it missed come again with the others' status
    assert [r.executed for r in link.replicas] == [1, 1, 1, 1]
    assert set(results(link, 1, 1)) == {0, 1, 2, 3}
    assert backup.normal.log[1].pre_prepare.requests == (req,)  # the body the batch names

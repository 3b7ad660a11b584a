"""The view change: the decision rule driven with crafted sets (f liars included), and replicas
moving to a new view through a fake link when the primary is silent."""

from __future__ import annotations

from dataclasses import replace

from bft.core.decision import decide
from bft.core.replica import Replica
from bft.messages import NULL_DIGEST, Checkpoint, Commit, NewView, PrePrepare, ViewChange

from .test_core import NOW, PARAMS, Link, put, results

F = 1
L = PARAMS.log_window
D1, D2, C8 = b"\x01" * 32, b"\x02" * 32, b"\x08" * 32
GENESIS = (0, b"\x00" * 32)


def vc(replica: int, prepared=(), preprepared=(), stable: int = 0, checkpoints=(GENESIS,), view: int = 1):
    return ViewChange(view, stable, tuple(checkpoints), tuple(prepared), tuple(preprepared), replica)


def test_null_batches_when_nothing_prepared() -> None:
    d = decide([vc(0), vc(1), vc(2)], F, L)
    assert d is not None and d.checkpoint == GENESIS and d.batches == ()


def test_waits_for_2f_plus_1_view_changes() -> None:
    assert decide([vc(0), vc(1)], F, L) is None


def test_prepared_batch_is_kept() -> None:
    q = ((1, ((D1, 0),)),)
    vcs = [vc(0, [(1, D1, 0)], q), vc(1, [(1, D1, 0)], q), vc(2, [], q)]
    d = decide(vcs, F, L)
    assert d is not None and d.batches == ((1, D1),)


def test_gap_before_a_prepared_batch_is_filled_with_null() -> None:
    q = ((2, ((D1, 0),)),)
    vcs = [vc(0, [(2, D1, 0)], q), vc(1, [], q), vc(2, [], ())]
    d = decide(vcs, F, L)
    assert d is not None and d.batches == ((1, NULL_DIGEST), (2, D1))


def test_a_liar_claiming_an_unprepared_batch_needs_f_plus_1_q_support() -> None:
    # Replica 3 lies that D2 prepared at seq 1; nobody else pre-prepared D2, so A2 fails and the
    # seq becomes null (2f+1 honest messages have no P entry for it).
    liar = vc(3, [(1, D2, 0)], ((1, ((D2, 0),)),))
    d = decide([vc(0), vc(1), vc(2), liar], F, L)
    assert d is not None and d.batches == ((1, NULL_DIGEST),)


def test_a_liar_hiding_a_prepared_batch_cannot_erase_it() -> None:
    # D1 prepared at 0, 1 and 2 (2f+1). Replica 2 lies by omission; 0 and 1 still carry it,
    # and the null rule needs 2f+1 messages without a P entry, which a single liar cannot give.
    q = ((1, ((D1, 0),)),)
    honest = [vc(0, [(1, D1, 0)], q), vc(1, [(1, D1, 0)], q)]
    hider = vc(2, [], ())
    d = decide([*honest, hider], F, L)
    assert d is not None and d.batches == ((1, D1),)


def test_later_view_wins_and_a_stale_claim_waits_for_more_evidence() -> None:
    q_new = ((1, ((D1, 0), (D2, 2))),)
    vcs = [
        vc(0, [(1, D2, 2)], q_new, view=3),
        vc(1, [(1, D1, 0)], ((1, ((D1, 0),)),), view=3),
        vc(2, [(1, D2, 2)], q_new, view=3),
    ]
    d = decide(vcs, F, L)
    assert d is not None and d.batches == ((1, D2),)
    # With only one message carrying the later view, A1 fails for D2 (replica 1 reports D1 in an
    # earlier view... which is lower, fine) but A2 needs f+1 Q entries for D2 at view >= 2.
    weak = [vcs[0], vcs[1], vc(2, [], ((1, ((D1, 0),)),), view=3)]
    assert decide(weak, F, L) is None


def test_checkpoint_needs_2f_plus_1_low_marks_and_f_plus_1_claims() -> None:
    ckpt = (8, C8)
    vcs = [
        vc(0, stable=8, checkpoints=[ckpt]),
        vc(1, stable=0, checkpoints=[GENESIS, ckpt]),
        vc(2, stable=0, checkpoints=[GENESIS]),
    ]
    d = decide(vcs, F, L)
    assert d is not None and d.checkpoint == ckpt
    liar = vc(3, stable=8, checkpoints=[(8, D2)])  # one liar's checkpoint is not enough
    assert decide([vcs[2], liar, vc(1)], F, L) is None  # and its low mark keeps genesis short of 2f+1
    d = decide([vc(0), vc(1), vc(2), liar], F, L)
    assert d is not None and d.checkpoint == GENESIS


def test_duplicate_senders_do_not_count_twice() -> None:
    assert decide([vc(0), vc(0), vc(1)], F, L) is None


# -- replicas through the fake link -------------------------------------------------------------


def elapse(link: Link, start: int, ms: int, step: int = 50) -> int:
    for t in range(start, start + ms, step):
        link.tick(t)
    return start + ms


def test_silent_primary_is_replaced_and_requests_survive() -> None:
    link = Link()
    link.request(put(1, 1, b"k", b"v1"))
    link.cut = {0}
    req = put(1, 2, b"k", b"v2")
    for backup in (1, 2, 3):  # the client timed out and sent to everyone
        link.request(req, to=backup)
    now = elapse(link, NOW, 3 * PARAMS.view_timeout_ms)
    live = link.replicas[1:]
    assert all(r.view == 1 and not r.view_changing for r in live)
    assert all(r.executed == 2 for r in live)
    assert set(results(link, 1, 2)) == {1, 2, 3}
    assert all(r.stats["views-entered"] == 1 for r in live)
    link.request(put(1, 3, b"k", b"v3"), to=1, now=now)  # the new primary orders new work
    assert all(r.executed == 3 for r in live)


def test_prepared_request_is_reproposed_in_the_new_view() -> None:
    link = Link()
    # No commit of view 0 gets through: seq 1 prepares everywhere but commits nowhere.
    link.drop = lambda src, dst, msg: type(msg).__name__ == "Commit" and msg.view == 0
    link.request(put(1, 1, b"k", b"v"))
    assert all(r.normal.log[1].prepared for r in link.replicas)
    assert all(r.executed == 0 for r in link.replicas)
    link.cut = {0}
    for backup in (1, 2, 3):
        link.request(put(1, 1, b"k", b"v"), to=backup)
    elapse(link, NOW, 3 * PARAMS.view_timeout_ms)
    for r in link.replicas[1:]:
        assert r.view == 1 and r.executed == 1
        assert r.view_change.new_view is not None and r.view_change.new_view.decisions[0][1] != NULL_DIGEST


def test_backup_rejects_a_new_view_whose_decision_does_not_follow() -> None:
    link = Link()
    q = ((1, ((D1, 0),)),)
    vcs = (vc(1, [(1, D1, 0)], q), vc(2, [(1, D1, 0)], q), vc(3, [], ()))
    forged = NewView(1, vcs, GENESIS, ((1, NULL_DIGEST),), 1)  # erases the prepared D1
    backup: Replica = link.replicas[2]
    backup.view_change.start(1)
    backup.step(forged, NOW)
    assert backup.dropped["bad-new-view"] == 1 and backup.view_changing
    honest = NewView(1, vcs, GENESIS, ((1, D1),), 1)
    backup.step(honest, NOW)
    assert not backup.view_changing and backup.normal.log[1].expected == D1


def test_f_plus_1_view_changes_pull_a_replica_along() -> None:
    link = Link()
    r3 = link.replicas[3]
    r3.step(vc(1, view=2), NOW)
    assert r3.view == 0
    r3.step(vc(2, view=3), NOW)
    assert r3.view == 2 and r3.view_changing  # joins the smallest view of the f+1


def test_a_replica_that_moved_on_still_counts_for_the_view_change_timer() -> None:
    """Seed 1050 (all faults): replica 1 saw 2f+1 VIEW-CHANGEs for view 2 and timed out there
    while view 2's primary was cut off; 0 and 2 had only their own for view 2, and 1's for view 3,
    which replaced its view-2 one. Counting view 2 alone, no timer ran anywhere, for ever."""
    r0 = Link().replicas[0]
    r0.step(vc(2, view=2), NOW)
    r0.step(vc(1, view=3), NOW)  # f+1 want a later view: 0 joins view 2, the smallest
    assert r0.view == 2 and r0.view_changing
    assert r0.timer.deadline_ms is not None  # its own and 2's for view 2, and 1's for view 3
    r0.tick(r0.timer.deadline_ms)
    assert r0.view == 3 and r0.view_changing


def test_byzantine_new_primary_cannot_reorder_below_the_new_view_checkpoint() -> None:
    """Found in review: replicas that lack the NEW-VIEW's checkpoint kept their old low mark,
    and a Byzantine new primary could order a different batch at a sequence number the
    others had already executed."""
    params = replace(PARAMS, batch_size_max=1, inflight_max=8, client_window=16)
    link = Link(params=params)

    def phase1(src, dst, msg):  # 2 misses the pre-prepares; 1 commits only to 0; no checkpoints
        return (
            (isinstance(msg, PrePrepare) and dst == 2)
            or (isinstance(msg, Commit) and src == 1 and dst != 0)
            or isinstance(msg, Checkpoint)
        )

    link.drop = phase1
    for ts in range(1, 5):
        link.request(put(9, ts, b"k", b"good%d" % ts))
    assert [r.executed for r in link.replicas] == [4, 4, 0, 0]
    for r in link.replicas:
        r.view_change.start(1)
        r.take_outbox()
    new_primary = link.replicas[1]
    for r in link.replicas:
        if r.id != 1:
            new_primary.step(r.view_change.view_changes[1][r.id], NOW)
    new_primary.take_outbox()
    nv = new_primary.view_change.new_view
    assert nv is not None and nv.checkpoint[0] == 4
    for i in (0, 2, 3):
        link.replicas[i].step(nv, NOW)
        link.replicas[i].take_outbox()
    evil = PrePrepare.make(1, 1, NOW, (put(9, 1, b"k", b"EVIL"),), 1)
    link.drop = lambda src, dst, msg: dst in (0, 1)
    for i in (2, 3):
        link.post(i, link.replicas[i].step(evil, NOW))
        link.post(i, link.replicas[i].step(Commit(1, 1, evil.digest, 1), NOW))
    link.run()
    for i in (2, 3):
        assert link.replicas[i].executed == 0
        assert link.replicas[i].dropped["below-new-view-checkpoint"] >= 1


def test_a_primary_that_censors_one_client_is_replaced() -> None:
    """Found in review: progress on other clients' requests kept restarting the view timer."""
    link = Link()
    censored = put(2, 1, b"c", b"censored")
    link.drop = lambda src, dst, msg: src == 0 and isinstance(msg, PrePrepare) and censored in msg.requests
    for backup in (1, 2, 3):
        link.request(censored, to=backup)
    t = NOW
    for ts in range(1, 60):  # client 1 keeps the primary busy with other work
        link.request(put(1, ts, b"k", b"%d" % ts), now=t)
        link.tick(t)
        t += 50
    assert all(r.view >= 1 for r in link.replicas[1:])
    assert set(results(link, 2, 1)) >= {1, 2, 3}

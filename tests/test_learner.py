"""A correct replica pushed out of the view learns what commits there, and replies."""

from __future__ import annotations

from bft.messages import Commit, PrePrepare, Status

from .test_core import NOW, Link, put, results


def test_a_replica_that_left_the_view_alone_executes_what_commits_in_it() -> None:
    link = Link()
    link.request(put(1, 1, b"k", b"a"))
    out = link.replicas[3]
    out.view_change.start(1)  # cut off, it timed out alone; the others stay in view 0
    link.queue.clear()
    link.cut = {3}
    for ts in range(2, 4):  # below checkpoint 4: the slots are still in the others' logs
        link.request(put(1, ts, b"k", b"v%d" % ts))
    assert [r.executed for r in link.replicas] == [3, 3, 3, 1]
    link.cut = set()
    said: list = []
    link.drop = lambda src, dst, msg: src == 3 and said.append(msg) is not None  # records, drops nothing
    link.tick(NOW + 1_000)  # its STATUS (view 1, changing) gets the pre-prepares and commits
    assert out.view == 1 and out.view_changing  # it did not go back to view 0 ...
    assert out.executed == 3 and out.stats["learned-batches"] == 2  # ... but it learned
    assert out.service.items() == link.replicas[0].service.items()
    assert 3 in results(link, 1, 3)  # and replied: its answer counts for the client
    assert said and not [m for m in said if getattr(m, "view", 1) == 0]  # it said nothing in view 0


def test_commits_alone_or_a_pre_prepare_from_a_non_primary_teach_nothing() -> None:
    link = Link()
    out = link.replicas[3]
    out.view_change.start(1)
    fake = PrePrepare.make(0, 1, NOW, (put(1, 1, b"k", b"x"),), 2)  # replica 2 is not view 0's primary
    out.step(fake, NOW)
    for voter in (0, 1, 2):
        out.step(Commit(0, 1, fake.digest, voter), NOW)
    assert out.executed == 0 and out.stats["learned-batches"] == 0
    out.step(Status(0, 0, 0, False, 0), NOW)  # and nothing in its answers speaks for view 0
    assert out.executed == 0


def test_a_replica_that_left_the_view_alone_waits_there_and_rejoins_at_the_next_view_change() -> None:
    """It does not run ahead (its view-change timer starts only once 2f+1 replicas change view,
    as in PBFT), so when the others next change view it is in that view with them, taking part
    in the normal case again, not learning from the outside."""
    link = Link()
    link.request(put(1, 1, b"k", b"a"))
    out = link.replicas[3]
    out.view_change.start(1)
    link.run()
    for t in range(1, 20):  # many view timeouts pass
        link.tick(NOW + t * 2_000)
    assert out.view == 1 and out.view_changing
    assert [r.view for r in link.replicas[:3]] == [0, 0, 0]
    for r in link.replicas[:3]:  # the next view change, for reasons of their own
        link.post(r.id, r.view_change.start(1) or r.take_outbox())
    link.run(NOW + 40_000)
    assert [(r.view, r.view_changing) for r in link.replicas] == [(1, False)] * 4
    link.request(put(1, 2, b"k", b"b"), to=1, now=NOW + 40_000)
    assert all(r.executed == 2 for r in link.replicas)
    assert out.stats["learned-batches"] == 0 and 3 in results(link, 1, 2)

"""Restarts from the data directory, driven through the core: a replica resumes with its promises
and its committed batches, and never contradicts what it said before it stopped."""

from __future__ import annotations

from dataclasses import replace

import msgpack
from msgspec.structs import replace as evolve

from bft.core.decision import decide
from bft.core.effects import Broadcast
from bft.core.promises import Prepared, Proposed
from bft.messages import Commit, Prepare, PrePrepare
from bft.service import KVService

from .test_core import NOW, PARAMS, Link, put, results


def test_a_restart_replays_the_committed_batches_after_its_checkpoint() -> None:
    link = Link()
    for ts in range(1, 11):
        link.request(put(1, ts, b"k%d" % ts, b"v%d" % ts))
    assert link.persisted[2].seq == 8
    restarted = link.restart(2)
    # At once, before any message: checkpoint 8 from disk, then batches 9 and 10 from the log.
    assert restarted.executed == 10 and restarted.stable == 8
    assert restarted.stats["replayed-batches"] == 2
    assert restarted.service.items() == link.replicas[0].service.items()
    link.request(put(1, 11, b"k", b"after"))
    assert restarted.executed == 11 and restarted.stats["state-fetches"] == 0


def test_a_memory_mode_replica_keeps_no_promises() -> None:
    params = replace(PARAMS, durability="memory")
    link = Link(params=params)
    link.request(put(1, 1, b"k", b"v"))
    assert link.records == {} and all(r.executed == 1 for r in link.replicas)


def test_one_restart_and_one_liar_cannot_undo_an_accepted_write() -> None:
    """The scenario of the durability issue: put(k, A) is accepted; backup 3, which prepared it
    but never saw it commit, restarts; the Byzantine primary 0 then offers 3 another batch for
    the same slot and, in the view change, lies that it prepared nothing."""
    params = replace(PARAMS, read_only=False)  # f+1 committed replies accept a write
    link = Link(params=params)
    write = put(7, 1, b"k", b"A")
    # Commits reach replicas 0 and 1 only: they execute and reply; 2 and 3 stay prepared.
    link.drop = lambda src, dst, msg: isinstance(msg, Commit) and dst in (2, 3)
    link.request(write)
    assert {r for r, v in results(link, 7, 1).items() if msgpack.unpackb(v) == [True, None]} >= {0, 1}
    assert [r.executed for r in link.replicas] == [1, 1, 0, 0]
    link.drop = lambda src, dst, msg: False

    restarted = link.restart(3)
    accepted = restarted.normal.log[1].pre_prepare
    assert accepted is not None and accepted.requests == (write,)
    assert restarted.view_change.pset[1] == (accepted.digest, 0)
    other = PrePrepare.make(0, 1, NOW, (put(7, 1, b"k", b"B"),), 0)
    assert restarted.step(other, NOW) == []  # no PREPARE for a second batch in slot 1 of view 0
    assert restarted.dropped["conflicting-pre-prepare"] == 1

    # The view change: 3's VIEW-CHANGE still names what it prepared, so however the liar
    # chooses among the view changes, slot 1 keeps batch A.
    for i in (1, 2, 3):
        link.post(i, link.replicas[i].tick(NOW))  # flush status traffic first
    link.run()
    for i in (2, 3):
        link.replicas[i].view_change.start(1)
    vcs = {i: link.replicas[i].view_change.own() for i in (2, 3)}
    liar = evolve(vcs[2], replica=0, prepared=(), preprepared=())
    decision = decide([liar, vcs[2], vcs[3]], 1, params.log_window)
    assert decision is not None and decision.batches == ((1, accepted.digest),)

    # And the cluster goes on: view 1 (primary 1) re-proposes A, every correct replica holds it.
    link.replicas[1].view_change.start(1)
    link.queue.clear()
    for i in (1, 2, 3):
        vc = link.replicas[i].view_change.own()
        link.queue += [(i, j, vc) for j in (1, 2, 3) if j != i]
    link.cut = {0}
    link.run()
    link.tick(NOW + 1_000)
    for i in (1, 2, 3):
        assert link.replicas[i].view == 1 and not link.replicas[i].view_changing
        assert link.replicas[i].service.items() == {b"k": b"A"}, f"replica {i}"


def test_without_its_promises_a_restarted_backup_would_prepare_the_liar_s_batch() -> None:
    """The same restart with durability = "memory": the test above is not vacuous."""
    params = replace(PARAMS, read_only=False, durability="memory")
    link = Link(params=params)
    link.drop = lambda src, dst, msg: isinstance(msg, Commit) and dst in (2, 3)
    link.request(put(7, 1, b"k", b"A"))
    restarted = link.restart(3)
    other = PrePrepare.make(0, 1, NOW, (put(7, 1, b"k", b"B"),), 0)
    assert [type(e.msg) for e in restarted.step(other, NOW)] == [Prepare]
    assert 1 not in restarted.view_change.pset


def test_a_checkpoint_made_stable_by_a_new_view_restarts() -> None:
    """The NEW-VIEW's checkpoint is certified by the view changes that claim it: persisted with
    that proof, the replica starts from it again (it used to refuse: a proof of one vote)."""
    link = Link()
    link.drop = lambda src, dst, msg: type(msg).__name__ == "Checkpoint" and dst == 3
    for ts in range(1, 9):
        link.request(put(1, ts, b"k%d" % ts, b"v"))
    assert link.replicas[3].executed == 8 and link.replicas[3].stable == 0
    link.drop = lambda src, dst, msg: False
    for r in link.replicas:
        r.view_change.start(1)
    link.queue.clear()
    for i, r in enumerate(link.replicas):
        link.queue += [(i, j, r.view_change.own()) for j in range(4) if j != i]
    link.run()
    assert link.replicas[3].view == 1 and link.replicas[3].stable == 8
    saved = link.persisted[3]
    assert saved.seq == 8 and len({r for r, d in saved.proof if d == saved.snapshot.root}) >= 2
    restarted = link.restart(3)
    assert restarted.stable == 8 and restarted.view == 1 and not restarted.view_changing


def test_a_restarted_primary_does_not_reuse_a_sequence_number() -> None:
    link = Link()
    link.cut = {2, 3}  # nothing commits: the primary has proposed seq 1 only
    link.request(put(1, 1, b"k", b"a"))
    assert link.replicas[0].normal.next_seq == 2
    restarted = link.restart(0)
    assert restarted.normal.next_seq == 2 and restarted.normal.log[1].pre_prepare is not None
    assert all(isinstance(rec, Proposed | Prepared) for rec in link.records[0])
    link.cut = set()
    link.request(put(1, 2, b"k", b"b"))  # ordered at seq 2, not at seq 1 again
    link.tick(NOW + 1_000)  # status brings replicas 2 and 3 batch 1
    assert [r.executed for r in link.replicas] == [2, 2, 2, 2]
    assert {r.service.items()[b"k"] for r in link.replicas} == {b"b"}


def test_a_late_pre_prepare_is_taken_once_f_plus_1_others_voted_for_it() -> None:
    """A replica that was down gets the primary's pre-prepares again long after they were made:
    their batch time is then far from its clock, but f+1 votes show a correct replica took it."""
    backup = Link().replicas[3]
    late = PrePrepare.make(0, 1, NOW - 60_000, (put(1, 1, b"k", b"v"),), 0)
    assert backup.step(late, NOW) == [] and backup.dropped["bad-timestamp"] == 1
    backup.step(Prepare(0, 1, late.digest, 1), NOW)
    assert backup.step(late, NOW) == [] and backup.dropped["bad-timestamp"] == 2  # one vote: a liar's?
    backup.step(Commit(0, 1, late.digest, 2), NOW)
    assert Broadcast(Prepare(0, 1, late.digest, 3)) in backup.step(late, NOW)


def test_a_replica_whose_state_went_wrong_repairs_it_at_the_next_checkpoint() -> None:
    """Its own state diverged (a damaged disk, a bug): the next checkpoint shows it (2f+1
    others certify another digest), and it fetches the partitions that differ and executes
    again what came after, instead of staying wrong for ever."""
    link = Link()
    for ts in range(1, 4):
        link.request(put(1, ts, b"k%d" % ts, b"v%d" % ts))
    wrong = link.replicas[3]
    wrong.service._buckets[0][b"planted"] = b"by a bug"  # silently, as damage would
    wrong.service._dirty.add(0)
    for ts in range(4, 11):  # checkpoints 4 and 8 come and go, batches 9 and 10 follow
        link.request(put(1, ts, b"k%d" % ts, b"v%d" % ts))
    assert wrong.stats["divergences"] == 2 and wrong.stable == 0  # it repairs to the latest
    link.tick(NOW + 1_000)  # status rounds: manifest, then the differing partitions
    link.tick(NOW + 2_000)
    assert wrong.stats["state-repairs"] == 1 and wrong.stable == 8 and wrong.executed == 10
    assert wrong.service.items() == link.replicas[0].service.items()
    assert wrong.stats["state-transfer-partitions"] <= 2  # the damaged bucket (and the replica's own)
    link.request(put(1, 11, b"k", b"v"))  # and it agrees from then on
    assert len({r.checkpoints.own[8].root for r in link.replicas}) == 1


def test_a_partition_larger_than_a_frame_still_transfers_in_chunks() -> None:
    """Three 600 KB values in one kv bucket make a partition of about 1.8 MB: it moves as chunks
    of at most PARTITION_CHUNK_BYTES, and a replica that missed it all catches up."""
    from bft.core.state import PARTITION_CHUNK_BYTES
    from bft.messages import Partition

    link = Link(params=replace(PARAMS, separate_large_requests=False))
    link.cut = {3}
    service = KVService()
    keys = [k for k in (b"key-%d" % i for i in range(2000)) if service._bucket(k) == 7][:3]
    for ts, key in enumerate(keys, 1):
        link.request(put(1, ts, key, bytes([ts]) * 600_000))
    for ts in range(4, 11):
        link.request(put(1, ts, b"small-%d" % ts, b"v"))
    assert link.replicas[0].stable == 8
    chunks: list = []
    link.drop = lambda src, dst, msg: isinstance(msg, Partition) and chunks.append(msg) is not None
    link.cut = set()
    for t in range(1_000, 6_000, 200):
        link.tick(NOW + t)
    lagging = link.replicas[3]
    assert lagging.executed == 10 and lagging.service.items() == link.replicas[0].service.items()
    assert max(len(c.data) for c in chunks) <= PARTITION_CHUNK_BYTES
    assert any(c.offset > 0 for c in chunks)  # the big bucket came in several chunks

"""Restarting from the data directory: the last stable checkpoint, then the promise log.

The committed batches after the checkpoint are executed again (silently: clients that still
wait resend and get the cached replies), so a restarted replica rejoins where it stopped
instead of fetching state. Its promises come back as they were: the P and Q sets and the batches
behind Q, its view (and whether it was changing view, with the VIEW-CHANGE it sent), the
NEW-VIEW decisions of its view, and the slots of its view it pre-prepared, prepared or committed
in. From then on it cannot say anything that contradicts what it said before it stopped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bft.core.effects import Persist
from bft.core.execution import Mode
from bft.core.promises import Committed, Learned, Prepared, Proposed, Record, Stable, ViewChangeSent, ViewEntered
from bft.messages import PrePrepare

if TYPE_CHECKING:
    from bft.core.replica import Replica


def recover(r: Replica, saved: Persist | None, records: list[Record]) -> None:
    assert r.executed == 0 and r.view == 0 and not r.normal.log, "recover only a fresh replica"
    if saved is not None:
        r.transfer.restore(saved)
    above = [rec for rec in records if rec.seq is None or rec.seq > r.stable]
    batches: dict[tuple[int, bytes], PrePrepare] = {}
    for rec in above:
        match rec:
            case Proposed(pp):
                batches[(pp.seq, pp.digest)] = pp
                r.view_change.record_pre_prepare(pp)
            case Learned(pp):
                batches[(pp.seq, pp.digest)] = pp
            case Prepared(view, seq, d):
                r.view_change.pset[seq] = (d, view)
    _replay(r, [rec for rec in above if isinstance(rec, Committed)], batches)
    _restore_stable(r, [rec for rec in above if isinstance(rec, Stable)])
    views = [rec for rec in above if isinstance(rec, ViewChangeSent | ViewEntered)]
    if views:
        _restore_view(r, views[-1])
    if not r.view_changing:
        _restore_slots(r, above)
    r.stats["recovered-records"] += len(above)


def _replay(r: Replica, committed: list[Committed], batches: dict[tuple[int, bytes], PrePrepare]) -> None:
    """Execute the committed batches that follow the checkpoint, as far as they are contiguous
    (a state transfer leaves a gap until its checkpoint is on disk: then we stop, behind)."""
    e = r.execution
    for rec in sorted(committed, key=lambda c: c.seq):
        if rec.seq <= r.executed:
            continue
        pp = batches.get((rec.seq, rec.digest))
        if rec.seq != r.executed + 1 or pp is None:
            break
        e.execute(pp, Mode.REPLAY)
        if r.executed % r.params.checkpoint_interval == 0:
            r.checkpoints.take()
    r.stats["replayed-batches"] += r.executed - r.stable


def _restore_stable(r: Replica, stables: list[Stable]) -> None:
    """Move the window as far as it had moved: to each certified checkpoint the replay reached,
    and to a later one by state transfer (until then our VIEW-CHANGEs wait: ViewChanges)."""
    for rec in sorted(stables, key=lambda s: s.seq):
        if rec.seq <= r.stable:
            continue
        r.checkpoints.votes[rec.seq] = dict(rec.proof)
        own = r.checkpoints.own.get(rec.seq)
        if own is not None and own.root == rec.digest:
            r.checkpoints.make_stable(rec.seq)
        elif r.executed < rec.seq:
            r.transfer.want(rec.seq, rec.digest)


def _restore_view(r: Replica, rec: ViewChangeSent | ViewEntered) -> None:
    if isinstance(rec, ViewChangeSent):
        r.view = rec.vc.view
        r.view_changing = True
        r.view_change.view_changes[r.view] = {r.id: rec.vc}
        return
    nv = rec.nv
    r.view = nv.view
    r.view_change.new_view = nv
    n0, d0 = nv.checkpoint
    r.normal.view_floor = n0
    if n0 > r.stable:
        r.view_change.count_claims(nv)
        own = r.checkpoints.own.get(n0)
        if own is not None and own.root == d0:
            r.checkpoints.make_stable(n0)
        elif r.executed < n0:
            r.transfer.want(n0, d0)
    for seq, d in nv.decisions:
        if seq > r.stable:
            r.normal.slot(seq).expected = d


def restore_deferred(r: Replica) -> None:
    """The window moved (``Checkpoints.make_stable``): the slots we had to set aside come back
    as far as they now fit, before any pre-prepare for them can be in the window."""
    deferred, r.normal.deferred = r.normal.deferred, []
    if deferred:
        _restore_slots(r, deferred)


def _restore_slots(r: Replica, records: list[Record]) -> None:
    """The slots of our view that we spoke in: what we pre-prepared or prepared, and what we
    committed to. A conflicting pre-prepare for one of them is then refused as usual.

    A slot above the window is set aside (``NormalCase.deferred``) until the window gets there:
    a replica whose checkpoint file lagged behind what it executed (written off the loop, or
    lost in a crash) comes back with an older low watermark than the slots it spoke in, and gets
    the later checkpoint by state transfer (found by simulator seeds with slow disks)."""
    normal = r.normal
    top = max(r.stable, normal.view_floor) + r.params.log_window
    for rec in records:
        if rec.seq is not None and rec.seq <= r.stable:
            continue  # below the window the replay and the Stable records moved to
        if isinstance(rec, Proposed | Prepared) and rec.seq > top:
            normal.deferred.append(rec)
            continue
        match rec:
            case Proposed(pp) if pp.view == r.view:
                slot = normal.slot(pp.seq)
                assert slot.expected in (None, pp.digest), "we only ever accepted the NEW-VIEW's batch"
                slot.pre_prepare = pp
                if not r.is_primary():
                    slot.prepares[r.id] = pp.digest
                normal.proposed_time_ms = max(normal.proposed_time_ms, pp.timestamp)
            case Prepared(view, seq, d) if view == r.view:
                slot = normal.slot(seq)
                assert slot.pre_prepare is not None and slot.pre_prepare.digest == d
                slot.prepared = True
                slot.commits[r.id] = d
    if r.is_primary():  # never a second batch for a sequence number we proposed, deferred or not
        normal.next_seq = max([r.executed, normal.view_floor, *normal.log, *(d.seq for d in normal.deferred)]) + 1

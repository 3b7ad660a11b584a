"""The view change with MAC-authenticated normal-case messages (Castro & Liskov, TOCS 2002,
section 4.4): the P and Q sets a replica keeps across views, the batches it pre-prepared,
VIEW-CHANGE and NEW-VIEW, and entering a view. The decision rule itself is the pure function in
``bft.core.decision``, which the new primary and every backup run on the same evidence.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bft.core.budgets import QSET_ENTRIES_MAX
from bft.core.decision import decide
from bft.core.effects import Broadcast, Send
from bft.core.promises import Proposed, ViewChangeSent, ViewEntered
from bft.messages import NULL_DIGEST, Batch, FetchBatch, NewView, PrePrepare, Request, ViewChange

if TYPE_CHECKING:
    from bft.core.replica import Replica

log = logging.getLogger("bft.replica")

class ViewChanges:
    __slots__ = ("batches", "new_view", "pset", "qset", "r", "view_changes", "wanted_batches")

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.pset: dict[int, tuple[bytes, int]] = {}  # seq -> (digest, view) last prepared
        self.qset: dict[int, dict[bytes, int]] = {}  # seq -> digest -> last view pre-prepared
        self.batches: dict[tuple[int, bytes], tuple[int, tuple[Request, ...]]] = {}  # what we pre-prepared
        self.wanted_batches: set[tuple[int, bytes]] = set()  # asked for by digest, not yet here
        self.view_changes: dict[int, dict[int, ViewChange]] = {}  # view -> replica -> its latest
        self.new_view: NewView | None = None  # the one that started our current view

    def collect(self, stable: int) -> None:
        for table in (self.pset, self.qset):
            for s in [s for s in table if s <= stable]:
                del table[s]
        for key in [k for k in self.batches if k[0] <= stable]:
            del self.batches[key]

    def record_pre_prepare(self, pp: PrePrepare) -> None:
        """Q-set and batch store: what we pre-prepared, kept across views for view changes."""
        q = self.qset.setdefault(pp.seq, {})
        q[pp.digest] = pp.view
        self.batches[(pp.seq, pp.digest)] = (pp.timestamp, pp.requests)
        if len(q) > QSET_ENTRIES_MAX:
            # Evict the oldest, but never the digest our P entry names: A2 needs its support.
            prepared = self.pset.get(pp.seq, (None,))[0]
            oldest = min((d for d in q if d != prepared), key=lambda d: (q[d], d))
            del q[oldest]
            self.batches.pop((pp.seq, oldest), None)

    # -- leaving a view ---------------------------------------------------------------------

    def start(self, view: int) -> None:
        r = self.r
        assert view > r.view or (view == r.view and not r.view_changing), "views only move forward"
        log.info("replica %d: view change to view %d", r.id, view)
        r.stats["view-changes-started"] += 1
        r.execution.rollback_tentative()
        r.view = view
        r.view_changing = True
        r.timer.attempt += 1
        r.timer.deadline_ms = None
        r.normal.leave_view()
        vc = self._view_change(view)
        for v in [v for v in self.view_changes if v < view]:
            del self.view_changes[v]
        if self._beyond_window():
            # We restarted behind our own promises (the checkpoint on disk lagged, or was lost):
            # a VIEW-CHANGE now would leave out what we prepared above the window. Say nothing
            # until state transfer has moved the window up (``announce_withheld``).
            r.stats["view-changes-withheld"] += 1
            return
        self._announce(vc)

    def _beyond_window(self) -> bool:
        top = self.r.stable + self.r.params.log_window
        return any(s > top for s in self.pset) or any(s > top for s in self.qset)

    def _announce(self, vc: ViewChange) -> None:
        r = self.r
        self._store(vc)
        r.promise(ViewChangeSent(vc))
        r.outbox.append(Broadcast(vc))
        self._progress()

    def announce_withheld(self) -> None:
        r = self.r
        if r.view_changing and self.own() is None and not self._beyond_window():
            self._announce(self._view_change(r.view))

    def _view_change(self, view: int) -> ViewChange:
        r = self.r
        return ViewChange(
            view,
            r.stable,
            tuple(sorted((s, snap.root) for s, snap in r.checkpoints.own.items())),
            tuple(sorted((s, d, v) for s, (d, v) in self.pset.items() if r.in_window(s))),
            tuple(sorted((s, tuple(sorted(q.items()))) for s, q in self.qset.items() if r.in_window(s))),
            r.id,
        )

    def own(self) -> ViewChange | None:
        """The VIEW-CHANGE we sent for our current view, if we are changing to it."""
        return self.view_changes.get(self.r.view, {}).get(self.r.id)

    def _store(self, vc: ViewChange) -> None:
        # One view change per replica, its latest: a liar cannot fill memory with many views.
        for v, by_replica in list(self.view_changes.items()):
            if v != vc.view and by_replica.pop(vc.replica, None) is not None and not by_replica:
                del self.view_changes[v]
        self.view_changes.setdefault(vc.view, {})[vc.replica] = vc

    def _progress(self) -> None:
        r = self.r
        if not r.view_changing:
            return
        if sum(len(by) for v, by in self.view_changes.items() if v >= r.view) >= r.quorum.strong:
            # Only once 2f+1 replicas are changing too does waiting for the new primary make
            # sense; if it does not deliver in time, move on (the paper's liveness rule). A
            # replica whose latest VIEW-CHANGE is for a later view counts: it has left ours too,
            # and will not send one for ours again. Counting ours alone, one that timed out here
            # before the others' VIEW-CHANGEs reached each other left them short of 2f+1 for our
            # view and of f+1 to join it, and no timer ran anywhere (simulator seed 1050).
            r.timer.start_for_view_change()
        if r.is_primary():
            self.try_new_view()

    def _valid(self, vc: ViewChange) -> bool:
        p = self.r.params
        h, high = vc.stable, vc.stable + p.log_window
        return (
            vc.stable % p.checkpoint_interval == 0
            and len(vc.checkpoints) <= p.log_window // p.checkpoint_interval + 2
            and all(s >= h and s % p.checkpoint_interval == 0 for s, _ in vc.checkpoints)
            and len(vc.prepared) <= p.log_window
            and all(h < s <= high and v < vc.view for s, _, v in vc.prepared)
            and len({s for s, _, _ in vc.prepared}) == len(vc.prepared)
            and len(vc.preprepared) <= p.log_window
            and all(h < s <= high and len(e) <= QSET_ENTRIES_MAX for s, e in vc.preprepared)
            and all(v < vc.view for _, e in vc.preprepared for _, v in e)
        )

    def on_view_change(self, vc: ViewChange, now_ms: int) -> None:
        r = self.r
        if vc.replica == r.id:
            return r.drop("view-change-from-self", vc)
        if vc.view < r.view or (vc.view == r.view and not r.view_changing):
            if vc.view == r.view and r.is_primary() and self.new_view is not None:
                r.outbox.append(Send(vc.replica, self.new_view))
            return r.drop("old-view-change", vc)
        if not self._valid(vc):
            return r.drop("malformed-view-change", vc)
        self._store(vc)
        if vc.view > r.view:
            # f+1 replicas want a later view: at least one correct one timed out, join them.
            latest = {v: view for view, by in self.view_changes.items() if view > r.view for v in by}
            if len(latest) >= r.quorum.weak:
                r.stats["view-changes-joined"] += 1
                self.start(min(latest.values()))
                return
        self._progress()

    # -- the new primary --------------------------------------------------------------------

    def try_new_view(self) -> None:
        r = self.r
        vcs = sorted(self.view_changes.get(r.view, {}).values(), key=lambda vc: vc.replica)
        decision = decide(vcs, r.f, r.params.log_window)
        if decision is None:
            return
        missing = [
            (s, d) for s, d in decision.batches if s > r.stable and d != NULL_DIGEST and (s, d) not in self.batches
        ]
        if missing:
            # Condition A3: we must hold every chosen batch; whoever prepared it can send it.
            for s, d in missing:
                self.wanted_batches.add((s, d))
                r.outbox.append(Broadcast(FetchBatch(s, d, r.id)))
            return
        nv = NewView(r.view, tuple(vcs), decision.checkpoint, decision.batches, r.id)
        r.promise(ViewEntered(nv))
        r.outbox.append(Broadcast(nv))
        self._enter(nv)

    def on_fetch_batch(self, fb: FetchBatch, now_ms: int) -> None:
        r = self.r
        batch = self.batches.get((fb.seq, fb.digest))
        if batch is None:
            return r.drop("no-such-batch", fb)
        r.outbox.append(Send(fb.replica, Batch(fb.seq, batch[0], batch[1], r.id, fb.digest)))

    def on_batch(self, b: Batch, now_ms: int) -> None:
        r = self.r
        key = (b.seq, b.digest)
        if key not in self.wanted_batches:
            return r.drop("unrequested-batch", b)
        self.wanted_batches.discard(key)
        self.batches[key] = (b.timestamp, b.requests)
        for req in b.requests:
            if r.large.is_large(req):
                r.large.store(req)
        if r.view_changing and r.is_primary():
            self.try_new_view()

    # -- entering a view --------------------------------------------------------------------

    def count_claims(self, nv: NewView) -> None:
        """Count the view changes that hold the NEW-VIEW's checkpoint as votes for it."""
        n0, d0 = nv.checkpoint
        votes = self.r.checkpoints.votes.setdefault(n0, {})
        for vc in nv.view_changes:
            if (n0, d0) in vc.checkpoints:
                votes.setdefault(vc.replica, d0)

    def on_new_view(self, nv: NewView, now_ms: int) -> None:
        r = self.r
        if nv.view < r.view or (nv.view == r.view and not r.view_changing):
            return r.drop("old-new-view", nv)
        if nv.replica != nv.view % r.n:
            return r.drop("new-view-not-from-primary", nv)
        vcs = sorted(nv.view_changes, key=lambda vc: vc.replica)
        if any(vc.view != nv.view or not self._valid(vc) for vc in vcs):
            return r.drop("bad-new-view", nv)
        decision = decide(vcs, r.f, r.params.log_window)
        if decision is None or decision.checkpoint != nv.checkpoint or decision.batches != nv.decisions:
            # The primary's decision does not follow from its own evidence: ignore it and let
            # the timer move us to the next view.
            return r.drop("bad-new-view", nv)
        r.promise(ViewEntered(nv))
        self._enter(nv)

    def _enter(self, nv: NewView) -> None:
        r = self.r
        r.execution.rollback_tentative()
        r.view = nv.view
        r.view_changing = False
        self.new_view = nv
        r.timer.deadline_ms = None
        self.wanted_batches.clear()
        for v in [v for v in self.view_changes if v <= nv.view]:
            del self.view_changes[v]
        normal = r.normal
        # Usually empty already (we changed view ourselves); not if a NEW-VIEW took us past
        # views we never started to change to, leaving batches we held as the old primary.
        normal.leave_view()
        r.stats["views-entered"] += 1
        log.info("replica %d: entered view %d (primary %d)", r.id, r.view, r.primary)
        n0, d0 = nv.checkpoint
        normal.view_floor = n0
        if n0 > r.stable:
            # The f+1 (or more) view changes that claim this checkpoint vouch for it: they are
            # its certificate, on disk too (a proof of our own vote alone would not restart).
            self.count_claims(nv)
            own = r.checkpoints.own.get(n0)
            if own is not None and own.root == d0:
                r.checkpoints.make_stable(n0)
            else:
                r.transfer.want(n0, d0)
        decided: set[tuple[int, int]] = set()
        for seq, d in nv.decisions:
            if seq <= r.stable:
                continue
            slot = normal.slot(seq)
            slot.expected = d
            if d != NULL_DIGEST:
                decided.update((q.client, q.timestamp) for q in self.batches.get((seq, d), (0, ()))[1])
            if r.is_primary():
                ts, requests = self.batches[(seq, d)] if d != NULL_DIGEST else (0, ())
                pp = PrePrepare.make(r.view, seq, ts, requests, r.id)
                assert pp.digest == d, "a re-proposed batch must keep its digest"
                slot.pre_prepare = pp
                self.record_pre_prepare(pp)
                r.promise(Proposed(pp))
                normal.proposed_time_ms = max(normal.proposed_time_ms, ts)
                r.outbox.append(Broadcast(r.large.by_reference(pp)))
        timer = r.timer
        if r.is_primary():
            top = max((s for s, _ in nv.decisions), default=n0)
            normal.next_seq = max(top, n0, r.executed) + 1
            for key, req in sorted(timer.waiting.items()):
                if key not in decided and r.execution.clients.is_new(*key):
                    normal.enqueue(req)
            timer.clear()
            normal.propose(r.now_ms)
        else:
            timer.restart_clocks()
            timer.arm()

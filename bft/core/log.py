"""The log and the normal case (OSDI 1999, section 4.2): requests reach the primary, which
orders them in batches; PRE-PREPARE, PREPARE and COMMIT make each sequence number prepared and
then committed, and committed batches go to execution in order.

The log holds one ``Slot`` per sequence number of the current view inside the window
(h, h + L]; a view change empties it, a stable checkpoint trims it.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from bft.core.budgets import queue_bytes_max, request_bytes
from bft.core.effects import Broadcast, Send
from bft.core.promises import Prepared, Proposed, Record
from bft.messages import Commit, Prepare, PrePrepare, Request

if TYPE_CHECKING:
    from bft.core.replica import Replica

# A frame's room for what is not the batch's requests (header, authenticator, fields).
FRAME_OVERHEAD_BYTES = 4096
# What a large request costs in a pre-prepare that carries only its digest.
REQUEST_REF_BYTES = 64


class Slot:
    """What a replica knows about one sequence number in the current view."""

    __slots__ = ("commits", "committed", "expected", "pre_prepare", "prepared", "prepares")

    def __init__(self) -> None:
        self.pre_prepare: PrePrepare | None = None
        self.expected: bytes | None = None  # digest a NEW-VIEW decided for this slot
        self.prepares: dict[int, bytes] = {}  # replica -> digest (first one it sent)
        self.commits: dict[int, bytes] = {}
        self.prepared = False
        self.committed = False

    def voters(self, d: bytes) -> set[int]:
        """Replicas that sent a PREPARE or a COMMIT for digest ``d``."""
        return {r for r, v in self.prepares.items() if v == d} | {r for r, v in self.commits.items() if v == d}

    def support(self, d: bytes) -> int:
        return len(self.voters(d))

    def matching(self, votes: dict[int, bytes]) -> int:
        d = self.pre_prepare.digest if self.pre_prepare else None
        return sum(1 for v in votes.values() if v == d)


class NormalCase:
    __slots__ = (
        "deferred", "log", "next_seq", "pending", "pending_bytes", "pending_bytes_max", "pending_ids",
        "proposed_time_ms", "r", "view_floor",
    )

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.log: dict[int, Slot] = {}
        self.next_seq = 1  # primary: next sequence number to assign
        self.proposed_time_ms = 0  # primary: time proposed in its last pre-prepare
        self.pending: deque[Request] = deque()  # primary: requests waiting for a batch
        self.pending_bytes = 0  # what they hold (``request_bytes``)
        self.pending_bytes_max = queue_bytes_max(replica.params)
        self.pending_ids: set[tuple[int, int]] = set()  # primary: pending or proposed, not executed
        # Promises of this view's slots above the window, kept after a restart until it gets there
        # (bft.core.recovery.restore_deferred).
        self.deferred: list[Record] = []
        # Nothing at or below the NEW-VIEW's checkpoint is ordered in this view, even while our
        # own low watermark lags behind it (we fetch that state instead).
        self.view_floor = 0

    def slot(self, seq: int) -> Slot:
        slot = self.log.get(seq)
        if slot is None:
            assert seq > self.r.stable, "no slot at or below the stable checkpoint"
            slot = self.log[seq] = Slot()
        return slot

    def collect(self, stable: int) -> None:
        for s in [s for s in self.log if s <= stable]:
            del self.log[s]

    def leave_view(self) -> None:
        """The view ends: its slots go, and requests we meant to order as its primary become
        requests we wait on (the next primary orders them, or the timer replaces it too)."""
        for req in self.pending:
            self.r.timer.hold((req.client, req.timestamp), req)
        self.pending.clear()
        self.pending_bytes = 0
        self.pending_ids.clear()
        self.r.learner.remember(self.log)  # what it knew of this view, our own commits included
        self.log = {}
        self.deferred = []  # the view's P and Q sets keep what they promised

    # -- requests ---------------------------------------------------------------------------

    def on_request(self, req: Request, now_ms: int, propose: bool = True) -> None:
        """``propose``: order it at once if the window allows (``Replica.step_requests`` queues
        a burst first)."""
        r = self.r
        if req.read_only:
            return r.execution.read_only(req)
        if r.execution.answer_again(req):
            return
        if r.execution.clients.too_old(req.client, req.timestamp):
            return r.drop("old-timestamp", req)
        key = (req.client, req.timestamp)
        large = r.large.is_large(req)
        if large or r.large.awaited(req.digest):
            # A held pre-prepare may wait for it: one whose copy we could not authenticate.
            r.large.store(req)
        if not r.is_primary() or r.view_changing:
            # A client that timed out sends to everyone. Relay so the primary hears of it, and
            # hold it: if it is not executed in time the primary is faulty (section 4.4).
            r.timer.wait_on(key, req)
            if not r.view_changing and not large:  # the client sent a large one to all
                r.outbox.append(Send(r.primary, req))
            return
        if key in self.pending_ids:
            return
        if self.enqueue(req) and propose:
            self.propose(now_ms)

    def enqueue(self, req: Request) -> bool:
        """Primary: queue a request for the next batches, if it fits: no more than the window
        can order, in count, nor more than the queue's budget in bytes (``bft.core.budgets``)."""
        r = self.r
        if len(self.pending) >= r.params.batch_size_max * r.params.log_window:
            r.drop("pending-queue-full", req)
            return False
        cost = request_bytes(req)
        if self.pending_bytes + cost > self.pending_bytes_max:
            r.drop("pending-queue-bytes-full", req)
            return False
        self.pending_ids.add((req.client, req.timestamp))
        self.pending.append(req)
        self.pending_bytes += cost
        return True

    def forget_client(self, client: int) -> None:
        """Drop ``client``'s requests still waiting for a batch (``Replica.distrust``)."""
        for q in self.pending:
            if q.client == client:
                self.pending_ids.discard((q.client, q.timestamp))
                self.pending_bytes -= request_bytes(q)
        self.pending = deque(q for q in self.pending if q.client != client)

    def propose(self, now_ms: int) -> None:
        """Primary: order pending requests. While ``inflight_max`` batches are unexecuted the
        requests accumulate, so batch size grows with load (the paper's sliding window)."""
        r = self.r
        p = r.params
        while (
            self.pending
            and r.is_primary()
            and not r.view_changing
            and self.next_seq <= r.executed + p.inflight_max
            and r.in_window(self.next_seq)
        ):
            batch: list[Request] = []
            size = 0
            budget = p.frame_bytes_max - FRAME_OVERHEAD_BYTES
            while self.pending and len(batch) < p.batch_size_max:
                req = self.pending[0]
                cost = REQUEST_REF_BYTES if r.large.is_large(req) else len(req.raw) + len(req.auth) + 16
                if batch and size + cost > budget:
                    break
                batch.append(self.pending.popleft())
                self.pending_bytes -= request_bytes(req)
                size += cost
            # Agreed time must move forward even if our clock steps back (TOCS 2002, 6.2).
            self.proposed_time_ms = max(now_ms, self.proposed_time_ms + 1)
            pp = PrePrepare.make(r.view, self.next_seq, self.proposed_time_ms, tuple(batch), r.id)
            self.next_seq += 1
            self.slot(pp.seq).pre_prepare = pp
            r.view_change.record_pre_prepare(pp)
            r.promise(Proposed(pp))
            r.stats["batches"] += 1
            r.stats["batched-requests"] += len(batch)
            r.outbox.append(Broadcast(r.large.by_reference(pp)))
            self.check_prepared(pp.seq)

    # -- agreement --------------------------------------------------------------------------

    def _ignore(self, msg: PrePrepare | Prepare | Commit) -> str | None:
        """Why a normal-case message of this view cannot be used, or None."""
        r = self.r
        if msg.view != r.view or r.view_changing:
            return "wrong-view"
        if msg.seq <= self.view_floor:
            return "below-new-view-checkpoint"
        return None

    def on_pre_prepare(self, pp: PrePrepare, now_ms: int) -> None:
        r = self.r
        if pp.view < r.view:
            return r.learner.on_pre_prepare(pp)
        reason = self._ignore(pp)
        if reason:
            return r.drop(reason, pp)
        if pp.replica != r.primary or r.is_primary():
            return r.drop("not-from-primary", pp)
        if not r.in_window(pp.seq):
            return r.drop("out-of-window", pp)
        if len(pp.requests) > r.params.batch_size_max:
            return r.drop("batch-too-large", pp)
        slot = self.slot(pp.seq)
        if slot.pre_prepare is not None:
            if slot.pre_prepare.digest != pp.digest:
                r.drop("conflicting-pre-prepare", pp)
            return
        if not pp.resolved:
            full = r.large.resolve_or_hold(pp, self.vouched(slot, pp.digest))
            if full is None:
                return  # some request bodies have not reached us yet: resolved when they come
            pp = full
        r.large.unresolved.pop(pp.seq, None)
        if slot.expected is not None:
            # Re-proposed by a NEW-VIEW: the decision fixed the batch, time checks do not apply.
            if pp.digest != slot.expected:
                return r.drop("not-the-new-view-decision", pp)
        elif abs(pp.timestamp - now_ms) > r.params.clock_skew_max_ms and slot.support(pp.digest) < r.quorum.weak:
            # A batch time far from our clock is refused, unless f+1 others voted for the batch
            # (one of them is correct and checked it): a pre-prepare retransmitted late, to a
            # replica that was down or cut off, must still get through.
            return r.drop("bad-timestamp", pp)
        else:
            before = self.log.get(pp.seq - 1)
            if before is not None and before.pre_prepare is not None and before.pre_prepare.timestamp >= pp.timestamp:
                return r.drop("non-monotonic-timestamp", pp)
        slot.pre_prepare = pp
        r.view_change.record_pre_prepare(pp)
        slot.prepares[r.id] = pp.digest
        r.promise(Proposed(pp))
        r.outbox.append(Broadcast(Prepare(r.view, pp.seq, pp.digest, r.id)))
        self.check_prepared(pp.seq)

    def on_prepare(self, p: Prepare, now_ms: int) -> None:
        r = self.r
        reason = self._ignore(p)
        if reason:
            return r.drop(reason, p)
        if p.replica == r.primary:
            return r.drop("prepare-from-primary", p)
        if not r.in_window(p.seq):
            return r.drop("out-of-window", p)
        self.slot(p.seq).prepares.setdefault(p.replica, p.digest)
        self.retry_held(p.seq)
        self.check_prepared(p.seq)

    def on_commit(self, c: Commit, now_ms: int) -> None:
        r = self.r
        if c.view < r.view:
            return r.learner.on_commit(c)
        reason = self._ignore(c)
        if reason:
            return r.drop(reason, c)
        if not r.in_window(c.seq):
            return r.drop("out-of-window", c)
        self.slot(c.seq).commits.setdefault(c.replica, c.digest)
        self.retry_held(c.seq)
        self.check_committed(c.seq)

    def vouched(self, slot: Slot, d: bytes) -> bool:
        """f+1 replicas took batch ``d`` (the primary proposed it, the others prepared or
        committed it), or a NEW-VIEW decided it: a correct one checked its requests
        (``LargeRequests.resolve``)."""
        return slot.expected == d or len(slot.voters(d) | {self.r.primary}) >= self.r.quorum.weak

    def retry_held(self, seq: int) -> None:
        """A vote came for a slot whose pre-prepare we hold for bodies: it may now resolve."""
        pp = self.r.large.unresolved.get(seq)
        if pp is not None and (slot := self.log.get(seq)) is not None and self.vouched(slot, pp.digest):
            self.on_pre_prepare(pp, self.r.now_ms)

    def check_prepared(self, seq: int) -> None:
        """prepared(m, v, n, i): the pre-prepare plus 2f matching prepares from backups."""
        r = self.r
        slot = self.log[seq]
        if slot.prepared or slot.pre_prepare is None or slot.matching(slot.prepares) < r.quorum.prepares:
            return
        assert r.primary not in slot.prepares, "the primary's pre-prepare stands for its prepare"
        slot.prepared = True
        r.view_change.pset[seq] = (slot.pre_prepare.digest, r.view)
        slot.commits.setdefault(r.id, slot.pre_prepare.digest)
        r.promise(Prepared(r.view, seq, slot.pre_prepare.digest))
        r.outbox.append(Broadcast(Commit(r.view, seq, slot.pre_prepare.digest, r.id)))
        self.check_committed(seq)
        if r.params.tentative and not slot.committed:
            r.execution.execute_ready()

    def check_committed(self, seq: int) -> None:
        """committed-local(m, v, n, i): prepared plus 2f+1 matching commits (our own included)."""
        r = self.r
        slot = self.log[seq]
        if slot.committed or not slot.prepared or slot.matching(slot.commits) < r.quorum.strong:
            return
        slot.committed = True
        r.execution.execute_ready()

"""A PBFT replica as a pure state machine (Castro & Liskov, OSDI 1999 / TOCS 2002).

``step(msg, now)`` takes a message that the driver has already authenticated (MAC or signature)
and decoded; ``tick(now)`` advances timers. Both return the typed effects (``bft.core.effects``)
they produced, in order. Byzantine input is dropped and counted
in ``dropped`` by reason; it never raises. Assertions guard our own invariants.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable

from bft.core.clients import ClientTable
from bft.core.effects import Broadcast, Effect, Executed, Persist, ReplyTo, Send
from bft.core.params import DIGEST_REPLY_BYTES_MIN, Params
from bft.core.state import Snapshot, Transfer, capture, decode_manifest, rebuild, root_of
from bft.core.viewchange import decide
from bft.messages import (
    NULL_DIGEST,
    Batch,
    Checkpoint,
    Commit,
    FetchBatch,
    FetchPartition,
    FetchState,
    Message,
    NewView,
    Partition,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    State,
    Status,
    ViewChange,
    digest,
)
from bft.service import Service

log = logging.getLogger("bft.replica")

# How a batch is executed: committed, tentatively (prepared only), or replayed after a rollback.
COMMITTED, TENTATIVE, REPLAY = range(3)
# Slots retransmitted in answer to one status message: bounds the work a peer can ask for.
STATUS_SLOTS_MAX = 64
# Q-set entries kept per sequence number (the most recent views): bounds a view change's size.
QSET_ENTRIES_MAX = 4
# Requests a backup holds for its view-change timer; more are relayed but not remembered.
WAITING_REQUESTS_MAX = 4096
# Large request bodies a replica keeps while their pre-prepare may still come.
REQUEST_STORE_MAX = 4096
# Exponential back-off of successive view changes stops doubling here.
VIEW_BACKOFF_MAX = 6


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

    def matching(self, votes: dict[int, bytes]) -> int:
        d = self.pre_prepare.digest if self.pre_prepare else None
        return sum(1 for v in votes.values() if v == d)


class Replica:
    def __init__(
        self,
        replica_id: int,
        f: int,
        params: Params,
        service_factory: Callable[[], Service],
    ) -> None:
        self.id = replica_id
        self.f = f
        self.n = 3 * f + 1
        assert 0 <= replica_id < self.n
        self.params = params
        self.service_factory = service_factory
        self.service = service_factory()
        self.view = 0
        self.log: dict[int, Slot] = {}
        self.executed = 0  # last executed sequence number
        self.stable = 0  # low watermark h: last stable checkpoint
        self.next_seq = 1  # primary: next sequence number to assign
        self.batch_time_ms = 0  # agreed time of the last executed batch
        self.proposed_time_ms = 0  # primary: time proposed in its last pre-prepare
        self.clients = ClientTable(params.client_window)
        self.pending: deque[Request] = deque()  # primary: requests waiting for a batch
        self.pending_ids: set[tuple[int, int]] = set()  # primary: pending or proposed, not executed
        # Checkpoints: our own (digest, snapshot) per seq, and everyone's votes per seq.
        self.own_checkpoints: dict[int, Snapshot] = {0: capture(self.service, self.clients, 0, None)}
        self.last_capture = self.own_checkpoints[0]
        self.transfer: Transfer | None = None
        self.checkpoint_votes: dict[int, dict[int, bytes]] = {}
        self.fetch_target: tuple[int, bytes] | None = None  # certified checkpoint we lack
        self.far_checkpoints: dict[int, tuple[int, bytes]] = {}  # replica -> its claim beyond H
        self.fetch_from = 0
        # View change state (TOCS 2002, section 4.4): P and Q sets, known batches, timers.
        self.tentative_seq = 0  # the batch executed tentatively and not yet committed, if any
        # Separate request transmission: large request bodies by digest, and pre-prepares that
        # still wait for some of them.
        self.request_store: dict[bytes, Request] = {}
        self.unresolved: dict[int, PrePrepare] = {}
        self.executed_batches: dict[int, PrePrepare] = {}  # executed above h, for rollback replay
        self.deferred_reads: list[Request] = []  # read-only requests waiting for a commit
        self.view_changing = False
        self.pset: dict[int, tuple[bytes, int]] = {}  # seq -> (digest, view) last prepared
        self.qset: dict[int, dict[bytes, int]] = {}  # seq -> digest -> last view pre-prepared
        self.batches: dict[tuple[int, bytes], tuple[int, tuple[Request, ...]]] = {}
        self.wanted_batches: set[tuple[int, bytes]] = set()
        self.view_changes: dict[int, dict[int, ViewChange]] = {}
        self.new_view: NewView | None = None
        # Nothing at or below the NEW-VIEW's checkpoint is ordered in this view, even while our
        # own low watermark lags behind it (we fetch that state instead).
        self.view_floor = 0
        self.waiting: dict[tuple[int, int], Request] = {}  # requests we saw and wait to see executed
        self.view_deadline_ms: int | None = None
        self.waiting_head: tuple[int, int] | None = None  # the request the view timer is for
        self.view_attempt = 0  # successive view changes without progress: the back-off exponent
        self.next_status_ms = 0
        self.now_ms = 0  # the driver's clock at the last input
        self.outbox: list[Effect] = []
        self.dropped: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()

    # -- helpers ----------------------------------------------------------------------------

    @property
    def primary(self) -> int:
        return self.view % self.n

    def is_primary(self) -> bool:
        return self.primary == self.id

    def in_window(self, seq: int) -> bool:
        return self.stable < seq <= self.stable + self.params.log_window

    def take_outbox(self) -> list[Effect]:
        out, self.outbox = self.outbox, []
        return out

    def _drop(self, reason: str, msg: Message) -> None:
        self.dropped[reason] += 1
        log.debug("replica %d drops %s: %s", self.id, type(msg).__name__, reason)

    def _slot(self, seq: int) -> Slot:
        slot = self.log.get(seq)
        if slot is None:
            slot = self.log[seq] = Slot()
        return slot

    # -- inputs -----------------------------------------------------------------------------

    def step(self, msg: Message, now_ms: int) -> list[Effect]:
        self.now_ms = now_ms
        handler = self._handlers.get(type(msg))
        if handler is None:
            self._drop("unexpected-type", msg)
        else:
            handler(self, msg, now_ms)
        return self.take_outbox()

    def tick(self, now_ms: int) -> list[Effect]:
        self.now_ms = now_ms
        if now_ms >= self.next_status_ms:
            self.next_status_ms = now_ms + self.params.status_interval_ms
            status = Status(self.view, self.stable, self._settled(), self.view_changing, self.id)
            self.outbox.append(Broadcast(status))
            self._maybe_fetch_state()
            self._fetch_unresolved()
            if self.view_changing and self.is_primary():
                self._try_new_view()
        if self.view_deadline_ms is not None and now_ms >= self.view_deadline_ms:
            if not self.view_changing:
                self._arm_view_timer()  # drops requests executed meanwhile; maybe none is left
            if self.view_deadline_ms is not None and now_ms >= self.view_deadline_ms:
                log.info("replica %d: view %d timed out", self.id, self.view)
                self._start_view_change(self.view + 1)
        self._try_propose(now_ms)
        return self.take_outbox()

    # -- requests ---------------------------------------------------------------------------

    def on_request(self, req: Request, now_ms: int) -> None:
        if req.read_only:
            # Executed at once on the current state, outside the order and the exactly-once
            # table; the client needs 2f+1 matching replies (TOCS 2002, section 5.1.3). Not on
            # a tentative state, which a view change may undo: such reads wait for the commit.
            if not (self.params.read_only and self.service.is_read_only(req.op)):
                return self._drop("not-read-only", req)
            if self.tentative_seq:
                if len(self.deferred_reads) < WAITING_REQUESTS_MAX:
                    self.deferred_reads.append(req)
                return
            self.stats["read-only-requests"] += 1
            result = self.service.execute(req.op, req.client, self.batch_time_ms)
            self.outbox.append(ReplyTo(req.client, self._reply(req, result, False)))
            return
        cached = self.clients.cached(req.client, req.timestamp)
        if cached is not None:
            self.stats["retransmitted-replies"] += 1
            tentative = (req.client, req.timestamp) in self._tentative_requests()
            reply = Reply(self.view, req.timestamp, req.client, self.id, cached, tentative)
            self.outbox.append(ReplyTo(req.client, reply))
            if tentative and not self.is_primary() and len(self.waiting) < WAITING_REQUESTS_MAX:
                # Executed only tentatively: if it never commits, the primary is to blame.
                self.waiting.setdefault((req.client, req.timestamp), req)
                self._arm_view_timer()
            return
        if self.clients.too_old(req.client, req.timestamp):
            self._drop("old-timestamp", req)
            return
        key = (req.client, req.timestamp)
        large = self._is_large(req)
        if large:
            self._store_request(req)
        if not self.is_primary() or self.view_changing:
            # A client that timed out sends to everyone. Relay so the primary hears of it, and
            # hold it: if it is not executed in time the primary is faulty (section 4.4).
            if len(self.waiting) < WAITING_REQUESTS_MAX:
                self.waiting.setdefault(key, req)
                self._arm_view_timer()
            if not self.view_changing and not large:  # the client sent a large one to all
                self.outbox.append(Send(self.primary, req))
            return
        if key in self.pending_ids:
            return
        if len(self.pending) >= self.params.batch_size_max * self.params.log_window:
            self._drop("pending-queue-full", req)
            return
        self.pending_ids.add(key)
        self.pending.append(req)
        self._try_propose(now_ms)

    def _try_propose(self, now_ms: int) -> None:
        """Primary: order pending requests. While ``inflight_max`` batches are unexecuted the
        requests accumulate, so batch size grows with load (the paper's sliding window)."""
        p = self.params
        while (
            self.pending
            and self.is_primary()
            and not self.view_changing
            and self.next_seq <= self.executed + p.inflight_max
            and self.in_window(self.next_seq)
        ):
            batch: list[Request] = []
            size = 0
            budget = p.frame_bytes_max - 4096
            while self.pending and len(batch) < p.batch_size_max:
                r = self.pending[0]
                cost = 64 if self._is_large(r) else len(r.raw) + len(r.auth) + 16  # large: by digest
                if batch and size + cost > budget:
                    break
                batch.append(self.pending.popleft())
                size += cost
            # Agreed time must move forward even if our clock steps back (TOCS 2002, 6.2).
            self.proposed_time_ms = max(now_ms, self.proposed_time_ms + 1)
            pp = PrePrepare.make(self.view, self.next_seq, self.proposed_time_ms, tuple(batch), self.id)
            self.next_seq += 1
            self._slot(pp.seq).pre_prepare = pp
            self._record_pre_prepare(pp)
            self.stats["batches"] += 1
            self.stats["batched-requests"] += len(batch)
            self.outbox.append(Broadcast(self._by_reference(pp)))
            self._check_prepared(pp.seq)

    # -- normal case ------------------------------------------------------------------------

    def on_pre_prepare(self, pp: PrePrepare, now_ms: int) -> None:
        if pp.view != self.view or self.view_changing:
            return self._drop("wrong-view", pp)
        if pp.seq <= self.view_floor:
            return self._drop("below-new-view-checkpoint", pp)
        if pp.replica != self.primary or self.is_primary():
            return self._drop("not-from-primary", pp)
        if not self.in_window(pp.seq):
            return self._drop("out-of-window", pp)
        if len(pp.requests) > self.params.batch_size_max:
            return self._drop("batch-too-large", pp)
        slot = self._slot(pp.seq)
        if slot.pre_prepare is not None:
            if slot.pre_prepare.digest != pp.digest:
                self._drop("conflicting-pre-prepare", pp)
            return
        if not pp.resolved:
            full = self._resolve(pp)
            if full is None:
                # Some request bodies have not reached us yet: keep it, resolve it when they
                # come (or fetch the batch from the primary at the next status tick).
                if len(self.unresolved) < self.params.log_window:
                    self.unresolved[pp.seq] = pp
                return
            pp = full
        self.unresolved.pop(pp.seq, None)
        if slot.expected is not None:
            # Re-proposed by a NEW-VIEW: the decision fixed the batch, time checks do not apply.
            if pp.digest != slot.expected:
                return self._drop("not-the-new-view-decision", pp)
        elif abs(pp.timestamp - now_ms) > self.params.clock_skew_max_ms:
            return self._drop("bad-timestamp", pp)
        else:
            before = self.log.get(pp.seq - 1)
            if before is not None and before.pre_prepare is not None and before.pre_prepare.timestamp >= pp.timestamp:
                return self._drop("non-monotonic-timestamp", pp)
        slot.pre_prepare = pp
        self._record_pre_prepare(pp)
        slot.prepares[self.id] = pp.digest
        self.outbox.append(Broadcast(Prepare(self.view, pp.seq, pp.digest, self.id)))
        self._check_prepared(pp.seq)

    def on_prepare(self, p: Prepare, now_ms: int) -> None:
        if p.view != self.view or self.view_changing:
            return self._drop("wrong-view", p)
        if p.seq <= self.view_floor:
            return self._drop("below-new-view-checkpoint", p)
        if p.replica == self.primary:
            return self._drop("prepare-from-primary", p)
        if not self.in_window(p.seq):
            return self._drop("out-of-window", p)
        slot = self._slot(p.seq)
        slot.prepares.setdefault(p.replica, p.digest)
        self._check_prepared(p.seq)

    def on_commit(self, c: Commit, now_ms: int) -> None:
        if c.view != self.view or self.view_changing:
            return self._drop("wrong-view", c)
        if c.seq <= self.view_floor:
            return self._drop("below-new-view-checkpoint", c)
        if not self.in_window(c.seq):
            return self._drop("out-of-window", c)
        slot = self._slot(c.seq)
        slot.commits.setdefault(c.replica, c.digest)
        self._check_committed(c.seq)

    def _check_prepared(self, seq: int) -> None:
        """prepared(m, v, n, i): the pre-prepare plus 2f matching prepares from backups."""
        slot = self.log[seq]
        if slot.prepared or slot.pre_prepare is None or slot.matching(slot.prepares) < 2 * self.f:
            return
        slot.prepared = True
        self.pset[seq] = (slot.pre_prepare.digest, self.view)
        slot.commits.setdefault(self.id, slot.pre_prepare.digest)
        self.outbox.append(Broadcast(Commit(self.view, seq, slot.pre_prepare.digest, self.id)))
        self._check_committed(seq)
        if self.params.tentative and not slot.committed:
            self._execute_ready()

    def _check_committed(self, seq: int) -> None:
        """committed-local(m, v, n, i): prepared plus 2f+1 matching commits (our own included)."""
        slot = self.log[seq]
        if slot.committed or not slot.prepared or slot.matching(slot.commits) < 2 * self.f + 1:
            return
        slot.committed = True
        self._execute_ready()

    def _execute_ready(self) -> None:
        """Execute committed batches in order; with tentative execution on, also the next batch
        once it is prepared and everything before it has committed (TOCS 2002, 5.1.2)."""
        while True:
            if self.tentative_seq:
                slot = self.log.get(self.tentative_seq)
                if slot is None or not slot.committed:
                    break
                self._tentative_committed()
                continue
            slot = self.log.get(self.executed + 1)
            if slot is None or slot.pre_prepare is None:
                break
            if slot.committed:
                self._execute(slot.pre_prepare, COMMITTED)
            elif slot.prepared and self.params.tentative and not self.view_changing:
                self._execute(slot.pre_prepare, TENTATIVE)
            else:
                break
        self._try_propose(self.now_ms)

    def _execute(self, pp: PrePrepare, mode: int) -> None:
        assert pp.seq == self.executed + 1 and not self.tentative_seq
        if mode == COMMITTED:
            self.outbox.append(Executed(pp))
        self.batch_time_ms = max(pp.timestamp, self.batch_time_ms + 1)
        tentative = mode == TENTATIVE
        for req in pp.requests:
            self.pending_ids.discard((req.client, req.timestamp))
            self.request_store.pop(req.digest, None)
            if not tentative:  # a tentative execution may be undone: keep waiting on it
                self.waiting.pop((req.client, req.timestamp), None)
            if not self.clients.is_new(req.client, req.timestamp):
                continue  # a duplicate ordered twice executes once, the same way everywhere
            result = self.service.execute(req.op, req.client, self.batch_time_ms)
            self.clients.record(req.client, req.timestamp, result)
            if mode != REPLAY:
                self.outbox.append(ReplyTo(req.client, self._reply(req, result, tentative)))
        self.executed = pp.seq
        self.executed_batches[pp.seq] = pp
        if mode == REPLAY:
            return
        self.stats["executed-requests"] += len(pp.requests)
        if pp.requests and not self.view_changing:
            self.view_attempt = 0  # progress: successive view changes start their back-off anew
            self._arm_view_timer()
        if tentative:
            self.tentative_seq = pp.seq
            self.stats["tentative-batches"] += 1
        elif self.executed % self.params.checkpoint_interval == 0:
            self._take_checkpoint()

    # -- separate request transmission (large requests) -------------------------------------

    def _is_large(self, req: Request) -> bool:
        return self.params.separate_large_requests and len(req.raw) > self.params.large_request_bytes

    def _store_request(self, req: Request) -> None:
        if len(self.request_store) >= REQUEST_STORE_MAX:
            del self.request_store[next(iter(self.request_store))]  # oldest; a fetch recovers it
        self.request_store[req.digest] = req
        for pp in [self.unresolved[s] for s in sorted(self.unresolved)]:
            if req.digest in pp.requests:
                self.on_pre_prepare(pp, self.now_ms)

    def _by_reference(self, pp: PrePrepare) -> PrePrepare:
        """The pre-prepare as sent: large requests replaced by their digests."""
        if not any(self._is_large(r) for r in pp.requests):
            return pp
        refs = tuple(r.digest if self._is_large(r) else r for r in pp.requests)
        return PrePrepare(pp.view, pp.seq, pp.timestamp, refs, pp.replica, pp.digest)

    def _resolve(self, pp: PrePrepare) -> PrePrepare | None:
        requests = []
        for r in pp.requests:
            body = self.request_store.get(r) if isinstance(r, bytes) else r
            if body is None:
                return None
            requests.append(body)
        return PrePrepare(pp.view, pp.seq, pp.timestamp, tuple(requests), pp.replica, pp.digest)

    def _fetch_unresolved(self) -> None:
        for seq, pp in list(self.unresolved.items()):
            if pp.view != self.view or not self.in_window(seq):
                del self.unresolved[seq]
                continue
            self.wanted_batches.add((seq, pp.digest))
            self.outbox.append(Send(pp.replica, FetchBatch(seq, pp.digest, self.id)))

    def _reply(self, req: Request, result: bytes, tentative: bool) -> Reply:
        """Digest replies (TOCS 2002, 5.1.1): one designated replica, rotating with the
        timestamp, sends a large result in full; the others send its digest. Retransmitted
        requests always get the full result, so a faulty designated replica only costs time."""
        designated = (req.client + req.timestamp) % self.n
        if self.params.digest_replies and len(result) > DIGEST_REPLY_BYTES_MIN and designated != self.id:
            return Reply(self.view, req.timestamp, req.client, self.id, digest(result), tentative, True)
        return Reply(self.view, req.timestamp, req.client, self.id, result, tentative)

    def _tentative_committed(self) -> None:
        seq, self.tentative_seq = self.tentative_seq, 0
        self.outbox.append(Executed(self.executed_batches[seq]))
        for req in self.executed_batches[seq].requests:
            self.waiting.pop((req.client, req.timestamp), None)
        self._arm_view_timer()
        self._serve_deferred_reads()
        if seq % self.params.checkpoint_interval == 0:
            self._take_checkpoint()

    def _tentative_requests(self) -> set[tuple[int, int]]:
        if not self.tentative_seq:
            return set()
        return {(r.client, r.timestamp) for r in self.executed_batches[self.tentative_seq].requests}

    def _rollback_tentative(self) -> None:
        """A tentatively executed batch that has not committed is undone before a view change
        decides that sequence number again: rebuild the last stable checkpoint's state and
        replay the committed batches after it, silently."""
        seq = self.tentative_seq
        if not seq:
            return
        self.tentative_seq = 0
        base = self.own_checkpoints[self.stable]
        self.service, self.clients, self.batch_time_ms = rebuild(
            self.service_factory, self.params.client_window, base.parts
        )
        self.last_capture = base
        self.executed = self.stable
        for s in range(self.stable + 1, seq):
            self._execute(self.executed_batches[s], REPLAY)
        del self.executed_batches[seq]
        self.stats["tentative-rollbacks"] += 1
        self._serve_deferred_reads()

    def _serve_deferred_reads(self) -> None:
        reads, self.deferred_reads = self.deferred_reads, []
        for req in reads:
            self.on_request(req, self.now_ms)

    # -- checkpoints and garbage collection -------------------------------------------------

    def _capture(self) -> Snapshot:
        self.last_capture = capture(self.service, self.clients, self.batch_time_ms, self.last_capture)
        return self.last_capture

    def _take_checkpoint(self) -> None:
        snap = self.own_checkpoints[self.executed] = self._capture()
        self.stats["checkpoints"] += 1
        log.debug("replica %d checkpoint %d", self.id, self.executed)
        cp = Checkpoint(self.executed, snap.root, self.id)
        self.outbox.append(Broadcast(cp))
        self.on_checkpoint(cp, 0)

    def on_checkpoint(self, cp: Checkpoint, now_ms: int) -> None:
        if cp.seq <= self.stable:
            return
        if cp.seq % self.params.checkpoint_interval:
            return self._drop("checkpoint-out-of-range", cp)
        if cp.seq > self.stable + self.params.log_window:
            self._far_checkpoint(cp)
            return
        votes = self.checkpoint_votes.setdefault(cp.seq, {})
        votes.setdefault(cp.replica, cp.digest)
        support = sum(1 for d in votes.values() if d == cp.digest)
        own = self.own_checkpoints.get(cp.seq)
        if support < 2 * self.f + 1:
            if support >= self.f + 1 and own is None and cp.seq > self.executed:
                # A weak certificate is enough to fetch that state (a correct replica has it);
                # with a replica down we may never see 2f+1. _maybe_fetch_state waits a status
                # interval first, so a replica that is merely slow executes instead.
                self.fetch_target = max(self.fetch_target or (0, b""), (cp.seq, cp.digest))
            return
        if own is not None and own.root == cp.digest:
            self._make_stable(cp.seq)
        elif own is not None:
            # 2f+1 replicas agree on a state we do not have: we diverged; take theirs.
            log.error("replica %d diverged at checkpoint %d", self.id, cp.seq)
            self.fetch_target = (cp.seq, cp.digest)
        elif cp.seq > self.executed:
            self.fetch_target = max(self.fetch_target or (0, b""), (cp.seq, cp.digest))

    def _far_checkpoint(self, cp: Checkpoint) -> None:
        """A checkpoint beyond our window (we restarted, or were cut off): only state transfer
        gets us there. Each replica's latest such claim is kept (so at most n); f+1 matching
        ones include a correct replica, which executed only committed requests."""
        self.far_checkpoints[cp.replica] = (cp.seq, cp.digest)
        voters = {r for r, c in self.far_checkpoints.items() if c == (cp.seq, cp.digest)}
        if len(voters) >= self.f + 1 and (self.fetch_target is None or self.fetch_target[0] < cp.seq):
            self.fetch_target = (cp.seq, cp.digest)
            self.checkpoint_votes[cp.seq] = dict.fromkeys(voters, cp.digest)

    def _make_stable(self, seq: int) -> None:
        """The checkpoint at ``seq`` has a 2f+1 certificate: move h and discard the log below it."""
        assert seq in self.own_checkpoints, "a stable checkpoint is one whose state we hold"
        self.stable = seq
        for s in [s for s in self.log if s <= seq]:
            del self.log[s]
        for s in [s for s in self.checkpoint_votes if s < seq]:
            del self.checkpoint_votes[s]
        for s in [s for s in self.own_checkpoints if s < seq]:
            del self.own_checkpoints[s]
        for r in [r for r, (s, _) in self.far_checkpoints.items() if s <= seq]:
            del self.far_checkpoints[r]
        for table in (self.pset, self.qset):
            for s in [s for s in table if s <= seq]:
                del table[s]
        for key in [k for k in self.batches if k[0] <= seq]:
            del self.batches[key]
        for s in [s for s in self.executed_batches if s <= seq]:
            del self.executed_batches[s]
        for d in [d for d, r in self.request_store.items() if not self.clients.is_new(r.client, r.timestamp)]:
            del self.request_store[d]  # executed here by state transfer, or never to come
        if self.fetch_target is not None and self.fetch_target[0] <= seq:
            self.fetch_target = None
        if self.transfer is not None and self.transfer.seq <= seq:
            self.transfer = None
        self.stats["stable-checkpoints"] += 1
        own = self.own_checkpoints.get(seq)
        if own is not None:
            votes = self.checkpoint_votes.get(seq, {})
            proof = tuple(sorted((r, d) for r, d in votes.items() if d == own.root))
            self.outbox.append(Persist(seq, own, proof))
        self._try_propose(self.now_ms)  # the window moved: the primary may order what waits

    # -- loss recovery and state transfer ---------------------------------------------------

    def on_status(self, st: Status, now_ms: int) -> None:
        """Retransmit our own messages that the peer's status shows it lacks."""
        to = st.replica
        if to == self.id:
            return self._drop("status-from-self", st)
        for seq in sorted(s for s in self.own_checkpoints if s > st.stable)[-2:]:
            self.outbox.append(Send(to, Checkpoint(seq, self.own_checkpoints[seq].root, self.id)))
        behind = st.view < self.view or (st.view == self.view and st.view_changing)
        if behind and not self.view_changing and self.is_primary() and self.new_view is not None:
            self.outbox.append(Send(to, self.new_view))  # it missed our NEW-VIEW
        if self.view_changing and (st.view < self.view or (st.view == self.view and st.view_changing)):
            # It may have missed our VIEW-CHANGE: to count it (f+1 pull a replica along, 2f+1
            # let the new primary decide) it needs it again.
            own = self.view_changes.get(self.view, {}).get(self.id)
            if own is not None:
                self.outbox.append(Send(to, own))
        if st.view != self.view or st.view_changing or self.view_changing:
            return
        sent = 0
        for seq in range(max(st.settled, self.stable) + 1, self.stable + self.params.log_window + 1):
            slot = self.log.get(seq)
            if slot is None or slot.pre_prepare is None:
                continue
            pp = slot.pre_prepare
            if self.is_primary():
                self.outbox.append(Send(to, pp))
            elif self.id in slot.prepares:
                self.outbox.append(Send(to, Prepare(self.view, seq, slot.prepares[self.id], self.id)))
            if self.id in slot.commits:
                self.outbox.append(Send(to, Commit(self.view, seq, slot.commits[self.id], self.id)))
            sent += 1
            if sent >= STATUS_SLOTS_MAX:
                break

    def _settled(self) -> int:
        """What peers need not resend us: everything up to it. A replica that executed a batch
        before a view change still has to prepare and commit it again when the new view
        re-proposes it, or the others cannot commit it without us."""
        unsettled = (s for s, slot in self.log.items() if s <= self.executed and not slot.committed)
        return min(min(unsettled, default=self.executed + 1) - 1, self.executed)

    def _maybe_fetch_state(self) -> None:
        """Runs every status interval while we lack a certified checkpoint: ask a voter for its
        manifest, or keep fetching partitions (again from another voter if one went quiet)."""
        if self.fetch_target is None:
            return
        seq, d = self.fetch_target
        own = self.own_checkpoints.get(seq)
        if seq <= self.executed:
            self.fetch_target = None  # we got there by executing
            votes = self.checkpoint_votes.get(seq, {})
            if own is not None and sum(v == own.root for v in votes.values()) >= 2 * self.f + 1:
                self._make_stable(seq)
            return
        voters = sorted(r for r, v in self.checkpoint_votes.get(seq, {}).items() if v == d and r != self.id)
        if not voters:
            return
        self.fetch_from = (self.fetch_from + 1) % len(voters)
        t = self.transfer
        if t is not None and t.seq == seq:
            if t.asked and all(self.now_ms - at >= self.params.status_interval_ms for at in t.asked.values()):
                t.source = voters[self.fetch_from]  # the source went quiet: try another
            self._ask_partitions(t)
            return
        self.stats["state-fetches"] += 1
        self.outbox.append(Send(voters[self.fetch_from], FetchState(seq, self.id)))

    def _ask_partitions(self, t: Transfer) -> None:
        for index in t.to_ask(self.now_ms, 4 * self.params.status_interval_ms):
            self.outbox.append(Send(t.source, FetchPartition(t.seq, index, self.id)))

    def on_fetch_state(self, fs: FetchState, now_ms: int) -> None:
        own = self.own_checkpoints.get(fs.seq)
        if own is None:
            return self._drop("no-such-checkpoint", fs)
        self.outbox.append(Send(fs.replica, State(fs.seq, own.manifest(), self.id)))

    def on_state(self, st: State, now_ms: int) -> None:
        target = self.fetch_target
        if target is None or st.seq != target[0] or (self.transfer is not None and self.transfer.seq == st.seq):
            return self._drop("unrequested-state", st)
        if st.seq <= self.executed:
            return self._drop("state-already-reached", st)
        digests = decode_manifest(st.manifest, target[1], self.params.frame_bytes_max // 32)
        if digests is None:
            # A lying replica cannot mislead us: the certified digest decides; ask another next time.
            return self._drop("state-digest-mismatch", st)
        self.transfer = Transfer(st.seq, target[1], digests, self._capture(), st.replica)
        self.stats["state-transfer-partitions"] += len(self.transfer.queue)
        self._continue_transfer()

    def on_fetch_partition(self, fp: FetchPartition, now_ms: int) -> None:
        own = self.own_checkpoints.get(fp.seq)
        if own is None or fp.index >= len(own.parts):
            return self._drop("no-such-partition", fp)
        self.outbox.append(Send(fp.replica, Partition(fp.seq, fp.index, own.parts[fp.index], self.id)))

    def on_partition(self, p: Partition, now_ms: int) -> None:
        t = self.transfer
        if t is None or p.seq != t.seq or p.index >= len(t.digests):
            return self._drop("unrequested-partition", p)
        if not t.offer(p.index, p.data):
            if p.index in t.asked:
                self._drop("partition-digest-mismatch", p)
                t.asked[p.index] = -(1 << 62)  # ask again at once, from the next voter
                voters = sorted(self.checkpoint_votes.get(t.seq, {}).keys() - {self.id, p.replica})
                if voters:
                    t.source = voters[0]
            return self._continue_transfer()
        self._continue_transfer()

    def _continue_transfer(self) -> None:
        t = self.transfer
        assert t is not None
        if not t.fetched_all:
            self._ask_partitions(t)
            return
        self.transfer = None
        if self.executed >= t.seq:
            return  # we got there by executing while we fetched: our own state is newer
        problem = self._install(t.seq, t.snapshot())
        if problem:
            return self._drop(problem, State(t.seq, b"", t.source))
        self.stats["state-transfers"] += 1
        log.info("replica %d installed state at checkpoint %d", self.id, t.seq)
        self._make_stable(t.seq)
        self._arm_view_timer()
        self._execute_ready()

    def _install(self, seq: int, snap: Snapshot) -> str | None:
        """Replace our state by the snapshot of checkpoint ``seq``, whose partitions were
        checked against its root; or say why it cannot be used."""
        assert seq > self.executed, "installing an older state than we hold would lose executions"
        try:
            self.service, self.clients, self.batch_time_ms = rebuild(
                self.service_factory, self.params.client_window, snap.parts
            )
        except ValueError:
            return "malformed-state"
        self.last_capture = snap
        self.tentative_seq = 0
        self.executed_batches.clear()
        self.executed = seq
        self.own_checkpoints[seq] = snap
        self.next_seq = max(self.next_seq, seq + 1)
        return None

    def restore(self, saved: Persist) -> None:
        """Resume from a checkpoint this replica persisted before it stopped. Our own disk is
        trusted, but every partition must still match the digest it was certified with."""
        assert self.executed == 0, "restore only a fresh replica"
        snap = saved.snapshot
        if len({r for r, d in saved.proof if d == snap.root}) < self.f + 1:
            raise ValueError(f"checkpoint {saved.seq} on disk lacks a certificate")
        if len(snap.parts) != len(snap.digests) or root_of(tuple(digest(p) for p in snap.parts)) != snap.root:
            raise ValueError(f"checkpoint {saved.seq} on disk is damaged")
        if self._install(saved.seq, snap):
            raise ValueError(f"checkpoint {saved.seq} on disk is malformed")
        self.checkpoint_votes[saved.seq] = dict(saved.proof)
        self.stable = saved.seq
        for s in [s for s in self.own_checkpoints if s < saved.seq]:
            del self.own_checkpoints[s]

    # -- view change ------------------------------------------------------------------------

    def _view_timeout(self) -> int:
        return self.params.view_timeout_ms << min(self.view_attempt, VIEW_BACKOFF_MAX)

    def _arm_view_timer(self) -> None:
        """The paper's rule (section 4.4): the timer runs for one request we wait on, the oldest;
        it restarts only when that one executes and others still wait. Progress on other
        requests does not restart it, so a primary that censors a client is replaced."""
        if self.view_changing:
            return
        tentative = self._tentative_requests()
        for key in [k for k in self.waiting if not self.clients.is_new(*k) and k not in tentative]:
            del self.waiting[key]  # executed meanwhile (by state transfer, say)
        head = next(iter(self.waiting), None)
        if head is None:
            self.view_deadline_ms = self.waiting_head = None
        elif head != self.waiting_head or self.view_deadline_ms is None:
            self.waiting_head = head
            self.view_deadline_ms = self.now_ms + self._view_timeout()

    def _record_pre_prepare(self, pp: PrePrepare) -> None:
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

    def _start_view_change(self, view: int) -> None:
        assert view > self.view or (view == self.view and not self.view_changing)
        log.info("replica %d: view change to view %d", self.id, view)
        self.stats["view-changes-started"] += 1
        self._rollback_tentative()
        self.view = view
        self.view_changing = True
        self.view_attempt += 1
        self.view_deadline_ms = None
        for req in self.pending:
            if len(self.waiting) < WAITING_REQUESTS_MAX:
                self.waiting.setdefault((req.client, req.timestamp), req)
        self.pending.clear()
        self.pending_ids.clear()
        self.log = {}
        vc = ViewChange(
            view,
            self.stable,
            tuple(sorted((s, snap.root) for s, snap in self.own_checkpoints.items())),
            tuple(sorted((s, d, v) for s, (d, v) in self.pset.items() if self.in_window(s))),
            tuple(sorted((s, tuple(sorted(q.items()))) for s, q in self.qset.items() if self.in_window(s))),
            self.id,
        )
        for v in [v for v in self.view_changes if v < view]:
            del self.view_changes[v]
        self._store_view_change(vc)
        self.outbox.append(Broadcast(vc))
        self._view_change_progress()

    def _store_view_change(self, vc: ViewChange) -> None:
        # One view change per replica, its latest: a liar cannot fill memory with many views.
        for v, by_replica in list(self.view_changes.items()):
            if v != vc.view and by_replica.pop(vc.replica, None) is not None and not by_replica:
                del self.view_changes[v]
        self.view_changes.setdefault(vc.view, {})[vc.replica] = vc

    def _view_change_progress(self) -> None:
        vcs = self.view_changes.get(self.view, {})
        if self.view_changing and len(vcs) >= 2 * self.f + 1 and self.view_deadline_ms is None:
            # Only once 2f+1 replicas are changing too does waiting for the new primary make
            # sense; if it does not deliver in time, move on (the paper's liveness rule).
            self.view_deadline_ms = self.now_ms + self._view_timeout()
        if self.view_changing and self.is_primary():
            self._try_new_view()

    def _valid_view_change(self, vc: ViewChange) -> bool:
        p = self.params
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
        if vc.replica == self.id:
            return self._drop("view-change-from-self", vc)
        if vc.view < self.view or (vc.view == self.view and not self.view_changing):
            if vc.view == self.view and self.is_primary() and self.new_view is not None:
                self.outbox.append(Send(vc.replica, self.new_view))
            return self._drop("old-view-change", vc)
        if not self._valid_view_change(vc):
            return self._drop("malformed-view-change", vc)
        self._store_view_change(vc)
        if vc.view > self.view:
            # f+1 replicas want a later view: at least one correct one timed out, join them.
            latest = {r: v for v, by in self.view_changes.items() if v > self.view for r in by}
            if len(latest) >= self.f + 1:
                self._start_view_change(min(latest.values()))
            return
        self._view_change_progress()

    def _try_new_view(self) -> None:
        vcs = sorted(self.view_changes.get(self.view, {}).values(), key=lambda vc: vc.replica)
        decision = decide(vcs, self.f, self.params.log_window)
        if decision is None:
            return
        missing = [
            (s, d)
            for s, d in decision.batches
            if s > self.stable and d != NULL_DIGEST and (s, d) not in self.batches
        ]
        if missing:
            # Condition A3: we must hold every chosen batch; whoever prepared it can send it.
            for s, d in missing:
                self.wanted_batches.add((s, d))
                self.outbox.append(Broadcast(FetchBatch(s, d, self.id)))
            return
        nv = NewView(self.view, tuple(vcs), decision.checkpoint, decision.batches, self.id)
        self.outbox.append(Broadcast(nv))
        self._enter_view(nv)

    def on_new_view(self, nv: NewView, now_ms: int) -> None:
        if nv.view < self.view or (nv.view == self.view and not self.view_changing):
            return self._drop("old-new-view", nv)
        if nv.replica != nv.view % self.n:
            return self._drop("new-view-not-from-primary", nv)
        vcs = sorted(nv.view_changes, key=lambda vc: vc.replica)
        if any(vc.view != nv.view or not self._valid_view_change(vc) for vc in vcs):
            return self._drop("bad-new-view", nv)
        decision = decide(vcs, self.f, self.params.log_window)
        if decision is None or decision.checkpoint != nv.checkpoint or decision.batches != nv.decisions:
            # The primary's decision does not follow from its own evidence: ignore it and let
            # the timer move us to the next view.
            return self._drop("bad-new-view", nv)
        self._enter_view(nv)

    def _enter_view(self, nv: NewView) -> None:
        self._rollback_tentative()
        self.view = nv.view
        self.view_changing = False
        self.new_view = nv
        self.view_deadline_ms = None
        self.wanted_batches.clear()
        for v in [v for v in self.view_changes if v <= nv.view]:
            del self.view_changes[v]
        self.log = {}
        self.stats["views-entered"] += 1
        log.info("replica %d: entered view %d (primary %d)", self.id, self.view, self.primary)
        n0, d0 = nv.checkpoint
        self.view_floor = n0
        if n0 > self.stable:
            own = self.own_checkpoints.get(n0)
            if own is not None and own.root == d0:
                self._make_stable(n0)
            else:
                votes = self.checkpoint_votes.setdefault(n0, {})
                for vc in nv.view_changes:
                    if (n0, d0) in vc.checkpoints:
                        votes.setdefault(vc.replica, d0)
                self.fetch_target = max(self.fetch_target or (0, b""), (n0, d0))
        decided: set[tuple[int, int]] = set()
        for seq, d in nv.decisions:
            if seq <= self.stable:
                continue
            slot = self._slot(seq)
            slot.expected = d
            if d != NULL_DIGEST:
                decided.update((r.client, r.timestamp) for r in self.batches.get((seq, d), (0, ()))[1])
            if self.is_primary():
                ts, requests = self.batches[(seq, d)] if d != NULL_DIGEST else (0, ())
                pp = PrePrepare.make(self.view, seq, ts, requests, self.id)
                assert pp.digest == d, "a re-proposed batch must keep its digest"
                slot.pre_prepare = pp
                self._record_pre_prepare(pp)
                self.proposed_time_ms = max(self.proposed_time_ms, ts)
                self.outbox.append(Broadcast(self._by_reference(pp)))
        if self.is_primary():
            top = max((s for s, _ in nv.decisions), default=n0)
            self.next_seq = max(top, n0, self.executed) + 1
            for key, req in sorted(self.waiting.items()):
                if key not in decided and self.clients.is_new(*key):
                    self.pending.append(req)
                    self.pending_ids.add(key)
            self.waiting.clear()
            self._try_propose(self.now_ms)
        else:
            self.waiting_head = None
            self._arm_view_timer()

    def on_fetch_batch(self, fb: FetchBatch, now_ms: int) -> None:
        batch = self.batches.get((fb.seq, fb.digest))
        if batch is None:
            return self._drop("no-such-batch", fb)
        self.outbox.append(Send(fb.replica, Batch(fb.seq, batch[0], batch[1], self.id, fb.digest)))

    def on_batch(self, b: Batch, now_ms: int) -> None:
        key = (b.seq, b.digest)
        if key not in self.wanted_batches:
            return self._drop("unrequested-batch", b)
        self.wanted_batches.discard(key)
        self.batches[key] = (b.timestamp, b.requests)
        for r in b.requests:
            if self._is_large(r):
                self._store_request(r)
        if self.view_changing and self.is_primary():
            self._try_new_view()

    _handlers: dict[type, Callable[[Replica, Message, int], None]] = {
        Request: on_request,
        PrePrepare: on_pre_prepare,
        Prepare: on_prepare,
        Commit: on_commit,
        Checkpoint: on_checkpoint,
        Status: on_status,
        FetchState: on_fetch_state,
        State: on_state,
        FetchPartition: on_fetch_partition,
        Partition: on_partition,
        ViewChange: on_view_change,
        NewView: on_new_view,
        FetchBatch: on_fetch_batch,
        Batch: on_batch,
    }

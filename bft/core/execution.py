"""Execution: the service, the exactly-once table and the agreed time, and the optimisations
that touch them (TOCS 2002, section 5.1): read-only requests executed at once, tentative
execution of prepared batches with rollback, and digest replies.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

from bft.core.budgets import queue_bytes_max, request_bytes
from bft.core.clients import ClientTable
from bft.core.effects import Executed, ReplyTo
from bft.core.params import DIGEST_REPLY_BYTES_MIN
from bft.core.promises import Committed
from bft.core.state import rebuild
from bft.messages import PrePrepare, Reply, Request, digest
from bft.service import Service

if TYPE_CHECKING:
    from bft.core.replica import Replica

# Read-only requests held while the state is tentative; more are dropped (the client resends).
DEFERRED_READS_MAX = 4096


class Mode(Enum):
    """How a batch is executed: committed, tentatively (prepared only), or replayed silently
    after a rollback."""

    COMMITTED = 1
    TENTATIVE = 2
    REPLAY = 3


class Execution:
    __slots__ = (
        "batch_time_ms",
        "clients",
        "deferred_bytes",
        "deferred_reads",
        "executed_batches",
        "r",
        "service",
        "service_factory",
        "tentative_seq",
    )

    def __init__(self, replica: Replica, service_factory: Callable[[], Service]) -> None:
        self.r = replica
        self.service_factory = service_factory
        self.service = service_factory()
        self.clients = ClientTable(replica.params.client_window)
        self.batch_time_ms = 0  # agreed time of the last executed batch
        self.tentative_seq = 0  # the batch executed tentatively and not yet committed, if any
        self.executed_batches: dict[int, PrePrepare] = {}  # executed above h, for rollback replay
        self.deferred_reads: list[Request] = []  # read-only requests waiting for a commit
        self.deferred_bytes = 0  # what they hold (``request_bytes``)

    def collect(self, stable: int) -> None:
        for s in [s for s in self.executed_batches if s <= stable]:
            del self.executed_batches[s]

    # -- requests answered without ordering -------------------------------------------------

    def read_only(self, req: Request) -> None:
        """Executed at once on the current state, outside the order and the exactly-once table;
        the client needs 2f+1 matching replies (TOCS 2002, section 5.1.3). Not on a tentative
        state, which a view change may undo: such reads wait for the commit."""
        r = self.r
        if not (r.params.read_only and self.service.is_read_only(req.op)):
            return r.drop("not-read-only", req)
        if self.tentative_seq:
            cost = request_bytes(req)
            if len(self.deferred_reads) >= DEFERRED_READS_MAX or self.deferred_bytes + cost > queue_bytes_max(r.params):
                return r.drop("deferred-reads-full", req)  # the client resends, or falls back
            self.deferred_reads.append(req)
            self.deferred_bytes += cost
            return
        r.stats["read-only-requests"] += 1
        result = self.service.execute(req.op, req.client, self.batch_time_ms)
        r.outbox.append(ReplyTo(req.client, self.reply(req, result, False)))

    def answer_again(self, req: Request) -> bool:
        """A request already executed gets its cached reply again; True if it was one."""
        r = self.r
        cached = self.clients.cached(req.client, req.timestamp)
        if cached is None:
            return False
        r.stats["retransmitted-replies"] += 1
        tentative = (req.client, req.timestamp) in self.tentative_requests()
        r.outbox.append(ReplyTo(req.client, Reply(r.view, req.timestamp, req.client, r.id, cached, tentative)))
        if tentative and not r.is_primary():
            # Executed only tentatively: if it never commits, the primary is to blame.
            r.timer.wait_on((req.client, req.timestamp), req)
        return True

    def reply(self, req: Request, result: bytes, tentative: bool) -> Reply:
        """Digest replies (TOCS 2002, 5.1.1): one designated replica, rotating with the
        timestamp, sends a large result in full; the others send its digest. Retransmitted
        requests always get the full result, so a faulty designated replica only costs time."""
        r = self.r
        if r.params.digest_replies and len(result) > DIGEST_REPLY_BYTES_MIN and req.designated(r.n) != r.id:
            return Reply(r.view, req.timestamp, req.client, r.id, digest(result), tentative, True)
        return Reply(r.view, req.timestamp, req.client, r.id, result, tentative)

    # -- ordered execution ------------------------------------------------------------------

    def execute_ready(self) -> None:
        """Execute committed batches in order; with tentative execution on, also the next batch
        once it is prepared and everything before it has committed (TOCS 2002, 5.1.2)."""
        r = self.r
        log = r.normal.log
        while True:
            if self.tentative_seq:
                slot = log.get(self.tentative_seq)
                if slot is None or not slot.committed:
                    break
                self._tentative_committed()
                continue
            slot = log.get(r.executed + 1)
            if slot is None or slot.pre_prepare is None:
                break
            if slot.committed:
                self.execute(slot.pre_prepare, Mode.COMMITTED)
            elif slot.prepared and r.params.tentative and not r.view_changing:
                self.execute(slot.pre_prepare, Mode.TENTATIVE)
            else:
                break
        r.normal.propose(r.now_ms)

    def execute(self, pp: PrePrepare, mode: Mode) -> None:
        r = self.r
        assert pp.seq == r.executed + 1 and not self.tentative_seq, "batches execute in order, one at a time"
        assert pp.resolved, "a batch executes with every request body"
        if mode is Mode.COMMITTED:
            r.promise(Committed(pp.seq, pp.digest))
            r.outbox.append(Executed(pp))
            r.monitor.executed += len(pp.requests)
        self.batch_time_ms = max(pp.timestamp, self.batch_time_ms + 1)
        tentative = mode is Mode.TENTATIVE
        replying = mode is not Mode.REPLAY
        # Bound once: this loop runs for every request of every batch (a fifth of a backup's time).
        waiting, done, discard = r.timer.waiting, r.timer.done, r.normal.pending_ids.discard
        forget, large = r.large.forget, r.large.holds_any()
        is_new, record, run = self.clients.is_new, self.clients.record, self.service.execute
        me, outbox, when = r.id, r.outbox, self.batch_time_ms
        for req in pp.requests:
            key = (req.client, req.timestamp)
            discard(key)
            if large:
                forget(req.digest)
            # Asked to reply, or the client sent it to us itself: it timed out (or sent a large
            # request to all), and may be waiting for replies from replicas it did not ask.
            asked = req.asks(me) or key in waiting
            if not tentative:  # a tentative execution may be undone: keep waiting on it
                done(key)
            if not is_new(req.client, req.timestamp):
                continue  # a duplicate ordered twice executes once, the same way everywhere
            result = run(req.op, req.client, when)
            record(req.client, req.timestamp, result, req.settled)
            if replying and asked:
                outbox.append(ReplyTo(req.client, self.reply(req, result, tentative)))
        r.executed = pp.seq
        self.executed_batches[pp.seq] = pp
        if mode is Mode.REPLAY:
            return
        r.stats["executed-requests"] += len(pp.requests)
        if pp.requests and not r.view_changing:
            r.timer.attempt = 0  # progress: successive view changes start their back-off anew
            r.timer.arm()
        if tentative:
            self.tentative_seq = pp.seq
            r.stats["tentative-batches"] += 1
        elif r.executed % r.params.checkpoint_interval == 0:
            r.checkpoints.take()

    # -- tentative execution ----------------------------------------------------------------

    def _tentative_committed(self) -> None:
        r = self.r
        seq, self.tentative_seq = self.tentative_seq, 0
        pp = self.executed_batches[seq]
        r.promise(Committed(seq, pp.digest))
        r.outbox.append(Executed(pp))
        r.monitor.executed += len(pp.requests)
        for req in self.executed_batches[seq].requests:
            r.timer.done((req.client, req.timestamp))
        r.timer.arm()
        self._serve_deferred_reads()
        if seq % r.params.checkpoint_interval == 0:
            r.checkpoints.take()

    def tentative_requests(self) -> set[tuple[int, int]]:
        if not self.tentative_seq:
            return set()
        return {(q.client, q.timestamp) for q in self.executed_batches[self.tentative_seq].requests}

    def rollback_tentative(self) -> None:
        """A tentatively executed batch that has not committed is undone before a view change
        decides that sequence number again: rebuild the last stable checkpoint's state and
        replay the committed batches after it, silently."""
        r = self.r
        seq = self.tentative_seq
        if not seq:
            return
        assert seq == r.executed > r.stable, "only the last executed batch can be tentative"
        self.tentative_seq = 0
        base = r.checkpoints.own[r.stable]
        self.service, self.clients, self.batch_time_ms = rebuild(
            self.service_factory, r.params.client_window, base.parts
        )
        r.checkpoints.last_capture = base
        r.executed = r.stable
        for s in range(r.stable + 1, seq):
            self.execute(self.executed_batches[s], Mode.REPLAY)
        del self.executed_batches[seq]
        r.stats["tentative-rollbacks"] += 1
        self._serve_deferred_reads()

    def _serve_deferred_reads(self) -> None:
        reads, self.deferred_reads, self.deferred_bytes = self.deferred_reads, [], 0
        for req in reads:
            self.r.normal.on_request(req, self.r.now_ms)

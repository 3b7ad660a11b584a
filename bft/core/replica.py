"""A PBFT replica as a pure state machine (Castro & Liskov, OSDI 1999 / TOCS 2002).

``step(msg, now)`` takes a message that the driver has already authenticated (MAC or signature)
and decoded; ``tick(now)`` advances timers. Both return the typed effects (``bft.core.effects``)
they produced, in order. Byzantine input is dropped and counted in ``dropped`` by reason; it never
raises. Assertions guard our own invariants: one that fails is a bug, and stops the run.

The replica holds what every part needs (view, executed, stable, the effects) and wires the
parts, each of which owns its state: the log and normal case, execution, checkpoints, state
transfer, the view timer, the slow-primary monitor, the view change, status recovery and large
requests.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from bft.core.budgets import request_bytes
from bft.core.checkpoints import Checkpoints
from bft.core.effects import Effect, Persist, Promise
from bft.core.execution import Execution
from bft.core.large import LargeRequests
from bft.core.learner import Learner
from bft.core.log import NormalCase
from bft.core.monitor import PrimaryMonitor
from bft.core.params import Params
from bft.core.promises import Record
from bft.core.quorum import Quorum
from bft.core.recovery import recover
from bft.core.statetransfer import StateTransfer
from bft.core.status import StatusRecovery
from bft.core.viewchange import ViewChanges
from bft.core.viewtimer import ViewTimer
from bft.messages import (
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
    Request,
    State,
    Status,
    ViewChange,
)
from bft.service import Service

log = logging.getLogger("bft.replica")


class Replica:
    __slots__ = (
        "checkpoints",
        "dropped",
        "executed",
        "execution",
        "f",
        "handlers",
        "id",
        "keeps_promises",
        "large",
        "learner",
        "monitor",
        "n",
        "normal",
        "now_ms",
        "outbox",
        "params",
        "quorum",
        "stable",
        "stats",
        "status",
        "timer",
        "transfer",
        "view",
        "view_change",
        "view_changing",
    )

    def __init__(self, replica_id: int, f: int, params: Params, service_factory: Callable[[], Service]) -> None:
        self.id = replica_id
        self.f = f
        self.quorum = Quorum(f)
        self.n = self.quorum.n
        assert 0 <= replica_id < self.n
        self.params = params
        self.keeps_promises = params.durability != "memory"
        self.view = 0
        self.view_changing = False
        self.executed = 0  # last executed sequence number
        self.stable = 0  # low watermark h: last stable checkpoint
        self.now_ms = 0  # the driver's clock at the last input
        self.outbox: list[Effect] = []
        self.dropped: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.execution = Execution(self, service_factory)
        self.checkpoints = Checkpoints(self)  # after execution: checkpoint 0 is its initial state
        self.transfer = StateTransfer(self)
        self.normal = NormalCase(self)
        self.large = LargeRequests(self)
        self.learner = Learner(self)
        self.timer = ViewTimer(self)
        self.monitor = PrimaryMonitor(self)
        self.view_change = ViewChanges(self)
        self.status = StatusRecovery(self)
        self.handlers: dict[type, Callable[[Message, int], None]] = {
            Request: self.normal.on_request,
            PrePrepare: self.normal.on_pre_prepare,
            Prepare: self.normal.on_prepare,
            Commit: self.normal.on_commit,
            Checkpoint: self.checkpoints.on_checkpoint,
            Status: self.status.on_status,
            FetchState: self.transfer.on_fetch_state,
            State: self.transfer.on_state,
            FetchPartition: self.transfer.on_fetch_partition,
            Partition: self.transfer.on_partition,
            ViewChange: self.view_change.on_view_change,
            NewView: self.view_change.on_new_view,
            FetchBatch: self.view_change.on_fetch_batch,
            Batch: self.view_change.on_batch,
        }

    @property
    def primary(self) -> int:
        return self.view % self.n

    def is_primary(self) -> bool:
        return self.primary == self.id

    def in_window(self, seq: int) -> bool:
        return self.stable < seq <= self.stable + self.params.log_window

    @property
    def service(self) -> Service:
        return self.execution.service

    def drop(self, reason: str, msg: Message) -> None:
        self.dropped[reason] += 1
        log.debug("replica %d drops %s: %s", self.id, type(msg).__name__, reason)

    def promise(self, record: Record) -> None:
        """Something we are about to say that binds what we may say later (``bft.core.promises``)."""
        if self.keeps_promises:
            self.outbox.append(Promise(record))

    def take_outbox(self) -> list[Effect]:
        out, self.outbox = self.outbox, []
        self.monitor.executed = 0  # what it executed is counted by ``observe`` or not at all
        return out

    # -- inputs -----------------------------------------------------------------------------

    def step(self, msg: Message, now_ms: int) -> list[Effect]:
        self.now_ms = now_ms
        handler = self.handlers.get(type(msg))
        if handler is None:
            self.drop("unexpected-type", msg)
        else:
            handler(msg, now_ms)
        self.monitor.observe(now_ms)
        return self.take_outbox()

    def step_requests(self, reqs: list[Request], now_ms: int) -> list[Effect]:
        """Requests that arrived together (one event-loop iteration of the runtime): all queued,
        then ordered, so that a burst becomes one batch rather than a batch of its first request
        and then the rest (BFT-SMaRt batches what arrived, some 30 requests at 64 clients)."""
        self.now_ms = now_ms
        for req in reqs:
            self.normal.on_request(req, now_ms, propose=False)
        self.normal.propose(now_ms)
        self.monitor.observe(now_ms)
        return self.take_outbox()

    def keep_body(self, req: Request, now_ms: int) -> list[Effect]:
        """A large request its client sent us directly, proven to us alone (its session; no
        signature): its body resolves the pre-prepare that names it, but we do not hold it for
        the view timer, since the primary may not be able to check it (its client's resend,
        signed, is held). One already executed is answered again."""
        self.now_ms = now_ms
        if self.execution.answer_again(req):
            return self.take_outbox()
        if self.large.is_large(req) and self.execution.clients.is_new(req.client, req.timestamp):
            self.large.store(req)
        return self.take_outbox()

    def offer_unverified(self, reqs: list[Request], now_ms: int) -> list[Effect]:
        """Request bodies from pre-prepares and batches that the runtime could not authenticate
        (``LargeRequests.offer``): they resolve only batches f+1 replicas vouch for."""
        self.now_ms = now_ms
        self.large.offer(reqs)
        self.monitor.observe(now_ms)
        return self.take_outbox()

    def tick(self, now_ms: int) -> list[Effect]:
        self.now_ms = now_ms
        self.status.tick(now_ms)
        self.timer.tick(now_ms)
        self.normal.propose(now_ms)
        self.monitor.observe(now_ms)
        return self.take_outbox()

    def recover(self, saved: Persist | None, records: list[Record]) -> None:
        """Resume from what this replica kept on disk before it stopped: its last stable
        checkpoint (``CheckpointDamaged`` if it cannot be used) and its promise log."""
        recover(self, saved, records)

    def distrust(self, client: int) -> list[Effect]:
        """Some replica could not authenticate a request of ``client`` that a pre-prepare
        carried: the client may be faulty (its tags good for some replicas only, the "big MAC"
        attack). From now on the runtime takes its requests only signed; those we hold on the
        strength of a tag alone are dropped, so that no primary proposes them again (a correct
        client resends them, signed, when it times out)."""
        self.normal.forget_client(client)
        self.timer.forget_client(client)
        self.stats["clients-distrusted"] += 1
        return self.take_outbox()

    def audit(self, now_ms: int) -> list[Effect]:
        """Proactive recovery's state check (``Checkpoints.audit``); the runtime refreshes the
        keys around it."""
        self.now_ms = now_ms
        self.checkpoints.audit()
        return self.take_outbox()

    # -- invariants -------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """What must hold between any two inputs; the simulator checks it after every one."""
        L = self.params.log_window
        normal, e, cps = self.normal, self.execution, self.checkpoints
        assert self.stable <= self.executed <= self.stable + L, "executed within the window"
        assert self.stable in cps.own, "we hold the state of our stable checkpoint"
        assert all(s >= self.stable for s in cps.own), "checkpoints below h are discarded"
        assert all(s <= self.executed for s in cps.own), "a checkpoint is of a state we reached"
        top = max(self.stable, normal.view_floor) + L
        assert all(self.stable < s <= top for s in normal.log), "the log stays in the window"
        assert not (self.view_changing and normal.log), "no slots while changing view"
        assert not normal.pending or (self.is_primary() and not self.view_changing), "only a primary batches"
        for s, slot in normal.log.items():
            assert not slot.committed or slot.prepared, f"slot {s}: committed before prepared"
            assert not slot.prepared or slot.pre_prepare is not None, f"slot {s}: prepared without pre-prepare"
            if slot.pre_prepare is not None:
                assert slot.pre_prepare.view == self.view and slot.pre_prepare.seq == s
                assert slot.expected in (None, slot.pre_prepare.digest), f"slot {s}: not the NEW-VIEW's batch"
        if e.tentative_seq:
            assert e.tentative_seq == self.executed > self.stable, "only the last batch is tentative"
        assert all(self.stable < s <= self.executed for s in e.executed_batches), "replay keeps (h, executed]"
        assert all(s > self.stable for s in self.view_change.pset), "P is trimmed at h"
        assert all(s > self.stable for s in self.view_change.qset), "Q is trimmed at h"
        assert sum(map(len, self.view_change.view_changes.values())) <= self.n, "one view change per replica"
        assert len(self.large.unresolved) <= L
        assert not self.timer.deadline_ms or self.timer.waiting or self.view_changing, "timer runs for a request"
        assert self.timer.waiting.keys() == self.timer.arrived_ms.keys()
        assert sum(self.timer.per_client.values()) == len(self.timer.waiting)
        assert self.timer.waiting_bytes == sum(request_bytes(q) for q in self.timer.waiting.values())
        watched = self.monitor.view
        assert watched is None or (watched == self.view and not self.view_changing), "the monitor counts this view"

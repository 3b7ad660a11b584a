"""A PBFT replica as a pure state machine (Castro & Liskov, OSDI 1999 / TOCS 2002).

``step(msg, now)`` takes a message that the driver has already authenticated (MAC or signature)
and decoded; ``tick(now)`` advances timers. Both append ``(destination, message)`` pairs to
``outbox``; the driver drains it with ``take_outbox``. Destinations are a replica id, ``ALL`` (every
other replica), or, for a ``Reply``, the client named in it. Byzantine input is dropped and counted
in ``dropped`` by reason; it never raises. Assertions guard our own invariants.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable

import msgpack

from bft.core.clients import ClientTable
from bft.core.params import Params
from bft.messages import (
    Checkpoint,
    Commit,
    FetchState,
    Message,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    State,
    Status,
    digest,
)
from bft.service import Service

log = logging.getLogger("bft.replica")

ALL = -1
Outbound = tuple[int, Message]
# Slots retransmitted in answer to one status message: bounds the work a peer can ask for.
STATUS_SLOTS_MAX = 64


class Slot:
    """What a replica knows about one sequence number in the current view."""

    __slots__ = ("commits", "committed", "pre_prepare", "prepared", "prepares")

    def __init__(self) -> None:
        self.pre_prepare: PrePrepare | None = None
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
        self.own_checkpoints: dict[int, tuple[bytes, bytes]] = {0: (self._state_digest(), self._snapshot())}
        self.checkpoint_votes: dict[int, dict[int, bytes]] = {}
        self.fetch_target: tuple[int, bytes] | None = None  # certified checkpoint we lack
        self.fetch_from = 0
        self.next_status_ms = 0
        self.now_ms = 0  # the driver's clock at the last input
        self.outbox: list[Outbound] = []
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

    def take_outbox(self) -> list[Outbound]:
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

    def step(self, msg: Message, now_ms: int) -> list[Outbound]:
        self.now_ms = now_ms
        handler = self._handlers.get(type(msg))
        if handler is None:
            self._drop("unexpected-type", msg)
        else:
            handler(self, msg, now_ms)
        return self.take_outbox()

    def tick(self, now_ms: int) -> list[Outbound]:
        self.now_ms = now_ms
        if now_ms >= self.next_status_ms:
            self.next_status_ms = now_ms + self.params.status_interval_ms
            self.outbox.append((ALL, Status(self.view, self.stable, self.executed, self.id)))
            self._maybe_fetch_state()
        self._try_propose(now_ms)
        return self.take_outbox()

    # -- requests ---------------------------------------------------------------------------

    def on_request(self, req: Request, now_ms: int) -> None:
        cached = self.clients.cached(req.client, req.timestamp)
        if cached is not None:
            self.stats["retransmitted-replies"] += 1
            self.outbox.append((req.client, Reply(self.view, req.timestamp, req.client, self.id, cached)))
            return
        if self.clients.too_old(req.client, req.timestamp):
            self._drop("old-timestamp", req)
            return
        if not self.is_primary():
            # A client that timed out sends to everyone; relay so the primary hears of it.
            self.outbox.append((self.primary, req))
            return
        key = (req.client, req.timestamp)
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
            and self.next_seq <= self.executed + p.inflight_max
            and self.in_window(self.next_seq)
        ):
            batch: list[Request] = []
            size = 0
            budget = p.frame_bytes_max - 4096
            while self.pending and len(batch) < p.batch_size_max:
                r = self.pending[0]
                cost = len(r.raw) + len(r.auth) + 16
                if batch and size + cost > budget:
                    break
                batch.append(self.pending.popleft())
                size += cost
            # Agreed time must move forward even if our clock steps back (TOCS 2002, 6.2).
            self.proposed_time_ms = max(now_ms, self.proposed_time_ms + 1)
            pp = PrePrepare.make(self.view, self.next_seq, self.proposed_time_ms, tuple(batch), self.id)
            self.next_seq += 1
            self._slot(pp.seq).pre_prepare = pp
            self.stats["batches"] += 1
            self.stats["batched-requests"] += len(batch)
            self.outbox.append((ALL, pp))
            self._check_prepared(pp.seq)

    # -- normal case ------------------------------------------------------------------------

    def on_pre_prepare(self, pp: PrePrepare, now_ms: int) -> None:
        if pp.view != self.view:
            return self._drop("wrong-view", pp)
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
        if abs(pp.timestamp - now_ms) > self.params.clock_skew_max_ms:
            return self._drop("bad-timestamp", pp)
        before = self.log.get(pp.seq - 1)
        if before is not None and before.pre_prepare is not None and before.pre_prepare.timestamp >= pp.timestamp:
            return self._drop("non-monotonic-timestamp", pp)
        slot.pre_prepare = pp
        slot.prepares[self.id] = pp.digest
        self.outbox.append((ALL, Prepare(self.view, pp.seq, pp.digest, self.id)))
        self._check_prepared(pp.seq)

    def on_prepare(self, p: Prepare, now_ms: int) -> None:
        if p.view != self.view:
            return self._drop("wrong-view", p)
        if p.replica == self.primary:
            return self._drop("prepare-from-primary", p)
        if not self.in_window(p.seq):
            return self._drop("out-of-window", p)
        slot = self._slot(p.seq)
        slot.prepares.setdefault(p.replica, p.digest)
        self._check_prepared(p.seq)

    def on_commit(self, c: Commit, now_ms: int) -> None:
        if c.view != self.view:
            return self._drop("wrong-view", c)
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
        slot.commits.setdefault(self.id, slot.pre_prepare.digest)
        self.outbox.append((ALL, Commit(self.view, seq, slot.pre_prepare.digest, self.id)))
        self._check_committed(seq)

    def _check_committed(self, seq: int) -> None:
        """committed-local(m, v, n, i): prepared plus 2f+1 matching commits (our own included)."""
        slot = self.log[seq]
        if slot.committed or not slot.prepared or slot.matching(slot.commits) < 2 * self.f + 1:
            return
        slot.committed = True
        self._execute_ready()

    def _execute_ready(self) -> None:
        while True:
            slot = self.log.get(self.executed + 1)
            if slot is None or not slot.committed:
                break
            self._execute(slot.pre_prepare)
        self._try_propose(self.now_ms)

    def _execute(self, pp: PrePrepare) -> None:
        assert pp.seq == self.executed + 1
        self.batch_time_ms = max(pp.timestamp, self.batch_time_ms + 1)
        for req in pp.requests:
            self.pending_ids.discard((req.client, req.timestamp))
            if not self.clients.is_new(req.client, req.timestamp):
                continue  # a duplicate ordered twice executes once, the same way everywhere
            result = self.service.execute(req.op, req.client, self.batch_time_ms)
            self.clients.record(req.client, req.timestamp, result)
            self.outbox.append((req.client, Reply(self.view, req.timestamp, req.client, self.id, result)))
        self.executed = pp.seq
        self.stats["executed-requests"] += len(pp.requests)
        if self.executed % self.params.checkpoint_interval == 0:
            self._take_checkpoint()

    # -- checkpoints and garbage collection -------------------------------------------------

    def _state_bytes(self) -> bytes:
        return msgpack.packb((self.service.digest(), self.clients.encode(), self.batch_time_ms))

    def _state_digest(self) -> bytes:
        return digest(self._state_bytes())

    def _snapshot(self) -> bytes:
        return msgpack.packb((self.service.snapshot(), self.clients.encode(), self.batch_time_ms))

    def _take_checkpoint(self) -> None:
        d = self._state_digest()
        self.own_checkpoints[self.executed] = (d, self._snapshot())
        self.stats["checkpoints"] += 1
        log.debug("replica %d checkpoint %d", self.id, self.executed)
        cp = Checkpoint(self.executed, d, self.id)
        self.outbox.append((ALL, cp))
        self.on_checkpoint(cp, 0)

    def on_checkpoint(self, cp: Checkpoint, now_ms: int) -> None:
        if cp.seq <= self.stable:
            return
        if cp.seq % self.params.checkpoint_interval or cp.seq > self.stable + 2 * self.params.log_window:
            return self._drop("checkpoint-out-of-range", cp)
        votes = self.checkpoint_votes.setdefault(cp.seq, {})
        votes.setdefault(cp.replica, cp.digest)
        support = sum(1 for d in votes.values() if d == cp.digest)
        if support < 2 * self.f + 1:
            return
        own = self.own_checkpoints.get(cp.seq)
        if own is not None and own[0] == cp.digest:
            self._make_stable(cp.seq)
        elif own is not None:
            # 2f+1 replicas agree on a state we do not have: we diverged; take theirs.
            log.error("replica %d diverged at checkpoint %d", self.id, cp.seq)
            self.fetch_target = (cp.seq, cp.digest)
        elif cp.seq > self.executed:
            self.fetch_target = max(self.fetch_target or (0, b""), (cp.seq, cp.digest))

    def _make_stable(self, seq: int) -> None:
        """The checkpoint at ``seq`` has a 2f+1 certificate: move h and discard the log below it."""
        self.stable = seq
        for s in [s for s in self.log if s <= seq]:
            del self.log[s]
        for s in [s for s in self.checkpoint_votes if s < seq]:
            del self.checkpoint_votes[s]
        for s in [s for s in self.own_checkpoints if s < seq]:
            del self.own_checkpoints[s]
        if self.fetch_target is not None and self.fetch_target[0] <= seq:
            self.fetch_target = None
        self.stats["stable-checkpoints"] += 1
        self._try_propose(self.now_ms)  # the window moved: the primary may order what waits

    # -- loss recovery and state transfer ---------------------------------------------------

    def on_status(self, st: Status, now_ms: int) -> None:
        """Retransmit our own messages that the peer's status shows it lacks."""
        to = st.replica
        if to == self.id:
            return self._drop("status-from-self", st)
        for seq in sorted(s for s in self.own_checkpoints if s > st.stable)[-2:]:
            self.outbox.append((to, Checkpoint(seq, self.own_checkpoints[seq][0], self.id)))
        if st.view != self.view:
            return
        sent = 0
        for seq in range(max(st.executed, self.stable) + 1, self.stable + self.params.log_window + 1):
            slot = self.log.get(seq)
            if slot is None or slot.pre_prepare is None:
                continue
            pp = slot.pre_prepare
            if self.is_primary():
                self.outbox.append((to, pp))
            elif self.id in slot.prepares:
                self.outbox.append((to, Prepare(self.view, seq, slot.prepares[self.id], self.id)))
            if self.id in slot.commits:
                self.outbox.append((to, Commit(self.view, seq, slot.commits[self.id], self.id)))
            sent += 1
            if sent >= STATUS_SLOTS_MAX:
                break

    def _maybe_fetch_state(self) -> None:
        if self.fetch_target is None:
            return
        seq, d = self.fetch_target
        if seq <= self.executed and self.own_checkpoints.get(seq, (b"",))[0] == d:
            self._make_stable(seq)
            return
        voters = sorted(r for r, v in self.checkpoint_votes.get(seq, {}).items() if v == d and r != self.id)
        if voters:
            self.fetch_from = (self.fetch_from + 1) % len(voters)
            self.stats["state-fetches"] += 1
            self.outbox.append((voters[self.fetch_from], FetchState(seq, self.id)))

    def on_fetch_state(self, fs: FetchState, now_ms: int) -> None:
        own = self.own_checkpoints.get(fs.seq)
        if own is None or fs.seq < self.stable:
            return self._drop("no-such-checkpoint", fs)
        self.outbox.append((fs.replica, State(fs.seq, own[1], self.id)))

    def on_state(self, st: State, now_ms: int) -> None:
        target = self.fetch_target
        if target is None or st.seq != target[0]:
            return self._drop("unrequested-state", st)
        service = self.service_factory()
        clients = ClientTable(self.params.client_window)
        try:
            snap, table, batch_time = msgpack.unpackb(st.snapshot, max_map_len=0, max_ext_len=0)
            service.restore(snap)
            clients.restore(table)
            if type(batch_time) is not int:
                raise ValueError("batch time")
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return self._drop("malformed-state", st)
        if digest(msgpack.packb((service.digest(), clients.encode(), batch_time))) != target[1]:
            # A lying replica cannot corrupt us: the certified digest decides; ask another next time.
            return self._drop("state-digest-mismatch", st)
        self.service, self.clients, self.batch_time_ms = service, clients, batch_time
        self.executed = st.seq
        self.own_checkpoints[st.seq] = (target[1], st.snapshot)
        self.stats["state-transfers"] += 1
        log.info("replica %d installed state at checkpoint %d from replica %d", self.id, st.seq, st.replica)
        self._make_stable(st.seq)
        self.next_seq = max(self.next_seq, st.seq + 1)
        self._execute_ready()

    _handlers: dict[type, Callable[[Replica, Message, int], None]] = {
        Request: on_request,
        PrePrepare: on_pre_prepare,
        Prepare: on_prepare,
        Commit: on_commit,
        Checkpoint: on_checkpoint,
        Status: on_status,
        FetchState: on_fetch_state,
        State: on_state,
    }

"""A deterministic simulator: 3f+1 core replicas and several clients over a simulated network and
clock, every choice drawn from one seeded RNG, so any run replays exactly from its seed.

A run has a fault phase followed by a healed phase in which every submitted request must
complete. Faults: random delays that reorder, duplicated and lost messages; partitions that cut
one replica (the primary too) off for longer than the log window; up to f faulty
replicas, each crashed (the primary of view 0 among the candidates), crashed and restarted from
its data directory or with a wiped state, or, for view 0's primary, equivocating: it sends a
different pre-prepare for each sequence number to half of the backups; within what is left of
the budget, a liar (``bft.byzantine``: lying replies, wrong checkpoints, view changes that
hide or invent certificates, lying state transfer, a status flood). Besides these, up to f
correct replicas restart from their data directory mid-run ("bounces"): with their promise log
they stay correct, and the checker holds them to it.
After every input a replica takes, its own invariants must hold (``Replica.check_invariants``:
a failed assertion is a bug in our code and stops the run with its seed), and the checker asserts:

- agreement: no two correct replicas execute different batches at the same sequence number, nor
  commit different batches in one slot of one view;
- checkpoints: every checkpoint taken at a sequence number has the same digest everywhere;
- promises: no replica (but one restarted wiped) sends two different PRE-PREPAREs, PREPAREs or
  COMMITs for one slot of one view, or two different VIEW-CHANGEs or NEW-VIEWs for one view,
  across its restarts from disk too;
- linearisability: every result a client accepted equals the result of executing the committed
  order sequentially on a fresh service; a read-only result (not in the order) must be a value
  the key held at some point of that sequential execution.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import Counter
from dataclasses import dataclass, field, replace

import msgpack

from bft.byzantine import BEHAVIOURS, lie
from bft.core.client import ClientCore
from bft.core.effects import Broadcast, Effect, Executed, Persist, Promise, ReplyTo, Send
from bft.core.params import Params
from bft.core.promises import Record, decode_record, encode_record
from bft.core.replica import Replica
from bft.messages import (
    DEFAULT_LIMITS,
    Checkpoint,
    Commit,
    Message,
    NewView,
    Prepare,
    PrePrepare,
    ViewChange,
    encode_payload,
    roundtrip,
)
from bft.service import KVService
from bft.sim.checker import Checker, Violation


@dataclass(frozen=True, slots=True)
class Faults:
    loss: float = 0.05
    duplicate: float = 0.05
    delay_ms_max: int = 20
    crashes: bool = True
    restarts: bool = True  # crashed replicas may come back with an empty state
    byzantine: bool = True  # view 0's primary may equivocate
    partitions: bool = True  # one replica at a time may be cut off, for longer than the log window
    bounces: bool = True  # up to f correct replicas restart from their data directory mid-run
    liar_chance: float = 0.7  # how likely a run gets a liar, where the fault budget leaves room

    @staticmethod
    def named(name: str) -> Faults:
        if name == "none":
            return Faults(0.0, 0.0, 2, False, False, False, False, False)
        if name == "network":
            return Faults(crashes=False, restarts=False, byzantine=False, bounces=False)
        if name == "crash":
            return Faults(byzantine=False)
        if name == "all":
            return Faults()
        if name == "byzantine":  # the whole budget for lies: an equivocating primary or a liar
            return Faults(crashes=False, restarts=False, liar_chance=1.0)
        raise ValueError(f"unknown fault set {name!r} (choose none, network, crash, byzantine or all)")


SIM_PARAMS = Params(
    checkpoint_interval=8,
    log_window=16,
    batch_size_max=4,
    inflight_max=2,
    client_window=4,
    status_interval_ms=50,
    request_timeout_ms=200,
    view_timeout_ms=300,
    large_request_bytes=90,  # the sim's padded values travel separately from their batches
)


@dataclass(slots=True)
class Result:
    seed: int
    ok: bool
    error: str = ""
    sim_time_ms: int = 0
    messages: int = 0
    completed: int = 0
    crashed: tuple[int, ...] = ()
    dropped: Counter[str] = field(default_factory=Counter)
    transcript: str = ""  # digest of every message sent, in order (golden transcripts)
    injected: tuple[str, ...] = ()  # the faults the seed drew, by kind


class _Disk:
    """A replica's data directory: its last stable checkpoint and its promise log, which a
    stable checkpoint truncates (the latest view record stays, as on a real disk)."""

    def __init__(self) -> None:
        self.saved: Persist | None = None
        self.records: list[Record] = []

    def checkpoint(self, saved: Persist) -> None:
        self.saved = saved
        views = [r for r in self.records if r.seq is None]
        self.records = [r for r in self.records if r.seq is not None and r.seq > saved.seq] + views[-1:]


class Simulation:
    TICK_MS = 10

    def __init__(
        self,
        seed: int,
        f: int = 1,
        faults: Faults | None = None,
        clients: int = 3,
        ops_per_client: int = 40,
        fault_phase_ms: int = 4_000,
        heal_budget_ms: int = 30_000,
        params: Params = SIM_PARAMS,
        tentative: bool | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        if tentative is None:
            # Drawn apart from the main stream so that the fault schedule of a seed stays put.
            tentative = random.Random(seed ^ 0x7E57).random() < 0.5
        params = replace(params, tentative=tentative)
        self.f = f
        self.n = 3 * f + 1
        self.faults = faults or Faults()
        self.params = params
        self.fault_phase_ms = fault_phase_ms
        self.heal_budget_ms = heal_budget_ms
        self.checker = Checker(params.client_window)
        self.replicas = [self._new_replica(i) for i in range(self.n)]
        self.restarted: set[int] = set()
        self.disks: dict[int, _Disk] = {}  # each replica's data directory
        self.amnesiacs: set[int] = set()  # restarted wiped: they forgot their promises (faulty)
        self.spoken: dict[tuple, bytes] = {}  # (replica, message kind, view[, seq]) -> what it said
        self.clients = [ClientCore(c, f, params) for c in range(clients)]
        self.ops_left = [ops_per_client] * clients
        self.outstanding: dict[tuple[int, int], bytes] = {}
        self.read_only: set[tuple[int, int]] = set()
        self.crashed: set[int] = set()
        self.now = 0
        self.queue: list[tuple[int, int, int, object]] = []
        self.counter = 0
        self.messages = 0
        self.completed = 0
        # Every message sent, in order, with its time and both ends: the golden transcripts pin
        # a seed's whole run to this digest, so a refactoring that changes behaviour shows.
        self.transcript = hashlib.blake2b(digest_size=16)
        # Up to f faulty replicas: an equivocating primary, crashes, restarts with a wiped state.
        self.crash_at: list[tuple[int, int]] = []
        self.restart_at: list[tuple[int, int]] = []
        self.equivocator: int | None = None
        faulty = self.rng.sample(range(self.n), self.rng.randint(0, f))
        if self.faults.byzantine and 0 in faulty and self.rng.random() < 0.5:
            self.equivocator = 0
            faulty.remove(0)
        if self.faults.crashes:
            for v in faulty:
                at = self.rng.randrange(fault_phase_ms)
                self.crash_at.append((at, v))
                if self.faults.restarts and self.rng.random() < 0.5:
                    self.restart_at.append((at + self.rng.randrange(1, fault_phase_ms), v))
            self.crash_at.sort()
            self.restart_at.sort()
        self.crash_schedule = tuple((v, at) for at, v in self.crash_at)  # (replica, time), for reports
        # Partitions come from a stream of their own, so that adding them kept every seed's
        # other faults where they were (the regression seeds depend on it).
        self.partitions: list[tuple[int, int, int]] = []  # (start, end, isolated replica)
        if self.faults.partitions:
            prng = random.Random(seed ^ 0x9A27)
            for _ in range(prng.randint(0, 2)):
                start = prng.randrange(fault_phase_ms)
                end = min(fault_phase_ms, start + prng.randint(300, 1500))
                self.partitions.append((start, end, prng.randrange(self.n)))
        # Restarts from disk ("bounces"), from a stream of their own too: up to f replicas that
        # the fault budget does not count, since a replica that kept its promises is as correct
        # after a restart as before it. They may come alongside the equivocating primary.
        self.bounces: list[tuple[int, int, int]] = []  # (down, up, replica)
        if self.faults.bounces:
            brng = random.Random(seed ^ 0xB0B5)
            correct = [i for i in range(self.n) if i not in faulty and i != self.equivocator]
            for i in brng.sample(correct, brng.randint(0, f)):
                down = brng.randrange(fault_phase_ms)
                self.bounces.append((down, down + brng.randint(1, 300), i))
        # A liar, within the fault budget left: a replica that runs the honest core, but whose
        # messages a behaviour of bft.byzantine rewrites on the way out, for the whole run.
        self.liar: int | None = None
        self.behaviour = ""
        budget = f - (len(faulty) if self.faults.crashes else 0) - (self.equivocator is not None)
        if self.faults.byzantine and budget > 0:
            lrng = random.Random(seed ^ 0xB1A5)
            bounced = {i for _, _, i in self.bounces}
            honest = [i for i in range(self.n) if i not in faulty and i != self.equivocator and i not in bounced]
            if honest and lrng.random() < self.faults.liar_chance:
                self.liar = lrng.choice(honest)
                self.behaviour = lrng.choice(sorted(BEHAVIOURS))

    def _new_replica(self, i: int) -> Replica:
        return Replica(i, self.f, self.params, KVService)

    # -- event plumbing ---------------------------------------------------------------------

    def _schedule(self, at: int, kind: int, payload: object) -> None:
        self.counter += 1
        heapq.heappush(self.queue, (at, self.counter, kind, payload))

    def _faulty_phase(self) -> bool:
        return self.now < self.fault_phase_ms

    def _cut_off(self, src: tuple[str, int], dst: tuple[str, int]) -> bool:
        for start, end, r in self.partitions:
            if start <= self.now < end and (src == ("replica", r)) != (dst == ("replica", r)):
                return True
        return False

    def _send(self, src: tuple[str, int], dst: tuple[str, int], msg: Message) -> None:
        self.transcript.update(msgpack.packb((self.now, src, dst, msg.TYPE, encode_payload(msg))))
        copies = 1
        if self._faulty_phase():
            if self._cut_off(src, dst):
                return
            if self.rng.random() < self.faults.loss:
                return
            if self.rng.random() < self.faults.duplicate:
                copies = 2
        for _ in range(copies):
            delay = self.rng.randint(1, self.faults.delay_ms_max if self._faulty_phase() else 2)
            self._schedule(self.now + delay, 0, (dst, msg))

    def _route(self, src: tuple[str, int], effects: list[Effect]) -> None:
        kind, i = src
        if src == ("replica", self.liar):
            rewrite = BEHAVIOURS[self.behaviour]
            effects = [told for e in effects for told in lie(rewrite, e)]
        for effect in effects:
            match effect:
                case Persist():
                    self.disks.setdefault(i, _Disk()).checkpoint(effect)
                case Promise(record):
                    # Through the codec, as the promise log on disk would give it back.
                    self.disks.setdefault(i, _Disk()).records.append(
                        decode_record(encode_record(record), DEFAULT_LIMITS)
                    )
                case Executed(batch):
                    # Only what commits is checked: a tentative execution may be rolled back.
                    self.checker.executed(i, batch)
                case ReplyTo(client, reply):
                    self._send(src, ("client", client), reply)
                case Send(to, msg):
                    self._check_sent(src, msg)
                    self._send(src, ("replica", to), msg)
                case Broadcast(msg) if src == ("replica", self.equivocator) and isinstance(msg, PrePrepare):
                    # Same requests, another time: a different digest for the other half.
                    other = PrePrepare.make(msg.view, msg.seq, msg.timestamp + 1, msg.requests, msg.replica)
                    for j in range(1, self.n):
                        self._send(src, ("replica", j), msg if j % 2 else other)
                case Broadcast(msg):
                    self._check_sent(src, msg)
                    for j in range(self.n):
                        if src != ("replica", j):
                            self._send(src, ("replica", j), msg)
                case _:
                    raise AssertionError(f"{kind} {i} asked for an unknown effect: {effect!r}")

    def _check_replica(self, i: int, replica: Replica) -> None:
        # The replica's own invariants (a failed assertion is a bug and stops the run with its
        # seed), then agreement within a view: no two replicas commit different batches in one
        # slot of one view.
        replica.check_invariants()
        if i in (self.equivocator, self.liar):
            return
        for seq, slot in replica.normal.log.items():
            if slot.committed:
                self.checker.committed(i, replica.view, seq, slot.pre_prepare.digest)

    def _check_sent(self, src: tuple[str, int], msg: Message) -> None:
        kind, i = src
        if kind != "replica" or i == self.liar:
            return
        if isinstance(msg, Checkpoint) and i != self.equivocator:
            self.checker.checkpoint(i, msg.seq, msg.digest)
        if i in self.amnesiacs:
            return
        # A replica never contradicts itself, across restarts from its data directory too.
        match msg:
            case PrePrepare() | Prepare() | Commit():
                self._said(i, (type(msg).__name__, msg.view, msg.seq), msg.digest)
            case ViewChange():
                self._said(i, ("ViewChange", msg.view), encode_payload(msg))
            case NewView():
                self._said(i, ("NewView", msg.view), encode_payload(msg))

    def _said(self, i: int, what: tuple, content: bytes) -> None:
        said = self.spoken.setdefault((i, *what), content)
        if said != content:
            restarted = " (it restarted from its data directory)" if i in self.restarted else ""
            raise Violation(f"promise: replica {i} sent a second, different {what}{restarted}")

    def _submit(self, c: int) -> None:
        client = self.clients[c]
        while self.ops_left[c] > 0 and client.can_submit():
            self.ops_left[c] -= 1
            key = b"k%d" % self.rng.randrange(5)
            read_only = False
            if self.rng.random() < 0.3:
                op = KVService.get(key)
                read_only = self.rng.random() < 0.5
            else:
                # Every third value is large enough for digest replies (no RNG draw, so the
                # seeds' schedules stay as they were).
                pad = b"." * 300 if self.ops_left[c] % 3 == 0 else b""
                op = KVService.put(key, b"c%d-%d" % (c, self.ops_left[c]) + pad)
            req = client.submit(op, self.now, read_only)
            self.outstanding[(c, req.timestamp)] = op
            if read_only:
                self.read_only.add((c, req.timestamp))
        self._route(("client", c), client.take_outbox())

    def _collect(self, c: int) -> None:
        for ts, result in self.clients[c].take_completed():
            if (c, ts) in self.read_only:
                self.checker.completed_read(c, self.outstanding[(c, ts)], result)
            else:
                self.checker.completed(c, ts, result)
            del self.outstanding[(c, ts)]
            self.completed += 1
        self._submit(c)

    def _deliver(self, dst: tuple[str, int], msg: Message) -> None:
        self.messages += 1
        msg = roundtrip(msg)
        kind, i = dst
        if kind == "client":
            self.clients[i].on_reply(msg, self.now)
            self._collect(i)
        elif i not in self.crashed:
            replica = self.replicas[i]
            self._route(("replica", i), replica.step(msg, self.now))
            self._check_replica(i, replica)

    def _tick(self) -> None:
        while self.crash_at and self.crash_at[0][0] <= self.now:
            self.crashed.add(self.crash_at.pop(0)[1])
        while self.restart_at and self.restart_at[0][0] <= self.now:
            i = self.restart_at.pop(0)[1]
            self.crashed.discard(i)
            self.replicas[i] = self._new_replica(i)
            # Half the restarts find their data directory, half come back wiped.
            if i in self.disks and self.rng.random() < 0.5:
                disk = self.disks[i]
                self.replicas[i].recover(disk.saved, list(disk.records))
            else:
                self.disks.pop(i, None)
                self.amnesiacs.add(i)
            self.restarted.add(i)
        for down, up, i in self.bounces:
            if self.now - self.TICK_MS < down <= self.now:
                self.crashed.add(i)
            if self.now - self.TICK_MS < up <= self.now:
                self.crashed.discard(i)
                self.replicas[i] = self._new_replica(i)
                disk = self.disks.get(i)
                if disk is not None:
                    self.replicas[i].recover(disk.saved, list(disk.records))
                self.restarted.add(i)
        for i, r in enumerate(self.replicas):
            if i not in self.crashed:
                self._route(("replica", i), r.tick(self.now))
                self._check_replica(i, r)
        for c, client in enumerate(self.clients):
            self._route(("client", c), client.tick(self.now))
        self._schedule(self.now + self.TICK_MS, 1, None)

    def _done(self) -> bool:
        """Every request completed, and every live replica (restarted ones too) holds the state
        of the latest stable checkpoint. PBFT does not promise more: a correct replica that
        started a view change alone stays out of the view until the others change view too,
        and follows by state transfer meanwhile."""
        unverified = self.checker.unverified or self.checker.unverified_reads
        if self.outstanding or any(self.ops_left) or self._faulty_phase() or unverified:
            return False
        live = [r for i, r in enumerate(self.replicas) if i not in self.crashed]
        stable = max(r.stable for r in live)
        return all(r.executed >= stable for r in live)

    # -- run --------------------------------------------------------------------------------

    def run(self) -> Result:
        deadline = self.fault_phase_ms + self.heal_budget_ms
        try:
            for c in range(len(self.clients)):
                self._submit(c)
            self._schedule(0, 1, None)
            while not self._done():
                at, _, kind, payload = heapq.heappop(self.queue)
                self.now = at
                if self.now > deadline:
                    state = [(r.view, r.executed) for r in self.replicas]
                    raise Violation(
                        f"liveness: {len(self.outstanding)} requests outstanding, replicas at "
                        f"(view, executed) {state}, {self.heal_budget_ms} ms after faults healed"
                    )
                if kind == 0:
                    self._deliver(*payload)
                else:
                    self._tick()
        except Violation as v:
            return self._result(False, str(v))
        return self._result(True)

    def _result(self, ok: bool, error: str = "") -> Result:
        dropped: Counter[str] = Counter()
        for r in self.replicas:
            dropped.update(r.dropped)
        return Result(
            self.seed,
            ok,
            error,
            self.now,
            self.messages,
            self.completed,
            tuple(sorted(self.crashed)),
            dropped,
            self.transcript.hexdigest(),
            self.injected(),
        )

    def injected(self) -> tuple[str, ...]:
        kinds = [f"crash {v}" for _, v in self.crash_at] + [f"wiped or disk restart {v}" for _, v in self.restart_at]
        kinds += [f"partition {r}" for _, _, r in self.partitions] + [f"disk restart {i}" for _, _, i in self.bounces]
        if self.equivocator is not None:
            kinds.append(f"equivocating primary {self.equivocator}")
        if self.liar is not None:
            kinds.append(f"{self.behaviour} {self.liar}")
        return tuple(kinds)


def run_seed(seed: int, f: int = 1, faults: str = "all", **kw: object) -> Result:
    return Simulation(seed, f, Faults.named(faults), **kw).run()


__all__ = ["Faults", "Result", "Simulation", "Violation", "run_seed"]

"""A deterministic simulator: 3f+1 core replicas and several clients over a simulated network and
clock, every choice drawn from seeded RNGs, so any run replays exactly from its seed.

A run has a fault phase followed by a healed phase in which every submitted request must
complete. Faults (``bft.sim.faults``): random delays that reorder, duplicated, lost and replayed
messages; partitions that cut one replica (the primary too) off for longer than the log window;
up to f faulty replicas, each crashed, crashed and restarted from its data directory or with a
wiped state, or Byzantine: view 0's primary equivocating, a liar from ``bft.byzantine`` (lying
replies, wrong checkpoints, view changes that hide or invent certificates, lying state transfer,
a status flood) or from ``bft.sim.liars`` (a slow or silent primary, a replayer, twins: two
instances of one replica on opposite sides of a split network). Besides these, up to f correct
replicas restart from their data directory mid-run ("bounces"), their checkpoint writes perhaps
late or lost (``bft.sim.disk``): with their promise log they stay correct, and the checker holds
them to it.

After every input a replica takes, its own invariants must hold (``Replica.check_invariants``:
a failed assertion is a bug in our code and stops the run with its seed), and the checker
(``bft.sim.checker``) asserts agreement, equal checkpoint digests and linearisability; here, that
no replica (but a Byzantine one, or one restarted wiped) contradicts what it said, across its
restarts from disk too; and ``bft.sim.progress`` bounds how long clients wait.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from bft.core.client import ClientCore
from bft.core.effects import Broadcast, Effect, Executed, Persist, Promise, ReplyTo, Send
from bft.core.params import Params
from bft.core.replica import Replica
from bft.messages import Checkpoint, Message, PrePrepare, Request, roundtrip
from bft.service import KVService
from bft.sim.attackers import BigMacClient
from bft.sim.checker import Checker, Promises, Violation
from bft.sim.disk import Disk
from bft.sim.faults import Faults, Schedule, draw
from bft.sim.liars import (
    EQUIVOCATING,
    REPLAY,
    REPLAY_CHANCE_PER_TICK,
    SLOW_SHARE,
    Recorder,
    equivocation,
    misbehave,
    replay_destination,
)
from bft.sim.lostkeys import LostKeys
from bft.sim.network import DELIVER, LATE, TICK, Network, Node, identity
from bft.sim.progress import Progress, gap_bound_ms, heal_bound_ms
from bft.sim.report import Result, report

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
        schedule: Schedule | None = None,  # the faults, instead of what the seed draws (scenario tests)
        delays: Callable[[random.Random], int] | None = None,  # link delays in us (bft sim --compare)
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
        self.amnesiacs: set[int] = set()  # restarted wiped: they forgot their promises (faulty)
        self.promises = Promises()
        self.clients = [ClientCore(c, f, params) for c in range(clients)]
        self.ops_left = [ops_per_client] * clients
        self.outstanding: dict[tuple[int, int], bytes] = {}
        self.read_only: set[tuple[int, int]] = set()
        self.crashed: set[int] = set()
        self.now = 0
        self.messages = 0
        self.completed = 0
        self.schedule = s = schedule or draw(seed, f, self.faults, fault_phase_ms, clients, self.rng)
        # What is still to come: the schedule keeps the whole of it, for the report.
        self.crash_at, self.restart_at, self.bounces = list(s.crash_at), list(s.restart_at), list(s.bounces)
        self.equivocator, self.byzantine = s.equivocator, s.byzantine
        self.crash_schedule = tuple((v, at) for at, v in self.crash_at)  # (replica, time), for reports
        self.equivocators = {i for i in (s.equivocator,) if i is not None}
        self.equivocators |= {i for i, b in s.byzantine.items() if b == EQUIVOCATING}
        self.twins = {i: self._new_replica(i) for i in s.twins}  # each twin's second instance
        replayers = [i for i, b in s.byzantine.items() if b == REPLAY]
        self.recorders = {i: Recorder(random.Random(f"{seed}-replayer-{i}")) for i in replayers}
        self.disk_rng = random.Random(f"{seed}-disk-writes")
        self.disks: dict[int, Disk] = {}  # each replica's data directory
        self.net = Network(seed, self.rng, self.faults, s, fault_phase_ms, delays)
        gap_ms = gap_bound_ms(params, f, s.big_mac) if s.byzantine_alone() else None
        self.progress = Progress(clients, fault_phase_ms, gap_ms)
        # A faulty client, one id past the correct ones: its replies go nowhere, nothing waits on it.
        self.attacker = BigMacClient(clients, self.n, random.Random(f"{seed}-big-mac-sends")) if s.big_mac else None
        self.acts = Counter[str]()  # Byzantine acts, by kind, for the report
        # Unsigned requests: what a restarted replica cannot check (bft.sim.lostkeys).
        self.lost_keys = None if params.sign_every_request else LostKeys()

    def _new_replica(self, i: int) -> Replica:
        return Replica(i, self.f, self.params, KVService)

    def _disk(self, i: int) -> Disk:
        if i not in self.disks:
            lag_ms = self.schedule.slow_disks.get(i, 0)
            self.disks[i] = Disk(self.disk_rng, lag_ms) if lag_ms else Disk()
        return self.disks[i]

    # -- routing ----------------------------------------------------------------------------

    def _send(self, src: Node, dst: Node, msg: Message) -> None:
        if src[0] != "client" and src[1] in self.recorders:
            self.recorders[src[1]].record(dst, msg)
        self.net.send(self.now, src, dst, msg)

    def _route(self, src: Node, effects: list[Effect]) -> None:
        behaviour = self.byzantine.get(src[1]) if src[0] != "client" else None
        if behaviour is not None:
            effects, late = misbehave(behaviour, effects)
            if late:
                self.acts["pre-prepares held back by a slow primary"] += len(late)
                self.net.schedule(self.now + int(SLOW_SHARE * self.params.view_timeout_ms), LATE, (src, late))
        self._dispatch(src, effects)

    def _dispatch(self, src: Node, effects: list[Effect]) -> None:
        kind, i = src
        for effect in effects:
            match effect:
                case Persist() if kind == "replica":
                    self._disk(i).checkpoint(effect, self.now)
                case Promise(record) if kind == "replica":
                    self._disk(i).promise(record)
                case Persist() | Promise():
                    pass  # a twin's second instance never restarts: its disk is never read
                case Executed(batch):
                    # Only what commits is checked (a tentative execution may be rolled back),
                    # and only at correct replicas: a twin may be led to execute anything.
                    if i not in self.twins:
                        self.checker.executed(i, batch)
                case ReplyTo(client, reply):
                    self._send(src, ("client", client), reply)
                case Send(to, msg):
                    self._check_sent(src, msg)
                    self._send(src, ("replica", to), msg)
                case Broadcast(msg) if kind != "client" and i in self.equivocators and isinstance(msg, PrePrepare):
                    other = equivocation(msg)
                    for j in range(self.n):
                        if j != i:
                            self._send(src, ("replica", j), msg if j % 2 else other)
                case Broadcast(msg):
                    self._check_sent(src, msg)
                    for j in range(self.n):
                        if identity(src) != ("replica", j):
                            self._send(src, ("replica", j), msg)
                case _:
                    raise AssertionError(f"{kind} {i} asked for an unknown effect: {effect!r}")

    # -- checks -----------------------------------------------------------------------------

    def _check_replica(self, i: int, replica: Replica) -> None:
        # The replica's own invariants (a failed assertion is a bug and stops the run with its
        # seed), then agreement within a view: no two replicas commit different batches in one
        # slot of one view.
        replica.check_invariants()
        if i in self.equivocators or i in self.byzantine:
            return
        for seq, slot in replica.normal.log.items():
            if slot.committed:
                self.checker.committed(i, replica.view, seq, slot.pre_prepare.digest)

    def _check_sent(self, src: Node, msg: Message) -> None:
        kind, i = src
        if i in self.twins and kind != "client" and self.promises.twin_said(i, msg):
            self.acts["slots and views in which twins equivocated"] += 1
        if kind != "replica" or i in self.byzantine:
            return
        if isinstance(msg, Checkpoint) and i != self.equivocator:
            self.checker.checkpoint(i, msg.seq, msg.digest)
        if i not in self.amnesiacs:
            self.promises.said(i, msg, i in self.restarted)

    # -- clients ----------------------------------------------------------------------------

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
            self.progress.submit(c, req.timestamp, self.now)
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
            self.progress.complete(c, ts, self.now)
            self.completed += 1
        self._submit(c)

    # -- events -----------------------------------------------------------------------------

    def _instance(self, node: Node) -> Replica:
        return self.twins[node[1]] if node[0] == "twin" else self.replicas[node[1]]

    def _deliver(self, dst: Node, msg: Message) -> None:
        self.messages += 1
        msg = roundtrip(msg)
        kind, i = dst
        if kind == "client":
            if i < len(self.clients):
                self.clients[i].on_reply(msg, self.now)
                self._collect(i)
        elif i not in self.crashed:
            if i in self.recorders:
                self.recorders[i].record(dst, msg)
            replica = self._instance(dst)
            if self.attacker is not None:
                msg = self._admit(replica, msg)
                if msg is None:
                    return
            if self.lost_keys is not None and kind == "replica":
                msg, bodies = self.lost_keys.admit(i, msg)
                if bodies:
                    self.acts["requests a restarted replica could not check"] += len(bodies)
                    self._route(dst, replica.offer_unverified(bodies, self.now))
                if msg is None:
                    return
            # Requests enter as the runtime hands them over (``Replica.step_requests``), one
            # delivery at a time here: the same result as ``step``, through the same path.
            if isinstance(msg, Request):
                self._route(dst, replica.step_requests([msg], self.now))
            else:
                self._route(dst, replica.step(msg, self.now))
            self._check_replica(i, replica)

    def _admit(self, replica: Replica, msg: Message) -> Message | None:
        """The big-MAC client's requests, as the replica's runtime would take them (attackers)."""
        assert self.attacker is not None
        admitted, suspect = self.attacker.admit(replica, msg)
        if admitted is None:
            self.acts["big-mac requests refused"] += 1
        if suspect and not self.attacker.suspect:
            self.attacker.suspect = True
            self.acts["clients made suspect"] += 1
            live = [(("replica", i), r) for i, r in enumerate(self.replicas) if i not in self.crashed]
            for node, r in live + [(("twin", i), t) for i, t in self.twins.items()]:
                self._route(node, r.distrust(self.attacker.id))
        return admitted

    def _crash(self, i: int) -> None:
        self.crashed.add(i)
        if i in self.disks:
            self.disks[i].crash()

    def _restart(self, i: int, wiped: bool) -> None:
        self.crashed.discard(i)
        self.replicas[i] = self._new_replica(i)
        if wiped:
            self.disks.pop(i, None)
            self.amnesiacs.add(i)
        elif i in self.disks:
            self.replicas[i].recover(self.disks[i].saved, list(self.disks[i].records))
        self.restarted.add(i)
        if self.lost_keys is not None:
            self.lost_keys.forget(i, {c.id: c.next_timestamp for c in self.clients})

    def _tick(self) -> None:
        for i, disk in self.disks.items():
            if i not in self.crashed:
                disk.advance(self.now)
        while self.crash_at and self.crash_at[0][0] <= self.now:
            self._crash(self.crash_at.pop(0)[1])
        while self.restart_at and self.restart_at[0][0] <= self.now:
            i = self.restart_at.pop(0)[1]
            # Half the restarts find their data directory, half come back wiped.
            self._restart(i, wiped=i not in self.disks or self.rng.random() >= 0.5)
        for down, up, i in self.bounces:
            if self.now - self.TICK_MS < down <= self.now:
                self._crash(i)
            if self.now - self.TICK_MS < up <= self.now:
                self._restart(i, wiped=False)
        for i, r in enumerate(self.replicas):
            if i not in self.crashed:
                self._route(("replica", i), r.tick(self.now))
                self._check_replica(i, r)
        for i, twin in self.twins.items():
            self._route(("twin", i), twin.tick(self.now))
            self._check_replica(i, twin)
        for c, client in enumerate(self.clients):
            self._route(("client", c), client.tick(self.now))
        if self.attacker is not None and self.net.faulty(self.now):
            for j, req in self.attacker.requests():
                self.net.send(self.now, ("client", self.attacker.id), ("replica", j), req)
        self._replay()
        if self.progress.heal_ms is None and not self.net.faulty(self.now):
            correct = [r for i, r in enumerate(self.replicas) if i not in self.crashed and i not in self.byzantine]
            self.progress.heal_ms = heal_bound_ms(self.params, self.f, max(r.timer.attempt for r in correct))
        self.progress.check(self.now)
        self.net.schedule(self.now + self.TICK_MS, TICK, None)

    def _replay(self) -> None:
        self.net.replay(self.now)
        for i, recorder in self.recorders.items():
            picked = recorder.pick(REPLAY_CHANCE_PER_TICK)
            if picked is not None:
                self.acts["frames replayed by a replayer"] += 1
                msg = picked[1]
                self.net.send(self.now, ("replica", i), replay_destination(recorder.rng, i, self.n, msg), msg)

    def _done(self) -> bool:
        """Every request completed, and every live replica (restarted ones too) holds the state
        of the latest stable checkpoint. PBFT does not promise more: a correct replica that
        started a view change alone stays out of the view until the others change view too,
        and follows by state transfer meanwhile."""
        unverified = self.checker.unverified or self.checker.unverified_reads
        if self.outstanding or any(self.ops_left) or self.net.faulty(self.now) or unverified:
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
            self.net.schedule(0, TICK, None)
            while not self._done():
                self.now, kind, payload = self.net.pop()
                if self.now > deadline:
                    state = [(r.view, r.executed) for r in self.replicas]
                    raise Violation(
                        f"liveness: {len(self.outstanding)} requests outstanding, replicas at "
                        f"(view, executed) {state}, {self.heal_budget_ms} ms after faults healed"
                    )
                if kind == DELIVER:
                    self._deliver(*payload)
                elif kind == TICK:
                    self._tick()
                else:
                    self._dispatch(*payload)
        except Violation as v:
            return report(self, False, str(v))
        return report(self, True)


def run_seed(seed: int, f: int = 1, faults: str = "all", **kw: object) -> Result:
    return Simulation(seed, f, Faults.named(faults), **kw).run()


__all__ = ["Faults", "Result", "Simulation", "Violation", "run_seed"]

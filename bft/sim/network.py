"""The simulated network: an event queue, and faults on the way (delays that reorder, loss,
duplication, partitions, Twins splits, replayed frames).

Nodes are ("replica", i), ("client", c) and, for a replica with twins, ("twin", i): its second
instance, which speaks as replica i. A message to replica i reaches the instance on the
sender's side of a Twins split, or both instances when no split is in force.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable

import msgpack

from bft.messages import Message, encode_payload
from bft.sim.faults import Faults, Schedule
from bft.sim.liars import NETWORK_REPLAY_CHANCE_PER_TICK, Recorder

Node = tuple[str, int]

DELIVER, TICK, LATE = 0, 1, 2  # event kinds: a message arrives; a tick; a slow primary's effects leave


def identity(node: Node) -> Node:
    """Who a node speaks as: a twin's second instance is its replica."""
    return ("replica", node[1]) if node[0] == "twin" else node


class Network:
    def __init__(
        self, seed: int, rng: random.Random, faults: Faults, schedule: Schedule, fault_phase_ms: int,
        delays: Callable[[random.Random], int] | None = None,
    ) -> None:
        self.rng = rng  # the main stream, shared with the clients' choice of operations
        self.faults = faults
        self.plan = schedule
        self.fault_phase_ms = fault_phase_ms
        self.twins = set(schedule.twins)
        self.queue: list[tuple[int, int, int, object]] = []
        self.counter = 0
        # Every message sent, in order, with its time and both ends: the golden transcripts pin
        # a seed's whole run to this digest, so a refactoring that changes behaviour shows.
        self.transcript = hashlib.blake2b(digest_size=16)
        self.recorder = Recorder(random.Random(f"{seed}-replay")) if faults.replay else None
        self.replayed = 0
        # A delay distribution in microseconds (bft.sim.casdnet, for ``bft sim --compare``), drawn
        # from a stream of its own in both phases; None: the uniform delays the seeds always had.
        self.delays = delays
        self.delay_rng = random.Random(f"{seed}-delays")

    def schedule(self, at: int, kind: int, payload: object) -> None:
        self.counter += 1
        heapq.heappush(self.queue, (at, self.counter, kind, payload))

    def pop(self) -> tuple[int, int, object]:
        at, _, kind, payload = heapq.heappop(self.queue)
        return at, kind, payload

    def faulty(self, now: int) -> bool:
        return now < self.fault_phase_ms

    def _split(self, now: int) -> frozenset[Node] | None:
        for start, end, side in self.plan.twin_splits:
            if start <= now < end:
                return side
        return None

    def _side(self, node: Node, split: frozenset[Node]) -> int:
        return 1 if node[0] == "twin" or node in split else 0

    def _cut_off(self, now: int, src: Node, dst: Node) -> bool:
        src, dst = identity(src), identity(dst)
        for start, end, r in self.plan.partitions:
            if start <= now < end and (src == ("replica", r)) != (dst == ("replica", r)):
                return True
        return False

    def send(self, now: int, src: Node, dst: Node, msg: Message) -> None:
        self.transcript.update(msgpack.packb((now, src, dst, msg.TYPE, encode_payload(msg))))
        targets = [dst]
        split = self._split(now) if self.twins else None
        if dst[0] == "replica" and dst[1] in self.twins:
            if split is None:
                targets = [dst, ("twin", dst[1])]
            elif self._side(src, split):
                targets = [("twin", dst[1])]
        elif split is not None and self._side(src, split) != self._side(dst, split):
            return
        for target in targets:
            self._carry(now, src, target, msg)

    def _carry(self, now: int, src: Node, dst: Node, msg: Message) -> None:
        copies = 1
        faulty = self.faulty(now)
        if faulty:
            if self._cut_off(now, src, dst):
                return
            if self.rng.random() < self.faults.loss:
                return
            if self.rng.random() < self.faults.duplicate:
                copies = 2
            if self.recorder is not None:
                self.recorder.record(dst, msg)
        for _ in range(copies):
            if self.delays is not None:
                delay = max(1, -(-self.delays(self.delay_rng) // 1000))
            else:
                delay = self.rng.randint(1, self.faults.delay_ms_max if faulty else 2)
            self.schedule(now + delay, DELIVER, (dst, msg))

    def replay(self, now: int) -> None:
        """While faults last, the network now and then delivers again a frame it carried before."""
        if self.recorder is None or not self.faulty(now):
            return
        picked = self.recorder.pick(NETWORK_REPLAY_CHANCE_PER_TICK)
        if picked is not None:
            self.replayed += 1
            self.schedule(now + self.recorder.rng.randint(1, self.faults.delay_ms_max), DELIVER, picked)

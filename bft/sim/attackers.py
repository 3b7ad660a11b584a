"""Faulty clients in the simulator: the "big MAC" client (Clement et al., NSDI 2009), whose
requests carry a tag good for the replica it sends them to and for no other, and no valid
signature.

The simulator authenticates nothing, so this module plays, for that one client, the part the
replicas' runtime plays (``bft.runtime.wire`` and ``bft.runtime.node``): a replica takes such a
request only sent to it directly while it is the primary (a backup holds only signed ones, and the
primary cannot check one relayed by a backup) and only until the client is suspect; a backup
receiving a pre-prepare that carries one holds it by digest, as the wire does, and makes the
client suspect at every replica (SUSPECT), which then drops what it held of that client on a tag
alone (``Replica.distrust``). What the protocol does with all that is the core's, as in a real
replica, so the simulator checks it over every seed: the one stalled slot, the view change it
costs, and that no later primary proposes the client's requests again.
"""

from __future__ import annotations

import random

from msgspec.structs import replace

from bft.core.replica import Replica
from bft.messages import Batch, Message, PrePrepare, Request
from bft.service import KVService

# How likely the attacker sends a request in a tick of the fault phase, to a replica it draws.
SEND_CHANCE_PER_TICK = 0.3


class BigMacClient:
    def __init__(self, client: int, n: int, rng: random.Random) -> None:
        self.id = client
        self.n = n
        self.rng = rng
        self.ts = 0
        self.suspect = False  # some replica told the others (one SUSPECT is enough)

    def requests(self) -> list[tuple[int, Request]]:
        """What it sends this tick: (replica, request). Its writes go to a key of its own, so
        that, were one ever executed (it never is), no correct client would read it."""
        if self.rng.random() >= SEND_CHANCE_PER_TICK:
            return []
        self.ts += 1
        op = KVService.put(b"big-mac", b"%d" % self.ts)
        return [(self.rng.randrange(self.n), Request.make(self.id, self.ts, op))]

    def admit(self, replica: Replica, msg: Message) -> tuple[Message | None, bool]:
        """What ``replica``'s runtime hands its core in place of ``msg`` (None: nothing), and
        whether this makes the client suspect."""
        if isinstance(msg, Request) and msg.client == self.id:
            taken = not self.suspect and replica.is_primary() and not replica.view_changing
            return (msg if taken else None), False
        if isinstance(msg, PrePrepare | Batch) and any(self._ours(q) for q in msg.requests):
            if isinstance(msg, Batch):
                return None, True  # a batch is taken whole or not at all
            refs = tuple(q.digest if self._ours(q) else q for q in msg.requests)
            return replace(msg, requests=refs), True
        return msg, False

    def _ours(self, q: Request | bytes) -> bool:
        return isinstance(q, Request) and q.client == self.id

"""Separate request transmission (TOCS 2002, section 5.1.4): a client sends a large request to
every replica itself, and the primary's pre-prepare carries only its digest. Backups resolve the
digests from the bodies clients sent them, or fetch the whole batch from the primary. A request
whose copy in a pre-prepare this replica could not authenticate is held the same way.

A held request's body is not thrown away: the runtime offers it as unverified (``offer``), and it
resolves a pre-prepare once f+1 replicas vouch for that batch (their prepares and commits, or a
NEW-VIEW's decision). One of them is correct and took the batch only after checking its
requests, and the batch's digest names each request's digest, so the body is the one that
replica checked. That is how a replica that lost the keys its clients tagged with (a restart, a
proactive recovery) keeps up without their signatures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bft.core.budgets import queue_bytes_max, request_bytes
from bft.core.effects import Send
from bft.messages import FetchBatch, PrePrepare, Request

if TYPE_CHECKING:
    from bft.core.replica import Replica

# Large request bodies a replica keeps while their pre-prepare may still come.
REQUEST_STORE_MAX = 4096


class LargeRequests:
    __slots__ = ("bodies", "bodies_bytes", "bodies_bytes_max", "r", "unresolved", "unverified", "unverified_bytes")

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.bodies: dict[bytes, Request] = {}  # large request bodies by digest, oldest first
        self.bodies_bytes = 0  # what they hold (``request_bytes``)
        self.bodies_bytes_max = queue_bytes_max(replica.params)
        self.unresolved: dict[int, PrePrepare] = {}  # pre-prepares still missing some bodies
        self.unverified: dict[bytes, Request] = {}  # bodies we could not authenticate, oldest first
        self.unverified_bytes = 0

    def is_large(self, req: Request) -> bool:
        p = self.r.params
        return p.separate_large_requests and len(req.raw) > p.large_request_bytes

    def collect(self) -> None:
        clients = self.r.execution.clients
        for d in [d for d, q in self.bodies.items() if not clients.is_new(q.client, q.timestamp)]:
            self.forget(d)  # executed here by state transfer, or never to come
        # A batch re-proposed by a NEW-VIEW may name requests executed here already: its
        # pre-prepare needs their bodies all the same.
        for d in [d for d, q in self.unverified.items() if not clients.is_new(q.client, q.timestamp)]:
            if not self.awaited(d):
                self.forget(d)

    def holds_any(self) -> bool:
        """Whether any request body is kept (most of the time none: ``forget`` has nothing to do)."""
        return bool(self.bodies or self.unverified)

    def forget(self, d: bytes) -> None:
        """The body of request ``d`` is no longer kept (executed, or making room)."""
        body = self.bodies.pop(d, None)
        if body is not None:
            self.bodies_bytes -= request_bytes(body)
        body = self.unverified.pop(d, None)
        if body is not None:
            self.unverified_bytes -= request_bytes(body)

    def awaited(self, d: bytes) -> bool:
        """Whether a held pre-prepare refers to request digest ``d``. The runtime holds a request
        by reference when it could not authenticate the copy in the pre-prepare; its client's own
        copy resolves it like a large request's body."""
        return any(d in pp.requests for pp in self.unresolved.values())

    def store(self, req: Request) -> None:
        self.forget(req.digest)
        cost = request_bytes(req)
        # If a pre-prepare still names one evicted, the batch is fetched instead.
        self.bodies_bytes = self._make_room(self.bodies, self.bodies_bytes, cost, "large-requests-evicted")
        self.bodies[req.digest] = req
        self.bodies_bytes += cost
        for pp in [self.unresolved[s] for s in sorted(self.unresolved)]:
            if req.digest in pp.requests:
                self.r.normal.on_pre_prepare(pp, self.r.now_ms)
        self.r.learner.execute()

    def _make_room(self, store: dict[bytes, Request], used: int, cost: int, evicted: str) -> int:
        """The oldest bodies of ``store`` go until one of ``cost`` bytes fits, in count and in
        bytes; what the store holds then."""
        while store and (len(store) >= REQUEST_STORE_MAX or used + cost > self.bodies_bytes_max):
            used -= request_bytes(store.pop(next(iter(store))))
            self.r.stats[evicted] += 1
        return used

    def offer(self, reqs: list[Request]) -> None:
        """Bodies the runtime could not authenticate; kept (bounded, the oldest make room) for
        a pre-prepare that f+1 replicas vouch for, and tried on the held ones that name them."""
        new: set[bytes] = set()
        for req in reqs:
            if req.digest in self.unverified:
                continue
            new.add(req.digest)
            cost = request_bytes(req)
            self.unverified_bytes = self._make_room(
                self.unverified, self.unverified_bytes, cost, "unverified-requests-evicted"
            )
            self.unverified[req.digest] = req
            self.unverified_bytes += cost
        # Only those: a faulty primary's every pre-prepare may carry such bodies, and each
        # would otherwise cost a pass over every held pre-prepare's requests.
        named = [s for s, pp in self.unresolved.items() if any(isinstance(q, bytes) and q in new for q in pp.requests)]
        for seq in sorted(named):
            self.r.normal.retry_held(seq)
        self.r.learner.execute()

    def by_reference(self, pp: PrePrepare) -> PrePrepare:
        """The pre-prepare as sent: large requests replaced by their digests."""
        if not any(self.is_large(q) for q in pp.requests):
            return pp
        refs = tuple(q.digest if self.is_large(q) else q for q in pp.requests)
        return PrePrepare(pp.view, pp.seq, pp.timestamp, refs, pp.replica, pp.digest)

    def resolve(self, pp: PrePrepare, vouched: bool) -> PrePrepare | None:
        """The pre-prepare with every body in place, or None if some body has not come. Bodies
        we could not authenticate count only if f+1 replicas vouch for the batch (``vouched``)."""
        requests = []
        for q in pp.requests:
            if isinstance(q, bytes):
                body = self.bodies.get(q)
                if body is None and vouched:
                    body = self.unverified.get(q)
                    self.r.stats["requests-resolved-unverified"] += body is not None
                if body is None:
                    return None
                q = body
            requests.append(q)
        return PrePrepare(pp.view, pp.seq, pp.timestamp, tuple(requests), pp.replica, pp.digest)

    def resolve_or_hold(self, pp: PrePrepare, vouched: bool) -> PrePrepare | None:
        """``resolve``; or None, holding the pre-prepare (bounded) until the bodies come or the
        batch is fetched at the next status tick."""
        full = self.resolve(pp, vouched)
        if full is None and len(self.unresolved) < self.r.params.log_window:
            self.unresolved[pp.seq] = pp
        return full

    def fetch_unresolved(self) -> None:
        r = self.r
        for seq, pp in list(self.unresolved.items()):
            if pp.view != r.view or not r.in_window(seq):
                del self.unresolved[seq]
                continue
            r.view_change.wanted_batches.add((seq, pp.digest))
            r.outbox.append(Send(pp.replica, FetchBatch(seq, pp.digest, r.id)))

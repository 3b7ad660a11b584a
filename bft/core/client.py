"""The PBFT client as a pure state machine.

A request goes to the primary of the view the client believes in; the result is accepted once
f+1 distinct replicas sent replies with the same timestamp and result, since at least one of them
is correct (OSDI 1999, section 4.1). On time-out the request goes to every replica, which relay it
to the primary, and the time-out doubles (up to a cap). The client learns the view from replies.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from bft.core.params import Params
from bft.core.replica import ALL, Outbound
from bft.messages import Reply, Request

log = logging.getLogger("bft.client")

TIMEOUT_BACKOFF_MAX = 16


@dataclass(slots=True)
class Pending:
    request: Request
    deadline_ms: int
    timeout_ms: int
    replies: dict[int, Reply] = field(default_factory=dict)


class ClientCore:
    def __init__(self, client_id: int, f: int, params: Params, first_timestamp: int = 1) -> None:
        self.id = client_id
        self.f = f
        self.n = 3 * f + 1
        self.params = params
        self.view = 0
        self.next_timestamp = first_timestamp
        self.inflight: dict[int, Pending] = {}
        self.outbox: list[Outbound] = []
        self.completed: list[tuple[int, bytes]] = []  # (timestamp, result), drained by the driver
        self.dropped: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()

    @property
    def primary(self) -> int:
        return self.view % self.n

    def can_submit(self) -> bool:
        # The replicas' exactly-once window is a range of timestamps, not a count: a request
        # lagging behind newer ones must stay inside it or it would be dropped as too old.
        oldest = min(self.inflight, default=self.next_timestamp)
        return self.next_timestamp - oldest < self.params.client_window

    def submit(self, op: bytes, now_ms: int, read_only: bool = False) -> Request:
        """Start an operation; returns the request (its timestamp identifies the result)."""
        assert self.can_submit(), "client window full"
        req = Request.make(self.id, self.next_timestamp, op, read_only)
        self.next_timestamp += 1
        timeout = self.params.request_timeout_ms
        self.inflight[req.timestamp] = Pending(req, now_ms + timeout, timeout)
        self.outbox.append((self.primary, req))
        return req

    def on_reply(self, reply: Reply, now_ms: int) -> None:
        pending = self.inflight.get(reply.timestamp)
        if reply.client != self.id or pending is None:
            self.dropped["unexpected-reply"] += 1
            return
        if not 0 <= reply.replica < self.n:
            self.dropped["unknown-replica"] += 1
            return
        pending.replies[reply.replica] = reply
        matching = [r for r in pending.replies.values() if r.result == reply.result]
        if len(matching) < self.f + 1:
            return
        # f+1 replicas vouch for this view or a later one; a single liar cannot push us ahead.
        views = sorted((r.view for r in matching), reverse=True)
        self.view = max(self.view, views[self.f])
        del self.inflight[reply.timestamp]
        self.completed.append((reply.timestamp, reply.result))

    def tick(self, now_ms: int) -> list[Outbound]:
        for pending in self.inflight.values():
            if now_ms >= pending.deadline_ms:
                pending.timeout_ms = min(
                    pending.timeout_ms * 2, self.params.request_timeout_ms * TIMEOUT_BACKOFF_MAX
                )
                pending.deadline_ms = now_ms + pending.timeout_ms
                self.stats["retransmissions"] += 1
                log.debug("client %d resends %d to all", self.id, pending.request.timestamp)
                self.outbox.append((ALL, pending.request))
        return self.take_outbox()

    def take_outbox(self) -> list[Outbound]:
        out, self.outbox = self.outbox, []
        return out

    def take_completed(self) -> list[tuple[int, bytes]]:
        done, self.completed = self.completed, []
        return done

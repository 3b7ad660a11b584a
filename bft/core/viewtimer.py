"""The view timer (OSDI 1999, section 4.4): a backup that holds a request it has not seen
executed suspects the primary when the request waits longer than the view timeout, and starts a
view change. Successive view changes without progress double the timeout (up to a cap).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bft.messages import Request

if TYPE_CHECKING:
    from bft.core.replica import Replica

log = logging.getLogger("bft.replica")

# Requests a backup holds for its view-change timer; more are relayed but not remembered.
WAITING_REQUESTS_MAX = 4096
# Exponential back-off of successive view changes stops doubling here.
VIEW_BACKOFF_MAX = 6


class ViewTimer:
    __slots__ = ("attempt", "deadline_ms", "head", "r", "waiting")

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.waiting: dict[tuple[int, int], Request] = {}  # requests we saw and wait to see executed
        self.deadline_ms: int | None = None
        self.head: tuple[int, int] | None = None  # the request the timer runs for
        self.attempt = 0  # successive view changes without progress: the back-off exponent

    def timeout_ms(self) -> int:
        return self.r.params.view_timeout_ms << min(self.attempt, VIEW_BACKOFF_MAX)

    def hold(self, key: tuple[int, int], req: Request) -> None:
        """Remember a request we expect to see executed (bounded: a flood is not remembered)."""
        if len(self.waiting) < WAITING_REQUESTS_MAX:
            self.waiting.setdefault(key, req)

    def wait_on(self, key: tuple[int, int], req: Request) -> None:
        if len(self.waiting) < WAITING_REQUESTS_MAX:
            self.waiting.setdefault(key, req)
            self.arm()

    def arm(self) -> None:
        """The paper's rule (section 4.4): the timer runs for one request we wait on, the oldest;
        it restarts only when that one executes and others still wait. Progress on other
        requests does not restart it, so a primary that censors a client is replaced."""
        r = self.r
        if r.view_changing:
            return
        tentative = r.execution.tentative_requests()
        clients = r.execution.clients
        for key in [k for k in self.waiting if not clients.is_new(*k) and k not in tentative]:
            del self.waiting[key]  # executed meanwhile (by state transfer, say)
        head = next(iter(self.waiting), None)
        if head is None:
            self.deadline_ms = self.head = None
        elif head != self.head or self.deadline_ms is None:
            self.head = head
            self.deadline_ms = r.now_ms + self.timeout_ms()

    def start_for_view_change(self) -> None:
        """2f+1 replicas are changing view: give the new primary one timeout to deliver."""
        if self.deadline_ms is None:
            self.deadline_ms = self.r.now_ms + self.timeout_ms()

    def tick(self, now_ms: int) -> None:
        r = self.r
        if self.deadline_ms is None or now_ms < self.deadline_ms:
            return
        if not r.view_changing:
            self.arm()  # drops requests executed meanwhile; maybe none is left
        if self.deadline_ms is not None and now_ms >= self.deadline_ms:
            log.info("replica %d: view %d timed out", r.id, r.view)
            r.view_change.start(r.view + 1)

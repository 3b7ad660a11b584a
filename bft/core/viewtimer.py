"""The view timer (OSDI 1999, section 4.4): a backup that holds a request it has not seen
executed suspects the primary when the request waits longer than the view timeout, and starts a
view change. Successive view changes without progress double the timeout (up to a cap).

As Aardvark (Clement et al., NSDI 2009) does, a request's time runs from its arrival, not from
when it became the oldest one waiting: a primary that executes each request just before its
timeout would otherwise restart the timer in full for the next one, and never be replaced. A new
view starts every clock again (its primary gets a full timeout). Each client has a fair share of
the waiting set, so a flooding client cannot push the others' requests out of it. A primary
that orders each request a little within its timeout is left to the slow-primary monitor
(``bft.core.monitor``), which reads the waits of the requests held here.

With ``adaptive_timeouts`` the timeout is learned (``bft.core.estimator``) from how long the
requests held here waited to execute, between ``view_timeout_min_ms`` and ``view_timeout_ms``, and
a view change starts once the request the timer runs for waited that long and the primary has
been silent for as long (nothing held here executed meanwhile), or once it waited the fixed
``view_timeout_ms``, whichever comes first. A primary that keeps executing is suspected no sooner
than with the fixed timer, so a load spike costs no view change the fixed timer would not start;
a crashed or silent one is suspected as soon as its silence outlasts what requests usually take,
and a slow one as soon as its pauses do. What the timer learns never exceeds the fixed timeout,
so a slow primary cannot teach it its own pace.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from bft.core.budgets import queue_bytes_max, request_bytes
from bft.core.estimator import Estimator
from bft.messages import Request

if TYPE_CHECKING:
    from bft.core.replica import Replica

log = logging.getLogger("bft.replica")

# Requests a backup holds for its view-change timer; more are relayed but not remembered.
WAITING_REQUESTS_MAX = 4096
# Exponential back-off of successive view changes stops doubling here.
VIEW_BACKOFF_MAX = 6


class ViewTimer:
    __slots__ = (
        "arrived_ms", "attempt", "deadline_ms", "estimator", "head", "per_client", "progress_ms", "r", "waiting",
        "waiting_bytes", "waiting_bytes_max",
    )

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.waiting: dict[tuple[int, int], Request] = {}  # requests we saw and wait to see executed
        self.arrived_ms: dict[tuple[int, int], int] = {}  # when each came (or its view began)
        self.per_client: Counter[int] = Counter()
        self.waiting_bytes = 0  # what they hold (bft.core.budgets)
        self.waiting_bytes_max = queue_bytes_max(replica.params)
        self.deadline_ms: int | None = None
        self.head: tuple[int, int] | None = None  # the request the timer runs for
        self.attempt = 0  # successive view changes without progress: the back-off exponent
        p = replica.params
        low = min(p.view_timeout_min_ms, p.view_timeout_ms)
        self.estimator = Estimator(low, p.view_timeout_ms) if p.adaptive_timeouts else None
        self.progress_ms = -1  # adaptive: when a request held here last executed

    def timeout_ms(self, alive: bool = False) -> int:
        """The fixed timeout; or, adaptive and while the primary is silent (not ``alive``), the
        learned one. Either doubles with each view change in a row (``attempt``)."""
        fixed = self.r.params.view_timeout_ms
        base = fixed if self.estimator is None or alive else self.estimator.bound(fixed)
        return base << min(self.attempt, VIEW_BACKOFF_MAX)

    def hold(self, key: tuple[int, int], req: Request) -> bool:
        """Remember a request we expect to see executed; bounded in all, in bytes and per client
        (a correct client has at most ``client_window`` requests in flight)."""
        if key in self.waiting:
            return True
        cost = request_bytes(req)
        if (
            len(self.waiting) >= WAITING_REQUESTS_MAX
            or self.per_client[key[0]] >= self.r.params.client_window
            or self.waiting_bytes + cost > self.waiting_bytes_max
        ):
            self.r.stats["waiting-requests-refused"] += 1
            return False
        self.waiting_bytes += cost
        self.waiting[key] = req
        self.arrived_ms[key] = self.r.now_ms
        self.per_client[key[0]] += 1
        return True

    def wait_on(self, key: tuple[int, int], req: Request) -> None:
        if self.hold(key, req):
            self.arm()

    def done(self, key: tuple[int, int]) -> None:
        req = self.waiting.pop(key, None)
        if req is not None:
            self.waiting_bytes -= request_bytes(req)
            waited = self.r.now_ms - self.arrived_ms.pop(key)
            self.r.monitor.completed(waited)
            if self.estimator is not None:
                self.estimator.observe(waited)
                self.progress_ms = self.r.now_ms
            self.per_client[key[0]] -= 1
            if not self.per_client[key[0]]:
                del self.per_client[key[0]]

    def forget_client(self, client: int) -> None:
        """Stop waiting for ``client``'s requests (``Replica.distrust``): not completions, so
        the primary's throughput monitor does not count them."""
        for key in [k for k in self.waiting if k[0] == client]:
            self.waiting_bytes -= request_bytes(self.waiting.pop(key))
            del self.arrived_ms[key]
        self.per_client.pop(client, None)
        self.head = None
        self.arm()

    def clear(self) -> None:
        self.waiting_bytes = 0
        self.waiting.clear()
        self.arrived_ms.clear()
        self.per_client.clear()

    def restart_clocks(self) -> None:
        """A new view: its primary gets a full timeout for every request still waiting."""
        for key in self.arrived_ms:
            self.arrived_ms[key] = self.r.now_ms
        self.head = None

    def arm(self) -> None:
        """The timer runs for one request we wait on, the oldest, until its arrival plus the
        timeout. Progress on other requests does not move it, so a primary that censors a client
        is replaced; nor does the execution of the one before it, so a slow one is too."""
        r = self.r
        if r.view_changing:
            return
        tentative = r.execution.tentative_requests()
        clients = r.execution.clients
        for key in [k for k in self.waiting if not clients.is_new(*k) and k not in tentative]:
            self.done(key)  # executed meanwhile (by state transfer, say)
        head = next(iter(self.waiting), None)
        if head is None:
            self.deadline_ms = self.head = None
        elif head != self.head or self.deadline_ms is None:
            self.head = head
            self.deadline_ms = self.arrived_ms[head] + self.timeout_ms()

    def _learning(self) -> bool:
        return self.estimator is not None and not self.r.view_changing and self.head in self.arrived_ms

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
        if self.deadline_ms is not None and now_ms >= self.deadline_ms and self._learning():
            # Not silent for the learned timeout: wait until it is, or as the fixed timer would.
            cap = self.arrived_ms[self.head] + self.timeout_ms(alive=True)
            self.deadline_ms = max(self.deadline_ms, min(cap, self.progress_ms + self.timeout_ms()))
        if self.deadline_ms is not None and now_ms >= self.deadline_ms:
            log.info("replica %d: view %d timed out", r.id, r.view)
            r.stats["view-changes-timed-out"] += 1
            r.view_change.start(r.view + 1)

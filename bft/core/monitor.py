"""The slow-primary monitor: Aardvark's adaptive view change (Clement et al., "Making Byzantine
Fault Tolerant Systems Tolerate Byzantine Faults", NSDI 2009, section 4.2).

The view timer replaces a primary that keeps a request waiting longer than the view timeout; a
primary that holds every batch for a little less is never replaced by it, and can cut throughput
to a fraction of a percent. So every replica counts the requests executed in each window of
``primary_window_ms``, and remembers each recent view's best window. After a grace period at the
start of a view, a backup expects the primary to execute, per window, at least
``primary_throughput_fraction`` of the best window of the last n views and of this one; and
every window it meets that, the expectation rises by ``RAISE_PER_WINDOW``, so that a slow
primary that set the only expectation there is (the first view, say) cannot settle at its own
pace. Below the expectation, the backup starts a view change.

Low throughput is the primary's fault only if there was work it did not do, so a window is
judged only when clients were kept waiting all through it: the backup held requests it had not
seen executed (a client sends to every replica only once its request timed out at the primary,
or when the request is large), with no gap longer than ``DEMAND_GAP_TIMEOUTS`` request time-outs
(the time a client's next request takes to become visible to the backups), and the requests it
held waited ``SLOW_WAIT_FRACTION`` of the view timeout on average (a correct primary orders what
a backup relays within a few message delays, so a single client sending large requests back to
back, which keeps the waiting set full, is not a slow primary). An idle cluster, a client that
stops or a load that drops is judged not at all; an overloaded primary is judged, but does its
best, so only the rising expectation can replace it, as in Aardvark, which rotates primaries
under sustained load too.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bft.core.replica import Replica

log = logging.getLogger("bft.replica")

# How much the expectation rises with every window the primary met it: a primary that set the
# expectation itself meets half of it for four windows (0.5 x 1.25^3 = 0.98), no more.
RAISE_PER_WINDOW = 1.25
# A gap in the waiting set that still counts as continued demand, in request time-outs: a closed
# loop client's next request reaches the backups one time-out after the last one executed.
DEMAND_GAP_TIMEOUTS = 2
# What "kept waiting" means, as a fraction of the view timeout: a request reaches a backup one
# client time-out (500 ms by default) after its client sent it, so behind a primary that holds
# its batches for 0.9 of the view timeout it waits 400 ms there; a correct primary orders it in
# a few milliseconds, or in a few status intervals when a message was lost.
SLOW_WAIT_FRACTION = 0.25


class PrimaryMonitor:
    __slots__ = (
        "best",
        "busy_since_ms",
        "count",
        "executed",
        "history",
        "idle_since_ms",
        "last_ms",
        "met",
        "r",
        "view",
        "view_start_ms",
        "waited",
        "waited_ms",
        "window_start_ms",
        "windows_waited",
        "windows_waited_ms",
    )

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.history: deque[int] = deque(maxlen=replica.n)  # best window of each of the last n views
        self.view: int | None = None  # the view we count for; None while changing view
        self.view_start_ms = 0
        self.window_start_ms = 0
        self.count = 0  # requests executed in the current window
        self.best = 0  # most requests executed in one window of this view
        self.met = 0  # windows judged in this view: the exponent of the rising expectation
        self.waited = self.waited_ms = 0  # requests we held that executed at this input, their waits
        self.windows_waited = self.windows_waited_ms = 0  # the same over the current window
        self.busy_since_ms: int | None = None  # since when requests we hold kept us waiting
        self.idle_since_ms: int | None = None  # since when we hold none, within that stretch
        self.last_ms = 0
        self.executed = 0  # requests executed since the last input, counted by Execution

    def completed(self, waited_ms: int) -> None:
        """A request we held (``bft.core.viewtimer``) executed after waiting that long."""
        self.waited += 1
        self.waited_ms += waited_ms

    def observe(self, now_ms: int) -> None:
        """After every input: count what it executed, close the windows that ended, judge them,
        and note whether requests wait. The core's state changes only at inputs, so what holds
        after one holds until the next: sampling here is exact."""
        r = self.r
        if not r.params.primary_throughput_fraction:
            return
        now = self.last_ms = max(now_ms, self.last_ms)  # a clock stepping back stops time instead
        executed, self.executed = self.executed, 0
        waited, waited_ms = self.waited, self.waited_ms
        self.waited = self.waited_ms = 0
        if r.view_changing:
            return self._end_view()
        if self.view != r.view:
            self._end_view()
            self._begin_view(now)
        window = r.params.primary_window_ms
        while now >= self.window_start_ms + window:
            self._close_window(self.window_start_ms + window)
            if r.view_changing:
                return self._end_view()
        self.count += executed
        self.windows_waited += waited
        self.windows_waited_ms += waited_ms
        self._note_demand(now)

    def _begin_view(self, now: int) -> None:
        self.view = self.r.view
        self.view_start_ms = self.window_start_ms = now
        self.count = self.best = self.met = 0
        self.windows_waited = self.windows_waited_ms = 0
        self.busy_since_ms = self.idle_since_ms = None

    def _end_view(self) -> None:
        if self.view is not None:
            self.history.append(self.best)
            self.view = None

    def _note_demand(self, now: int) -> None:
        r = self.r
        gap = DEMAND_GAP_TIMEOUTS * r.params.request_timeout_ms
        if r.transfer.target is not None:
            # We are behind and fetch state: our executions say nothing of the primary's pace.
            self.busy_since_ms = self.idle_since_ms = None
        elif r.timer.waiting:
            if self.busy_since_ms is None or (self.idle_since_ms is not None and now - self.idle_since_ms > gap):
                self.busy_since_ms = now
            self.idle_since_ms = None
        elif self.busy_since_ms is not None and self.idle_since_ms is None:
            self.idle_since_ms = now

    def _kept_waiting(self, start: int, end: int) -> bool:
        """Clients were kept waiting from ``start`` to ``end``: we held requests all along (bar
        short gaps), and they waited long."""
        r = self.r
        p = r.params
        if self.busy_since_ms is None or self.busy_since_ms > start:
            return False
        if self.idle_since_ms is not None and end - self.idle_since_ms > DEMAND_GAP_TIMEOUTS * p.request_timeout_ms:
            return False
        slow_ms = SLOW_WAIT_FRACTION * p.view_timeout_ms
        if self.windows_waited:
            return self.windows_waited_ms >= slow_ms * self.windows_waited
        oldest = next(iter(r.timer.arrived_ms.values()), None)  # none executed: the oldest waits on
        return oldest is not None and end - oldest >= slow_ms

    def _close_window(self, end: int) -> None:
        r = self.r
        p = r.params
        start = end - p.primary_window_ms
        count = self.count
        judged = start >= self.view_start_ms + p.primary_grace_ms and not r.is_primary()
        if judged and self._kept_waiting(start, end):
            expected = max(self.best, max(self.history, default=0))
            required = p.primary_throughput_fraction * expected * RAISE_PER_WINDOW**self.met
            self.met += 1
            if count < required:
                log.info(
                    "replica %d: primary %d executed %d requests in %d ms while clients waited, "
                    "%.0f expected: view change",
                    r.id, r.primary, count, p.primary_window_ms, required,
                )
                r.stats["slow-primary-view-changes"] += 1
                r.view_change.start(r.view + 1)
        self.best = max(self.best, count)
        self.window_start_ms = end
        self.count = 0
        self.windows_waited = self.windows_waited_ms = 0

"""What an operator alerts on, beside ``/status``: request latency and batch size, checkpoint,
state-transfer and view-change durations, view changes by reason, messages by type and bytes by
peer; and the log lines for drops and view changes (``Observer``).

The node's hot path only adds to plain ints and lists here (a message in or out, a read or a
write, an executed batch); everything else is read off the core by ``Observer`` 20 times a
second, and turned into Prometheus families only when ``/metrics`` is scraped.
"""

from __future__ import annotations

import logging
import time
import typing
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from bft.messages import Message, PrePrepare

log = logging.getLogger("bft.node")

TYPE_NAMES = {cls.TYPE: cls.__name__ for cls in typing.get_args(Message)}
TYPES_MAX = max(TYPE_NAMES) + 1

LATENCY_BOUNDS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DURATION_BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

OBSERVE_S = 0.05
HISTORY_S = 5.0  # one dashboard sample every 5 s ...
HISTORY_SAMPLES = 180  # ... for the last 15 minutes
DROP_LOG_S = 60.0  # a drop reason is logged when first seen, then at most once a minute


class Histogram:
    """A Prometheus histogram that costs a bisect and two additions per observation (the
    client library's takes a lock and one call per bucket)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float, weight: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += weight
        self.total += value * weight

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        buckets, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.total)


class Metrics:
    def __init__(self, checkpoint_interval: int) -> None:
        self.checkpoint_interval = checkpoint_interval
        self.msgs_in = [0] * TYPES_MAX
        self.msgs_out = [0] * TYPES_MAX
        self.traffic: dict[str, list[int]] = {}  # peer -> [bytes in, bytes out]
        self.requests_executed = 0
        self.latency = Histogram(LATENCY_BOUNDS_S)
        self.batch_size = Histogram(BATCH_BOUNDS)
        self.checkpoint = Histogram(DURATION_BOUNDS_S)
        self.state_transfer = Histogram(DURATION_BOUNDS_S)
        self.view_change = Histogram(DURATION_BOUNDS_S)
        self.view_changes: Counter[str] = Counter()  # started, by reason
        self._checkpoint_started: dict[int, float] = {}

    def peer(self, name: str) -> list[int]:
        """The [in, out] byte counts of ``name`` (``replica-1``, ``client-3``), shared by every
        connection it ever has."""
        return self.traffic.setdefault(name, [0, 0])

    def executed(self, batch: PrePrepare, now_ms: int) -> None:
        """A committed batch ran here: each of its requests took from the batch's pre-prepare
        (its agreed time, the primary's clock) to now."""
        n = len(batch.requests)
        self.requests_executed += n
        self.latency.observe(max(0, now_ms - batch.timestamp) / 1000, n)
        self.batch_size.observe(n)
        if batch.seq % self.checkpoint_interval == 0:
            self._checkpoint_started[batch.seq] = time.monotonic()

    def persisted(self, seq: int) -> None:
        """Checkpoint ``seq`` became stable: how long from executing its last batch."""
        started = self._checkpoint_started.pop(seq, None)
        for older in [s for s in self._checkpoint_started if s < seq]:
            del self._checkpoint_started[older]  # superseded (a state transfer jumped past them)
        if started is not None:
            self.checkpoint.observe(time.monotonic() - started)

    def families(self) -> Iterator:
        yield self.latency.family(
            "bft_request_latency_seconds", "per request: from its batch's pre-prepare to its execution here")
        yield self.batch_size.family("bft_batch_size", "requests per executed batch")
        yield self.checkpoint.family("bft_checkpoint_seconds", "from executing a checkpoint's batch to it being stable")
        yield self.state_transfer.family("bft_state_transfer_seconds", "from fetching state to having it")
        yield self.view_change.family("bft_view_change_seconds", "from leaving a view to entering the next")
        changes = CounterMetricFamily("bft_view_changes", "view changes started here, by reason", labels=["reason"])
        for reason, count in sorted(self.view_changes.items()):
            changes.add_metric([reason], count)
        yield changes
        for direction, counts in (("in", self.msgs_in), ("out", self.msgs_out)):
            family = CounterMetricFamily(f"bft_messages_{direction}", f"protocol messages {direction}, by type",
                                         labels=["type"])
            for t, name in sorted(TYPE_NAMES.items()):
                family.add_metric([name], counts[t])
            yield family
        traffic = CounterMetricFamily("bft_peer_bytes", "bytes on the wire, by peer", labels=["peer", "direction"])
        for peer, (bytes_in, bytes_out) in sorted(self.traffic.items()):
            traffic.add_metric([peer, "in"], bytes_in)
            traffic.add_metric([peer, "out"], bytes_out)
        yield traffic


class Observer:
    """Watches a replica's core from outside the hot path: logs each view change with its
    reason and each kind of drop (once, then at most once a minute), times view changes and
    state transfers, and keeps the dashboard's recent history."""

    def __init__(self, name: str, core, drops: Callable[[], Counter[str]], metrics: Metrics) -> None:
        self.name, self.core, self.drops, self.metrics = name, core, drops, metrics
        self.history: deque[dict] = deque(maxlen=HISTORY_SAMPLES)
        self._stats = Counter(core.stats)
        self._dropped = Counter(drops())
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (when last logged, count then)
        self._changing_since: float | None = None
        self._fetching_since: float | None = None
        self._next_sample = 0.0

    def poll(self, now: float) -> None:
        stats = self.core.stats
        delta = Counter({k: v - self._stats[k] for k, v in stats.items() if v != self._stats[k]})
        self._stats = Counter(stats)
        if delta:
            self._view_changes(delta, now)
            self._state_transfers(delta, now)
        self._drops(now)
        if now >= self._next_sample:
            self._next_sample = now + HISTORY_S
            self.history.append({
                "t": round(time.time(), 1), "view": self.core.view, "executed": self.core.executed,
                "requests": self.metrics.requests_executed, "view_changes": stats["view-changes-started"],
                "dropped": sum(self._dropped.values()),
            })

    def _view_changes(self, delta: Counter[str], now: float) -> None:
        core = self.core
        if delta["view-changes-started"]:
            if delta["slow-primary-view-changes"]:
                reason = "slow-primary"
            elif delta["view-changes-joined"]:
                reason = "joined-f+1-replicas"
            elif delta["view-changes-timed-out"] and self._changing_since is not None:
                reason = "new-view-timed-out"
            else:
                reason = "request-timed-out"
            self.metrics.view_changes[reason] += delta["view-changes-started"]
            if self._changing_since is None:
                self._changing_since = now
            log.warning("%s: view change to view %d (%s)", self.name, core.view, reason)
        if delta["views-entered"] and not core.view_changing:
            took = now - (self._changing_since or now)
            self._changing_since = None
            self.metrics.view_change.observe(took)
            log.warning("%s: entered view %d, primary %d, after %.2f s", self.name, core.view, core.primary, took)

    def _state_transfers(self, delta: Counter[str], now: float) -> None:
        if delta["state-fetches"] and self._fetching_since is None:
            self._fetching_since = now
            log.warning("%s: fetching state (behind the others' stable checkpoint)", self.name)
        if delta["state-transfers"]:
            took = now - (self._fetching_since or now)
            self._fetching_since = None
            self.metrics.state_transfer.observe(took)
            log.warning("%s: state transfer done in %.2f s, at checkpoint %d", self.name, took, self.core.stable)

    def _drops(self, now: float) -> None:
        dropped = self.drops()
        for reason, total in dropped.items():
            if total == self._dropped[reason]:
                continue
            last = self._logged.get(reason)
            if last is None:
                log.warning("%s: dropped %d message(s): %s", self.name, total - self._dropped[reason], reason)
                self._logged[reason] = (now, total)
            elif now - last[0] >= DROP_LOG_S:
                log.info("%s: dropped %d message(s) in %.0f s: %s (%d in all)",
                         self.name, total - last[1], now - last[0], reason, total)
                self._logged[reason] = (now, total)
        self._dropped = Counter(dropped)

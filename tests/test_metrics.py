"""The operator metrics and log lines of bft/runtime/metrics.py, against a stand-in core (the
real processes are in tests/test_operations.py)."""

from __future__ import annotations

import logging
from collections import Counter

from bft.messages import PrePrepare
from bft.runtime.metrics import DROP_LOG_S, Histogram, Metrics, Observer


class FakeCore:
    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.view = self.primary = self.executed = self.stable = 0
        self.view_changing = False


def test_histogram_buckets_are_cumulative_and_weighted() -> None:
    h = Histogram((0.01, 0.1, 1.0))
    h.observe(0.005)
    h.observe(0.05, 3)
    h.observe(5.0)
    family = h.family("x_seconds", "x")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.01": 1, "0.1": 4, "1.0": 4, "+Inf": 5}
    assert [s.value for s in family.samples if s.name == "x_seconds_sum"] == [0.005 + 0.15 + 5.0]


def test_executed_batches_give_per_request_latency_and_checkpoint_time() -> None:
    m = Metrics(checkpoint_interval=4)
    m.executed(PrePrepare(0, 4, 1_000, (b"a" * 32, b"b" * 32), 0), now_ms=1_020)
    assert m.requests_executed == 2 and m.latency.counts[m.latency.bounds.index(0.025)] == 2
    assert m.batch_size.counts[1] == 1  # a batch of 2
    m.persisted(4)
    assert sum(m.checkpoint.counts) == 1
    m.persisted(8)  # never executed here (a state transfer jumped to it): nothing to time
    assert sum(m.checkpoint.counts) == 1


def test_view_changes_logged_with_reason_and_timed(caplog) -> None:
    core = FakeCore()
    m = Metrics(16)
    obs = Observer("replica-1", core, lambda: core.dropped, m)
    caplog.set_level(logging.INFO, "bft.node")
    core.stats.update({"view-changes-timed-out": 1, "view-changes-started": 1})
    core.view, core.view_changing = 1, True
    obs.poll(10.0)
    core.stats.update({"view-changes-timed-out": 1, "view-changes-started": 1})  # v1 not installed
    core.view = 2
    obs.poll(11.0)
    core.stats["views-entered"] += 1
    core.view_changing, core.primary = False, 2
    obs.poll(11.5)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "replica-1: view change to view 1 (request-timed-out)",
        "replica-1: view change to view 2 (new-view-timed-out)",
        "replica-1: entered view 2, primary 2, after 1.50 s",
    ]
    assert m.view_changes == {"request-timed-out": 1, "new-view-timed-out": 1}
    assert sum(m.view_change.counts) == 1 and m.view_change.total == 1.5


def test_each_kind_of_drop_logged_once_then_at_most_once_a_minute(caplog) -> None:
    core = FakeCore()
    obs = Observer("replica-0", core, lambda: core.dropped, Metrics(16))
    caplog.set_level(logging.INFO, "bft.node")
    for t in range(30):  # a flood: 10 drops every poll for 30 polls
        core.dropped["bad-handshake"] += 10
        obs.poll(100.0 + t)
    core.dropped["bad-handshake"] += 5
    obs.poll(100.0 + DROP_LOG_S + 1)
    core.dropped["wrong-view"] += 1
    obs.poll(100.0 + DROP_LOG_S + 2)
    assert [r.getMessage() for r in caplog.records] == [
        "replica-0: dropped 10 message(s): bad-handshake",
        "replica-0: dropped 295 message(s) in 61 s: bad-handshake (305 in all)",
        "replica-0: dropped 1 message(s): wrong-view",
    ]

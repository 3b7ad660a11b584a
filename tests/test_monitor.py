"""The slow-primary monitor (bft.core.monitor), driven through a timed fake link: four core
replicas and closed-loop core clients, every message a fixed delay, every node ticked every
10 ms, and a primary that may hold each of its PRE-PREPAREs for 0.9 of the view timeout
(the ``slow-primary`` behaviour of bft.byzantine). No sockets, no clock, no randomness."""

from __future__ import annotations

import heapq
from dataclasses import replace

import pytest

from bft import config
from bft.byzantine import CATALOGUE, held_ms
from bft.core import monitor
from bft.core.client import ClientCore
from bft.core.effects import Broadcast, Executed, Persist, Promise, ReplyTo, Send
from bft.core.params import Params
from bft.core.replica import Replica
from bft.messages import Message, Reply
from bft.service import KVService

PARAMS = Params(durability="memory")
HOP_MS = 2
TICK_MS = 10
START = 1_000_000
SLOW = CATALOGUE["slow-primary"]


class TimedLink:
    """Replicas and clients exchanging messages ``HOP_MS`` apart, ticked every ``TICK_MS``.
    Replica ``slow`` holds its PRE-PREPAREs from ``slow_from`` on; each client in ``looping``
    keeps one operation in flight, large ones if it is in ``large``."""

    def __init__(self, params: Params = PARAMS, clients: int = 2, slow: int | None = None, slow_from: int = 0) -> None:
        self.params = params
        self.replicas = [Replica(i, 1, params, KVService) for i in range(4)]
        self.clients = [ClientCore(c, 1, params) for c in range(clients)]
        self.slow, self.slow_from = slow, START + slow_from
        self.looping = set(range(clients))
        self.large: set[int] = set()
        self.now = START
        self.events: list[tuple[int, int, str, int, object]] = []
        self.order = 0
        self.done: list[int] = []  # when each operation completed
        self.busy_ms = 0  # how long backup 1 held requests it waited to see executed
        self.next_tick = START
        for c in range(clients):
            self._submit(c)

    def _at(self, when: int, kind: str, dst: int, payload: object) -> None:
        self.order += 1
        heapq.heappush(self.events, (when, self.order, kind, dst, payload))

    def _send(self, src: int, dst: int, msg: Message) -> None:
        delay = HOP_MS
        if src == self.slow and self.now >= self.slow_from:
            delay += held_ms(SLOW, msg, self.params)
        self._at(self.now + delay, "replica", dst, msg)

    def _route_replica(self, src: int, effects: list) -> None:
        for effect in effects:
            match effect:
                case Send(to, msg):
                    self._send(src, to, msg)
                case Broadcast(msg):
                    for j in range(4):
                        if j != src:
                            self._send(src, j, msg)
                case ReplyTo(client, reply):
                    self._at(self.now + HOP_MS, "client", client, reply)
                case Persist() | Promise() | Executed():
                    pass
                case _:
                    raise AssertionError(f"unknown effect {effect!r}")

    def _route_client(self, effects: list) -> None:
        for effect in effects:
            for j in [effect.to] if isinstance(effect, Send) else range(4):
                self._at(self.now + HOP_MS, "replica", j, effect.msg)

    def _submit(self, c: int) -> None:
        client = self.clients[c]
        if c in self.looping and not client.inflight:
            value = b"x" * (PARAMS.large_request_bytes + 1) if c in self.large else b"v"
            client.submit(KVService.put(b"k%d" % c, value), self.now)
            self._route_client(client.take_outbox())

    def _advance(self, to: int) -> None:
        if self.replicas[1].timer.waiting:
            self.busy_ms += to - self.now
        self.now = to

    def run_for(self, ms: int) -> None:
        end = self.now + ms
        while True:
            at = self.events[0][0] if self.events else end
            if self.next_tick <= min(at, end):
                self._advance(self.next_tick)
                self.next_tick += TICK_MS
                self._tick()
                continue
            if not self.events or at > end:
                break
            _, _, kind, dst, payload = heapq.heappop(self.events)
            self._advance(at)
            if kind == "replica":
                self._route_replica(dst, self.replicas[dst].step(payload, self.now))
            else:
                assert isinstance(payload, Reply)
                client = self.clients[dst]
                client.on_reply(payload, self.now)
                self.done += [self.now for _ in client.take_completed()]
                self._submit(dst)
        self._advance(end)

    def _tick(self) -> None:
        for i, r in enumerate(self.replicas):
            self._route_replica(i, r.tick(self.now))
        for c, client in enumerate(self.clients):
            self._route_client(client.tick(self.now))
            self._submit(c)

    def rate(self, start: int, end: int) -> float:
        """Operations completed per second between ``start`` and ``end`` (ms since the start)."""
        done = sum(START + start <= t < START + end for t in self.done)
        return done * 1000 / (end - start)

    def views(self) -> list[int]:
        return [r.view for r in self.replicas]

    def monitor_view_changes(self) -> int:
        return sum(r.stats["slow-primary-view-changes"] for r in self.replicas)


def run_until_view_change(link: TimedLink, limit_ms: int) -> int:
    """Run until every correct replica is in view 1; the time that took (ms since the start)."""
    while link.now - START < limit_ms:
        link.run_for(100)
        if all(r.view >= 1 and not r.view_changing for r in link.replicas[1:]):
            return link.now - START
    raise AssertionError(f"no view change within {limit_ms} ms: views {link.views()}")


def test_a_primary_that_holds_every_pre_prepare_is_replaced_and_throughput_recovers() -> None:
    """View 0's primary holds each PRE-PREPARE for 0.9 of the view timeout, from the start: no
    view before it to compare with, so it sets the expectation itself, and the rising
    expectation replaces it a few windows after the grace period. Two closed-loop clients:
    with more, requests queue behind the held batches and the view timer replaces it first."""
    link = TimedLink(clients=2, slow=0)
    changed_at = run_until_view_change(link, limit_ms=PARAMS.primary_grace_ms + 8 * PARAMS.primary_window_ms)
    slow = link.rate(1_000, changed_at)
    link.run_for(5_000)
    recovered = link.rate(changed_at + 1_000, changed_at + 5_000)
    assert slow < 5, f"{slow:.1f} ops/s: the primary was not slow"
    assert recovered > 20 * slow, f"{recovered:.1f} ops/s after the view change, {slow:.1f} before"
    assert link.monitor_view_changes() >= 2, "f+1 backups judged the primary slow"
    assert link.views() == [1, 1, 1, 1]


def test_without_the_monitor_the_view_timer_keeps_the_slow_primary() -> None:
    """What the monitor is for: the same primary, the monitor off, stays for good."""
    link = TimedLink(params=replace(PARAMS, primary_throughput_fraction=0), clients=2, slow=0)
    link.run_for(30_000)
    assert link.views() == [0, 0, 0, 0]
    assert link.rate(1_000, 30_000) < 5


def test_a_primary_that_turns_slow_is_replaced_within_two_windows() -> None:
    """A primary that was fast in this view set a high expectation: once it turns slow, the
    first window in which clients were kept waiting throughout replaces it."""
    turns_at = PARAMS.primary_grace_ms + 3_000
    link = TimedLink(clients=2, slow=0, slow_from=turns_at)
    changed_at = run_until_view_change(link, limit_ms=turns_at + 10_000)
    budget = PARAMS.request_timeout_ms + 3 * PARAMS.primary_window_ms + 1_000  # demand shows, a window, a view change
    assert changed_at - turns_at < budget, f"replaced {changed_at - turns_at} ms after it turned slow"


def test_an_idle_cluster_and_clients_that_stop_are_not_a_slow_primary() -> None:
    link = TimedLink(clients=4)
    link.run_for(PARAMS.primary_grace_ms + 2_000)
    link.looping = {0}  # three clients stop
    link.run_for(4_000)
    link.looping = set()  # the last one too: idle
    link.run_for(15_000)
    assert link.views() == [0, 0, 0, 0] and link.monitor_view_changes() == 0


def test_a_load_that_drops_while_requests_wait_at_the_backups_is_not_a_slow_primary(monkeypatch) -> None:
    """After a busy phase, one client alone sends large requests back to back: each goes to
    every replica, so the backups hold a request nearly all the time, and a window holds a
    fraction of the busy phase's best. The primary orders each at once, so nobody was kept
    waiting. Without that test of the waits, the monitor would replace it."""

    def run() -> TimedLink:
        link = TimedLink(clients=4)
        link.run_for(PARAMS.primary_grace_ms + 2_000)
        link.looping = {0}
        link.large = {0}
        link.busy_ms = 0
        link.run_for(8_000)
        return link

    link = run()
    assert link.busy_ms > 0.5 * 8_000, "the backups held requests most of the time"
    assert link.views() == [0, 0, 0, 0] and link.monitor_view_changes() == 0
    monkeypatch.setattr(monitor, "SLOW_WAIT_FRACTION", 0)
    assert run().monitor_view_changes() > 0


def test_the_monitor_s_parameters_are_in_cluster_toml_and_checked(tmp_path) -> None:
    path = config.keygen(tmp_path, clients=0, base_port=20_000)
    text = path.read_text()
    assert "primary_throughput_fraction = 0.5" in text and "primary_grace_ms = 5000" in text
    path.write_text(text.replace("primary_throughput_fraction = 0.5", "primary_throughput_fraction = 1.5"))
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert "\n" not in str(err.value) and "primary_throughput_fraction must be a number from 0 (off) to 1" in str(
        err.value
    )

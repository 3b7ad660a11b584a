"""Adaptive timeouts (``adaptive_timeouts``): the client's resend timer learns from replies, the
view timer from how long requests take, and in the simulator (deterministic, so these are
behaviours of seeds, not timings) a crashed primary goes sooner while a load spike costs no view
change; with the parameter off nothing changes (tests/test_golden.py)."""

from __future__ import annotations

import math
from dataclasses import replace

from bft.core.client import ClientCore
from bft.core.effects import Broadcast
from bft.core.params import Params
from bft.messages import Reply
from bft.sim.faults import Faults, Schedule
from bft.sim.simulator import SIM_PARAMS, Simulation

ADAPTIVE = replace(SIM_PARAMS, adaptive_timeouts=True, request_timeout_ms=500, request_timeout_min_ms=20)


def _complete(client: ClientCore, ts: int, now: int) -> None:
    for r in range(3):
        client.on_reply(Reply(0, ts, client.id, r, b"ok"), now)


def test_the_client_learns_its_resend_timeout_and_backs_off_on_a_resend() -> None:
    client = ClientCore(5, 1, ADAPTIVE, first_timestamp=1)
    assert client.timeout_ms() == 500  # nothing learned yet: the fixed value
    now = 0
    for ts in range(1, 21):
        client.submit(b"op", now)
        _complete(client, ts, now + 10)
        now += 100
    learned = client.timeout_ms()
    assert 20 <= learned < 100
    req = client.submit(b"op", now)
    client.take_outbox()
    assert client.tick(now + learned - 1) == [] and client.tick(now + learned) == [Broadcast(req)]
    assert client.tick(now + 3 * learned - 1) == [] and client.tick(now + 3 * learned) == [Broadcast(req)]
    assert client.timeout_ms() == 2 * learned  # a resend is a suspicion, once per request
    _complete(client, req.timestamp, now + 50 * learned)  # Karn: a resent request is no sample
    assert client.timeout_ms() == 2 * learned
    for _ in range(7):
        client.estimator.suspect()
    assert client.timeout_ms() == 500  # never past the fixed time-out


class Watched(Simulation):
    """Notes when operations complete, and in which view their client then was."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.done_at: list[tuple[int, int]] = []

    def _collect(self, c: int) -> None:
        before = self.completed
        super()._collect(c)
        self.done_at += [(self.now, self.clients[c].view)] * (self.completed - before)


def _run(params: Params, schedule: Schedule, clients: int = 3, seed: int = 1) -> Watched:
    sim = Watched(seed, 1, Faults.named("none"), clients=clients, ops_per_client=120, params=params,
                  tentative=False, schedule=schedule)
    r = sim.run()
    assert r.ok, r.error
    return sim


def test_a_crashed_primary_is_replaced_sooner_with_adaptive_timeouts() -> None:
    fixed = replace(SIM_PARAMS, request_timeout_ms=500, view_timeout_ms=1_000)
    crash = Schedule(crash_at=[(200, 0)])  # with a quarter of the operations still to come
    first_later = {}
    for name, params in (("fixed", fixed), ("adaptive", replace(fixed, adaptive_timeouts=True))):
        sim = _run(params, crash)
        first_later[name] = min((t for t, view in sim.done_at if view >= 1), default=math.inf) - 200
    # Fixed: the backups' 1 s, from a request they already hold (clients send large ones to all;
    # one sent to the primary alone costs the client's 500 ms resend first); adaptive: the view
    # timer's floor of silence (500 ms), after a learned resend (tens of ms) if need be.
    assert first_later["adaptive"] < first_later["fixed"] - 400, first_later


def test_without_faults_adaptive_timeouts_start_no_view_change() -> None:
    for seed in range(3):
        sim = _run(ADAPTIVE, Schedule(), clients=8, seed=seed)
        assert max(r.view for r in sim.replicas) == 0
        assert sum(c.stats["retransmissions"] for c in sim.clients) < sim.completed // 10

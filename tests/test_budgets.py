"""What a peer can make a replica do is a budget (Aardvark's lesson), driven through the core."""

from __future__ import annotations

from dataclasses import replace

from bft.core.effects import Send
from bft.messages import PrePrepare, Request, Status
from bft.service import KVService

from .test_core import NOW, PARAMS, Link, put


def test_a_status_flood_gets_one_answer_per_half_interval() -> None:
    link = Link()
    link.cut = {3}
    for ts in range(1, 4):
        link.request(put(1, ts, b"k%d" % ts, b"v"))
    primary = link.replicas[0]
    behind = Status(0, 0, 0, False, 3)
    answers = [primary.step(behind, NOW + t) for t in range(0, 60)]  # 60 statuses in 60 ms
    assert answers[0] and all(a == [] for a in answers[1:])
    assert primary.dropped["status-too-often"] == 59
    assert primary.step(behind, NOW + PARAMS.status_interval_ms) != []  # a correct pace is answered


def test_a_status_resends_large_requests_by_reference() -> None:
    """The pre-prepare resent to a replica that missed it is the one first sent: a request body
    the client sent to every replica itself travels by its digest, not inline."""
    params = replace(PARAMS, large_request_bytes=64)
    link = Link(params=params)
    link.cut = {3}
    big = Request.make(1, 1, KVService.put(b"k", b"x" * 1000))
    for i in range(3):
        link.post(i, link.replicas[i].step(big, NOW))
    link.run()
    assert link.replicas[0].executed == 1
    [resent] = [e.msg for e in link.replicas[0].step(Status(0, 0, 0, False, 3), NOW) if isinstance(e, Send)
                and isinstance(e.msg, PrePrepare)]
    assert resent.requests == (big.digest,)


def test_a_primary_that_orders_each_request_just_in_time_is_replaced() -> None:
    """Aardvark's slow primary: it orders every request just before the view timeout. The timer
    of a request runs from its arrival, so the second one, which came with the first, times
    out soon after the first executed instead of getting a full timeout of its own."""
    link = Link()
    link.drop = lambda src, dst, msg: isinstance(msg, Request) and dst == 0  # the primary stalls
    first, second = put(1, 1, b"k", b"1"), put(1, 2, b"k", b"2")
    for i in (1, 2, 3):  # the client timed out and sent both to every replica
        for req in (first, second):
            link.post(i, link.replicas[i].step(req, NOW))
    link.run()
    timeout = PARAMS.view_timeout_ms
    link.request(first, to=0, now=NOW + timeout * 9 // 10)  # just in time
    assert all(r.executed == 1 for r in link.replicas)
    for r in link.replicas[1:]:
        r.tick(NOW + timeout + 1)
    assert all(r.view_changing and r.view == 1 for r in link.replicas[1:])


def test_a_flooding_client_gets_its_share_of_a_backup_s_waiting_set_and_no_more() -> None:
    backup = Link().replicas[1]
    for ts in range(1, 101):
        backup.step(put(9, ts, b"k", b"flood"), NOW)
    backup.step(put(1, 1, b"k", b"mine"), NOW)
    held = backup.timer.per_client
    assert held[9] == PARAMS.client_window and held[1] == 1
    assert backup.stats["waiting-requests-refused"] == 100 - PARAMS.client_window

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

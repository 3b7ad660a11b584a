"""What a peer can make a replica do is a budget (Aardvark's lesson), driven through the core."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from bft.core.budgets import queue_bytes_max, request_bytes
from bft.core.effects import Send
from bft.messages import Commit, PrePrepare, Request, Status
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


# -- byte budgets (bft.core.budgets): at the budget accepted, a byte more refused -----------------

SMALL_FRAMES = replace(PARAMS, op_bytes_max=4096, frame_bytes_max=8192, large_request_bytes=1024)
BUDGET = queue_bytes_max(SMALL_FRAMES)  # 16 KiB: twice the one frame the primary may have in flight
SIZE = 4096  # BUDGET / 4: four requests fill it exactly


def sized(client: int, ts: int, size: int, read_only: bool = False) -> Request:
    """A kv request (a get if read-only, else a put) whose encoding is exactly ``size`` bytes."""
    for pad in range(size):
        op = KVService.get(b"k" * pad) if read_only else KVService.put(b"k", b"v" * pad)
        req = Request.make(client, ts, op, read_only)
        if request_bytes(req) == size:
            return req
    raise AssertionError(f"no request of {size} bytes")


def test_the_primary_s_pending_queue_is_bounded_in_bytes() -> None:
    link = Link(params=replace(SMALL_FRAMES, large_request_bytes=SIZE))  # none of them large
    link.cut = {1, 2, 3}  # the first batch waits for the backups; the rest waits in the queue
    primary = link.replicas[0]
    link.request(sized(1, 1, SIZE))
    for client in range(2, 2 + BUDGET // SIZE):
        link.request(sized(client, 1, SIZE))
    assert primary.normal.pending_bytes == BUDGET and not primary.dropped
    link.request(put(9, 1, b"k", b""))  # a few bytes more
    assert primary.dropped == Counter({"pending-queue-bytes-full": 1})
    assert len(primary.normal.pending) == BUDGET // SIZE
    link.cut = set()
    for t in range(1, 40):  # status recovery brings the backups along; batches drain the queue
        link.tick(NOW + t * PARAMS.status_interval_ms)
    assert primary.normal.pending_bytes == 0 and primary.executed == 1 + BUDGET // SIZE


def test_a_backup_keeps_large_request_bodies_within_a_byte_budget() -> None:
    backup = Link(params=SMALL_FRAMES).replicas[1]
    bodies = [sized(c, 1, SIZE) for c in range(1, 2 + BUDGET // SIZE)]
    assert all(backup.large.is_large(b) for b in bodies)
    for body in bodies[:-1]:  # clients send their large requests to every replica
        backup.step(body, NOW)
    assert backup.large.bodies_bytes == BUDGET and not backup.stats["large-requests-evicted"]
    backup.step(bodies[-1], NOW)  # one more: the oldest goes (a batch fetch would recover it)
    assert backup.stats["large-requests-evicted"] == 1
    assert backup.large.bodies_bytes == BUDGET
    assert list(backup.large.bodies) == [b.digest for b in bodies[1:]]


def test_reads_waiting_for_a_tentative_batch_to_commit_are_bounded_in_bytes() -> None:
    link = Link(params=replace(SMALL_FRAMES, tentative=True))
    link.drop = lambda src, dst, msg: isinstance(msg, Commit)  # batches prepare, never commit
    link.request(put(1, 1, b"k", b"v"))
    backup = link.replicas[1]
    assert backup.execution.tentative_seq == 1
    for client in range(2, 2 + BUDGET // SIZE):
        assert backup.step(sized(client, 1, SIZE, read_only=True), NOW) == []  # deferred
    assert backup.execution.deferred_bytes == BUDGET and not backup.dropped
    backup.step(sized(9, 1, 64, read_only=True), NOW)
    assert backup.dropped == Counter({"deferred-reads-full": 1})
    link.drop = lambda src, dst, msg: False
    for t in range(1, 20):  # the commits come by status recovery: the reads are answered
        link.tick(NOW + t * PARAMS.status_interval_ms)
    assert backup.execution.tentative_seq == 0 and backup.execution.deferred_bytes == 0
    assert {r.client for r in link.replies if r.replica == 1} >= set(range(2, 2 + BUDGET // SIZE))


def test_the_requests_a_backup_waits_on_are_bounded_in_bytes() -> None:
    """Clients (faulty or many) sending large requests a backup holds for its view timer: past
    the byte budget it refuses to hold more, and counts each refusal."""
    link = Link(params=SMALL_FRAMES)
    backup = link.replicas[1]
    bodies = [sized(c, 1, SIZE) for c in range(1, 3 + BUDGET // SIZE)]
    for body in bodies:
        backup.step(body, NOW)
    assert backup.timer.waiting_bytes == BUDGET and len(backup.timer.waiting) == BUDGET // SIZE
    assert backup.stats["waiting-requests-refused"] == 2
    backup.check_invariants()
    backup.timer.clear()
    assert backup.timer.waiting_bytes == 0


def test_bodies_a_replica_could_not_check_are_kept_within_the_large_bodies_budget() -> None:
    """A faulty primary may fill every pre-prepare with requests nobody can check: their bodies,
    kept for a batch that f+1 replicas might vouch for, stay within the count and byte budget of
    the large bodies, the oldest making room, and each costs a pass over only the held
    pre-prepares that name it."""
    from bft.core.large import REQUEST_STORE_MAX

    backup = Link().replicas[1]
    budget = backup.large.bodies_bytes_max
    big = [put(2, ts, b"k", b"v" * (budget // 50)) for ts in range(1, 200)]
    backup.offer_unverified(big, NOW)
    assert backup.large.unverified_bytes <= budget
    assert backup.large.unverified_bytes == sum(request_bytes(q) for q in backup.large.unverified.values())
    assert backup.stats["unverified-requests-evicted"] > 0 and big[-1].digest in backup.large.unverified
    small = [put(3, ts, b"k", b"v") for ts in range(1, REQUEST_STORE_MAX + 100)]
    backup.offer_unverified(small, NOW)
    assert len(backup.large.unverified) <= REQUEST_STORE_MAX
    assert small[-1].digest in backup.large.unverified and small[0].digest not in backup.large.unverified

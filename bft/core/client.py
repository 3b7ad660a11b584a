"""The PBFT client as a pure state machine.

A request goes to the primary of the view the client believes in. Without the read-only
optimisation its result is accepted once f+1 distinct replicas sent committed replies with the same
timestamp and result, since at least one of them is correct (OSDI 1999, section 4.1). With it (the
default) every result needs 2f+1 matching replies: a read-only result is checked against only 2f+1
replicas, and unless writes were confirmed by 2f+1 as well a read could miss one its client saw
complete (TOCS 2002, section 5.1.3). Tentative replies always need 2f+1, so that the result survives
a view change (5.1.2). A write names the replicas asked to reply, as many as its result needs
(``replies_from_quorum``; the paper has every replica reply). On time-out the request goes to every
replica, which relay it to the primary and reply, and the time-out doubles (up to a cap) unless
f+1 replicas already agreed on its result. The client learns the view from replies. With
``adaptive_timeouts`` the first time-out is learned from how long replies took (Jacobson and Karels,
``bft.core.estimator``; Karn's rule: only requests never resent count), between
``request_timeout_min_ms`` and the fixed ``request_timeout_ms``; a resend doubles it for the
requests after (within the same bounds), so that a load spike, whose replies Karn's rule would
never sample, soon stops costing resends. Never longer than the fixed time-out, it keeps the
simulator's liveness bounds, which are counted in fixed time-outs.

A read-only request goes to every replica, which execute it at once on their current state. If
their replies disagree or are too slow the operation is sent again as an ordinary ordered request,
under a new timestamp so that late read-only replies can never be counted for it.
"""

from __future__ import annotations

import logging
from collections import Counter

from bft.core.effects import Broadcast, Send
from bft.core.estimator import Estimator
from bft.core.inflight import InFlight, Pending, result_key
from bft.core.params import Params
from bft.messages import Reply, Request

log = logging.getLogger("bft.client")

TIMEOUT_BACKOFF_MAX = 16
# After a resend a client signs everything for this long, doubling while resends keep coming:
# a replica may have made it suspect (then only signed requests are taken), which costs it one
# time-out per period instead of a signature per request in the common case.
SIGN_HOLD_MS_MIN = 5_000
SIGN_HOLD_MS_MAX = 600_000
# A replica that missed this many results in a row is not waited for (until it answers again).
SILENT_AFTER = 3
# A request names the replicas asked to reply in one msgpack integer; a larger cluster asks all.
REPLIERS_N_MAX = 63
# After a time-out or a disagreement, writes ask every replica for this long: with a quorum
# asked, one late reply (a lossy link, a replica behind) stalls a write that the fastest 2f+1 of
# all would have completed; 10% loss on every link halved the throughput (tests/test_netns.py).
ASK_ALL_HOLD_MS = 5_000


class ClientCore:
    def __init__(self, client_id: int, f: int, params: Params, first_timestamp: int = 1) -> None:
        self.id = client_id
        self.f = f
        self.n = 3 * f + 1
        self.params = params
        self.view = 0
        self.next_timestamp = first_timestamp
        self.inflight = InFlight()
        self.outbox: list[Send | Broadcast] = []
        self.completed: list[tuple[int, bytes]] = []  # (timestamp, result), drained by the driver
        self.dropped: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.misses: Counter[int] = Counter()  # replica -> results in a row it did not answer
        self.sign_until_ms = -1
        self.sign_hold_ms = SIGN_HOLD_MS_MIN
        self.ask_all_until_ms = -1
        p = params
        low = min(p.request_timeout_min_ms, p.request_timeout_ms)
        self.estimator = Estimator(low, p.request_timeout_ms) if p.adaptive_timeouts else None

    def timeout_ms(self) -> int:
        fixed = self.params.request_timeout_ms
        return fixed if self.estimator is None else self.estimator.bound(fixed)

    @property
    def primary(self) -> int:
        return self.view % self.n

    def can_submit(self) -> bool:
        # A read-only operation waiting to fall back goes first: a busy caller refills the
        # window the moment it opens, and the fallback, tried at its deadline only, would find
        # it full for as long as the caller has work (simulator seed 241).
        return (
            len(self.inflight) < 2 * self.params.client_window
            and self._timestamp_window_open()
            and not self.inflight.falling_back
        )

    def _timestamp_window_open(self) -> bool:
        # The replicas' exactly-once window is a range of timestamps, not a count: a request
        # lagging behind newer ones must stay inside it or it would be dropped as too old.
        # Read-only requests never enter that table, so they do not pin the window.
        return self.next_timestamp - self._settled() < self.params.client_window

    def _settled(self) -> int:
        """Below this timestamp we hold every ordered result we will ever ask for (or gave up on
        it, ``abandon``): the oldest ordered request in flight, else the next one."""
        oldest = self.inflight.oldest_ordered()
        return self.next_timestamp if oldest is None else oldest

    def submit(self, op: bytes, now_ms: int, read_only: bool = False) -> Request:
        """Start an operation; returns the request (its timestamp identifies the result)."""
        assert self.can_submit(), "client window full"
        repliers = 0 if read_only else self._repliers(self.next_timestamp, now_ms)
        req = Request.make(self.id, self.next_timestamp, op, read_only, repliers, self._settled())
        self.next_timestamp += 1
        timeout = self.timeout_ms()
        pending = Pending(req, now_ms + timeout, timeout, req.timestamp, sent_ms=now_ms)
        self.inflight.track(pending)
        large = self.params.separate_large_requests and len(req.raw) > self.params.large_request_bytes
        if read_only and self.params.read_only_to_quorum:
            targets, pending.unsent = self._read_targets(req.timestamp)
            pending.deadline_ms = now_ms + max(1, timeout // 10)
            self.outbox.extend(Send(i, req) for i in targets)
        else:
            self.outbox.append(Broadcast(req) if read_only or large else Send(self.primary, req))
        return req

    def _read_targets(self, timestamp: int) -> tuple[list[int], tuple[int, ...]]:
        """2f+1 replicas for a read-only request, and the rest. A quorum is all it needs, and
        each replica it goes to executes it and replies, so sending it to every replica costs
        them a quarter more work (and the client a quarter more frames) for nothing in the
        normal case. The one left out takes turns; one that missed the last SILENT_AFTER
        results is left out first. The rest get it if the first do not agree in time."""
        order = self._turns(timestamp)
        return order[: 2 * self.f + 1], tuple(order[2 * self.f + 1 :])

    def _turns(self, start: int) -> list[int]:
        """Every replica, from ``start`` round, those that missed the last SILENT_AFTER results
        last: the order in which a request's replicas are chosen."""
        return sorted(range(self.n), key=lambda i: (self._silent(i), (i - start) % self.n))

    def _repliers(self, timestamp: int, now_ms: int) -> int:
        """The replicas asked to reply to a write (``Request.repliers``): as many as its result
        needs, 2f+1 with the read-only or tentative optimisation, else f+1. They take turns,
        the designated one first; those that missed the last SILENT_AFTER results (silent, or
        answering what the others did not) are left out first. Each reply not asked for cost a
        replica a frame and us one to read: a quarter of the frames of a write at 64 clients.
        All are asked (0) for ASK_ALL_HOLD_MS after a time-out or a disagreement."""
        p = self.params
        if not p.replies_from_quorum or self.n > REPLIERS_N_MAX or now_ms < self.ask_all_until_ms:
            return 0
        needed = 2 * self.f + 1 if p.read_only or p.tentative else self.f + 1
        return sum(1 << i for i in self._turns(self.id + timestamp)[:needed])

    def _send_to_the_rest(self, pending: Pending, now_ms: int) -> None:
        self.stats["read-only-widened"] += 1
        self.outbox.extend(Send(i, pending.request) for i in pending.unsent)
        pending.unsent = ()
        pending.deadline_ms = now_ms + pending.timeout_ms

    def must_sign(self, effect: Send | Broadcast, now_ms: int) -> bool:
        """Whether a request we send goes with our signature as well as the replicas' tags.

        A tag convinces only its replica; a signature convinces anyone, at 50 µs or more per
        request here, more than the rest of the client's work. So a request is signed where
        somebody other than its addressee may have to check it: a write sent again to every
        replica (backups hold it for their view timers and relay it), or anything while we may
        be suspect (``tick``). A large request's first copies need none: each replica keeps the
        body its client sent it to resolve the pre-prepare, and a read-only request is answered
        by each replica on the strength of its own session. Unless ``sign_every_request``."""
        if self.params.sign_every_request or now_ms < self.sign_until_ms:
            return True
        pending = self.inflight.get(effect.msg.timestamp)
        return isinstance(effect, Broadcast) and pending is not None and pending.resent

    def _resent(self, now_ms: int) -> None:
        self.ask_all_until_ms = now_ms + ASK_ALL_HOLD_MS
        # Resends right after the last period: we are likely still suspect, sign for longer.
        if now_ms < self.sign_until_ms + self.sign_hold_ms:
            self.sign_hold_ms = min(2 * self.sign_hold_ms, SIGN_HOLD_MS_MAX)
        else:
            self.sign_hold_ms = SIGN_HOLD_MS_MIN
        self.sign_until_ms = now_ms + self.sign_hold_ms

    def abandon(self, origin: int) -> bool:
        """Forget the operation the caller knows as ``origin`` (it gave up waiting)."""
        ts = self.inflight.of_origin(origin)
        if ts is None:
            return False
        self.inflight.forget(ts)
        return True

    def _fall_back(self, pending: Pending, now_ms: int) -> None:
        """Re-issue a read-only operation as an ordered one (new timestamp, same caller id)."""
        if not self._timestamp_window_open():
            # Goes as soon as an ordered request completes (``on_reply``).
            self.inflight.falling_back[pending.request.timestamp] = pending
            pending.deadline_ms = now_ms + self.params.request_timeout_ms
            return
        self.inflight.forget(pending.request.timestamp)
        repliers = self._repliers(self.next_timestamp, now_ms)
        req = Request.make(self.id, self.next_timestamp, pending.request.op, False, repliers, self._settled())
        self.next_timestamp += 1
        timeout = self.timeout_ms()
        self.inflight.track(Pending(req, now_ms + timeout, timeout, pending.origin, sent_ms=now_ms))
        self.stats["read-only-fallbacks"] += 1
        self.outbox.append(Send(self.primary, req))

    def _awaited(self, pending: Pending) -> set[int]:
        """Replicas that have not answered this request and are worth waiting for: not those
        that missed the last ``SILENT_AFTER`` results (a crashed one soon is not)."""
        return {i for i in range(self.n) if i not in pending.replies and not self._silent(i)}

    def _silent(self, replica: int) -> bool:
        return self.misses[replica] >= SILENT_AFTER

    def _shortly(self, pending: Pending, now_ms: int) -> None:
        """Give the replies still due a tenth of the request timeout, no more."""
        pending.deadline_ms = min(pending.deadline_ms, now_ms + self.params.request_timeout_ms // 10)

    def on_reply(self, reply: Reply, now_ms: int) -> None:
        pending = self.inflight.get(reply.timestamp)
        if reply.client != self.id or pending is None:
            self.dropped["unexpected-reply"] += 1
            return
        if not 0 <= reply.replica < self.n:
            self.dropped["unknown-replica"] += 1
            return
        key = result_key(reply)  # a digest of a large result: once per reply, not per reply seen
        pending.replies[reply.replica] = reply
        pending.keys[reply.replica] = key
        matching = [pending.replies[i] for i, k in pending.keys.items() if k == key]
        # f+1 committed replies include a correct replica's; tentative results need 2f+1 so
        # they survive a view change (TOCS 2002, 5.1.2). With the read-only optimisation on,
        # every result needs 2f+1 (5.1.3): otherwise a read by 2f+1 replicas, f of them lying
        # and f+1 not yet past our write, could miss a write we saw complete.
        request = pending.request
        if len(matching) < 2 * self.f + 1 and (
            request.read_only or self.params.read_only or sum(not r.tentative for r in matching) < self.f + 1
        ):
            self._not_yet(pending, now_ms, len(matching))
            return
        full = next((r.result for r in matching if not r.digest_only), None)
        if full is None:
            # Agreed on a digest; the full result comes from the designated replica. One that has
            # been answering is most likely a moment behind the others: wait a little for it, as
            # a resend makes every replica send its full result. One that missed the last
            # SILENT_AFTER results is most likely down: resend to all at once (a retransmission
            # is answered in full) rather than wait.
            designated = request.designated(self.n)
            if not request.read_only and not pending.resent_for_full:
                pending.awaits_full = True
                if self._silent(designated):
                    self._resend_for_full(pending)
                    return
            self._shortly(pending, now_ms)
            return
        # f+1 replicas vouch for this view or a later one; a single liar cannot push us ahead.
        views = sorted((r.view for r in matching), reverse=True)
        self.view = max(self.view, views[self.f])
        self.inflight.forget(reply.timestamp)
        if self.estimator is not None and not pending.resent and not pending.request.read_only:
            self.estimator.observe(now_ms - pending.sent_ms)
        # A miss: no reply, or not the result agreed on. Replicas not asked are not judged.
        agreed = {r.replica for r in matching}
        for i in range(self.n):
            if i in agreed:
                self.misses.pop(i, None)
            elif pending.resent or pending.request.asks(i):
                self.misses[i] += 1
        self.completed.append((pending.origin, full))
        if self._timestamp_window_open():
            for ts in sorted(self.inflight.falling_back):  # oldest first, as they were issued
                self._fall_back(self.inflight.falling_back[ts], now_ms)

    def _not_yet(self, pending: Pending, now_ms: int, agreeing: int) -> None:
        """A reply came and no result has enough matching replies yet; ``agreeing`` match it."""
        request = pending.request
        if request.read_only:
            if agreeing == len(pending.replies) and max(self.misses.values(), default=0) < SILENT_AFTER:
                return  # all agree so far and none is given up on: a quorum can still form
            # Fall back to the ordered path once no quorum can form among the replies we
            # have and those live replicas may still send. A liar or a replica that is
            # behind among the first 2f+1 does not cost the ordered path when the others
            # can still agree: their replies come at once; a crashed one is not waited for.
            best = self._agreeing(pending)
            awaited = self._awaited(pending)
            if best + len(awaited) < 2 * self.f + 1:
                self._fall_back(pending, now_ms)
            elif pending.unsent and best + len(awaited - set(pending.unsent)) < 2 * self.f + 1:
                self._send_to_the_rest(pending, now_ms)
            elif len(pending.replies) >= 2 * self.f + 1:
                self._shortly(pending, now_ms)
        elif (
            not pending.resent
            and len(pending.replies) >= (request.repliers.bit_count() or self.n)  # the cheap test first
            and all(i in pending.replies for i in range(self.n) if request.asks(i))
        ):
            # Every replica we asked answered and they disagree (a liar among them, or one
            # behind): ask all now rather than at the time-out.
            self.ask_all_until_ms = now_ms + ASK_ALL_HOLD_MS
            self._resend_at_once(pending, now_ms, "resent-for-disagreement")

    @staticmethod
    def _agreeing(pending: Pending) -> int:
        """The most replies for it that carry one result."""
        return max(Counter(pending.keys.values()).values(), default=0)

    def _resend_at_once(self, pending: Pending, now_ms: int, why: str) -> None:
        """To every replica, with no back-off: replicas answered, the cluster is not slow."""
        self.stats[why] += 1
        pending.resent = True
        pending.deadline_ms = now_ms + pending.timeout_ms
        self.outbox.append(Broadcast(pending.request))

    def _resend_for_full(self, pending: Pending) -> None:
        pending.resent_for_full = pending.resent = True
        self.stats["resent-for-full-result"] += 1
        self.outbox.append(Broadcast(pending.request))

    def tick(self, now_ms: int) -> list[Send | Broadcast]:
        late = [p for p in self.inflight.values() if now_ms >= p.deadline_ms]
        if any(not p.unsent for p in late):
            self._resent(now_ms)  # (a read sent to the rest of the replicas is not a resend)
        for pending in late:
            if pending.unsent:  # a read not yet sent to every replica
                self._send_to_the_rest(pending, now_ms)
            elif pending.request.read_only:
                self._fall_back(pending, now_ms)
            elif pending.awaits_full and not pending.resent_for_full:
                # Not a sign of a slow cluster (a quorum answered): no backoff, no suspicion.
                pending.deadline_ms = now_ms + pending.timeout_ms
                self._resend_for_full(pending)
            elif self._agreeing(pending) >= self.f + 1:
                # Executed (f+1 agree, one of them correct), but a reply we need was lost or
                # contradicted: each resend is answered from the replicas' caches. A back-off
                # here let one liar and a lossy link stall a client (seed 127 of "all").
                self._resend_at_once(pending, now_ms, "resent-for-lost-replies")
            else:
                pending.timeout_ms = min(
                    pending.timeout_ms * 2, self.params.request_timeout_ms * TIMEOUT_BACKOFF_MAX
                )
                pending.deadline_ms = now_ms + pending.timeout_ms
                if self.estimator is not None and not pending.resent:
                    self.estimator.suspect()
                pending.resent = True
                self.stats["retransmissions"] += 1
                log.debug("client %d resends %d to all", self.id, pending.request.timestamp)
                self.outbox.append(Broadcast(pending.request))
        return self.take_outbox()

    def take_outbox(self) -> list[Send | Broadcast]:
        out, self.outbox = self.outbox, []
        return out

    def take_completed(self) -> list[tuple[int, bytes]]:
        done, self.completed = self.completed, []
        return done

"""Liveness with bounds: how long a correct client may wait, during faults and after them.

- While the faults last, in a run whose only faults are Byzantine replicas and the network's
  loss, duplication, delays and replays (no partition, twin split, crash or restart), no client
  with a request in flight goes ``gap_bound_ms`` without completing one.
- After the faults heal, each request completes within ``heal_bound_ms`` of the later of its
  submission and the heal.
"""

from __future__ import annotations

from bft.core.client import TIMEOUT_BACKOFF_MAX
from bft.core.params import Params
from bft.core.viewtimer import VIEW_BACKOFF_MAX
from bft.sim.checker import Violation


def gap_bound_ms(params: Params, f: int, faulty_client: bool = False) -> int:
    """f faulty primaries in a row cost f view changes, and one more is allowed for a view
    change that lost its messages; each waits twice as long as the one before (the view
    timer's back-off), and the first starts once the request reached the backups: by the
    client's first resend (after request_timeout_ms) or, that one lost, its second (twice that
    later). A "big MAC" client costs one view change more, once (bft.sim.attackers)."""
    views = f + 1 + faulty_client
    return params.view_timeout_ms * (2**views - 1) + 3 * params.request_timeout_ms


def heal_bound_ms(params: Params, f: int, attempt: int) -> int:
    """A request still waiting when the faults heal is resent within the client's longest
    back-off; then the same f + 1 view changes, but starting from the back-off the correct
    replicas had reached (``attempt``: view changes in a row without progress)."""
    views = sum(params.view_timeout_ms << min(attempt + k, VIEW_BACKOFF_MAX) for k in range(f + 1))
    return params.request_timeout_ms * TIMEOUT_BACKOFF_MAX + views


class Progress:
    def __init__(self, clients: int, fault_phase_ms: int, gap_ms: int | None) -> None:
        self.fault_phase_ms = fault_phase_ms
        self.gap_ms = gap_ms  # None: the run's faults may stop progress for a while (partitions, ...)
        self.heal_ms: int | None = None  # set at the heal, from the replicas' back-off then
        self.submitted: dict[tuple[int, int], int] = {}
        self.last_done = [0] * clients  # when each client last completed a request (or started)
        self.longest_gap_ms = 0
        self.longest_heal_ms = 0
        self.latencies_ms: list[int] = []  # submission to completion, every request

    def submit(self, client: int, ts: int, now: int) -> None:
        self.submitted[(client, ts)] = now

    def complete(self, client: int, ts: int, now: int) -> None:
        at = self.submitted.pop((client, ts))
        self.latencies_ms.append(now - at)
        if now >= self.fault_phase_ms:
            self.longest_heal_ms = max(self.longest_heal_ms, now - max(at, self.fault_phase_ms))
        else:
            self.longest_gap_ms = max(self.longest_gap_ms, now - self.last_done[client])
        self.last_done[client] = now

    def check(self, now: int) -> None:
        if self.heal_ms is not None:
            for (c, ts), at in self.submitted.items():
                waited = now - max(at, self.fault_phase_ms)
                if waited > self.heal_ms:
                    raise Violation(
                        f"liveness: client {c} request {ts} still waits {waited} ms after the faults "
                        f"healed (bound {self.heal_ms} ms)"
                    )
            return
        if self.gap_ms is None:
            return
        busy = {c for c, _ in self.submitted}
        for c in sorted(busy):
            if now - self.last_done[c] > self.gap_ms:
                raise Violation(
                    f"liveness: client {c} completed nothing for {now - self.last_done[c]} ms while only "
                    f"Byzantine replicas and the network misbehaved (bound {self.gap_ms} ms)"
                )

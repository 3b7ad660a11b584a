"""Request tags a restarted replica cannot check, in the simulator.

With ``sign_every_request = false`` clients tag requests with their sessions' keys only; a
replica that restarts has lost those keys, so the requests its clients tagged before it came back
(in flight, or in the slots it catches up on) are unverifiable there. The simulator authenticates
nothing, so this module plays the runtime's part (``bft.runtime.wire``): such a request in a
pre-prepare is held by its digest and its body offered as unverified
(``Replica.offer_unverified``); a batch that carries one is dropped, its bodies offered. The
core must then resolve them from the votes of f+1 replicas, and keep up without state transfer.
"""

from __future__ import annotations

from msgspec.structs import replace

from bft.messages import Batch, Message, PrePrepare, Request


class LostKeys:
    def __init__(self) -> None:
        self.stale: dict[int, dict[int, int]] = {}  # replica -> client -> first timestamp it can check

    def forget(self, replica: int, next_timestamps: dict[int, int]) -> None:
        """``replica`` restarted: what each client tagged until now it cannot check."""
        self.stale[replica] = next_timestamps

    def admit(self, replica: int, msg: Message) -> tuple[Message | None, list[Request]]:
        """What ``replica``'s runtime hands its core in place of ``msg`` (None: nothing), and the
        bodies it offers as unverified."""
        below = self.stale.get(replica)
        if below is None or not isinstance(msg, PrePrepare | Batch):
            return msg, []
        lost = [q for q in msg.requests if isinstance(q, Request) and q.timestamp < below.get(q.client, 0)]
        if not lost:
            return msg, []
        if isinstance(msg, Batch):
            return None, [q for q in msg.requests if isinstance(q, Request)]
        refs = tuple(q.digest if q in lost else q for q in msg.requests)
        return replace(msg, requests=refs), lost

"""What a replica holds for its clients and peers is bounded in bytes, not only in count.

A count alone bounds nothing when each item may be as large as ``op_bytes_max``: 16,384 pending
requests of 8 MiB are 128 GiB. So every queue or store of requests a peer or client can fill has
a byte budget too, derived from the parameters, and what does not fit is refused or evicted and
counted (Aardvark, Clement et al., NSDI 2009: every demand is a budget). A correct workload stays
far inside them: the budgets exist for the faulty one.
"""

from __future__ import annotations

from bft.core.params import Params
from bft.messages import Request

# Q-set entries a replica keeps per sequence number (the most recent views): bounds the size of
# its VIEW-CHANGE, and so what a decoder accepts in one (bft.runtime.wire.limits_of).
QSET_ENTRIES_MAX = 4


def request_bytes(req: Request) -> int:
    """What holding a request costs: its body and its client's authenticator."""
    return len(req.raw) + len(req.auth)


def queue_bytes_max(p: Params) -> int:
    """The bytes of requests one queue may hold: the primary's pending requests, the bodies of
    large requests at a backup, the read-only requests waiting for a commit. Twice what the
    batches the primary may have in flight carry (a frame each): enough that the next batches
    are ready while those execute; what comes beyond waits at its client, which resends."""
    return 2 * p.inflight_max * p.frame_bytes_max

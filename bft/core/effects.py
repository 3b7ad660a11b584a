"""What a core asks its driver to do: typed effects instead of (destination, message) pairs.

``step`` and ``tick`` return a list of these in the order they arose; the order matters (the
simulator draws its faults per message in that order, and the golden transcripts pin it). One
router per driver turns them into I/O: the runtime's node, the client library, the simulator
and the core tests all read the same effects.
"""

from __future__ import annotations

from bft.core.promises import Record
from bft.core.state import Snapshot
from bft.messages import Immutable, Message, PrePrepare, Reply


class Send(Immutable):
    """One message to one replica."""

    to: int
    msg: Message


class Broadcast(Immutable):
    """One message to every replica but the sender (from a client: to every replica)."""

    msg: Message


class ReplyTo(Immutable):
    """A reply to a client, on the connection that client's requests come from."""

    client: int
    reply: Reply


class Persist(Immutable):
    """A stable checkpoint to keep on disk: its snapshot and the 2f+1 (or, after a state
    transfer, f+1) checkpoint messages that certify its digest. A restarted replica resumes
    from it (``Replica.restore``) and catches up from there."""

    seq: int
    snapshot: Snapshot
    proof: tuple[tuple[int, bytes], ...]  # (replica, digest) of the certifying checkpoints


class Promise(Immutable):
    """A record for the replica's promise log (``bft.core.promises``). The driver writes it
    before any message that follows it in the effects leaves: "persist, then send"."""

    record: Record


class Executed(Immutable):
    """A committed batch was executed (a tentative one only once it commits): what checkers
    compare across replicas, and what a driver may count."""

    batch: PrePrepare


Effect = Send | Broadcast | ReplyTo | Persist | Promise | Executed

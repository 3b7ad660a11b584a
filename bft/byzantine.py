"""Byzantine replicas: each behaviour rewrites what an honest core sends.

One catalogue for the simulator (``bft.sim.simulator``) and for real replica processes
(``bft replica --byzantine BEHAVIOUR``, ``bft.runtime.node.Node``'s ``rewrite`` hook), so the lies
a seed explores are the lies an integration test or a demonstration tells over TCP.

The liar holds its real keys and runs the unmodified core; what leaves it is rewritten on the way
out, deterministically, so its lies are consistent: the same message always becomes the same lie.
In a replica process the rewriting happens before sealing, so every lie carries the liar's own
valid MAC or signature and only the protocol can catch it (in the simulator nothing is
authenticated). The simulator's checker does not hold a liar to anything; the correct replicas
and clients must stay safe and live beside it.

Each behaviour is a pure function from one message to the messages sent in its place; its
docstring's first line is what ``bft replica --help`` says of it. A few (``DELAYING``) also
hold some messages back (``held_ms``), which only a replica process does.
"""

from __future__ import annotations

from collections.abc import Callable

from msgspec.structs import replace

from bft.core.effects import Broadcast, Effect, ReplyTo, Send
from bft.core.params import Params
from bft.messages import Checkpoint, Message, Partition, PrePrepare, Reply, State, Status, ViewChange, digest

Rewrite = Callable[[Message], list[Message]]


def _lying_replies(msg: Message) -> list[Message]:
    """Replies with a wrong result (or a wrong digest of one)."""
    if isinstance(msg, Reply):
        lie = digest(msg.result) if msg.digest_only else b"lie:" + msg.result
        return [replace(msg, result=lie)]
    return [msg]


def _wrong_checkpoints(msg: Message) -> list[Message]:
    """Every CHECKPOINT votes for a wrong state digest."""
    if isinstance(msg, Checkpoint):
        return [replace(msg, digest=digest(b"wrong" + msg.digest))]
    return [msg]


def _hiding_view_changes(msg: Message) -> list[Message]:
    """VIEW-CHANGEs hide its certificates: nothing prepared or pre-prepared."""
    if isinstance(msg, ViewChange):
        return [replace(msg, prepared=(), preprepared=(), raw=b"", signature=b"")]
    return [msg]


def _claiming_view_changes(msg: Message) -> list[Message]:
    """VIEW-CHANGEs claim a batch it never saw prepared, just after its checkpoint."""
    if isinstance(msg, ViewChange) and msg.view > 0:
        seq, fake = msg.stable + 1, digest(b"never prepared %d" % msg.view)
        prepared = sorted([*(p for p in msg.prepared if p[0] != seq), (seq, fake, msg.view - 1)])
        preprepared = sorted([*(q for q in msg.preprepared if q[0] != seq), (seq, ((fake, msg.view - 1),))])
        return [replace(msg, prepared=tuple(prepared), preprepared=tuple(preprepared), raw=b"", signature=b"")]
    return [msg]


def _lying_state(msg: Message) -> list[Message]:
    """State transfer from it gets a corrupt manifest and corrupt partitions."""
    if isinstance(msg, Partition):
        return [replace(msg, data=msg.data + b"lie")]
    if isinstance(msg, State):
        return [replace(msg, manifest=msg.manifest[:-1] + bytes([msg.manifest[-1] ^ 1]))]
    return [msg]


def _status_flood(msg: Message) -> list[Message]:
    """Every STATUS goes out eight times, asking peers to resend again and again."""
    return [msg] * 8 if isinstance(msg, Status) else [msg]


BEHAVIOURS: dict[str, Rewrite] = {
    "lying-replies": _lying_replies,
    "wrong-checkpoints": _wrong_checkpoints,
    "hiding-view-changes": _hiding_view_changes,
    "claiming-view-changes": _claiming_view_changes,
    "lying-state": _lying_state,
    "status-flood": _status_flood,
}


# Behaviours that send what an honest replica sends, some of it late. A delay is not a rewrite:
# the node holds what ``held_ms`` names on its event loop's clock. They are kept apart from
# BEHAVIOURS, from which the simulator draws its liars: a new name there would move every
# seed's draw (and the golden transcripts that pin them).
Hold = Callable[[Message, Params], int]


def _slow_primary(msg: Message) -> list[Message]:
    """As the primary, holds each PRE-PREPARE for 0.9 of the view timeout (Aardvark's slow primary)."""
    return [msg]


def _slow_primary_hold(msg: Message, params: Params) -> int:
    # Just within the view timer of the requests it carries: only the slow-primary monitor
    # (bft.core.monitor) can tell this primary from a correct one.
    return params.view_timeout_ms * 9 // 10 if isinstance(msg, PrePrepare) else 0


DELAYING: dict[str, Rewrite] = {"slow-primary": _slow_primary}
_HOLDS: dict[Rewrite, Hold] = {_slow_primary: _slow_primary_hold}
# Every behaviour a replica process can take (``bft replica --byzantine``).
CATALOGUE: dict[str, Rewrite] = BEHAVIOURS | DELAYING


def held_ms(rewrite: Rewrite, msg: Message, params: Params) -> int:
    """How long a liar with behaviour ``rewrite`` holds ``msg`` before sending it (0: not at all)."""
    hold = _HOLDS.get(rewrite)
    return hold(msg, params) if hold is not None else 0


def describe(name: str) -> str:
    """What behaviour ``name`` does, in one line."""
    doc = CATALOGUE[name].__doc__
    assert doc, f"behaviour {name} says nothing of itself"
    return doc.strip().splitlines()[0]


def lie(rewrite: Rewrite, effect: Effect) -> list[Effect]:
    """What leaves a liar in place of ``effect``: its messages rewritten; what it promises and
    persists stays honest."""
    match effect:
        case Send(to, msg):
            return [Send(to, m) for m in rewrite(msg)]
        case Broadcast(msg):
            return [Broadcast(m) for m in rewrite(msg)]
        case ReplyTo(client, reply):
            return [ReplyTo(client, m) for m in rewrite(reply)]
    return [effect]

"""Byzantine replicas for the simulator: each behaviour rewrites what an honest core sends.

The liar holds its real keys (the simulator does not authenticate) and runs the unmodified core;
what leaves it is rewritten on the way out, deterministically, so its lies are consistent: the
same message always becomes the same lie. The checker does not hold a liar to anything; the
correct replicas and clients must stay safe and live beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from bft.messages import Checkpoint, Message, Partition, Reply, State, Status, ViewChange, digest


def _lying_replies(msg: Message) -> list[Message]:
    if isinstance(msg, Reply):
        lie = digest(msg.result) if msg.digest_only else b"lie:" + msg.result
        return [replace(msg, result=lie)]
    return [msg]


def _wrong_checkpoints(msg: Message) -> list[Message]:
    if isinstance(msg, Checkpoint):
        return [replace(msg, digest=digest(b"wrong" + msg.digest))]
    return [msg]


def _hiding_view_changes(msg: Message) -> list[Message]:
    """Claims it prepared and pre-prepared nothing: hides the certificates it holds."""
    if isinstance(msg, ViewChange):
        return [replace(msg, prepared=(), preprepared=(), raw=b"", signature=b"")]
    return [msg]


def _claiming_view_changes(msg: Message) -> list[Message]:
    """Claims a prepared certificate it does not have, for the slot after its checkpoint."""
    if isinstance(msg, ViewChange) and msg.view > 0:
        seq, fake = msg.stable + 1, digest(b"never prepared %d" % msg.view)
        prepared = sorted([*(p for p in msg.prepared if p[0] != seq), (seq, fake, msg.view - 1)])
        preprepared = sorted([*(q for q in msg.preprepared if q[0] != seq), (seq, ((fake, msg.view - 1),))])
        return [replace(msg, prepared=tuple(prepared), preprepared=tuple(preprepared), raw=b"", signature=b"")]
    return [msg]


def _lying_state(msg: Message) -> list[Message]:
    if isinstance(msg, Partition):
        return [replace(msg, data=msg.data + b"lie")]
    if isinstance(msg, State):
        return [replace(msg, manifest=msg.manifest[:-1] + bytes([msg.manifest[-1] ^ 1]))]
    return [msg]


def _status_flood(msg: Message) -> list[Message]:
    return [msg] * 8 if isinstance(msg, Status) else [msg]


BEHAVIOURS: dict[str, Callable[[Message], list[Message]]] = {
    "lying-replies": _lying_replies,
    "wrong-checkpoints": _wrong_checkpoints,
    "hiding-view-changes": _hiding_view_changes,
    "claiming-view-changes": _claiming_view_changes,
    "lying-state": _lying_state,
    "status-flood": _status_flood,
}

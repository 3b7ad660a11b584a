"""CASD atomic broadcast (Cristian, Aghili, Strong and Dolev, FTCS 1985; Information and
Computation 118, 1995) as a sans-IO state machine: one node's part in the diffusion.

The system is synchronous by assumption: correct clocks differ by at most epsilon (``skew_us``), a
message on a correct link arrives, processed, within delta (``link_us``), at most pi nodes fail
(``faulty``) and the correct nodes' graph keeps a diameter of at most d (``diameter``). A node that
broadcasts at its clock's T sends (T, sender, payload) to its neighbours; a node that accepts a
message relays it once to its neighbours and delivers it at its own clock's T + Delta, messages
with the same delivery time in sender order. Nothing else is exchanged: no acknowledgement, no
agreement round. Three variants, each for a failure model:

- omission (a faulty node or link loses messages): accept what is not late, U < T + Delta, and
  Delta = (pi + d) delta + epsilon: pi faulty relays before the first correct one, d correct hops.
- timing (a faulty node may also be early or late, or its clock wrong): the message counts its
  hops h and is accepted only if T - h epsilon < U <= T + h (delta + epsilon). A correct node that
  accepts at hop h relays in time for every correct neighbour to accept at hop h + 1, so all
  correct nodes accept or none; a message from the future is refused, so the history stays
  bounded. Delta = pi (delta + epsilon) + d delta + epsilon.
- authenticated Byzantine (anything, but no forged signature): each relay adds its Ed25519
  signature, h is the number of distinct valid signatures (the sender's first), the same time
  test; a node accepts up to two different payloads for one (sender, T), relays both, and at
  T + Delta delivers the payload only if it saw exactly one: a sender that equivocated gets
  nothing delivered anywhere. Same Delta.

Times are integers in microseconds on the node's own clock, passed in by the caller; the node
reads no clock, draws nothing at random and does no I/O, so the simulator replays it from a seed.
A message carries the link bound it is held to (``link_us``), signed with it, so every node
computes the same Delta for it: the sender's configured delta, or a learned one, within bounds
every node checks. Learning (``bft.core.estimator``: Jacobson and Karels over how late messages
arrive per hop, backing off when one that was not delivered yet comes too late) happens where
messages arrive, but the bound is the sender's to choose, and clock offsets make what a node sees
of others' messages the mirror of what they see of its own (a node whose clock is behind sees
every message early). So each message also carries its sender's own estimate (``seen_us``), and a
sender holds its messages to the largest estimate it has heard from anyone: how late messages
arrive at the node whose clock is furthest ahead.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass, field, replace

import msgpack

from bft.core.estimator import Estimator
from bft.crypto import REPLICA, Keyring


class Variant(enum.Enum):
    OMISSION = "omission"
    TIMING = "timing"
    BYZANTINE = "byzantine"


VARIANTS = tuple(v.value for v in Variant)
# Distinct payloads one node accepts for one (sender, T): two prove the sender equivocated.
PAYLOADS_MAX = 2


@dataclass(frozen=True, slots=True)
class Bounds:
    """The synchrony a run assumes; Delta follows from it (the paper's formulas, above)."""

    link_us: int  # delta: a correct link's delay, processing included
    skew_us: int  # epsilon: how far two correct clocks may differ
    faulty: int  # pi: faulty nodes
    diameter: int  # d: of the graph of correct nodes, whichever pi failed

    def delta_us(self, variant: Variant, link_us: int | None = None) -> int:
        link = self.link_us if link_us is None else link_us
        if variant is Variant.OMISSION:
            return (self.faulty + self.diameter) * link + self.skew_us
        return self.faulty * (link + self.skew_us) + self.diameter * link + self.skew_us


@dataclass(frozen=True, slots=True)
class Diffuse:
    """A broadcast on its way: what the sender said (T, link bound, payload), how far it came."""

    sender: int
    timestamp_us: int  # T, on the sender's clock
    link_us: int  # the delta this message is held to: it fixes its Delta everywhere
    payload: bytes
    hops: int = 1  # omission and timing variants: links crossed (faulty nodes cannot lie about it)
    seen_us: int = 0  # learning: how late messages arrive at the sender, per hop (its estimate)
    signatures: tuple[tuple[int, bytes], ...] = ()  # Byzantine variant: (signer, signature), sender first

    @property
    def key(self) -> tuple[int, int]:
        return self.sender, self.timestamp_us

    def content(self) -> bytes:
        """What every signature covers."""
        return msgpack.packb((b"casd", self.sender, self.timestamp_us, self.link_us, self.seen_us, self.payload))


def signed(msg: Diffuse, keyring: Keyring) -> Diffuse:
    """``msg`` with the signature of ``keyring``'s owner added (a relay's, or the sender's)."""
    return replace(
        msg, hops=msg.hops + (len(msg.signatures) > 0),
        signatures=(*msg.signatures, (keyring.me[1], keyring.sign_raw(msg.content()))),
    )


@dataclass(frozen=True, slots=True)
class Delivered:
    sender: int
    timestamp_us: int
    payload: bytes | None  # None: the sender equivocated, nothing is delivered for its (sender, T)
    at_us: int  # on the delivering node's clock: T + Delta


@dataclass(slots=True)
class _Entry:
    deliver_us: int
    link_us: int
    payloads: list[bytes] = field(default_factory=list)


class CasdNode:
    """One node. ``broadcast`` and ``receive`` return the messages to send to every neighbour;
    ``tick`` returns what is due for delivery; ``wake_us`` says when to call it next."""

    def __init__(
        self, node: int, variant: Variant, bounds: Bounds, keyring: Keyring | None = None,
        learn: tuple[int, int] | None = None,
    ) -> None:
        assert (keyring is not None) == (variant is Variant.BYZANTINE), "signatures in the Byzantine variant only"
        self.id = node
        self.variant = variant
        self.bounds = bounds
        self.keyring = keyring
        # (floor, ceiling) of the learned link bound; None: always the configured one. Every node
        # refuses a message whose bound is outside them (a faulty sender cannot stall deliveries).
        self.link_range = learn or (bounds.link_us, bounds.link_us)
        self.learner = Estimator(*learn) if learn else None
        self.heard: dict[int, int] = {}  # learning: each other node's latest estimate
        self.accepted: dict[tuple[int, int], _Entry] = {}
        self.due: list[tuple[int, int, int]] = []  # (deliver at, sender, T)
        self.last_timestamp_us = -1
        # What was delivered lately, (sender, T) -> delivery time: a copy of one of these that
        # comes late is a relay's echo, not a sign that the bound is short. Kept for one Delta.
        self.delivered: dict[tuple[int, int], int] = {}
        self.refused: dict[str, int] = {}  # why messages were not accepted, counted

    def seen_us(self) -> int:
        """Our own estimate of the link bound, from what arrives here."""
        return self.bounds.link_us if self.learner is None else self.learner.bound(self.bounds.link_us)

    def link_us(self) -> int:
        """The bound our broadcasts are held to: the largest estimate heard, ours included."""
        return max(self.seen_us(), *self.heard.values(), 0) if self.learner is not None else self.bounds.link_us

    def delta_us(self, link_us: int | None = None) -> int:
        return self.bounds.delta_us(self.variant, link_us)

    def broadcast(self, payload: bytes, now_us: int) -> list[Diffuse]:
        # Distinct timestamps per sender: (sender, T) names a broadcast.
        t = max(now_us, self.last_timestamp_us + 1)
        self.last_timestamp_us = t
        msg = Diffuse(self.id, t, self.link_us(), payload, seen_us=self.seen_us() if self.learner else 0)
        if self.keyring is not None:
            msg = signed(msg, self.keyring)
        self._accept(msg)
        return [msg]

    def receive(self, msg: Diffuse, now_us: int) -> list[Diffuse]:
        why = self._refuse(msg, now_us)
        if why is not None:
            self.refused[why] = self.refused.get(why, 0) + 1
            return []
        if self.learner is not None and msg.sender != self.id:
            self.learner.observe((now_us - msg.timestamp_us) // msg.hops)
            self.heard[msg.sender] = min(max(msg.seen_us, self.link_range[0]), self.link_range[1])
        self._accept(msg)
        if self.keyring is not None:
            return [signed(msg, self.keyring)]
        return [replace(msg, hops=msg.hops + 1)]

    def _refuse(self, msg: Diffuse, now_us: int) -> str | None:
        """Why ``msg`` is not accepted here (None: it is). Cheap tests first, signatures last."""
        entry = self.accepted.get(msg.key)
        if entry is not None and (msg.payload in entry.payloads or len(entry.payloads) >= PAYLOADS_MAX):
            return "duplicate"
        if entry is not None and self.variant is not Variant.BYZANTINE:
            return "duplicate"  # without signatures a second payload proves nothing
        if not self.link_range[0] <= msg.link_us <= self.link_range[1]:
            return "link bound out of range"
        t, skew = msg.timestamp_us, self.bounds.skew_us
        if now_us >= t + self.delta_us(msg.link_us):
            if self.learner is not None and msg.key not in self.delivered:
                self.learner.suspect()  # delivered elsewhere by now, perhaps: our bound was short
            return "late"
        if self.variant is not Variant.OMISSION:
            hops = len(msg.signatures) if self.variant is Variant.BYZANTINE else msg.hops
            if hops < 1:
                return "no hops"
            if now_us <= t - hops * skew:
                return "early"
            if now_us > t + hops * (msg.link_us + skew):
                return "late for its hops"
        if self.keyring is not None and not self._authentic(msg):
            return "bad signatures"
        return None

    def _authentic(self, msg: Diffuse) -> bool:
        assert self.keyring is not None
        signers = [s for s, _ in msg.signatures]
        if not signers or signers[0] != msg.sender or len(set(signers)) != len(signers):
            return False
        content = msg.content()
        return all(self.keyring.verify_raw((REPLICA, s), content, sig) for s, sig in msg.signatures)

    def _accept(self, msg: Diffuse) -> None:
        entry = self.accepted.get(msg.key)
        if entry is None:
            entry = self.accepted[msg.key] = _Entry(msg.timestamp_us + self.delta_us(msg.link_us), msg.link_us)
            heapq.heappush(self.due, (entry.deliver_us, msg.sender, msg.timestamp_us))
        entry.payloads.append(msg.payload)

    def wake_us(self) -> int | None:
        return self.due[0][0] if self.due else None

    def tick(self, now_us: int) -> list[Delivered]:
        out = []
        while self.due and self.due[0][0] <= now_us:
            at, sender, t = heapq.heappop(self.due)
            entry = self.accepted.pop((sender, t))
            payload = entry.payloads[0] if len(entry.payloads) == 1 else None
            out.append(Delivered(sender, t, payload, at))
            if self.learner is not None:
                self.delivered[(sender, t)] = at
        if self.delivered:
            horizon = now_us - self.delta_us(self.link_range[1])
            self.delivered = {k: at for k, at in self.delivered.items() if at >= horizon}
        return out

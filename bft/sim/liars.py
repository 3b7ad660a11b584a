"""Byzantine behaviours that need the simulator: time, the network or what a replica recorded.

``bft.byzantine`` holds the pure rewrites (one message in, the messages sent in its place), which
real replica processes run too. A slow primary needs a clock to hold its PRE-PREPAREs back, a
replayer needs what it saw earlier, twins need the network to decide which instance a message
reaches; so these live here, and the simulator's catalogue is both lists together.
"""

from __future__ import annotations

import random

from bft.byzantine import BEHAVIOURS, lie
from bft.core.effects import Broadcast, Effect, Send
from bft.messages import Message, PrePrepare, Reply

EQUIVOCATING = "equivocating-primary"  # a different PRE-PREPARE for each half of the backups
SILENT = "silent-primary"  # sends no PRE-PREPARE, answers everything else
SLOW = "slow-primary"  # its PRE-PREPAREs leave SLOW_SHARE of a view timeout late
REPLAY = "replay"  # re-sends frames it received or sent earlier in the run
TWINS = "twins"  # two instances under one identity, on opposite sides of a split network

SIM_BEHAVIOURS = (EQUIVOCATING, REPLAY, SILENT, SLOW, TWINS)
# Behaviours that only bite while the replica leads a view.
PRIMARY_BEHAVIOURS = frozenset({EQUIVOCATING, SILENT, SLOW, TWINS})
# The catalogue the sets pinned by golden transcripts draw their one liar from, as it was when
# they were recorded: a behaviour added to bft.byzantine must not change which lie a seed tells.
LEGACY_LIES = (
    "claiming-view-changes",
    "hiding-view-changes",
    "lying-replies",
    "lying-state",
    "status-flood",
    "wrong-checkpoints",
)
CATALOGUE = tuple(sorted(set(BEHAVIOURS) - set(SIM_BEHAVIOURS))) + SIM_BEHAVIOURS

# Just inside a backup's patience: each batch waits nearly a whole timeout, none quite times out.
SLOW_SHARE = 0.9
# Frames a recorder keeps: a uniform sample of all it saw, so a replay may reach back to the start.
RECORDED_MAX = 64
REPLAY_CHANCE_PER_TICK = 0.5  # a replayer re-sends about one frame every other tick
NETWORK_REPLAY_CHANCE_PER_TICK = 0.2


def _silent(msg: Message) -> list[Message]:
    return [] if isinstance(msg, PrePrepare) else [msg]


def _is_pre_prepare(effect: Effect) -> bool:
    return isinstance(effect, Send | Broadcast) and isinstance(effect.msg, PrePrepare)


def misbehave(behaviour: str, effects: list[Effect]) -> tuple[list[Effect], list[Effect]]:
    """What leaves a Byzantine replica now, and what leaves it late (a slow primary's
    PRE-PREPAREs); behaviours the simulator acts out in the network pass effects through."""
    if behaviour in BEHAVIOURS and behaviour not in SIM_BEHAVIOURS:
        return [told for e in effects for told in lie(BEHAVIOURS[behaviour], e)], []
    if behaviour == SILENT:
        return [told for e in effects for told in lie(_silent, e)], []
    if behaviour == SLOW:
        return [e for e in effects if not _is_pre_prepare(e)], [e for e in effects if _is_pre_prepare(e)]
    return effects, []


def equivocation(msg: PrePrepare) -> PrePrepare:
    """The same requests at another time: another digest, for the other half of the backups."""
    return PrePrepare.make(msg.view, msg.seq, msg.timestamp + 1, msg.requests, msg.replica)


class Recorder:
    """Frames seen, as a reservoir sample of the whole run so far (Vitter's algorithm R)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.frames: list[tuple[tuple[str, int], Message]] = []
        self.seen = 0

    def record(self, dst: tuple[str, int], msg: Message) -> None:
        self.seen += 1
        if len(self.frames) < RECORDED_MAX:
            self.frames.append((dst, msg))
        else:
            k = self.rng.randrange(self.seen)
            if k < RECORDED_MAX:
                self.frames[k] = (dst, msg)

    def pick(self, chance: float) -> tuple[tuple[str, int], Message] | None:
        if not self.frames or self.rng.random() >= chance:
            return None
        return self.rng.choice(self.frames)


def replay_destination(rng: random.Random, me: int, n: int, msg: Message) -> tuple[str, int]:
    """Where a replayer sends a frame again: a reply to its client, anything else to another
    replica (its authenticator has a tag for every replica when its sender broadcast it)."""
    if isinstance(msg, Reply):
        return ("client", msg.client)
    return ("replica", rng.choice([j for j in range(n) if j != me]))

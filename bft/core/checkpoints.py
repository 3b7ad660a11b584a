"""Checkpoints, watermarks and garbage collection (OSDI 1999, section 4.3).

Every K sequence numbers a replica captures its state (a partition tree, ``bft.core.state``) and
multicasts CHECKPOINT(seq, digest). 2f+1 matching ones make it stable: the low watermark h moves
there and everything below it is discarded, in every component. f+1 matching ones (a weak
certificate) are enough to fetch that state from someone who has it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bft.core.effects import Broadcast, Persist
from bft.core.promises import Stable
from bft.core.recovery import restore_deferred
from bft.core.state import Snapshot, capture, root_of
from bft.messages import Checkpoint, digest

if TYPE_CHECKING:
    from bft.core.replica import Replica

log = logging.getLogger("bft.replica")


class Checkpoints:
    __slots__ = ("far", "full_capture", "last_capture", "own", "r", "votes")

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        e = replica.execution
        self.own: dict[int, Snapshot] = {0: capture(e.service, e.clients, 0, None)}  # ours, by seq
        self.last_capture = self.own[0]  # what the next capture re-encodes only the changes of
        self.votes: dict[int, dict[int, bytes]] = {}  # seq -> replica -> digest
        self.far: dict[int, tuple[int, bytes]] = {}  # replica -> its latest claim beyond H
        self.full_capture = False  # the next capture hashes every partition (after an audit)

    def capture(self) -> Snapshot:
        e = self.r.execution
        previous = None if self.full_capture else self.last_capture
        self.full_capture = False
        self.last_capture = capture(e.service, e.clients, e.batch_time_ms, previous)
        return self.last_capture

    def audit(self) -> None:
        """Proactive recovery (TOCS 2002, section 4): check our state against what 2f+1 replicas
        certified, from the bytes, not from digests we kept (a compromised replica could have
        changed both). The stable checkpoint's partitions are hashed again; if they no longer
        match its certified root, the differing ones are fetched (a repair, then the batches
        after it run again). The state since then is checked at the next checkpoint, which is
        hashed in full rather than from the digests of partitions that look unchanged."""
        r = self.r
        snap = self.own[r.stable]
        r.stats["state-audits"] += 1
        self.full_capture = True
        digests = tuple(digest(p) for p in snap.parts)
        if root_of(digests) == snap.root:
            return
        log.error("replica %d: its stable checkpoint %d no longer matches its certificate: repairing", r.id, r.stable)
        r.stats["divergences"] += 1
        self.own[r.stable] = Snapshot(root_of(digests), snap.parts, digests)  # what we really hold
        r.transfer.repair(r.stable, snap.root)

    def take(self) -> None:
        r = self.r
        assert r.executed % r.params.checkpoint_interval == 0 and not r.execution.tentative_seq
        snap = self.own[r.executed] = self.capture()
        r.stats["checkpoints"] += 1
        cp = Checkpoint(r.executed, snap.root, r.id)
        r.outbox.append(Broadcast(cp))
        self.on_checkpoint(cp, 0)

    def on_checkpoint(self, cp: Checkpoint, now_ms: int) -> None:
        r = self.r
        if cp.seq <= r.stable:
            return
        if cp.seq % r.params.checkpoint_interval:
            return r.drop("checkpoint-out-of-range", cp)
        if cp.seq > r.stable + r.params.log_window:
            return self._far_checkpoint(cp)
        votes = self.votes.setdefault(cp.seq, {})
        votes.setdefault(cp.replica, cp.digest)
        support = r.quorum.support(votes, cp.digest)
        own = self.own.get(cp.seq)
        if support < r.quorum.strong:
            if support >= r.quorum.weak and own is None and cp.seq > r.executed:
                # A weak certificate is enough to fetch that state (a correct replica has it);
                # with a replica down we may never see 2f+1. The fetch waits a status interval
                # first, so a replica that is merely slow executes instead.
                r.transfer.want(cp.seq, cp.digest)
            return
        if own is not None and own.root == cp.digest:
            self.make_stable(cp.seq)
        elif own is not None:
            # 2f+1 replicas agree on a state we do not have: ours went wrong (a damaged disk,
            # a bug). Repair: fetch the partitions that differ, then execute again what followed.
            log.error("replica %d diverged at checkpoint %d: repairing from the others", r.id, cp.seq)
            r.stats["divergences"] += 1
            r.transfer.repair(cp.seq, cp.digest)
        elif cp.seq > r.executed:
            r.transfer.want(cp.seq, cp.digest)

    def _far_checkpoint(self, cp: Checkpoint) -> None:
        """A checkpoint beyond our window (we restarted, or were cut off): only state transfer
        gets us there. Each replica's latest such claim is kept (so at most n); f+1 matching
        ones include a correct replica, which executed only committed requests."""
        r = self.r
        self.far[cp.replica] = (cp.seq, cp.digest)
        voters = {v for v, c in self.far.items() if c == (cp.seq, cp.digest)}
        target = r.transfer.target
        if len(voters) >= r.quorum.weak and (target is None or target[0] < cp.seq):
            r.transfer.target = (cp.seq, cp.digest)
            self.votes[cp.seq] = dict.fromkeys(voters, cp.digest)

    def certified(self, seq: int) -> bool:
        """We hold checkpoint ``seq`` and 2f+1 replicas vouch for its digest."""
        own = self.own.get(seq)
        votes = self.votes.get(seq, {})
        return own is not None and self.r.quorum.support(votes, own.root) >= self.r.quorum.strong

    def make_stable(self, seq: int) -> None:
        """Checkpoint ``seq`` is certified: move h there and discard everything below it."""
        r = self.r
        assert seq in self.own, "a stable checkpoint is one whose state we hold"
        assert r.stable < seq <= r.executed, "the low watermark only moves forward, to a state we reached"
        r.stable = seq
        for s in [s for s in self.votes if s < seq]:
            del self.votes[s]
        for s in [s for s in self.own if s < seq]:
            del self.own[s]
        for v in [v for v, (s, _) in self.far.items() if s <= seq]:
            del self.far[v]
        r.normal.collect(seq)
        restore_deferred(r)
        r.view_change.collect(seq)
        r.execution.collect(seq)
        r.large.collect()
        r.transfer.collect(seq)
        r.stats["stable-checkpoints"] += 1
        own = self.own[seq]
        proof = tuple(sorted((v, d) for v, d in self.votes.get(seq, {}).items() if d == own.root))
        r.promise(Stable(seq, own.root, proof))
        r.outbox.append(Persist(seq, own, proof))
        r.view_change.announce_withheld()  # a VIEW-CHANGE that waited for the window to move
        r.normal.propose(r.now_ms)  # the window moved: the primary may order what waits

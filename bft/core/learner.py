"""Learning what committed in a view we have left.

A correct replica can be pushed out of the view the others are in: cut off, it timed out and
sent a VIEW-CHANGE alone, and must not speak in the old view again (its VIEW-CHANGE would go
stale). It may still learn: a pre-prepare from that view's primary and 2f+1 matching COMMITs
prove a batch committed, so it executes it and replies, without sending anything in that view.
Without this a correct replica out of the view, beside one liar, leaves clients short of the
2f+1 matching replies they need, for ever (simulator seeds 14, 26 and 28, lying replies).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bft.core.execution import Mode
from bft.core.promises import Learned
from bft.messages import Commit, PrePrepare

if TYPE_CHECKING:
    from bft.core.log import Slot
    from bft.core.replica import Replica


class Learner:
    __slots__ = ("commits", "proposals", "r")

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.proposals: dict[int, PrePrepare] = {}  # seq -> the latest view's pre-prepare for it
        self.commits: dict[tuple[int, int], dict[int, bytes]] = {}  # (view, seq) -> replica -> digest

    def _useful(self, view: int, seq: int) -> bool:
        r = self.r
        return view < r.view and r.executed < seq <= r.stable + r.params.log_window

    def collect(self) -> None:
        r = self.r
        for seq in [s for s in self.proposals if s <= r.executed]:
            del self.proposals[seq]
        for key in [k for k in self.commits if k[1] <= r.executed]:
            del self.commits[key]

    def remember(self, log: dict[int, Slot]) -> None:
        """The view ends for us: keep what its slots hold (the pre-prepares and every commit,
        ours too: nobody resends a replica its own messages) for learning the rest."""
        r = self.r
        for seq, slot in log.items():
            pp = slot.pre_prepare
            if pp is None or not r.executed < seq <= r.stable + r.params.log_window:
                continue
            self.proposals[seq] = pp
            self.commits.setdefault((pp.view, seq), {}).update(slot.commits)

    def on_pre_prepare(self, pp: PrePrepare) -> None:
        r = self.r
        if not self._useful(pp.view, pp.seq) or pp.replica != pp.view % r.n:
            return r.drop("wrong-view", pp)
        known = self.proposals.get(pp.seq)
        if known is None or known.view < pp.view or not known.resolved:
            self.proposals[pp.seq] = pp
            self.execute()

    def on_commit(self, c: Commit) -> None:
        r = self.r
        if not self._useful(c.view, c.seq):
            return r.drop("wrong-view", c)
        votes = self.commits.setdefault((c.view, c.seq), {})
        votes.setdefault(c.replica, c.digest)
        if len(self.commits) > 2 * r.params.log_window:  # one view per slot is all that helps
            del self.commits[min(self.commits)]
        self.execute()

    def execute(self) -> None:
        """Execute what is proven committed, in order (large requests resolved from the bodies
        clients sent us)."""
        r = self.r
        while not r.execution.tentative_seq:
            pp = self.proposals.get(r.executed + 1)
            if pp is None or r.quorum.support(self.commits.get((pp.view, pp.seq), {}), pp.digest) < r.quorum.strong:
                break
            full = pp if pp.resolved else r.large.resolve(pp, vouched=True)  # 2f+1 commits
            if full is None:
                break
            r.stats["learned-batches"] += 1
            r.promise(Learned(full))
            r.execution.execute(full, Mode.COMMITTED)
        self.collect()

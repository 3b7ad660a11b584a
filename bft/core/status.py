"""Status recovery (TOCS 2002, section 5.2): messages may be lost, so every replica tells the
others where it is at a fixed interval, and each answers with what its own messages show the
peer lacks: checkpoints, the NEW-VIEW or VIEW-CHANGE it missed, and the slots of the current view
it has not settled. The answer to one status is bounded, so a peer cannot ask for unbounded work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bft.core.effects import Broadcast, Send
from bft.messages import Checkpoint, Commit, Prepare, Request, Status

if TYPE_CHECKING:
    from bft.core.replica import Replica

# Slots retransmitted in answer to one status message: bounds the work a peer can ask for.
STATUS_SLOTS_MAX = 64
# Our latest checkpoints resent to a peer whose stable checkpoint is older.
STATUS_CHECKPOINTS_MAX = 2
# Request bytes the pre-prepares resent in answer to one status may carry inline.
STATUS_ANSWER_BYTES_MAX = 4 * 1024 * 1024


class StatusRecovery:
    __slots__ = ("answered_ms", "next_status_ms", "r")

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.next_status_ms = 0
        self.answered_ms: dict[int, int] = {}  # replica -> when we last answered its status

    def tick(self, now_ms: int) -> None:
        r = self.r
        if now_ms < self.next_status_ms:
            return
        self.next_status_ms = now_ms + r.params.status_interval_ms
        r.outbox.append(Broadcast(Status(r.view, r.stable, self.settled(), r.view_changing, r.id)))
        r.transfer.tick()
        r.large.fetch_unresolved()
        if r.view_changing and r.is_primary():
            r.view_change.try_new_view()

    def settled(self) -> int:
        """What peers need not resend us: everything up to it. A replica that executed a batch
        before a view change still has to prepare and commit it again when the new view
        re-proposes it, or the others cannot commit it without us."""
        r = self.r
        unsettled = (s for s, slot in r.normal.log.items() if s <= r.executed and not slot.committed)
        return min(min(unsettled, default=r.executed + 1) - 1, r.executed)

    def on_status(self, st: Status, now_ms: int) -> None:
        """Retransmit our own messages that the peer's status shows it lacks."""
        r = self.r
        to = st.replica
        if to == r.id:
            return r.drop("status-from-self", st)
        # A budget, not a count: one answer per peer per half status interval, however fast it
        # sends (a correct replica sends one per interval; a flood costs us nothing more).
        if now_ms - self.answered_ms.get(to, -(1 << 62)) < r.params.status_interval_ms // 2:
            return r.drop("status-too-often", st)
        self.answered_ms[to] = now_ms
        own = r.checkpoints.own
        for seq in sorted(s for s in own if s > st.stable)[-STATUS_CHECKPOINTS_MAX:]:
            r.outbox.append(Send(to, Checkpoint(seq, own[seq].root, r.id)))
        behind = st.view < r.view or (st.view == r.view and st.view_changing)
        new_view = r.view_change.new_view
        if behind and not r.view_changing and r.is_primary() and new_view is not None:
            r.outbox.append(Send(to, new_view))  # it missed our NEW-VIEW
        if r.view_changing and behind:
            # It may have missed our VIEW-CHANGE: to count it (f+1 pull a replica along, 2f+1
            # let the new primary decide) it needs it again.
            vc = r.view_change.own()
            if vc is not None:
                r.outbox.append(Send(to, vc))
        # A peer in our view that lacks slots gets our messages for them; so does one that left
        # our view alone (it cannot speak in it any more, but it learns what commits: Learner).
        ahead = st.view > r.view
        if r.view_changing or not (ahead or (st.view == r.view and not st.view_changing)):
            return
        sent = inline_bytes = 0
        for seq in range(max(st.settled, r.stable) + 1, r.stable + r.params.log_window + 1):
            slot = r.normal.log.get(seq)
            if slot is None or slot.pre_prepare is None:
                continue
            if r.is_primary():
                pp = r.large.by_reference(slot.pre_prepare)  # as first sent: large bodies by digest
                inline_bytes += sum(len(q.raw) for q in pp.requests if isinstance(q, Request))
                if inline_bytes > STATUS_ANSWER_BYTES_MAX and sent:
                    break
                r.outbox.append(Send(to, pp))
            elif r.id in slot.prepares and not ahead:
                r.outbox.append(Send(to, Prepare(r.view, seq, slot.prepares[r.id], r.id)))
            if r.id in slot.commits:
                r.outbox.append(Send(to, Commit(r.view, seq, slot.commits[r.id], r.id)))
            sent += 1
            if sent >= STATUS_SLOTS_MAX:
                break

"""The new-view decision rule of the MAC-compatible view change (Castro & Liskov, TOCS 2002,
section 4.5), as a pure function so the new primary and every backup compute it the same way and
tests can drive it with crafted view-change sets.

A VIEW-CHANGE's P, Q and C are claims, not proofs; the rule tolerates f liars among the senders:

- checkpoint: the highest (n, d) such that 2f+1 messages have h <= n and f+1 messages hold (n, d);
- for each sequence number above it, a batch digest d is chosen if some message has (n, d, v) in P
  and (A1) 2f+1 messages have h < n and, for n, no P entry, one with a lower view, or (v, d) itself,
  and (A2) f+1 messages have d in Q for n with a view >= v; a null batch is chosen if 2f+1 messages
  have h < n and no P entry for n; otherwise the decision waits for more view changes.

A3 (the new primary holds the batch) is the caller's business: the rule only names digests.
"""

from __future__ import annotations

from dataclasses import dataclass

from bft.core.quorum import Quorum
from bft.messages import NULL_DIGEST, ViewChange


@dataclass(frozen=True, slots=True)
class Decision:
    checkpoint: tuple[int, bytes]
    batches: tuple[tuple[int, bytes], ...]  # (seq, batch digest); NULL_DIGEST for a null batch


def decide(vcs: list[ViewChange], f: int, log_window: int) -> Decision | None:
    """Decide from view changes of distinct replicas for one view, or None to wait for more."""
    q = Quorum(f)
    quorum, weak = q.strong, q.weak
    if len({vc.replica for vc in vcs}) != len(vcs) or len(vcs) < quorum:
        return None
    claims = [set(vc.checkpoints) for vc in vcs]
    checkpoint = None
    for n, d in sorted(set().union(*claims), reverse=True):
        if sum(vc.stable <= n for vc in vcs) >= quorum and sum((n, d) in c for c in claims) >= weak:
            checkpoint = (n, d)
            break
    if checkpoint is None:
        return None
    low = checkpoint[0]
    high = low + log_window
    prepared = [{s: (d, v) for s, d, v in vc.prepared} for vc in vcs]
    preprepared = [{s: dict(entries) for s, entries in vc.preprepared} for vc in vcs]
    top = max((s for p in prepared for s in p if low < s <= high), default=low)
    batches = []
    for seq in range(low + 1, top + 1):
        choice = None
        candidates = sorted({p[seq] for p in prepared if seq in p}, key=lambda dv: (-dv[1], dv[0]))
        for d, v in candidates:
            a1 = sum(
                vc.stable < seq
                and (seq not in p or p[seq][1] < v or p[seq] == (d, v))
                for vc, p in zip(vcs, prepared, strict=True)
            )
            a2 = sum(q.get(seq, {}).get(d, -1) >= v for q in preprepared)
            if a1 >= quorum and a2 >= weak:
                choice = d
                break
        if choice is None:
            if sum(vc.stable < seq and seq not in p for vc, p in zip(vcs, prepared, strict=True)) >= quorum:
                choice = NULL_DIGEST
            else:
                return None
        batches.append((seq, choice))
    return Decision(checkpoint, tuple(batches))

"""Proactive recovery's state check, driven through the core (``Replica.audit``): a replica
checks its stable checkpoint against the root 2f+1 replicas certified, from the bytes it holds,
and repairs what differs. The key refresh around it is the runtime's (tests/test_sessions.py)."""

from __future__ import annotations

from dataclasses import replace

import msgpack

from .test_core import NOW, Link, put


def _run_to_checkpoint_8(link: Link) -> None:
    for ts in range(1, 11):
        link.request(put(1, ts, b"k%d" % ts, b"v%d" % ts))
    assert all(r.stable == 8 for r in link.replicas)


def test_an_audit_of_a_sound_state_changes_nothing() -> None:
    link = Link()
    _run_to_checkpoint_8(link)
    r = link.replicas[2]
    before = r.checkpoints.own[8]
    assert r.audit(NOW) == []
    assert r.stats["state-audits"] == 1 and r.stats["divergences"] == 0
    assert r.checkpoints.own[8] is before and r.checkpoints.full_capture
    link.request(put(1, 11, b"k", b"after"))
    assert r.executed == 11 and r.checkpoints.full_capture  # no checkpoint since
    link.request(put(1, 12, b"k", b"again"))
    assert r.executed == 12 and not r.checkpoints.full_capture and r.stats["divergences"] == 0


def test_an_audit_finds_a_stable_checkpoint_whose_bytes_changed_and_repairs_it() -> None:
    """A partition of the stable checkpoint was replaced in memory, its digest left as it was:
    the checkpoint looks fine by its digests, and only hashing the bytes shows it."""
    link = Link()
    _run_to_checkpoint_8(link)
    wrong = link.replicas[3]
    snap = wrong.checkpoints.own[8]
    key = next(k for k in (b"planted-%d" % i for i in range(1000)) if wrong.service._bucket(k) == 0)
    parts = (msgpack.packb([[key, b"by an intruder"]]), *snap.parts[1:])
    wrong.checkpoints.own[8] = replace(snap, parts=parts)
    # The live service shares those bytes: the tampering is in its state too.
    wrong.service.restore(parts[:-1])
    wrong.audit(NOW)
    assert wrong.stats["divergences"] == 1
    link.tick(NOW + 1_000)  # status rounds: the manifest, then the differing partition
    link.tick(NOW + 2_000)
    assert wrong.stats["state-repairs"] == 1 and wrong.executed == 10 and wrong.stable == 8
    assert wrong.service.items() == link.replicas[0].service.items()
    assert wrong.stats["state-transfer-partitions"] <= 1  # at most the tampered one (an empty bucket is local)
    link.request(put(1, 11, b"k", b"v"))
    assert wrong.executed == 11 and wrong.service.items() == link.replicas[0].service.items()

"""State transfer (TOCS 2002, section 6.2): a replica behind a certified checkpoint (restarted,
partitioned, slow) fetches that checkpoint's manifest, checks it against the certified digest,
then fetches only the partitions it lacks, each checked against the manifest, from one voter at a
time, moving to another voter when one lies or goes quiet. Also: resuming from our own disk.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bft.core.effects import Persist, Send
from bft.core.execution import Mode
from bft.core.state import PARTITION_CHUNK_BYTES, Snapshot, Transfer, decode_manifest, rebuild, root_of
from bft.messages import DIGEST_BYTES, FetchPartition, FetchState, Partition, State, digest

if TYPE_CHECKING:
    from bft.core.replica import Replica

log = logging.getLogger("bft.replica")


class CheckpointDamaged(ValueError):
    """The checkpoint in a replica's own data directory cannot be used."""


class StateTransfer:
    __slots__ = ("current", "fetch_from", "r", "repairing", "target")

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.target: tuple[int, bytes] | None = None  # a certified checkpoint we lack
        self.current: Transfer | None = None  # the fetch of its partitions, once we hold its manifest
        self.fetch_from = 0  # rotates over the checkpoint's voters
        self.repairing = False  # the target is a checkpoint we executed past with a wrong state

    def repair(self, seq: int, d: bytes) -> None:
        """Our state at checkpoint ``seq`` differs from the one 2f+1 replicas certified."""
        self.target = (seq, d)
        self.repairing = True

    def want(self, seq: int, d: bytes) -> None:
        """Fetch checkpoint ``seq`` (certified with digest ``d``) unless a later one is wanted."""
        self.target = max(self.target or (0, b""), (seq, d))

    def collect(self, stable: int) -> None:
        if self.target is not None and self.target[0] <= stable:
            self.target = None
            self.repairing = False
        if self.current is not None and self.current.seq <= stable:
            self.current = None

    def tick(self) -> None:
        """Runs every status interval while we lack a certified checkpoint: ask a voter for its
        manifest, or keep fetching partitions (again from another voter if one went quiet)."""
        r = self.r
        if self.target is None:
            return
        seq, d = self.target
        if seq <= r.executed and not self.repairing:
            self.target = None  # we got there by executing (or repaired the stable one)
            if seq > r.stable and r.checkpoints.certified(seq):
                r.checkpoints.make_stable(seq)
            return
        voters = sorted(v for v, vd in r.checkpoints.votes.get(seq, {}).items() if vd == d and v != r.id)
        if not voters:
            return
        self.fetch_from = (self.fetch_from + 1) % len(voters)
        t = self.current
        if t is not None and t.seq == seq:
            self._ask_partitions(t)  # chunks whose source went quiet go to the next voter
            return
        r.stats["state-fetches"] += 1
        r.outbox.append(Send(voters[self.fetch_from], FetchState(seq, r.id)))

    def _ask_partitions(self, t: Transfer) -> None:
        r = self.r
        for index, offset, source in t.to_ask(r.now_ms, 4 * r.params.status_interval_ms):
            r.outbox.append(Send(source, FetchPartition(t.seq, index, offset, r.id)))

    # -- serving others ---------------------------------------------------------------------

    def on_fetch_state(self, fs: FetchState, now_ms: int) -> None:
        r = self.r
        own = r.checkpoints.own.get(fs.seq)
        if own is None:
            return r.drop("no-such-checkpoint", fs)
        r.outbox.append(Send(fs.replica, State(fs.seq, own.manifest(), r.id)))

    def on_fetch_partition(self, fp: FetchPartition, now_ms: int) -> None:
        r = self.r
        own = r.checkpoints.own.get(fp.seq)
        if own is None or fp.index >= len(own.parts) or fp.offset > len(own.parts[fp.index]):
            return r.drop("no-such-partition", fp)
        part = own.parts[fp.index]
        chunk = part[fp.offset : fp.offset + PARTITION_CHUNK_BYTES]
        r.outbox.append(Send(fp.replica, Partition(fp.seq, fp.index, fp.offset, len(part), chunk, r.id)))

    # -- fetching ---------------------------------------------------------------------------

    def on_state(self, st: State, now_ms: int) -> None:
        r = self.r
        target = self.target
        if target is None or st.seq != target[0] or (self.current is not None and self.current.seq == st.seq):
            return r.drop("unrequested-state", st)
        if st.seq <= r.executed and not self.repairing:
            return r.drop("state-already-reached", st)
        digests = decode_manifest(st.manifest, target[1], r.params.frame_bytes_max // DIGEST_BYTES)
        if digests is None:
            # A lying replica cannot mislead us: the certified digest decides; ask another next time.
            return r.drop("state-digest-mismatch", st)
        # Only what differs from our own snapshot at that checkpoint (or from our state now) moves.
        have = r.checkpoints.own.get(st.seq) if self.repairing else None
        voters = sorted(v for v, vd in r.checkpoints.votes.get(st.seq, {}).items() if vd == target[1] and v != r.id)
        sources = [st.replica, *(v for v in voters if v != st.replica)]  # its sender first, then the voters
        self.current = Transfer(st.seq, target[1], digests, have or r.checkpoints.capture(), sources)
        r.stats["state-transfer-partitions"] += len(self.current.queue)
        self._continue()

    def on_partition(self, p: Partition, now_ms: int) -> None:
        r = self.r
        t = self.current
        if t is None or p.seq != t.seq or p.index >= len(t.digests):
            return r.drop("unrequested-partition", p)
        problem = t.offer(p.index, p.offset, p.total, p.data, p.replica)
        if problem:
            r.drop(problem, p)  # a lying voter cannot mislead us: the next one is asked
        self._continue()

    def _continue(self) -> None:
        r = self.r
        t = self.current
        assert t is not None
        if not t.fetched_all:
            self._ask_partitions(t)
            return
        self.current = None
        if self.repairing:
            return self._repair(t.seq, t.snapshot())
        if r.executed >= t.seq:
            return  # we got there by executing while we fetched: our own state is newer
        problem = self._install(t.seq, t.snapshot())
        if problem:
            return r.drop(problem, State(t.seq, b"", t.sources[0]))
        r.stats["state-transfers"] += 1
        log.info("replica %d installed state at checkpoint %d", r.id, t.seq)
        r.checkpoints.make_stable(t.seq)
        r.timer.arm()
        r.execution.execute_ready()

    def _repair(self, seq: int, snap: Snapshot) -> None:
        """Replace our wrong state at checkpoint ``seq`` by the certified one and execute the
        batches after it again, silently (the others answered those clients)."""
        r = self.r
        e = r.execution
        if e.tentative_seq:
            r.execution.rollback_tentative()
        after = [e.executed_batches[s] for s in range(seq + 1, r.executed + 1)]
        for s in [s for s in r.checkpoints.own if s >= seq]:
            del r.checkpoints.own[s]  # taken from the wrong state
        executed, r.executed = r.executed, seq - 1
        problem = self._install(seq, snap)
        if problem:
            r.executed = executed
            return r.drop(problem, State(seq, b"", 0))
        for pp in after:
            e.execute(pp, Mode.REPLAY)
            if r.executed % r.params.checkpoint_interval == 0:
                r.checkpoints.take()
        self.repairing = False
        r.stats["state-repairs"] += 1
        log.info("replica %d repaired its state at checkpoint %d", r.id, seq)
        if r.stable < seq:  # a later checkpoint may have become stable during the replay
            r.checkpoints.make_stable(seq)

    def _install(self, seq: int, snap: Snapshot) -> str | None:
        """Replace our state by the snapshot of checkpoint ``seq``, whose partitions were
        checked against its root; or say why it cannot be used."""
        r = self.r
        e = r.execution
        assert seq > r.executed, "installing an older state than we hold would lose executions"
        try:
            e.service, e.clients, e.batch_time_ms = rebuild(e.service_factory, r.params.client_window, snap.parts)
        except ValueError:
            return "malformed-state"
        r.checkpoints.last_capture = snap
        e.tentative_seq = 0
        e.executed_batches.clear()
        r.executed = seq
        r.checkpoints.own[seq] = snap
        r.normal.next_seq = max(r.normal.next_seq, seq + 1)
        return None

    def restore(self, saved: Persist) -> None:
        """Resume from a checkpoint this replica persisted before it stopped. Our own disk is
        trusted, but every partition must still match the digest it was certified with."""
        r = self.r
        assert r.executed == 0, "restore only a fresh replica"
        snap = saved.snapshot
        if len({v for v, d in saved.proof if d == snap.root}) < r.quorum.weak:
            raise CheckpointDamaged(f"checkpoint {saved.seq} on disk lacks a certificate")
        if len(snap.parts) != len(snap.digests) or root_of(tuple(digest(p) for p in snap.parts)) != snap.root:
            raise CheckpointDamaged(f"checkpoint {saved.seq} on disk is damaged")
        if self._install(saved.seq, snap):
            raise CheckpointDamaged(f"checkpoint {saved.seq} on disk is malformed")
        r.checkpoints.votes[saved.seq] = dict(saved.proof)
        r.stable = saved.seq
        for s in [s for s in r.checkpoints.own if s < saved.seq]:
            del r.checkpoints.own[s]

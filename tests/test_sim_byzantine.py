"""The simulator's newer faults (Twins, slow and silent primaries, replayed frames, late or lost
checkpoint writes, up to f Byzantine replicas at once) and its bounds on how long clients wait;
each check is also shown to fail when a defence is taken away."""

from __future__ import annotations

import random

import pytest

from bft.core.effects import Persist
from bft.core.promises import Committed, Record, Stable
from bft.core.quorum import Quorum
from bft.core.viewtimer import ViewTimer
from bft.sim import attackers
from bft.sim.disk import Disk
from bft.sim.faults import Faults, Schedule, draw
from bft.sim.liars import CATALOGUE, LEGACY_LIES, TWINS
from bft.sim.simulator import Result, Simulation, run_seed

OPS = 30


def _run(
    schedule: Schedule, f: int = 1, faults: str = "byzantine", ops: int = OPS, **kw: object
) -> tuple[Simulation, Result]:
    sim = Simulation(1, f, Faults.named(faults), ops_per_client=ops, schedule=schedule, **kw)
    return sim, sim.run()


# Twins of view 0's primary: side 1 holds the twin's second instance, replicas 2 and 3 (with it a
# quorum) and clients 1 and 2; side 0 the first instance, replica 1 and client 0.
SPLIT = frozenset({("replica", 2), ("replica", 3), ("client", 1), ("client", 2)})


def _twins() -> Schedule:
    return Schedule(byzantine={0: TWINS}, twin_splits=[(0, 1_200, SPLIT)])


class _CountsOnlyFPlusOne(Quorum):
    """A broken replica: it takes f+1 votes for a certificate that needs 2f+1."""

    @property
    def strong(self) -> int:
        return self.f + 1

    @property
    def prepares(self) -> int:
        return self.f


def test_twins_make_the_primary_equivocate_and_the_correct_replicas_stay_safe() -> None:
    sim, r = _run(_twins())
    assert r.ok, r.error
    assert r.completed == 3 * OPS
    assert r.events["slots and views in which twins equivocated"] > 0  # unmodified code, two stories
    # Whether the twin is voted out depends on timing: a quorum (the twin's second instance and
    # replicas 2 and 3) may keep view 0 going, and replica 1, lied to, may change view alone. Either
    # way every correct replica, that one included, must end up having executed the same history.
    correct = sim.replicas[1:]
    assert len({(rep.executed, rep.stable) for rep in correct}) == 1, "the replica lied to caught up"
    assert correct[0].executed > 0


def test_twins_break_replicas_that_take_f_plus_one_votes_for_a_certificate() -> None:
    """Each side of the split certifies its own twin's batch on f+1 votes: the checker sees two
    batches committed in one slot of one view."""
    sim = Simulation(1, 1, Faults.named("byzantine"), ops_per_client=OPS, schedule=_twins())
    for replica in sim.replicas:
        replica.quorum = _CountsOnlyFPlusOne(1)
    r = sim.run()
    assert not r.ok
    assert r.error.startswith("agreement: "), r.error


def test_a_slow_primary_holds_its_pre_prepares_and_clients_still_progress() -> None:
    _, r = _run(Schedule(byzantine={0: "slow-primary"}), faults="liars")
    assert r.ok, r.error
    assert r.events["pre-prepares held back by a slow primary"] > 0
    assert r.gap_bound_ms is not None and 0 < r.longest_gap_ms <= r.gap_bound_ms


def test_a_silent_primary_is_replaced() -> None:
    sim, r = _run(Schedule(byzantine={0: "silent-primary"}), faults="liars")
    assert r.ok, r.error
    assert r.completed == 3 * OPS
    assert all(replica.view > 0 for replica in sim.replicas)
    assert r.gap_bound_ms is not None and r.longest_gap_ms <= r.gap_bound_ms


def test_the_progress_bound_fails_a_run_whose_backups_never_suspect_a_silent_primary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ViewTimer, "tick", lambda self, now_ms: None)
    _, r = _run(Schedule(byzantine={0: "silent-primary"}), faults="liars")
    assert not r.ok
    assert r.error.startswith("liveness: client "), r.error
    assert f"while only Byzantine replicas and the network misbehaved (bound {r.gap_bound_ms} ms)" in r.error


def test_the_heal_bound_fails_a_request_that_waits_too_long_after_the_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ViewTimer, "tick", lambda self, now_ms: None)
    _, r = _run(Schedule(byzantine={0: "silent-primary"}), faults="liars", fault_phase_ms=100)
    assert not r.ok
    assert f"ms after the faults healed (bound {r.heal_bound_ms} ms)" in r.error, r.error
    assert r.sim_time_ms < 100 + 2 * r.heal_bound_ms, "the bound fired, not the run's overall budget"


def test_replayed_frames_reach_the_replicas_and_are_turned_down() -> None:
    _, r0 = _run(Schedule(), faults="liars")
    _, r1 = _run(Schedule(byzantine={3: "replay"}), faults="liars")
    assert r0.ok and r1.ok, (r0.error, r1.error)
    assert r1.events["frames replayed by a replayer"] > 50 and r1.events["frames replayed by the network"] > 0
    assert sum(r1.dropped.values()) > sum(r0.dropped.values())


def _bounce_with_a_slow_disk() -> Schedule:
    """Replica 1's checkpoint writes take up to 1.5 s, and it goes down at 1.4 s: a write in flight
    is lost, and it comes back from an older checkpoint than its promise log's Stable records."""
    return Schedule(bounces=[(1_400, 1_600, 1)], slow_disks={1: 1_500})


def test_a_checkpoint_write_lost_in_a_restart_is_survived() -> None:
    sim, r = _run(_bounce_with_a_slow_disk(), ops=60)
    assert r.ok, r.error
    assert r.events["checkpoint writes lost in a restart"] >= 1 and r.events["late checkpoint writes"] >= 1
    assert sim.replicas[1].executed == sim.replicas[0].executed


def test_without_stable_records_a_lost_checkpoint_write_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defence of tests/test_review_findings.py (Stable records move a restarted replica's
    window back to where it was) taken away: the replay runs past the window of the older
    checkpoint on disk, and the replica's invariants stop the run."""
    promise = Disk.promise

    def forget_stable_records(disk: Disk, record: Record) -> None:
        if not isinstance(record, Stable):
            promise(disk, record)

    monkeypatch.setattr(Disk, "promise", forget_stable_records)
    with pytest.raises(AssertionError, match="executed within the window"):
        _run(_bounce_with_a_slow_disk(), ops=60)


def test_two_byzantine_replicas_at_once_with_f_2() -> None:
    sim, r = _run(Schedule(byzantine={0: "silent-primary", 1: "slow-primary"}), f=2, faults="liars")
    assert r.ok, r.error
    assert r.completed == 3 * OPS
    assert all(replica.view >= 2 for replica in sim.replicas), "both primaries were passed over"
    assert r.gap_bound_ms is not None and r.longest_gap_ms <= r.gap_bound_ms


def test_the_fault_budget_holds_and_the_catalogue_is_drawn() -> None:
    """Over many seeds' schedules: never more than f faulty replicas (Byzantine, equivocating,
    crashed), up to f Byzantine ones at once, and every behaviour of the catalogue drawn."""
    seen: set[str] = set()
    two = 0
    for faults in ("byzantine", "mixed"):
        for seed in range(200):
            s = draw(seed, 2, Faults.named(faults), 4_000, 3, random.Random(seed))
            crashed = {i for _, i in s.crash_at}
            assert len(s.byzantine) + len(crashed) + (s.equivocator is not None) <= 2, (faults, seed, s)
            assert not set(s.byzantine) & ({i for _, _, i in s.bounces} | crashed)
            seen |= set(s.byzantine.values())
            two += len(s.byzantine) == 2
    assert seen == set(CATALOGUE)
    assert two > 50


def test_the_sets_the_golden_transcripts_pin_draw_none_of_the_newer_faults() -> None:
    for faults in ("none", "network", "crash", "all"):
        for seed in range(100):
            s = draw(seed, 1, Faults.named(faults), 4_000, 3, random.Random(seed))
            assert set(s.byzantine.values()) <= set(LEGACY_LIES) and len(s.byzantine) <= 1
            assert not s.twin_splits and not s.slow_disks


NEWER_SETS = [(3, 1, "byzantine", 40), (5, 2, "liars", 30), (9, 1, "mixed", 40)]


@pytest.mark.parametrize(("seed", "f", "faults", "ops"), NEWER_SETS)
def test_a_few_seeds_of_each_newer_set(seed: int, f: int, faults: str, ops: int) -> None:
    r = run_seed(seed, f=f, faults=faults, ops_per_client=ops)
    assert r.ok, f"{r.error} (replay: bft sim --seed {seed} --f {f} --faults {faults} --ops {ops})"
    assert r.completed == 3 * ops


# Seeds that found a bug in the core: a replica restarted from a data directory whose latest
# checkpoint writes were lost (``slow disk``) came back with an older low watermark than the slots
# it had spoken in, and put them back past h + L ("the log stays in the window"). Fixed: those
# slots are set aside until the window gets there (bft.core.recovery.restore_deferred).
LOST_CHECKPOINT_WRITES = [
    (34, 1, "byzantine", 120),
    (105, 1, "byzantine", 120),
    (110, 1, "byzantine", 120),
    (48, 1, "mixed", 120),
    (35, 2, "mixed", 80),
]


@pytest.mark.parametrize(("seed", "f", "faults", "ops"), LOST_CHECKPOINT_WRITES)
def test_seeds_that_restart_from_lost_checkpoint_writes(seed: int, f: int, faults: str, ops: int) -> None:
    result = run_seed(seed, f=f, faults=faults, ops_per_client=ops)
    assert result.ok, result.error


def test_a_slow_disk_lands_one_write_at_a_time_and_a_crash_loses_what_had_not_landed() -> None:
    """As the runtime's background writer: one write in flight, the latest waiting (an older
    waiting one is skipped), the promise log truncated only once a checkpoint is on disk."""
    disk = Disk(random.Random(0), lag_ms_max=100)
    for seq in range(1, 25):
        disk.promise(Committed(seq, b"d" * 32))
    for seq in (8, 16, 24):
        disk.checkpoint(Persist(seq, None, ()), seq)  # no snapshot: the disk never looks inside
    assert disk.saved is None and len(disk.records) == 24, "nothing landed yet: the log is whole"
    assert disk.writing is not None
    disk.advance(disk.writing[1])
    assert disk.saved is not None and disk.saved.seq == 8 and min(r.seq for r in disk.records) == 9
    assert disk.writing is not None and disk.writing[0].seq == 24, "16 was skipped for 24"
    disk.crash()
    assert disk.lost == 1 and disk.saved.seq == 8 and disk.writing is None
    disk.advance(10_000)
    assert disk.saved.seq == 8 and disk.late == 1


def test_bft_sim_byzantine_prints_seeds_faults_and_violations(capsys: pytest.CaptureFixture[str]) -> None:
    from bft.cli import main

    main(["sim", "--seeds", "3", "--byzantine", "--ops", "20"])
    out = capsys.readouterr().out
    assert "3/3 seeds, 0 failed" in out
    assert "all 3 seeds passed (f = 1, faults = byzantine): 0 violations" in out
    injected = out.split("faults injected: ")[1].splitlines()[0]
    assert "slow disk" in injected
    assert "longest a request took after the faults healed: " in out


def _big_mac_run(seed: int, defence: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Simulation, Result]:
    if not defence:  # no replica ever tells the others: each primary proposes its requests anew
        admit = attackers.BigMacClient.admit
        monkeypatch.setattr(attackers.BigMacClient, "admit", lambda self, r, m: (admit(self, r, m)[0], False))
    sim = Simulation(seed, 1, Faults.named("liars"), ops_per_client=OPS, schedule=Schedule(big_mac=True))
    result = sim.run()
    assert "big-mac client" in result.injected
    return sim, result


@pytest.mark.parametrize("seed", range(4))
def test_a_big_mac_client_costs_at_most_a_view_change_or_two(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its requests, good for the replica they are sent to only, stall the one slot a primary
    proposed them in; the view change that follows finds the client suspect everywhere. With the
    defence off, every primary proposes them again: a view change each time, until a request
    outlasts its bound after the heal (the test's teeth)."""
    defended, result = _big_mac_run(seed, True, monkeypatch)
    assert result.ok, result.error
    assert max(r.view for r in defended.replicas) <= 2
    assert defended.acts["clients made suspect"] == 1 and defended.attacker.ts > 20
    undefended, result = _big_mac_run(seed, False, monkeypatch)
    assert not result.ok or max(r.view for r in undefended.replicas) >= 4

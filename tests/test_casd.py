"""CASD atomic broadcast (bft.casd) in the simulator (bft.sim.casd): each variant keeps atomicity,
order and timeliness under its own failure model, over seeds, and breaks them just outside it."""

from __future__ import annotations

import pytest

from bft.casd.protocol import Bounds, CasdNode, Diffuse, Variant, signed
from bft.core.estimator import Estimator
from bft.sim.casd import CasdConfig, keyrings, run_casd

OWN_SEEDS = range(8)


def _violations(cfg: CasdConfig, seeds: range) -> list[str]:
    return [v for seed in seeds for v in run_casd(seed, cfg).violations]


@pytest.mark.parametrize("variant", list(Variant), ids=lambda v: v.value)
@pytest.mark.parametrize("graph", ["complete", "ring:2"])
def test_each_variant_holds_under_its_own_failure_model(variant: Variant, graph: str) -> None:
    """pi = 2 of 7 nodes faulty in the variant's own way (bft.sim.casd.draw_faulty), links and
    clocks inside the assumed bounds: every correct node delivers every message it shares with
    the others at T + Delta, and every correct sender's at all of them."""
    cfg = CasdConfig(variant=variant, graph=graph)
    for seed in OWN_SEEDS:
        r = run_casd(seed, cfg)
        assert r.ok, r.violations[:3]
        # Each correct broadcast delivered by each correct node.
        assert r.link_us_used and len(r.latencies_us) == (cfg.n - cfg.faulty) * len(r.link_us_used)
        # Real latency: Delta, give or take the clocks' offsets (within epsilon).
        assert all(abs(lat - r.delta_us) <= cfg.skew_us for lat in r.latencies_us)


@pytest.mark.parametrize(
    ("variant", "faults", "kind"),
    [
        # A late clock or a held-back relay: one correct node accepts just before T + Delta, the
        # rest too late. The timing variant's per-hop window refuses it everywhere.
        (Variant.OMISSION, "timing", "atomicity"),
        # An equivocating sender: without signatures each node keeps the first payload it saw.
        (Variant.TIMING, "byzantine", "order"),
    ],
)
def test_a_variant_breaks_under_the_next_failure_model(variant: Variant, faults: str, kind: str) -> None:
    found = _violations(CasdConfig(variant=variant, faults=faults), range(12))
    assert any(f": {kind}: " in v for v in found), found[:5]
    assert all(v.startswith("seed ") for v in found)


def test_the_byzantine_variant_breaks_when_more_than_pi_fail_or_links_are_slower_than_assumed() -> None:
    # Three colluding signers where pi = 2: a message accepted at hop 3, too late to spread.
    over = _violations(CasdConfig(variant=Variant.BYZANTINE, faulty_actual=3, broadcasts=25), range(8))
    # No faulty node, but heavy-tailed delays against a link bound of 0.5 ms (Delta = 2.5 ms).
    slow = _violations(CasdConfig(variant=Variant.BYZANTINE, faulty=0, delays="pareto", link_us=500,
                                  broadcasts=25), range(2))
    assert over and slow
    assert any(": atomicity: " in v or ": timeliness: " in v for v in slow)


def test_a_run_replays_from_its_seed() -> None:
    cfg = CasdConfig(variant=Variant.TIMING, faults="byzantine", delays="lognormal", skews="laplace")
    a, b = run_casd(5, cfg), run_casd(5, cfg)
    assert (a.violations, a.latencies_us, a.messages) == (b.violations, b.latencies_us, b.messages)
    assert run_casd(6, cfg).latencies_us != a.latencies_us


# -- the protocol alone -------------------------------------------------------------------------

BOUNDS = Bounds(link_us=1_000, skew_us=100, faulty=1, diameter=1)


def test_the_time_tests_refuse_early_and_late_messages() -> None:
    node = CasdNode(1, Variant.TIMING, BOUNDS)
    assert node.delta_us() == 1 * 1_100 + 1_000 + 100
    msg = Diffuse(0, 10_000, 1_000, b"x")
    assert node.receive(msg, 10_000 - 100) == []  # T - h epsilon: from the future
    assert node.receive(msg, 10_000 + 1_101) == []  # past T + h (delta + epsilon) at one hop
    assert node.refused == {"early": 1, "late for its hops": 1}
    relayed = node.receive(msg, 10_500)
    assert [m.hops for m in relayed] == [2]
    assert node.receive(msg, 10_600) == [] and node.refused["duplicate"] == 1
    assert node.tick(10_000 + node.delta_us() - 1) == []
    [d] = node.tick(10_000 + node.delta_us())
    assert (d.sender, d.payload, d.at_us) == (0, b"x", 10_000 + node.delta_us())
    # Delivered and forgotten: a copy now is late, not a second delivery.
    assert node.receive(msg, 10_000 + node.delta_us()) == [] and node.refused["late"] == 1


def test_the_byzantine_variant_delivers_nothing_for_an_equivocating_sender() -> None:
    rings = keyrings(4)
    node = CasdNode(1, Variant.BYZANTINE, BOUNDS, rings[1])
    a = signed(Diffuse(0, 10_000, 1_000, b"a"), rings[0])
    b = signed(Diffuse(0, 10_000, 1_000, b"b"), rings[0])
    forged = Diffuse(0, 10_000, 1_000, b"c", signatures=((0, a.signatures[0][1]),))
    assert node.receive(forged, 10_100) == [] and node.refused == {"bad signatures": 1}
    [relay] = node.receive(a, 10_100)
    assert [s for s, _ in relay.signatures] == [0, 1]
    assert node.receive(b, 10_200)  # the second payload is relayed too: others must see it
    [d] = node.tick(10_000 + node.delta_us())
    assert d.payload is None


def test_a_learned_link_bound_rides_in_the_message_and_backs_off_after_a_late_one() -> None:
    node = CasdNode(1, Variant.OMISSION, BOUNDS, learn=(200, 5_000))
    for k in range(20):
        node.receive(Diffuse(0, 10_000 * k, 300, b"%d" % k), 10_000 * k + 300)
    learned = node.link_us()
    assert 200 <= learned < 1_000
    [msg] = node.broadcast(b"mine", 300_000)
    assert msg.link_us == learned
    assert node.receive(Diffuse(2, 300_000, 300, b"late"), 300_000 + node.delta_us(300)) == []
    assert node.link_us() >= 2 * learned  # suspicion doubles it
    assert node.receive(Diffuse(2, 400_000, 50_000, b"stall"), 400_100) == []  # bound out of range


def test_the_estimator_tracks_mean_and_deviation_within_its_bounds() -> None:
    e = Estimator(floor=10, ceiling=1_000)
    assert e.bound(default=500) == 500
    for x in [100, 110, 90, 105, 95] * 10:
        e.observe(x)
    assert 100 < e.bound(500) < 160
    e.suspect()
    assert e.bound(500) >= 200
    for _ in range(10):
        e.observe(10_000)
    assert e.bound(500) == 1_000


# -- bft sim --compare casd,pbft -------------------------------------------------------------------


def test_compare_prints_the_table_and_writes_the_chart(tmp_path, capsys) -> None:
    from bft.cli import main

    chart = tmp_path / "chart.png"
    main(["sim", "--compare", "casd,pbft", "--seeds", "1", "--delays", "bounded", "--skews", "bounded",
          "--out", str(chart)])
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:5]): line for line in out.splitlines() if line.startswith(("casd", "pbft"))}
    pbft = next(line for key, line in rows.items() if key[0] == "pbft")
    assert " 0.0% " in pbft  # safe whatever the delays
    tight = rows[("casd", "omission", "bounded", "bounded", "0.25")]
    loose = rows[("casd", "omission", "bounded", "bounded", "8")]
    assert " 0.0% " not in tight and " 0.0% " in loose  # Delta below the real delays breaks atomicity
    # In bounds (delta 2 ms), no agreement round: faster than PBFT, with a third of its messages.
    casd = rows[("casd", "omission", "bounded", "bounded", "2")].split()
    assert " 0.0% " in " ".join(casd) and float(casd[7]) < float(pbft.split()[5])
    assert float(casd[10]) < float(pbft.split()[8]) / 2
    assert "best fixed" in out and chart.stat().st_size > 10_000


def test_compare_refuses_an_unknown_protocol_or_distribution(capsys) -> None:
    from bft.cli import main

    for argv in (["--compare", "casd,raft"], ["--compare", "casd", "--delays", "gauss"]):
        with pytest.raises(SystemExit):
            main(["sim", *argv])
        assert "unknown" in capsys.readouterr().err

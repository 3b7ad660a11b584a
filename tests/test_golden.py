"""Golden transcripts: the digest of every message a fixed set of simulator runs sends.

The replica core was split by concern without changing what it does; these digests, recorded
before the split, prove it for every seed below, and catch any later change of behaviour that
was not meant. When a change is meant to alter the protocol's messages, regenerate them on
purpose (``BFT_REWRITE_GOLDEN=1 pytest tests/test_golden.py``) and say why in the commit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bft.sim.simulator import run_seed

GOLDEN = Path(__file__).parent / "golden" / "transcripts.txt"

# (seed, f, faults, operations per client, tentative): every fault kind, both f, both modes.
RUNS = [
    (1, 1, "none", 30, False),
    (2, 1, "network", 60, False),
    (5, 1, "crash", 60, True),
    (3, 1, "all", 40, False),
    (44, 1, "all", 120, False),
    (80, 1, "all", 150, True),
    (1023, 1, "all", 150, False),
    (64, 1, "all", 120, True),
    (68, 1, "all", 120, False),
    (105, 1, "all", 120, True),
    (4, 2, "all", 150, True),
    (29, 2, "all", 80, False),
    (36, 2, "all", 80, True),
]


def _key(run: tuple) -> str:
    return " ".join(str(x) for x in run)


def _recorded() -> dict[str, str]:
    lines = GOLDEN.read_text().splitlines() if GOLDEN.exists() else []
    return dict(line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))


def _transcript(run: tuple) -> str:
    seed, f, faults, ops, tentative = run
    result = run_seed(seed, f=f, faults=faults, ops_per_client=ops, tentative=tentative)
    assert result.ok, result.error
    return result.transcript


if os.environ.get("BFT_REWRITE_GOLDEN"):

    def test_rewrite_golden_transcripts() -> None:
        lines = ["# seed f faults ops tentative transcript-digest (tests/test_golden.py)"]
        lines += [f"{_key(run)} {_transcript(run)}" for run in RUNS]
        GOLDEN.write_text("\n".join(lines) + "\n")
        assert _recorded().keys() == {_key(run) for run in RUNS}

else:

    @pytest.mark.parametrize("run", RUNS, ids=_key)
    def test_transcript_is_unchanged(run: tuple) -> None:
        recorded = _recorded()
        assert _key(run) in recorded, f"no golden transcript for {_key(run)}: regenerate on purpose"
        assert _transcript(run) == recorded[_key(run)], (
            f"simulator run {_key(run)} sent different messages than recorded; if that is meant, "
            "regenerate with BFT_REWRITE_GOLDEN=1 and say why in the commit"
        )

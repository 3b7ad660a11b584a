"""What a hostile frame costs a replica before it is refused, and what a valid one costs to decode.

A Byzantine replica holds real keys, so its frames authenticate. Two of them, each about 14 MB
(under the default ``frame_bytes_max`` of 16 MiB), built to be as expensive as the codec lets:

- a VIEW-CHANGE (signed by replica 3) whose C, P and Q sets hold tens of thousands of entries,
  where the protocol allows at most L/K + 2, L and L (with at most 4 digests per Q entry);
- a NEW-VIEW (replica 1, the primary of view 1) carrying 1,024 copies of one signed view
  change, where the protocol allows at most n = 4.

Each goes through ``Wire.open`` of replica 0 with the cluster's own limits (``limits_of``): the
time to its refusal (best of several runs) and the peak of what Python allocates meanwhile
(tracemalloc, on a separate run). For contrast, the same figures for valid messages of the
largest size the protocol allows, and for the small messages of the normal case.

Prints a Markdown table and writes ``bench/results/decode_bounds.{md,json}``. A measurement, not
a test. To compare with an older checkout, measure it there with ``--json-only`` and pass those
figures with ``--before``.

    python -m bench.decode_bounds [--runs 5] [--json-only] [--before FIGURES.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from datetime import date
from pathlib import Path

from msgspec.structs import replace

from bench.micro import RESULTS, machine
from bft import config as cfg
from bft.core.params import DEFAULT_PARAMS
from bft.crypto import CLIENT, REPLICA
from bft.messages import NULL_DIGEST, Commit, NewView, Prepare, PrePrepare, Request, ViewChange, encode_payload
from bft.runtime.wire import Wire, limits_of

HOSTILE_BYTES = 14 * 1024 * 1024


def _digest(i: int) -> bytes:
    return i.to_bytes(32, "big")


def hostile_view_change() -> ViewChange:
    """As many C, P and Q entries as fit in HOSTILE_BYTES, each list as long as the codec's old
    array limit (65,536), Q entries with as many digests as it takes."""
    count = 1 << 16
    ckpts = tuple((128 * i, _digest(i)) for i in range(count))
    prepared = tuple((i + 1, _digest(i), 0) for i in range(count))
    base = len(encode_payload(ViewChange(1, 0, ckpts, prepared, (), 3)))
    per_entry = (HOSTILE_BYTES - base) // count
    digests = max(1, round((per_entry - 8) / 36))  # an entry: seq and list headers, 36 bytes a digest
    qset = tuple((i + 1, tuple((_digest(i + j), 0) for j in range(digests))) for i in range(count))
    return ViewChange(1, 0, ckpts, prepared, qset, 3)


def largest_valid_view_change(replica: int) -> ViewChange:
    """A view change at the protocol's bounds: C of L/K + 2, P and Q of L, 4 digests per Q entry."""
    p = DEFAULT_PARAMS
    L, K = p.log_window, p.checkpoint_interval
    ckpts = tuple((K * i, _digest(i)) for i in range(L // K + 2))
    prepared = tuple((s, _digest(s), 0) for s in range(1, L + 1))
    qset = tuple((s, tuple((_digest(s + j), 0) for j in range(4))) for s in range(1, L + 1))
    return ViewChange(1, 0, ckpts, prepared, qset, replica)


def signed(wire: Wire, vc: ViewChange) -> ViewChange:
    raw = encode_payload(vc)
    return replace(vc, raw=raw, signature=wire.keyring.sign(ViewChange.TYPE, raw))


def measure(opener: Callable[[], Wire], data: bytes, runs: int) -> dict:
    """Best time of ``runs`` opens of ``data``, the peak allocated during one, and the outcome."""
    best = float("inf")
    outcome = ""
    for _ in range(runs):
        wire = opener()
        start = time.perf_counter()
        msg = wire.open(data)
        best = min(best, time.perf_counter() - start)
        outcome = type(msg).__name__ if msg is not None else ",".join(sorted(wire.dropped))
        del msg
    wire = opener()
    tracemalloc.start()
    tracemalloc.reset_peak()
    msg = wire.open(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del msg
    return {"frame_bytes": len(data), "ms": round(best * 1000, 4), "peak_mb": round(peak / 1e6, 3), "outcome": outcome}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json-only", action="store_true", help="print the figures as JSON, write nothing")
    ap.add_argument("--before", type=Path, help="figures (--json-only) of an older checkout, to compare")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = cfg.load(cfg.keygen(tmp, f=1, clients=1, base_port=17500))
        params = cluster.params
        limits = limits_of(params)
        wires = {i: Wire(cluster.keyring(REPLICA, i), limits, Counter()) for i in range(cluster.n)}
        client = Wire(cluster.keyring(CLIENT, 0), limits, Counter())

        def target() -> Wire:
            return Wire(cluster.keyring(REPLICA, 0), limits, Counter())

        copy = signed(wires[2], ViewChange(1, 0, (), tuple((s, _digest(s), 0) for s in range(1, 257)),
                                           tuple((s, ((_digest(s), 0),)) for s in range(1, 100)), 2))
        copies = max(1, HOSTILE_BYTES // (len(copy.raw) + 80))
        copies = 1024 if copies >= 1024 else copies
        valid_vcs = tuple(signed(wires[i], largest_valid_view_change(i)) for i in range(cluster.n))
        decisions = tuple((s, NULL_DIGEST) for s in range(1, params.log_window + 1))
        ring = cluster.keyring(CLIENT, 0)
        reqs = tuple(Request.make(0, t, b"x" * 64) for t in range(1, params.batch_size_max + 1))
        reqs = tuple(r.with_auth(ring.authenticator(Request.TYPE, r.raw)) for r in reqs)
        cases = {
            "hostile VIEW-CHANGE (C, P, Q of 65,536 entries)": wires[3].seal(hostile_view_change()),
            f"hostile NEW-VIEW ({copies:,} copies of one view change)": wires[1].seal(
                NewView(1, (copy,) * copies, (0, bytes(32)), (), 1)
            ),
            "largest valid VIEW-CHANGE": wires[3].seal(valid_vcs[3]),
            "largest valid NEW-VIEW (n view changes, L decisions)": wires[1].seal(
                NewView(1, valid_vcs, (0, bytes(32)), decisions, 1)
            ),
            f"PRE-PREPARE of {len(reqs)} requests of 64 bytes": wires[1].seal(PrePrepare.make(0, 1, 1, reqs, 1)),
            "REQUEST of 64 bytes": client.seal(reqs[0]),
            "PREPARE": wires[2].seal(Prepare(0, 1, bytes(32), 2)),
            "COMMIT": wires[2].seal(Commit(0, 1, bytes(32), 2)),
        }
        figures = {
            name: measure(target, data, args.runs if len(data) > 1 << 20 else 2000) for name, data in cases.items()
        }
    if args.json_only:
        print(json.dumps(figures))
        return
    before = json.loads(args.before.read_text()) if args.before else {}
    results = {"machine": machine(), "date": date.today().isoformat(), "cases": figures, "before": before}
    md = table(results)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_bounds.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "decode_bounds.md").write_text(f"Machine: {results['machine']}, {results['date']}\n\n{md}\n")
    print(f"\nwrote {RESULTS / 'decode_bounds'}.md and .json")


def table(results: dict) -> str:
    before = results["before"]
    head = "| frame | bytes | time to open | peak allocated | outcome |"
    if before:
        head = "| frame | bytes | time before | time after | peak before | peak after | outcome before | after |"
    numbers = 5 if before else 3  # bytes, times and peaks are right-aligned
    lines = [head, "|---|" + "---:|" * numbers + "---|" * (head.count("|") - 2 - numbers)]
    for name, f in results["cases"].items():
        b = before.get(name)
        if b:
            lines.append(
                f"| {name} | {f['frame_bytes']:,} | {b['ms']:.4g} ms | {f['ms']:.4g} ms | {b['peak_mb']:.3g} MB "
                f"| {f['peak_mb']:.3g} MB | {b['outcome']} | {f['outcome']} |"
            )
        else:
            lines.append(
                f"| {name} | {f['frame_bytes']:,} | {f['ms']:.4g} ms | {f['peak_mb']:.3g} MB | {f['outcome']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

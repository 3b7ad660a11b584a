"""How long a replica whose state went wrong takes to notice and to repair itself.

Four replica cores (f = 1, the kv service, the default checkpoint interval of 128) exchange their
messages in this process over a link without loss, so what is measured is the protocol and the
CPU it spends, not a network. ``--state-mb`` of values are written first; then one replica's state
is changed behind the protocol's back, in one of two ways:

- ``live``: a value in its service is changed (a bug, or memory corruption). Nothing notices until
  the next checkpoint, whose digest differs from the one the other three certify; it then fetches
  the partitions that differ and executes again the batches after that checkpoint.
- ``audit``: a partition of its stable checkpoint is replaced, with the digests kept beside it
  left as they were, so that the checkpoint still looks sound by its digests. The next proactive
  recovery's audit (``Replica.audit``) hashes the bytes again and repairs it.

For each it prints the batches and the protocol time (status intervals, the clock the replicas
are given) from the damage to the repair, the partitions and bytes fetched, and the wall time the
four cores spent from the damage to the repair. Writes bench/results/divergence.{md,json,png}.
A measurement, not a test.

    python -m bench.divergence [--state-mb 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import msgpack

from bench.micro import RESULTS, machine, pyplot, save, write_results
from bft.core.effects import Broadcast, Send
from bft.core.params import DEFAULT_PARAMS
from bft.core.replica import Replica
from bft.messages import Partition, Request
from bft.service import KVService

VALUE_BYTES = 64 * 1024
VICTIM = 3
NOW_MS = 1_000_000


class Cluster:
    """Four cores and a lossless link; time moves only when ``tick`` says so."""

    def __init__(self) -> None:
        self.params = DEFAULT_PARAMS
        self.replicas = [Replica(i, 1, self.params, KVService) for i in range(4)]
        self.now_ms = NOW_MS
        self.ts = 0
        self.partition_bytes = 0

    def _post(self, src: int, effects: list) -> None:
        queue = [(src, e) for e in effects]
        while queue:
            src, effect = queue.pop(0)
            if isinstance(effect, Broadcast):
                targets = [j for j in range(4) if j != src]
            elif isinstance(effect, Send):
                targets = [effect.to]
            else:
                continue
            for j in targets:
                if isinstance(effect.msg, Partition) and j == VICTIM:
                    self.partition_bytes += len(effect.msg.data)
                queue += [(j, e) for e in self.replicas[j].step(effect.msg, self.now_ms)]

    def put(self, key: bytes, value: bytes) -> None:
        self.ts += 1
        self._post(0, self.replicas[0].step(Request.make(1, self.ts, KVService.put(key, value)), self.now_ms))

    def tick(self) -> None:
        self.now_ms += self.params.status_interval_ms
        for i, r in enumerate(self.replicas):
            self._post(i, r.tick(self.now_ms))

    def settle(self) -> None:
        """Tick until every replica executed all there is and the last checkpoint is stable."""
        while True:
            before = [(r.executed, r.stable) for r in self.replicas]
            self.tick()
            if [(r.executed, r.stable) for r in self.replicas] == before:
                return


def scenario(kind: str, state_mb: int) -> dict:
    c = Cluster()
    for i in range(state_mb * 2**20 // VALUE_BYTES):
        c.put(b"fill-%d" % i, bytes([i % 251]) * VALUE_BYTES)
    c.settle()
    interval = c.params.checkpoint_interval
    while c.replicas[0].executed % interval:  # start right after a checkpoint: the worst case for "live"
        c.put(b"tick", b"x")
        c.settle()
    victim = c.replicas[VICTIM]
    assert all(r.executed == c.replicas[0].executed for r in c.replicas)
    started_ms, started_batches, wall = c.now_ms, victim.executed, time.perf_counter()
    key = b"fill-0"
    bucket = victim.service._bucket(key)
    if kind == "live":
        victim.service._buckets[bucket][key] = b"by a bug"
        victim.service._dirty.add(bucket)
    else:
        snap = victim.checkpoints.own[victim.stable]
        items = dict(msgpack.unpackb(snap.parts[bucket]))
        items[key] = b"by an intruder"
        parts = list(snap.parts)
        parts[bucket] = msgpack.packb(sorted(items.items()))
        victim.checkpoints.own[victim.stable] = type(snap)(snap.root, tuple(parts), snap.digests)
        victim.service.restore(parts[:-1])
        c._post(VICTIM, victim.audit(c.now_ms))
    detected_batches = None
    detected_ms = started_ms
    while victim.stats["state-repairs"] == 0:
        if not victim.stats["divergences"]:
            c.put(b"tick", b"x")  # a batch: a sequential client's next put
            if victim.stats["divergences"]:
                detected_batches = max(r.executed for r in c.replicas) - started_batches
                detected_ms = c.now_ms
        c.tick()
        assert c.now_ms - started_ms < 600_000, "no repair within 10 protocol minutes"
    elapsed = time.perf_counter() - wall
    assert victim.service.items() == c.replicas[0].service.items()
    return {
        "kind": kind,
        "state_mb": state_mb,
        "batches_until_detected": detected_batches or 0,
        "status_intervals_until_repaired": (c.now_ms - detected_ms) // c.params.status_interval_ms,
        "protocol_ms_after_detection": c.now_ms - detected_ms,
        "partitions_fetched": victim.stats["state-transfer-partitions"],
        "bytes_fetched": c.partition_bytes,
        "wall_s": elapsed,
    }


def table(results: dict) -> str:
    lines = [
        "| damage | state | batches until detected | status intervals from detection to repair | fetched "
        "| wall time, damage to repair |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["scenarios"]:
        lines.append(
            f"| {r['kind']} | {r['state_mb']} MB | {r['batches_until_detected']} | "
            f"{r['status_intervals_until_repaired']} ({r['protocol_ms_after_detection']} ms) | "
            f"{r['partitions_fetched']} partitions, {r['bytes_fetched'] / 1024:.0f} KiB | {r['wall_s']:.2f} s |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    rs = results["scenarios"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([r["kind"] for r in rs], [r["wall_s"] for r in rs], color=["tab:red", "tab:blue"])
    ax.set_ylabel("wall time from damage to repair (s)")
    ax.set_title(f"divergence repair, {rs[0]['state_mb']} MB kv state", fontsize=9)
    return save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-mb", type=int, default=20, help="kv state written before the damage")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "scenarios": []}
    for kind in ("live", "audit"):
        print(f"{kind}: filling {args.state_mb} MB, damaging replica {VICTIM} ...", flush=True)
        r = scenario(kind, args.state_mb)
        results["scenarios"].append(r)
        print(f"  detected after {r['batches_until_detected']} batches, repaired "
              f"{r['status_intervals_until_repaired']} status intervals later, "
              f"{r['partitions_fetched']} partitions fetched, {r['wall_s']:.2f} s of CPU", flush=True)
    md = table(results)
    print()
    print(md)
    write_results(args.out, "divergence", results, md, plot)


if __name__ == "__main__":
    main()

"""The checkpoint store's files: one pack per checkpoint, bounded space, the old format read."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import msgpack
import pytest

from bft.core.effects import Persist
from bft.core.state import Snapshot
from bft.runtime.storage import COMPACT_SLACK, CheckpointStore, StorageError

PROOF = ((0, b"c" * 32), (1, b"d" * 32), (2, b"e" * 32))


def checkpoint(seq: int, parts: list[bytes]) -> Persist:
    digests = tuple(hashlib.sha256(p).digest() for p in parts)
    return Persist(seq, Snapshot(hashlib.sha256(b"".join(digests)).digest(), tuple(parts), digests), PROOF)


def packs(d: Path) -> dict[str, int]:
    return {e.name: e.stat().st_size for e in os.scandir(d / "packs")}


def test_each_checkpoint_adds_one_file_with_only_the_partitions_that_changed(tmp_path: Path) -> None:
    rng = random.Random(1)
    parts = [rng.randbytes(100) for _ in range(500)]
    store = CheckpointStore(tmp_path)
    store._write(checkpoint(128, parts))
    assert packs(tmp_path) == {"1": 50_000}
    for k in range(1, 6):
        for i in rng.sample(range(500), 3):
            parts[i] = rng.randbytes(100)
        store._write(checkpoint(128 * (k + 1), parts))
        assert len(packs(tmp_path)) <= k + 1 and packs(tmp_path)[str(k + 1)] == 300
    loaded = CheckpointStore(tmp_path).load()
    assert loaded is not None and loaded.seq == 768 and loaded.proof == PROOF
    assert list(loaded.snapshot.parts) == parts and loaded.snapshot == checkpoint(768, parts).snapshot


def test_the_packs_stay_within_twice_the_state_as_partitions_keep_changing(tmp_path: Path) -> None:
    rng = random.Random(2)
    parts = [rng.randbytes(4096) for _ in range(1000)]  # 4 MB
    store = CheckpointStore(tmp_path)
    most = 0
    for seq in range(1, 60):
        for i in rng.sample(range(1000), 100):
            parts[i] = rng.randbytes(4096)
        store._write(checkpoint(seq, parts))
        most = max(most, sum(packs(tmp_path).values()))
    live = sum(map(len, parts))
    assert 2 * live < most <= 2 * live + COMPACT_SLACK + 100 * 4096  # compacted, more than once
    loaded = CheckpointStore(tmp_path).load()
    assert loaded is not None and list(loaded.snapshot.parts) == parts


def test_a_pack_left_by_a_crash_before_its_manifest_is_ignored_and_removed(tmp_path: Path) -> None:
    parts = [b"a" * 10, b"b" * 10]
    CheckpointStore(tmp_path)._write(checkpoint(1, parts))
    (tmp_path / "packs" / "2").write_bytes(b"half a pack")  # written, no manifest names it
    (tmp_path / "packs" / "3.tmp").write_bytes(b"torn")
    store = CheckpointStore(tmp_path)
    assert store.load() is not None
    store._write(checkpoint(2, [b"a" * 10, b"c" * 10]))
    assert packs(tmp_path) == {"1": 20, "3": 10}  # a new name: a manifest may have named 2
    loaded = CheckpointStore(tmp_path).load()
    assert loaded is not None and loaded.snapshot.parts == (b"a" * 10, b"c" * 10)


def test_after_a_damaged_checkpoint_the_next_one_is_written_whole(tmp_path: Path) -> None:
    parts = [b"x" * 50, b"y" * 50]
    CheckpointStore(tmp_path)._write(checkpoint(1, parts))
    store = CheckpointStore(tmp_path)
    store.distrust()
    store._write(checkpoint(2, parts))  # nothing changed, and still a whole pack
    assert packs(tmp_path) == {"2": 100}


def test_a_short_or_missing_pack_is_reported_by_the_manifest_s_path(tmp_path: Path) -> None:
    CheckpointStore(tmp_path)._write(checkpoint(1, [b"x" * 50]))
    os.truncate(tmp_path / "packs" / "1", 20)
    with pytest.raises(StorageError, match="shorter than the manifest says"):
        CheckpointStore(tmp_path).load()
    (tmp_path / "packs" / "1").unlink()
    with pytest.raises(StorageError, match=r"checkpoint\.msgpack: file .*packs/1 is missing"):
        CheckpointStore(tmp_path).load()


def test_the_old_format_with_a_file_per_partition_is_read_and_converted(tmp_path: Path) -> None:
    parts = [b"old" * 10, b"data" * 10]
    cp = checkpoint(7, parts)
    (tmp_path / "parts").mkdir()
    for d, part in zip(cp.snapshot.digests, parts, strict=True):
        (tmp_path / "parts" / d.hex()).write_bytes(part)
    manifest = (2, 7, cp.snapshot.root, list(cp.snapshot.digests), list(PROOF))
    (tmp_path / "checkpoint.msgpack").write_bytes(msgpack.packb(manifest))
    store = CheckpointStore(tmp_path)
    loaded = store.load()
    assert loaded == cp
    store._write(checkpoint(8, parts))
    assert not (tmp_path / "parts").exists() and packs(tmp_path) == {"1": 70}
    assert CheckpointStore(tmp_path).load() == checkpoint(8, parts)

"""A damaged data directory, with real replica processes: a replica killed, one of its files
damaged, and started again. It starts (it never refuses), reports the damaged file by its path
in /status "data_problems" and sets it aside as NAME.damaged, recovers from what is intact and
from the others (state transfer), and ends where the others are: same executed number, same
stable checkpoint and digest; the cluster serves and reads correct values throughout, and a
second restart finds the directory sound again. A torn tail of the promise log is what a kill
leaves, not damage: nothing is reported for it. The victims vary, the primary among them."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from bft.service import KVService
from client import Client

from .conftest import LocalCluster

pytestmark = pytest.mark.integration

KEYS = 24
# The promise log's layout (bft/runtime/promiselog.py): a header of magic, version, salt and
# crc; then records, each a head (length, seq, head crc, crc) and its payload.
LOG_HEADER = struct.Struct(">8sIQI")
LOG_RECORD_HEAD = struct.Struct(">IQII")


def data_dir(lc: LocalCluster, replica: int) -> Path:
    return lc.cluster.path.parent / "data" / f"replica-{replica}"


def log_records(path: Path) -> list[tuple[int, int]]:
    """(offset, length with head) of every record in a promise log, by the lengths alone."""
    data = path.read_bytes()
    offset, records = LOG_HEADER.size, []
    while offset < len(data):
        length = LOG_RECORD_HEAD.unpack_from(data, offset)[0]
        records.append((offset, LOG_RECORD_HEAD.size + length))
        offset += LOG_RECORD_HEAD.size + length
    assert offset == len(data), "the log does not end with a whole record"
    return records


# -- the damage, each to a killed replica's directory; each returns the path to be reported --


def flip_bytes_in_the_log(d: Path) -> Path:
    path = d / "promises.log"
    records = log_records(path)
    assert len(records) >= 4, f"only {len(records)} records in {path}"
    offset, size = records[len(records) // 2]  # a record in the middle, with intact ones after it
    with open(path, "r+b") as fh:
        fh.seek(offset + size // 2)
        chunk = fh.read(4)
        fh.seek(offset + size // 2)
        fh.write(bytes(b ^ 0xFF for b in chunk))
    return path


def _manifest(d: Path) -> tuple[Path, list[list[int]]]:
    """The manifest and where each partition lies: (pack, offset, length), format 3."""
    manifest = d / "checkpoint.msgpack"
    version, *_, where = msgpack.unpackb(manifest.read_bytes())
    assert version == 3
    return manifest, where


def delete_a_partition(d: Path) -> Path:
    manifest, where = _manifest(d)
    pack = where[len(where) // 2][0]
    (d / "packs" / str(pack)).unlink()  # the pack that holds a partition in the middle
    return manifest


def flip_bytes_in_a_partition(d: Path) -> Path:
    """The pack is there under its name, with other bytes: the core finds it out."""
    manifest, where = _manifest(d)
    pack, offset, length = next(w for w in where if w[2] > 0)  # an early partition: rarely rewritten
    path = d / "packs" / str(pack)
    data = bytearray(path.read_bytes())
    data[offset + length // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return manifest


def truncate_the_checkpoint(d: Path) -> Path:
    path = d / "checkpoint.msgpack"
    os.truncate(path, path.stat().st_size // 2)
    return path


def tear_the_log_s_tail(d: Path) -> None:
    path = d / "promises.log"
    offset, size = log_records(path)[-1]
    os.truncate(path, offset + size // 2)  # a crash in the middle of the last write
    return None


# -- the scenario ---------------------------------------------------------------------------


async def _put(c: Client, expected: dict[bytes, bytes], i: int) -> None:
    key, value = b"key-%d" % (i % KEYS), b"value-%d" % i
    ok, old = msgpack.unpackb(await c.invoke(KVService.put(key, value), timeout=20))
    assert ok and old == expected.get(key), (key, old, expected.get(key))
    expected[key] = value


async def _settled(lc: LocalCluster, timeout_s: float = 20.0) -> list[dict]:
    """Wait until the four agree on executed number, stable checkpoint and its digest, and each
    has that checkpoint on disk."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        statuses = [lc.status(i) for i in range(4)]
        if len({_point(s) for s in statuses}) == 1 or loop.time() > deadline:
            return statuses
        await asyncio.sleep(0.1)


def _point(s: dict) -> tuple:
    return s["executed"], s["stable_checkpoint"], s["stable_digest"], s["persisted_checkpoint"]


def _summary(statuses: list[dict]) -> list[dict]:
    keys = ("replica", "view", "executed", "stable_checkpoint", "persisted_checkpoint", "data_problems")
    return [{k: s.get(k) for k in keys} for s in statuses]


async def recovers_from(lc: LocalCluster, victim: int, damage: Callable[[Path], Path | None]) -> dict:
    """Writes past two checkpoints; the victim killed and its directory damaged; writes past two
    more while it is down (beyond its log window: it must fetch state); restarted; more writes;
    then every replica agrees, every value reads back, and a second restart finds nothing
    wrong. Every write checks the value it replaces. Returns the victim's status after catching up."""
    expected: dict[bytes, bytes] = {}
    async with Client(lc.cluster, 0) as c:
        await c.wait_connected()
        for i in range(80):  # sequential: one batch each, so sequence numbers 1..80
            await _put(c, expected, i)
        statuses = await _settled(lc)
        assert {s["persisted_checkpoint"] for s in statuses} == {64}, _summary(statuses)

        lc.kill(victim)
        d = data_dir(lc, victim)
        reported = damage(d)
        for i in range(80, 160):
            await _put(c, expected, i)
        lc.restart(victim)
        for i in range(160, 200):
            await _put(c, expected, i)

        statuses = await _settled(lc)
        assert len({_point(s) for s in statuses}) == 1, _summary(statuses)
        assert statuses[0]["executed"] >= 200 and statuses[0]["stable_checkpoint"] >= 192, _summary(statuses)
        status = statuses[victim]
        # Reads the victim must answer itself: with another backup down, a read needs the
        # matching replies of all three replicas left.
        other = next(i for i in range(4) if i not in (victim, status["primary"]))
        lc.kill(other)
        for read_only in (True, False):
            for key, value in sorted(expected.items()):
                ok, got = msgpack.unpackb(await c.invoke(KVService.get(key), read_only, timeout=20))
                assert ok and got == value, (key, got, value, read_only)
        lc.restart(other)
        statuses = await _settled(lc)  # the ordered reads may have made a checkpoint
        assert len({_point(s) for s in statuses}) == 1, _summary(statuses)

    problems = status.get("data_problems", [])
    if reported is None:
        assert problems == [], problems
    else:
        assert len(problems) == 1 and str(reported) in problems[0], (problems, reported)
        assert reported.with_name(reported.name + ".damaged").exists()

    # The damage was repaired, not only lived with: killed again, the victim starts from its own
    # directory with nothing to report, at the checkpoint it persisted.
    lc.kill(victim)
    lc.restart(victim)
    again = lc.status(victim)
    assert "data_problems" not in again, again["data_problems"]
    assert again["stable_checkpoint"] == statuses[victim]["persisted_checkpoint"], _summary([statuses[victim], again])
    assert again["promise_log"].get("torn_tails", 0) == 0, again["promise_log"]
    return status


@pytest.mark.parametrize(
    ("victim", "damage"),
    [
        (0, flip_bytes_in_the_log),
        (3, delete_a_partition),
        (2, flip_bytes_in_a_partition),
        (1, truncate_the_checkpoint),
    ],
    ids=["flipped-bytes-in-the-promise-log", "a-missing-partition-file", "flipped-bytes-in-a-partition-file",
         "a-truncated-checkpoint"],
)
async def test_damage_is_repaired_by_state_transfer(local_cluster: LocalCluster, victim: int, damage) -> None:
    status = await recovers_from(local_cluster, victim, damage)
    assert status["stats"].get("state-transfers", 0) > 0


async def test_a_torn_tail_is_not_damage(local_cluster: LocalCluster) -> None:
    status = await recovers_from(local_cluster, 0, tear_the_log_s_tail)
    assert status["promise_log"].get("torn_tails") == 1, status["promise_log"]
    assert status["stats"].get("replayed-batches", 0) > 0  # from its own log, up to the tear

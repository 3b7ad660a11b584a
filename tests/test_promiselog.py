"""The promise log on real files: round trips, group commit, torn tails, damage, truncation."""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bft.runtime.promiselog import FORMAT, RECORD_BYTES_MAX, LogDamaged, PromiseLog
from bft.runtime.storage import StorageError

HEADER_BYTES = 24
HEAD_BYTES = 20


def opened(directory: Path, fsync: bool = False) -> tuple[PromiseLog, list[bytes]]:
    plog = PromiseLog(directory, fsync)
    return plog, plog.load()


def reload(directory: Path) -> list[bytes]:
    plog, records = opened(directory)
    plog.close()
    return records


def payload(i: int, size: int = 40) -> bytes:
    return (f"record {i}:".encode() * size)[:size]


def write_log(directory: Path, commits: list[list[bytes]]) -> list[int]:
    """Commit each list of records in one group commit; return the file size after each."""
    plog, _ = opened(directory)
    sizes = []
    for group in commits:
        for record in group:
            plog.append(record, None)
        plog.commit()
        sizes.append(plog.path.stat().st_size)
    plog.close()
    return sizes


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_missing_file_is_an_empty_log_with_a_header(tmp_path: Path) -> None:
    plog, records = opened(tmp_path / "data")
    assert records == []
    assert not plog.pending
    plog.close()
    data = (tmp_path / "data" / "promises.log").read_bytes()
    assert len(data) == HEADER_BYTES and data.startswith(b"bft-plog")
    assert reload(tmp_path / "data") == []


def test_many_records_round_trip_across_commits(tmp_path: Path) -> None:
    groups = [[payload(i * 100 + j, size=(i * 37 + j * 11) % 300) for j in range(i + 1)] for i in range(20)]
    groups.append([b"", b"\x00" * 10, os.urandom(200_000)])
    plog, _ = opened(tmp_path)
    for group in groups:
        for record in group:
            plog.append(record, None)
        assert plog.pending
        plog.commit()
        assert not plog.pending
    assert plog.stats["commits"] == len(groups)
    assert plog.stats["records"] == sum(map(len, groups))
    assert plog.stats["bytes"] == plog.path.stat().st_size - HEADER_BYTES == plog.file_bytes - HEADER_BYTES
    plog.close()
    assert reload(tmp_path) == [r for group in groups for r in group]


def test_a_group_commit_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plog, _ = opened(tmp_path)
    size_before = plog.path.stat().st_size
    records = [payload(i, 200) for i in range(10)]
    for record in records:
        plog.append(record, 7)
    assert plog.path.stat().st_size == size_before  # appended: nothing written yet
    writes: list[tuple[int, int]] = []
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        writes.append((fd, len(data)))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    plog.commit()
    plog.commit()  # nothing pending: nothing written
    monkeypatch.undo()
    grown = plog.path.stat().st_size - size_before
    assert writes == [(plog._fd, grown)]
    assert grown == 10 * (HEAD_BYTES + 200)
    assert (plog.stats["writes"], plog.stats["commits"], plog.stats["records"]) == (1, 1, 10)
    plog.close()
    assert reload(tmp_path) == records


def test_fsync_true_calls_fsync_on_every_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    strict, _ = opened(tmp_path / "strict", fsync=True)
    relaxed, _ = opened(tmp_path / "relaxed", fsync=False)
    synced.clear()  # creating the files fsyncs them, whatever the flag
    for plog in (strict, relaxed):
        for i in range(3):
            plog.append(payload(i), i)
            plog.commit()
    assert synced == [strict._fd] * 3
    assert strict.stats["fsyncs"] == 3 and strict.stats["fsync_seconds"] > 0
    assert relaxed.stats["fsyncs"] == 0
    synced.clear()
    relaxed.truncate(1)  # a rewrite is always fsynced: a crash must not leave an empty file
    assert relaxed._fd in synced
    strict.close()
    relaxed.close()


def test_a_torn_last_commit_keeps_every_whole_record_at_every_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    earlier = [[payload(1), payload(2)], [payload(3, 100)]]
    last = [payload(4, 30), payload(5, 1), payload(6, 50)]
    sizes = write_log(tmp_path / "full", [*earlier, last])
    whole = (tmp_path / "full" / "promises.log").read_bytes()
    boundary = sizes[-2]
    ends = [boundary]
    for record in last:
        ends.append(ends[-1] + HEAD_BYTES + len(record))
    assert ends[-1] == len(whole)
    before = [r for group in earlier for r in group]
    for kept in range(len(whole) - boundary):
        directory = tmp_path / f"cut{kept}"
        directory.mkdir()
        path = directory / "promises.log"
        path.write_bytes(whole[: boundary + kept])
        survivors = sum(1 for end in ends[1:] if end <= boundary + kept)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bft.promiselog"):
            plog, records = opened(directory)
        assert records == before + last[:survivors], kept
        assert path.stat().st_size == ends[survivors]
        torn = boundary + kept != ends[survivors]
        assert (str(path) in caplog.text) == torn
        assert plog.stats["torn_tails"] == int(torn)
        plog.append(b"after the cut", 99)
        plog.commit()
        plog.close()
        assert reload(directory) == [*before, *last[:survivors], b"after the cut"]


def test_a_flipped_byte_in_a_middle_record_is_damage(tmp_path: Path) -> None:
    records = [payload(i, 30) for i in range(4)]
    write_log(tmp_path, [records[:2], records[2:]])
    path = tmp_path / "promises.log"
    whole = path.read_bytes()
    start = HEADER_BYTES + HEAD_BYTES + 30  # the second record, in the middle of the first commit
    for offset in range(start, start + HEAD_BYTES + 30):
        path.write_bytes(whole)
        flip(path, offset)
        damaged = path.read_bytes()
        with pytest.raises(LogDamaged) as caught:
            opened(tmp_path)
        message = str(caught.value)
        assert str(path) in message and f"offset {start}" in message and "\n" not in message, offset
        assert isinstance(caught.value, StorageError)  # the CLI prints these in one line
        assert path.read_bytes() == damaged  # never truncated: the evidence stays


def test_a_flipped_byte_in_the_last_record_is_a_torn_tail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = [payload(i, 30) for i in range(3)]
    write_log(tmp_path, [records])
    path = tmp_path / "promises.log"
    whole = path.read_bytes()
    start = len(whole) - HEAD_BYTES - 30
    for offset in range(start, len(whole)):
        path.write_bytes(whole)
        flip(path, offset)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bft.promiselog"):
            assert reload(tmp_path) == records[:2], offset
        assert str(path) in caplog.text
        assert path.stat().st_size == start


def test_a_tail_of_zeros_is_torn_but_zeros_before_a_record_are_damage(tmp_path: Path) -> None:
    records = [payload(i) for i in range(3)]
    write_log(tmp_path, [records])
    path = tmp_path / "promises.log"
    whole = path.read_bytes()
    path.write_bytes(whole + bytes(8192))  # the file grew, its data never reached the disk
    assert reload(tmp_path) == records
    assert path.read_bytes() == whole
    second = HEADER_BYTES + HEAD_BYTES + 40
    path.write_bytes(whole[:second] + bytes(HEAD_BYTES + 40) + whole[second + HEAD_BYTES + 40 :])
    with pytest.raises(LogDamaged, match="intact record follows"):
        reload(tmp_path)


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda d: b"", "shorter than its 24-byte header"),
        (lambda d: d[:10], "shorter than its 24-byte header"),
        (lambda d: b"not-plog" + d[8:], "not a promise log"),
        (lambda d: d[:14] + bytes([d[14] ^ 1]) + d[15:], "header checksum mismatch"),
    ],
)
def test_a_bad_header_is_damage(tmp_path: Path, damage, what: str) -> None:
    write_log(tmp_path, [[payload(1)]])
    path = tmp_path / "promises.log"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(LogDamaged, match=what) as caught:
        reload(tmp_path)
    assert str(path) in str(caught.value)


def test_another_format_version_is_damage(tmp_path: Path) -> None:
    write_log(tmp_path, [[payload(1)]])
    path = tmp_path / "promises.log"
    data = path.read_bytes()
    start = data[:8] + struct.pack(">I", FORMAT + 1) + data[12:20]
    path.write_bytes(start + struct.pack(">I", zlib.crc32(start)) + data[24:])
    with pytest.raises(LogDamaged, match=f"format version {FORMAT + 1}, expected {FORMAT}"):
        reload(tmp_path)


def test_an_impossible_length_is_damage_never_an_allocation(tmp_path: Path) -> None:
    """Written from the format's description, which this also pins down."""
    records = [payload(1), payload(2)]
    write_log(tmp_path, [records])
    path = tmp_path / "promises.log"
    data = path.read_bytes()
    (salt,) = struct.unpack_from(">Q", data, 12)
    length_seq = struct.pack(">IQ", RECORD_BYTES_MAX + 1, 5)
    head = length_seq + struct.pack(">II", zlib.crc32(length_seq, salt >> 32), 0)
    path.write_bytes(data + head + b"short")
    with pytest.raises(LogDamaged, match=f"offset {len(data)}: record length {RECORD_BYTES_MAX + 1} above the limit"):
        reload(tmp_path)
    # The same head with a wrong head crc is an unreadable head at the end of the file: torn.
    path.write_bytes(data + head[:12] + b"\x00\x00\x00\x00" + head[16:] + b"short")
    assert reload(tmp_path) == records
    # And a record built by hand from the description reads back.
    record, length_seq = b"by hand", struct.pack(">IQ", 7, 2**64 - 1)
    crc = zlib.crc32(record, zlib.crc32(length_seq, salt & 0xFFFF_FFFF))
    path.write_bytes(data + length_seq + struct.pack(">II", zlib.crc32(length_seq, salt >> 32), crc) + record)
    assert reload(tmp_path) == [*records, b"by hand"]


def test_truncate_keeps_later_records_and_the_last_view_record(tmp_path: Path) -> None:
    log_seqs: list[tuple[bytes, int | None]] = [
        (b"view 1", None),
        (b"pp 1", 1),
        (b"pp 2", 2),
        (b"view 2", None),
        (b"pp 3", 3),
        (b"pp 5", 5),
        (b"commit 4", 4),
        (b"view 3", None),
        (b"pp 6", 6),
    ]
    plog, _ = opened(tmp_path)
    for record, seq in log_seqs:
        plog.append(record, seq)
    with pytest.raises(AssertionError):
        plog.truncate(3)  # appended, not committed
    plog.commit()
    plog.truncate(3)
    expected = [b"pp 5", b"commit 4", b"view 3", b"pp 6"]
    assert reload(tmp_path) == expected
    assert plog.stats["truncates"] == 1 and plog.stats["truncated_records"] == 5
    assert not (tmp_path / "promises.log.tmp").exists()
    plog.append(b"pp 7", 7)
    plog.commit()
    plog.truncate(3)  # nothing to drop: no rewrite
    assert plog.stats["truncates"] == 1
    plog.close()
    assert reload(tmp_path) == [*expected, b"pp 7"]
    # After a restart the log still knows each record's seq: no caller has to say it again.
    plog, _ = opened(tmp_path)
    plog.append(b"view 4", None)
    plog.commit()
    plog.truncate(5)
    plog.close()
    assert reload(tmp_path) == [b"pp 6", b"pp 7", b"view 4"]


def test_a_stale_temporary_from_an_interrupted_rewrite_is_ignored(tmp_path: Path) -> None:
    write_log(tmp_path, [[payload(1)]])
    (tmp_path / "promises.log.tmp").write_bytes(b"half a rewrite")
    assert reload(tmp_path) == [payload(1)]
    assert not (tmp_path / "promises.log.tmp").exists()


def test_a_failed_fsync_closes_the_log_and_drops_the_half_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plog, _ = opened(tmp_path, fsync=True)
    plog.append(payload(1), 1)
    plog.commit()

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    plog.append(payload(2), 2)
    with pytest.raises(OSError, match="Input/output"):
        plog.commit()
    monkeypatch.undo()
    with pytest.raises(AssertionError):
        plog.append(payload(3), 3)
    plog.close()
    assert reload(tmp_path) == [payload(1)]


def test_misuse_fails_an_assertion(tmp_path: Path) -> None:
    plog = PromiseLog(tmp_path, fsync=False)
    with pytest.raises(AssertionError):
        plog.append(b"before load", 1)
    plog.load()
    with pytest.raises(AssertionError):
        plog.load()
    with pytest.raises(AssertionError):
        plog.append(b"negative", -1)
    plog.close()


appends = st.tuples(st.just("append"), st.binary(max_size=48), st.none() | st.integers(0, 40))
operations = st.lists(
    st.one_of(appends, appends, st.just(("commit",)), st.tuples(st.just("truncate"), st.integers(0, 40))),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(operations, st.lists(st.integers(0, 40), max_size=3))
def test_any_appends_commits_truncates_and_restarts_read_back_what_truncation_kept(
    ops: list[tuple], restarts_at: list[int]
) -> None:
    """The model: a list of committed (seq, record); truncate filters it; a restart loses what was
    only appended."""
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        plog, _ = opened(directory)
        committed: list[tuple[int | None, bytes]] = []
        pending: list[tuple[int | None, bytes]] = []
        for i, op in enumerate(ops):
            if i in restarts_at:
                plog.close()
                plog, records = opened(directory)
                assert records == [r for _, r in committed]
                pending = []
            if op[0] == "append":
                plog.append(op[1], op[2])
                pending.append((op[2], op[1]))
            elif op[0] == "commit":
                plog.commit()
                committed += pending
                pending = []
            else:
                plog.commit()  # truncate wants nothing pending
                committed += pending
                pending = []
                plog.truncate(op[1])
                kept, view_kept = [], False
                for seq, record in reversed(committed):
                    if seq is None and not view_kept:
                        kept.append((seq, record))
                        view_kept = True
                    elif seq is not None and seq > op[1]:
                        kept.append((seq, record))
                committed = kept[::-1]
        plog.close()
        assert reload(directory) == [r for _, r in committed]

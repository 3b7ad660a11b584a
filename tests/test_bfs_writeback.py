"""The mount's write-back cache without a mount: range coalescing against a model file, writev
grouping, the bound, flush order and error reporting (bfs/writeback.py); the replicas' writev
(bfs/fs.py); the attribute cache's expiry (bfs/attrcache.py); the mount options for both modes."""

from __future__ import annotations

import asyncio
import errno
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bfs.attrcache import LISTINGS_MAX, NAMES_MAX, AttrCache
from bfs.cli import helper_argv
from bfs.fs import WRITEV_EXTENTS_MAX, Limits
from bfs.writeback import EXTENT_OVERHEAD_BYTES, Extents, FlushError, WriteBack, overlay

from .test_bfs_state import ALICE, BOB, Fs, ino

writes = st.lists(st.tuples(st.integers(0, 300), st.binary(min_size=0, max_size=60)), max_size=30)


def model(ops: list[tuple[int, bytes]]) -> tuple[bytearray, set[int]]:
    """A file's bytes after the writes, and which offsets were written."""
    data, covered = bytearray(400), set()
    for offset, chunk in ops:
        data[offset:offset + len(chunk)] = chunk
        covered.update(range(offset, offset + len(chunk)))
    return data, covered


@settings(max_examples=300, deadline=None)
@given(writes)
def test_extents_coalesce_to_what_the_writes_leave(ops: list[tuple[int, bytes]]) -> None:
    ext = Extents()
    held = 0
    for offset, chunk in ops:
        held += ext.add(offset, chunk)
    data, covered = model(ops)
    assert held == ext.nbytes == len(covered)
    # sorted, disjoint, and not even touching: adjacent writes became one range
    for k in range(len(ext.starts) - 1):
        assert ext.ends[k] < ext.starts[k + 1]
    for s, e, d in zip(ext.starts, ext.ends, ext.datas, strict=True):
        assert e - s == len(d) > 0
        assert bytes(d) == bytes(data[s:e])
        assert set(range(s, e)) <= covered
    assert sum(e - s for s, e in zip(ext.starts, ext.ends, strict=True)) == len(covered)
    assert ext.end == (max(covered) + 1 if covered else 0)


@settings(max_examples=200, deadline=None)
@given(writes, st.integers(0, 350), st.integers(0, 120))
def test_overlay_puts_the_cached_bytes_over_what_is_read(ops, offset: int, count: int) -> None:
    ext = Extents()
    for o, chunk in ops:
        ext.add(o, chunk)
    data, covered = model(ops)
    buf = bytearray(b"\xee" * count)
    ext.overlay(offset, buf)
    for i in range(count):
        assert buf[i] == (data[offset + i] if offset + i in covered else 0xEE)


@settings(max_examples=200, deadline=None)
@given(writes, st.integers(EXTENT_OVERHEAD_BYTES + 1, 120))
def test_groups_are_full_writevs_that_rebuild_the_ranges(ops, capacity: int) -> None:
    ext = Extents()
    for o, chunk in ops:
        ext.add(o, chunk)
    groups = list(ext.groups(capacity))
    rebuilt = Extents()
    for group in groups:
        cost = sum(len(d) + EXTENT_OVERHEAD_BYTES for _, d in group)
        assert group and cost <= capacity
        for o, d in group:
            assert d
            rebuilt.add(o, d)
    assert (rebuilt.starts, rebuilt.datas) == (ext.starts, ext.datas)
    for group in groups[:-1]:  # the fewest: each but the last has no room for another byte
        assert capacity - sum(len(d) + EXTENT_OVERHEAD_BYTES for _, d in group) <= EXTENT_OVERHEAD_BYTES
    if ext.nbytes:
        assert len(groups) <= math.ceil(ext.nbytes / (capacity - EXTENT_OVERHEAD_BYTES)) + len(ext.starts)
    with pytest.raises(ValueError):
        next(ext.groups(EXTENT_OVERHEAD_BYTES))


class Replicas:
    """What the cache sends to, as a list of writevs, failing with ``fail`` when it is set."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, list]] = []
        self.fail = 0

    async def send(self, creds: list, ino: int, extents: list) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise FlushError(self.fail)
        self.sent.append((ino, extents))


def test_the_bound_flushes_the_largest_file_and_failures_reach_each_handle_once() -> None:
    async def run() -> None:
        r = Replicas()
        wb = WriteBack(r.send, bytes_max=100, writev_bytes_max=1000, file_bytes_max=10_000)
        await wb.write(1, ALICE, 0, b"a" * 30)
        await wb.write(2, ALICE, 0, b"b" * 60)
        await wb.write(1, ALICE, 30, b"a" * 5)  # adjacent: one range
        assert r.sent == [] and wb.nbytes == 95 and wb.size(1, 0) == 35
        assert overlay(wb.pending(1), 30, 10, b"", 0) == b"aaaaa"
        await wb.write(3, ALICE, 0, b"c" * 10)  # past the bound: file 2, the largest, goes
        assert r.sent == [(2, [(0, b"b" * 60)])] and wb.nbytes == 45
        with pytest.raises(FlushError) as exc:
            await wb.write(1, ALICE, 10_000, b"xx")
        assert exc.value.code == errno.EFBIG
        assert await wb.write(1, ALICE, 10_000, b"") == 0
        # Two handles on file 3, and one opened after its failure.
        first, second = wb.sample(), wb.sample()
        r.fail = errno.EACCES
        await wb.write(3, ALICE, 10, b"c" * 80)  # over the bound: file 3 (90 bytes) is sent, fails
        assert wb.nbytes == 35 and 3 not in wb.files
        late = wb.sample()
        code, first = wb.check(3, first)
        assert code == errno.EACCES and wb.check(3, first) == (0, first)  # once for each handle
        assert wb.check(3, second)[0] == errno.EACCES
        assert wb.check(3, late) == (0, late)  # not to one opened after it
        assert wb.check(1, 0) == (0, 0)  # nor to another file's
        r.fail = 0
        await wb.flush(1)
        assert r.sent[-1] == (1, [(0, b"a" * 35)]) and wb.check(3, first) == (0, first)
        # a later failure of the same file reaches the handles again
        await wb.write(3, ALICE, 0, b"c")
        r.fail = errno.ENOSPC
        await wb.flush(3)
        assert wb.check(3, first)[0] == errno.ENOSPC and wb.check(3, late)[0] == errno.ENOSPC
        wb.forget(3)
        assert wb.check(3, 0) == (0, 0) and wb.failures == {}
        r.fail = 0
        assert await wb.write(9, ALICE, 9_998, b"xyz") == 2 and wb.size(9, 0) == 10_000  # what fits
        await wb.flush(9)
        # another writer's bytes are sent first: a writev carries one writer's credentials
        await wb.write(4, ALICE, 0, b"d" * 20)
        await wb.write(4, BOB, 20, b"e")
        assert r.sent[-1] == (4, [(0, b"d" * 20)])
        await wb.flush(4)
        assert r.sent[-1] == (4, [(20, b"e")]) and wb.files == {} and wb.nbytes == 0

    asyncio.run(run())


def test_bytes_being_sent_count_against_the_bound() -> None:
    """A writer past the bound while everything cached is being sent waits for the replicas
    instead of caching more (second reader's finding: up to twice the bound was held)."""

    async def run() -> None:
        gate = asyncio.Event()

        async def send(creds: list, ino: int, extents: list) -> None:
            await gate.wait()

        wb = WriteBack(send, bytes_max=100, writev_bytes_max=1000, file_bytes_max=10_000)
        await wb.write(1, ALICE, 0, b"a" * 90)
        sending = asyncio.create_task(wb.flush(1))
        await asyncio.sleep(0)
        assert wb.nbytes == 90 and wb.files[1].sending
        writer = asyncio.create_task(wb.write(2, ALICE, 0, b"b" * 30))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not writer.done() and wb.nbytes == 120
        gate.set()
        await asyncio.gather(sending, writer)
        assert wb.nbytes <= 100

    asyncio.run(run())


def test_flushes_of_one_file_keep_their_order_and_reads_see_what_is_in_flight() -> None:
    async def run() -> None:
        gate = asyncio.Event()
        sent: list[list] = []

        async def send(creds: list, ino: int, extents: list) -> None:
            await gate.wait()
            sent.append(extents)

        wb = WriteBack(send, bytes_max=1 << 20, writev_bytes_max=1000, file_bytes_max=1 << 30)
        await wb.write(7, ALICE, 0, b"old!")
        first = asyncio.create_task(wb.flush(7))
        await asyncio.sleep(0)
        await wb.write(7, ALICE, 2, b"NEW")
        second = asyncio.create_task(wb.flush(7))
        await asyncio.sleep(0)
        assert overlay(wb.pending(7), 0, 10, b"", 0) == b"olNEW" and wb.size(7, 0) == 5
        gate.set()
        await asyncio.gather(first, second)
        assert sent == [[(0, b"old!")], [(2, b"NEW")]]

    asyncio.run(run())


def test_many_scattered_small_writes_go_in_writevs_the_replicas_accept() -> None:
    """70,000 two-byte writes four bytes apart are 70,000 ranges in far fewer bytes than a
    request holds: they must still go in writevs of at most WRITEV_EXTENTS_MAX ranges, and the
    file the replicas then hold must have every one (second reader's finding: EINVAL, all lost)."""
    ext = Extents()
    for k in range(70_000):
        ext.add(4 * k, b"xy")
    groups = list(ext.groups(8 * 1024 * 1024))
    assert [len(g) for g in groups] == [WRITEV_EXTENTS_MAX, 70_000 - WRITEV_EXTENTS_MAX]
    fs = Fs(Limits(bytes_max=10_000_000, file_bytes_max=1_000_000))
    f = ino(fs("create", 1, b"f", 0o644, True))
    for g in groups:
        fs("writev", f, [[o, d] for o, d in g])
    data, _ = fs("read", f, 0, 280_000)
    assert len(data) == 279_998 and data[::4] == b"x" * 70_000 and data[1::4] == b"y" * 70_000


def test_writev_is_all_or_nothing_and_checks_its_arguments() -> None:
    fs = Fs(Limits(bytes_max=40_000, file_bytes_max=100_000))
    made = fs("create", 1, b"f", 0o644, True)
    assert made[12] is True and fs("create", 1, b"f", 0o644, False)[12] is False  # new, or not
    assert made[13] == fs("getattr", 1)  # with the directory's attributes after
    d = fs("mkdir", 1, b"d", 0o755)
    assert d[12] == fs("getattr", 1) and d[12][3] == 3  # its new ".." counted
    f = ino(made)
    attrs = fs("writev", f, [[0, b"abc"], [10, b"xyz"], [1, b"B"]])
    assert attrs[6] == 13 and fs("read", f, 0, 20) == [b"aBc" + bytes(7) + b"xyz", True]
    before = fs("getattr", f)
    assert fs.err("writev", f, [[0, b"q"], [20_000, b"x" * 40_000]]) == errno.ENOSPC
    assert fs.err("writev", f, [[0, b"q"], [99_999, b"xx"]]) == errno.EFBIG
    assert fs.err("writev", f, [[0, b"q"]], who=BOB) == errno.EACCES
    for bad in ([], [[0]], [[-1, b"x"]], [[0, "text"]], "x"):
        assert fs.err("writev", f, bad) == errno.EINVAL
    assert fs("getattr", f) == before and fs("read", f, 0, 3) == [b"aBc", False]
    assert fs("access", f, 4)[0] == f  # access answers with the attributes


def test_attribute_cache_expires_and_forgets_what_changed() -> None:
    cache = AttrCache(1.0)
    attrs = [5, "f", 0o644, 1, 0, 0, 10, 0, 77, 0, 1, 0]
    cache.note(attrs, now=100.0)
    assert cache.get(5, 100.25) == (attrs, 0.75) and cache.get(5, 101.0) is None
    assert cache.stale(attrs)  # the kernel was never told
    cache.told(attrs)
    assert not cache.stale(attrs) and cache.stale([*attrs[:6], 11, *attrs[7:]])
    cache.distrust(5)  # a refused flush: the kernel's pages of it are not the replicas'
    cache.told(attrs)  # a getattr since says the same size and mtime: still stale, once
    assert cache.stale(attrs) and not cache.stale(attrs)
    cache.drop(5)
    assert cache.get(5, 100.1) is None
    cache.note_no_xattr(5, b"security.capability", 100.0)
    assert cache.xattr_absent(5, b"security.capability", 100.9)
    assert not cache.xattr_absent(5, b"security.capability", 101.0)
    cache.drop_xattrs(5)
    assert not cache.xattr_absent(5, b"security.capability", 100.1)
    cache.note_no_xattr(5, None, 100.0)  # created by this mount: none at all
    assert cache.xattr_absent(5, b"user.any", 100.5)
    cache.drop_xattrs(5)
    assert not cache.xattr_absent(5, b"user.any", 100.5)
    assert AttrCache(0.0).get(5, 0.0) is None  # --attr-timeout 0 caches nothing


def test_directory_names_answer_for_the_timeout_and_stay_bounded() -> None:
    cache = AttrCache(1.0)
    cache.listed(2, [b"a", b"b"], asked=100.0)
    assert cache.missing(2, b"c", 100.25) == 0.75 and cache.missing(2, b"a", 100.25) is None
    assert cache.missing(2, b"c", 101.0) is None and cache.missing(3, b"c", 100.0) is None
    cache.named(2, b"c")  # being made here
    assert cache.missing(2, b"c", 100.5) is None
    for k in range(NAMES_MAX - 3):  # with a, b and c: NAMES_MAX
        cache.named(2, b"n%d" % k)
    assert cache.missing(2, b"zz", 100.5) is not None  # NAMES_MAX names: still held
    cache.named(2, b"one more")
    assert cache.missing(2, b"zz", 100.5) is None  # a longer directory's are not
    cache.listed(4, [b"x"] * (NAMES_MAX + 1), asked=100.0)
    assert cache.missing(4, b"zz", 100.5) is None
    for d in range(LISTINGS_MAX + 1):
        cache.listed(10 + d, [], asked=100.0)
    assert len(cache.listings) <= LISTINGS_MAX
    cache.drop_all()  # a remove or rename here
    assert cache.listings == {}
    zero = AttrCache(0.0)
    zero.listed(2, [], asked=5.0)
    assert zero.missing(2, b"x", 5.0) is None  # --attr-timeout 0 keeps no names


def test_mount_options_select_the_mode_and_the_cache() -> None:
    argv = helper_argv(["bfs", "/mnt/bfs", "-o", "config=/c.toml,strict,write_cache_kib=0,nodev"])
    assert argv == ["mount", "/mnt/bfs", "--config", "/c.toml", "--strict", "--write-cache-kib", "0", "-o", "nodev"]

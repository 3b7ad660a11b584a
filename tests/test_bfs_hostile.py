"""Hostile operations get an errno from BFS and never an exception: since execute no longer
catches TypeError, KeyError or IndexError, every malformed argument must be refused where it is
read, and whatever still raises is a bug of ours that this test is meant to find."""

from __future__ import annotations

import errno

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from bfs.fs import _ARITY, BLOCK, ROOT, FileSystem, Limits

SCALARS = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False),
    st.integers(min_value=-(2**63), max_value=2**64 - 1), st.sampled_from([ROOT, 2, 3, -1, 2**63 - 1, 2**63]),
    st.binary(max_size=40), st.sampled_from([b".", b"..", b"a", b"a/b", b"x" * 300]), st.text(max_size=8),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=7), max_leaves=12)
CREDS = st.one_of(st.just([0, 0, []]), st.just([1000, 1000, [5]]), VALUES)


@st.composite
def operations(draw) -> list:
    name = draw(st.sampled_from(sorted(_ARITY)))
    count = max(0, _ARITY[name] + draw(st.sampled_from([0, 0, 0, 1, -1])))
    return [name, draw(CREDS), *(draw(VALUES) for _ in range(count))]


@settings(max_examples=200, deadline=None)
@given(st.lists(operations(), min_size=1, max_size=12))
def test_hostile_operations_get_an_errno(ops) -> None:
    fs = FileSystem(Limits(bytes_max=4 * BLOCK, inodes_max=16))
    root = [0, 0, []]
    for setup in (["mkdir", root, ROOT, b"a", 0o777], ["create", root, ROOT, b"b", 0o666, False]):
        assert msgpack.unpackb(fs.execute(msgpack.packb(setup), 0, 1))[0] == 0
    for i, op in enumerate(ops):
        data = msgpack.packb(op)
        code, _ = msgpack.unpackb(fs.execute(data, 0, 2 + i))
        assert code == 0 or code in errno.errorcode
        fs.is_read_only(data)
    fs.partitions()

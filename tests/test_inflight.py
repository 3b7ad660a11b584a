"""The client's in-flight table: its indexes agree with a walk over every operation, whatever
mix of submits, fall-backs, completions and abandons came before."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bft.core.inflight import InFlight, Pending
from bft.messages import Request


def _walked(table: InFlight) -> tuple[int | None, dict[int, int]]:
    ordered = [ts for ts, p in table.items() if not p.request.read_only]
    return min(ordered, default=None), {p.origin: ts for ts, p in table.items()}


# Each step: submit (read-only or not), re-issue an operation under a new timestamp (a read
# falling back), or forget one (completed or abandoned), picked by index.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.booleans()),
        st.tuples(st.just("reissue"), st.integers(0, 50)),
        st.tuples(st.just("forget"), st.integers(0, 50)),
        st.tuples(st.just("wait"), st.integers(0, 50)),
    ),
    max_size=80,
)


@given(steps)
def test_indexes_match_a_walk_over_every_operation(ops) -> None:
    table = InFlight()
    next_ts = 1
    for op, arg in ops:
        if op == "submit":
            table.track(Pending(Request.make(7, next_ts, b"op", arg), 0, 1, next_ts))
            next_ts += 1
        elif table:
            ts = sorted(table)[arg % len(table)]
            if op == "wait":
                table.falling_back[ts] = table[ts]
                continue
            origin = table[ts].origin
            table.forget(ts)
            if op == "reissue":
                table.track(Pending(Request.make(7, next_ts, b"op", False), 0, 1, origin))
                next_ts += 1
        oldest, origins = _walked(table)
        assert table.oldest_ordered() == oldest
        assert all(table.of_origin(o) == ts for o, ts in origins.items())
        assert set(table.falling_back) <= set(table)
    table.clear()
    assert table.oldest_ordered() is None and not table.falling_back and table.of_origin(1) is None

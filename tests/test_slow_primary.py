"""A slow primary among real replica processes (``bft replica --byzantine slow-primary``): it holds
each PRE-PREPARE for 0.9 of the view timeout, so no request's view timer expires, and the
slow-primary monitor of the correct backups (bft.core.monitor) has to replace it."""

from __future__ import annotations

import asyncio

import pytest

from bft.core.params import Params
from bft.local import LocalCluster
from client import Client

from .test_integration import workload

pytestmark = pytest.mark.integration

PARAMS = Params(checkpoint_interval=8, log_window=16)


async def test_a_slow_primary_process_is_replaced_and_correct_clients_complete(tmp_path) -> None:
    """Two clients, one operation at a time each: a load the held batches carry whole, so that
    nothing waits behind them long enough for the view timer (with more, it would replace the
    primary itself). Every result must be the value written, before the view change and after."""
    lc = LocalCluster(tmp_path / "cluster", 1, "kv", PARAMS, byzantine=(0, "slow-primary"))
    correct = [1, 2, 3]

    async def states() -> list[dict]:
        return [await asyncio.to_thread(lc.status, i) for i in correct]

    async def until_moved(c: Client, name: bytes) -> None:
        while not all(s["view"] >= 1 and not s["view_changing"] for s in await states()):
            await workload(c, name, 4, concurrency=1, keys=4)

    try:
        async with Client(lc.cluster, 0) as a, Client(lc.cluster, 1) as b:
            await asyncio.gather(a.wait_connected(), b.wait_connected())
            budget_s = (PARAMS.primary_grace_ms + 10 * PARAMS.primary_window_ms) / 1000
            await asyncio.wait_for(asyncio.gather(until_moved(a, b"alice"), until_moved(b, b"bob")), budget_s)
            await asyncio.gather(
                workload(a, b"alice", 100, concurrency=1, keys=10), workload(b, b"bob", 100, concurrency=1, keys=10)
            )
        seen = await states()
        assert all(s["view"] >= 1 for s in seen)
        judged = [s["stats"].get("slow-primary-view-changes", 0) for s in seen]
        assert sum(j > 0 for j in judged) >= 2, f"f+1 correct backups judged the primary slow: {judged}"
        assert (await asyncio.to_thread(lc.status, 0))["rewritten"] > 0, "the slow primary held pre-prepares"
        assert all(p.poll() is None for p in lc.procs), "every replica still runs"
    finally:
        lc.stop()

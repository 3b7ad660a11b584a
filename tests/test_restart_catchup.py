"""Found by `make docker-test` (deploy/docker-test.sh) after clients stopped signing every
request (aae3df1): a backup stopped with SIGTERM and started again inside the log window no
longer caught up. The requests in the pre-prepares and batches it fetched carry tags under the
clients' session keys of before its restart, which it no longer has: it dropped the batches
("bad-request-authentication") and made the clients suspect. Clients sign every request again by
default (sign_every_request) for a while, so the restarted replica checked them by their
signatures. Now they need not (the default is false again): a replica resolves a request it cannot
check from the votes of f+1 replicas for its batch (bft.core.large), so the restarted one catches
up from its peers' log, without a state transfer, and suspects nobody."""

from __future__ import annotations

import asyncio
import signal
import time

from bft.core.params import Params
from bft.local import LocalCluster
from bft.service import KVService
from client import Client

from .test_integration import value_of


async def test_backup_restarted_within_the_window_catches_up_from_the_log(tmp_path) -> None:
    lc = LocalCluster(tmp_path / "c", 1, "kv", Params())
    try:
        async with Client(lc.cluster, 0) as c:
            await c.wait_connected()
            for i in range(20):
                await c.invoke(KVService.put(b"k", b"%d" % i))
            lc.procs[2].send_signal(signal.SIGTERM)
            lc.procs[2].wait()
            for i in range(40):  # 40 batches: inside the 256-slot window
                await c.invoke(KVService.put(b"k%d" % i, b"x"))
            target = lc.status(0)["executed"]
            lc.restart(2)
            deadline = time.monotonic() + 10
            while lc.status(2)["executed"] < target and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            status = lc.status(2)
            assert status["executed"] >= target, (status["dropped"], status["stats"], lc.status(0)["dropped"])
            assert not status["stats"].get("clients-distrusted"), status["stats"]
            assert not status["stats"].get("state-transfers"), status["stats"]
            assert status["stats"].get("requests-resolved-unverified", 0) > 0, status["stats"]
            assert not any(lc.status(i)["stats"].get("clients-distrusted") for i in range(4))
            assert value_of(await c.invoke(KVService.get(b"k39"))) == b"x"
    finally:
        lc.stop()

"""Faulty clients against real replica processes: a client whose requests carry a valid tag for
the replica it sends them to and for no other, and no valid signature (the "big MAC" attack of
Clement et al., NSDI 2009). Before, each backup dropped every pre-prepare carrying one of them,
so each primary that proposed one stalled until a view change, and the next primary, which had
received the same kind of request, proposed it again: 1 ops/s and 9 view changes in 20 s, and
the cluster stuck after the client stopped. Now a backup holds such a request by reference, and
says so; every replica then takes that client's requests only signed, and drops the ones it held
on the strength of a tag alone."""

from __future__ import annotations

import asyncio

import pytest

from bft.core.params import Params
from bft.crypto import CLIENT
from bft.local import LocalCluster
from bft.messages import MAC_BYTES, SIGNATURE_BYTES, Request, frame
from bft.service import KVService
from client import Client

from .sessionconn import StreamSession
from .test_integration import workload

pytestmark = pytest.mark.integration

FAULTY = 5


async def _poison(lc: LocalCluster, stop: asyncio.Event) -> int:
    """Client FAULTY's requests to each replica, good for that replica only; returns how many."""
    cluster = lc.cluster
    kr = cluster.keyring(CLIENT, FAULTY)
    conns = [await StreamSession.open(r.host, r.port, kr, r.id) for r in cluster.replicas]
    sent = 0
    try:
        ts = 1
        while not stop.is_set():
            for j, conn in enumerate(conns):
                req = Request.make(FAULTY, ts, KVService.put(b"poison", b"%d" % ts))
                tags = kr.authenticator(Request.TYPE, req.raw)
                only_j = bytes(j * MAC_BYTES) + tags[j * MAC_BYTES:(j + 1) * MAC_BYTES]
                auth = only_j + bytes((cluster.n - j - 1) * MAC_BYTES) + bytes(SIGNATURE_BYTES)
                conn.send(frame(req, req.raw, auth))
                ts += 1
                sent += 1
            await asyncio.sleep(0.02)
    finally:
        for conn in conns:
            conn.close()
    return sent


async def test_a_big_mac_client_costs_at_most_a_view_change_and_correct_clients_go_on(tmp_path) -> None:
    lc = LocalCluster(tmp_path / "cluster", 1, "kv", Params(checkpoint_interval=16, log_window=32))
    try:
        cluster = lc.cluster
        async with Client(cluster, 0) as a, Client(cluster, 1) as b:
            await asyncio.gather(a.wait_connected(), b.wait_connected())
            await asyncio.gather(workload(a, b"a-before", 50), workload(b, b"b-before", 50))
            stop = asyncio.Event()
            attack = asyncio.create_task(_poison(lc, stop))
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.wait_for(
                asyncio.gather(workload(a, b"a-during", 300), workload(b, b"b-during", 300)), 60
            )
            during_s = loop.time() - started
            stop.set()
            sent = await attack
            await asyncio.gather(workload(a, b"a-after", 50), workload(b, b"b-after", 50))
        statuses = [lc.status(i) for i in range(cluster.n)]
        assert sent > 100
        assert all(s["stats"].get("clients-distrusted", 0) == 1 for s in statuses), statuses
        assert max(s["view"] for s in statuses) <= 1, [s["view"] for s in statuses]
        # Once suspect, its requests are refused at the door: unsigned, by everyone.
        refused = sum(s["dropped"].get("bad-authentication", 0) for s in statuses)
        assert refused > sent // 2, (refused, sent)
        assert during_s < 30
    finally:
        lc.stop()

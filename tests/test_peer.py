"""The outbound connection's reconnect: a peer that proves it is back is retried at once, not
after the back-off its absence built up (a restarted replica would otherwise wait up to
``RETRY_S_MAX`` for its peers, and fall behind a checkpoint they certify meanwhile)."""

from __future__ import annotations

import asyncio
from collections import Counter

from bft.runtime.transport import FrameProtocol, Peer

from .conftest import free_base_port


async def test_wake_retries_at_once_after_a_long_back_off() -> None:
    port = free_base_port(1)
    peer = Peer("127.0.0.1", port, lambda data, conn: None, 1 << 16, Counter())
    peer.RETRY_S_MIN = peer.RETRY_S_MAX = 3600.0  # without the wake it would not retry in this test
    peer.start()
    try:
        await asyncio.sleep(0.2)  # refused once: now backing off for an hour
        counters: Counter[str] = Counter()
        server = await asyncio.get_running_loop().create_server(
            lambda: FrameProtocol(lambda data, conn: None, 1 << 16, counters), "127.0.0.1", port
        )
        try:
            peer.wake()
            await asyncio.wait_for(peer.connected.wait(), 10)
            assert peer.protocol is not None
        finally:
            server.close()
    finally:
        await peer.close()


async def test_wake_while_connected_changes_nothing() -> None:
    port = free_base_port(1)
    server = await asyncio.get_running_loop().create_server(
        lambda: FrameProtocol(lambda data, conn: None, 1 << 16, Counter()), "127.0.0.1", port
    )
    peer = Peer("127.0.0.1", port, lambda data, conn: None, 1 << 16, Counter())
    peer.start()
    try:
        await asyncio.wait_for(peer.connected.wait(), 10)
        first = peer.protocol
        peer.wake()
        await asyncio.sleep(0.1)
        assert peer.protocol is first and not peer._woken.is_set()
    finally:
        await peer.close()
        server.close()

"""The node's own contract, in one process: a bug in the code it drives stops it (fail-stop),
while hostile bytes are only counted. The core here is a stand-in: this is the node's unit test."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from bft.core.effects import ReplyTo
from bft.core.params import DEFAULT_PARAMS
from bft.messages import Message, Reply, Request
from bft.runtime.node import Node
from bft.runtime.transport import LENGTH
from bft.runtime.wire import Wire, limits_of

from .conftest import free_base_port


class BuggyCore:
    """Answers one request, then raises: an exception from our own code, not from input."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.steps = 0

    def step(self, msg: Message, now_ms: int) -> list:
        self.steps += 1
        if self.steps > 1:
            raise RuntimeError("a bug in the core")
        return [ReplyTo(msg.client, Reply(0, msg.timestamp, msg.client, 0, b"ok"))]

    def tick(self, now_ms: int) -> list:
        return []


def _framed(data: bytes) -> bytes:
    return LENGTH.pack(len(data)) + data


async def test_a_bug_stops_the_node_and_garbage_does_not() -> None:
    port = free_base_port(1)
    core = BuggyCore()
    wire = Wire(None, limits_of(DEFAULT_PARAMS), Counter(), replica=True)
    node = Node(core, wire, "127.0.0.1", port, {}, DEFAULT_PARAMS.frame_bytes_max, name="test")
    await node.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client_wire = Wire(None, limits_of(DEFAULT_PARAMS), Counter(), replica=False)
        writer.write(_framed(b"\x01garbage that is no frame"))  # hostile: counted, not a bug
        writer.write(_framed(client_wire.seal(Request.make(7, 1, b"op"))))
        await writer.drain()
        size = LENGTH.unpack(await asyncio.wait_for(reader.readexactly(4), 5))[0]
        reply = client_wire.open(await reader.readexactly(size))
        assert isinstance(reply, Reply) and reply.result == b"ok"
        assert sum(wire.dropped.values()) == 1 and not node.failure.done()
        writer.write(_framed(client_wire.seal(Request.make(7, 2, b"op"))))
        await writer.drain()
        with pytest.raises(RuntimeError, match="a bug in the core"):
            await asyncio.wait_for(node.failure, 5)
        writer.close()
    finally:
        await node.stop()

"""TCP transport: length-prefixed frames, a push parser, persistent outbound connections.

Each frame is a 4-byte big-endian length and the frame bytes. ``FrameProtocol`` feeds received
bytes to a parser that hands whole frames to a callback; a length over the limit cannot be
resynchronised, so that connection is closed (an honest peer reconnects). ``Peer`` keeps one
outbound connection to a node, reconnecting with exponential back-off, and bounds what it holds:
frames queued while disconnected, and bytes buffered in the kernel-facing write buffer. What does
not fit is dropped and counted; the protocol above recovers lost messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import Counter, deque
from collections.abc import Callable

log = logging.getLogger("bft.transport")

LENGTH = struct.Struct("!I")
FrameHandler = Callable[[bytes, "FrameProtocol"], None]


class FrameProtocol(asyncio.Protocol):
    def __init__(self, on_frame: FrameHandler, frame_bytes_max: int, counters: Counter[str]) -> None:
        self.on_frame = on_frame
        self.frame_bytes_max = frame_bytes_max
        self.counters = counters
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self.write_paused = False
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = LENGTH.unpack_from(buf, pos)
            if size > self.frame_bytes_max:
                self.counters["frame-too-large"] += 1
                log.warning("closing a connection that announced a %d-byte frame", size)
                buf.clear()
                if self.transport is not None:
                    self.transport.close()
                return
            if end - pos - 4 < size:
                break
            frame = bytes(buf[pos + 4:pos + 4 + size])
            pos += 4 + size
            # Hostile input is rejected and counted where it is parsed (the wire, the core); an
            # exception here is our own bug, which the node turns into a stop (Node.failure).
            self.on_frame(frame, self)
        if pos:
            del buf[:pos]

    def send(self, frame: bytes) -> bool:
        """Queue one frame; False (and nothing queued) if closed or over the buffer limit.

        Frames queued during one event-loop iteration leave in one write: under load a replica
        answers many frames per iteration, and a system call per frame was most of its time."""
        t = self.transport
        if t is None or t.is_closing() or self.write_paused:
            return False
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out += (LENGTH.pack(len(frame)), frame)
        return True

    def _flush(self) -> None:
        data = b"".join(self._out)
        self._out.clear()
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)


class Peer:
    """One persistent outbound connection, with reconnect and a bounded backlog."""

    BACKLOG_FRAMES_MAX = 1024
    RETRY_S_MIN = 0.05
    RETRY_S_MAX = 2.0

    def __init__(
        self,
        host: str,
        port: int,
        on_frame: FrameHandler,
        frame_bytes_max: int,
        counters: Counter[str],
    ) -> None:
        self.host, self.port = host, port
        self.on_frame = on_frame
        self.frame_bytes_max = frame_bytes_max
        self.counters = counters
        self.protocol: FrameProtocol | None = None
        self.backlog: deque[bytes] = deque()
        self.greeting: bytes | None = None  # sent first on every (re)connection
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.RETRY_S_MIN
        while True:
            try:
                _, proto = await loop.create_connection(
                    lambda: FrameProtocol(self.on_frame, self.frame_bytes_max, self.counters),
                    self.host,
                    self.port,
                )
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.RETRY_S_MAX)
                continue
            delay = self.RETRY_S_MIN
            self.protocol = proto
            if self.greeting is not None:
                proto.send(self.greeting)
            while self.backlog and proto.send(self.backlog[0]):
                self.backlog.popleft()
            self.connected.set()
            await proto.closed
            self.connected.clear()
            self.protocol = None
            self.counters["disconnects"] += 1

    def send(self, frame: bytes) -> None:
        proto = self.protocol
        if proto is not None and proto.send(frame):
            return
        if proto is not None and proto.transport is not None:
            self.counters["send-buffer-full"] += 1  # connected but the peer is not reading
            return
        if len(self.backlog) >= self.BACKLOG_FRAMES_MAX:
            self.backlog.popleft()
            self.counters["backlog-full"] += 1
        self.backlog.append(frame)

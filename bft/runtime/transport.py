"""TCP transport: length-prefixed frames, a push parser, sessions, persistent outbound connections.

Each frame is a 4-byte big-endian length and the frame bytes. ``FrameProtocol`` feeds received
bytes to a parser that hands whole frames to a callback; a length over the limit cannot be
resynchronised, so that connection is closed (an honest peer reconnects). With a ``Session``
(bft.runtime.session) a connection first runs its handshake, in frames of at most a few hundred
bytes, and then hands on only frames that passed their session tag, with the peer it proved to
be; anything else closes the connection. ``Admission`` bounds what peers that have not proved who
they are may hold: how many at once, and for how long. ``Peer`` keeps one outbound connection to
a node, reconnecting with exponential back-off, and bounds what it holds: frames queued while
disconnected, and bytes buffered in the kernel-facing write buffer. What does not fit is dropped
and counted; the protocol above recovers lost messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import Counter, deque
from collections.abc import Callable

from bft.messages import MAC_BYTES
from bft.runtime.session import HANDSHAKE_BYTES_MAX, Session, SessionError

log = logging.getLogger("bft.transport")

LENGTH = struct.Struct("!I")
FrameHandler = Callable[[bytes, "FrameProtocol"], None]


class Admission:
    """What a server grants connections whose peer has not yet proved who it is: at most
    ``pending_max`` of them at a time, at most ``per_source_max`` from one address, each for
    ``deadline_s``. Each costs the server one ephemeral key exchange and one signature, so their
    number and lifetime are what bound it. The per-address share keeps one host that holds idle
    connections open from locking out every other (bench.fuzz showed it could); and when all the
    places are taken, the oldest waiting connection gives its place to the newest, so attackers on
    several addresses must open connections faster than an honest handshake completes (a few
    milliseconds) to keep one out, not merely hold them (bench.attacks: a fresh client took 9 s
    to get in behind 80 idle connections when the newest was refused instead)."""

    DEADLINE_S = 5.0  # an honest handshake takes three messages and well under a millisecond

    def __init__(
        self, counters: Counter[str], pending_max: int = 64, per_source_max: int = 16, deadline_s: float = DEADLINE_S
    ) -> None:
        self.counters = counters
        self.pending_max = pending_max
        self.per_source_max = per_source_max
        self.deadline_s = deadline_s
        self.pending: dict[FrameProtocol, tuple[str, asyncio.TimerHandle]] = {}  # oldest first
        self.per_source: Counter[str] = Counter()

    def admit(self, conn: FrameProtocol) -> bool:
        assert conn.transport is not None
        peer = conn.transport.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if self.per_source[source] >= self.per_source_max:
            self.counters["unauthenticated-connections-refused"] += 1
            return False
        if len(self.pending) >= self.pending_max:
            oldest = next(iter(self.pending))
            self._release(oldest)
            self.counters["unauthenticated-connections-evicted"] += 1
            if oldest.transport is not None:
                oldest.transport.close()
        self.per_source[source] += 1
        self.pending[conn] = (source, asyncio.get_running_loop().call_later(self.deadline_s, conn.expire))
        conn.ready.add_done_callback(lambda _: self._release(conn))
        return True

    def _release(self, conn: FrameProtocol) -> None:
        entry = self.pending.pop(conn, None)
        if entry is None:
            return  # evicted already
        source, timer = entry
        timer.cancel()
        self.per_source[source] -= 1
        if not self.per_source[source]:
            del self.per_source[source]


class FrameProtocol(asyncio.Protocol):
    def __init__(
        self,
        on_frame: FrameHandler,
        frame_bytes_max: int,
        counters: Counter[str],
        session: Session | None = None,
        admission: Admission | None = None,
        on_session: Callable[[FrameProtocol], None] | None = None,
        traffic: list[int] | None = None,
    ) -> None:
        self.on_frame = on_frame
        # Bytes [in, out], shared by every connection of one peer (bft.runtime.metrics).
        self.traffic = [0, 0] if traffic is None else traffic
        # Called as soon as the handshake completes, before any frame after it is handed on (a
        # future's callbacks would run only later, after frames that arrived in the same read).
        self.on_session = on_session
        self.frame_bytes_max = frame_bytes_max
        self.counters = counters
        self.session = session
        self.admission = admission
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self.write_paused = False
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        # Done when frames may flow: at once without a session, after the handshake with one
        # (True), or when the connection closed first (False).
        self.ready: asyncio.Future[bool] = loop.create_future()
        if session is None:
            self.ready.set_result(True)

    @property
    def peer(self):
        return None if self.session is None else self.session.peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)  # type: ignore[attr-defined]
        if self.admission is not None and not self.admission.admit(self):
            transport.close()
        elif self.session is not None and self.session.expect is not None:
            self._write(self.session.initiate())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.ready.done():
            self.ready.set_result(False)
        if not self.closed.done():
            self.closed.set_result(None)

    def expire(self) -> None:
        if not self.ready.done() and self.transport is not None:
            self.counters["handshake-timeout"] += 1
            self.transport.close()

    def _write(self, frame: bytes) -> None:
        if self.transport is not None:
            self.transport.write(LENGTH.pack(len(frame)) + frame)
            self.traffic[1] += 4 + len(frame)

    def _handshake(self, frame: bytes) -> None:
        session = self.session
        assert session is not None
        try:
            answer = session.receive_handshake(frame)
        except SessionError as exc:
            self.counters["bad-handshake"] += 1
            log.info("closing a connection: %s", exc)
            if self.transport is not None:
                self.transport.close()
            return
        if answer is not None:
            self._write(answer)
        if session.established and not self.ready.done():
            if self.on_session is not None:
                self.on_session(self)
            self.ready.set_result(True)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False

    def data_received(self, data: bytes) -> None:
        self.traffic[0] += len(data)
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        session = self.session
        while end - pos >= 4:
            (size,) = LENGTH.unpack_from(buf, pos)
            if session is None:
                limit = self.frame_bytes_max
            elif session.established:
                limit = self.frame_bytes_max + MAC_BYTES  # the session tag
            else:
                limit = HANDSHAKE_BYTES_MAX
            if size > limit:
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
            if session is not None:
                if not session.established:
                    self._handshake(frame)
                    if self.transport is None or self.transport.is_closing():
                        break
                    continue
                try:
                    frame = session.open(frame)
                except SessionError:
                    # Not from the peer that ran the handshake, or replayed, reordered or cut:
                    # nothing after it on this stream can be trusted.
                    self.counters["bad-session-tag"] += 1
                    buf.clear()
                    if self.transport is not None:
                        self.transport.close()
                    return
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
        if t is None or t.is_closing() or self.write_paused or not self.ready.done():
            return False
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        if self.session is not None:
            frame = self.session.seal(frame)
        self._out += (LENGTH.pack(len(frame)), frame)
        return True

    def _flush(self) -> None:
        data = b"".join(self._out)
        self._out.clear()
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)
            self.traffic[1] += len(data)


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
        session: Callable[[], Session] | None = None,
        on_session: Callable[[FrameProtocol], None] | None = None,
        traffic: list[int] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.traffic = traffic
        self.on_session = on_session
        self.on_frame = on_frame
        self.frame_bytes_max = frame_bytes_max
        self.counters = counters
        self.session = session  # a fresh one for each connection: new keys every time
        self.protocol: FrameProtocol | None = None
        self.backlog: deque[bytes] = deque()
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """The peer proved it is up (it opened a session to us): retry now, not after the
        back-off, which after a restart of a few seconds has grown to ``RETRY_S_MAX``."""
        if self.protocol is None:
            self._woken.set()

    async def _back_off(self, delay: float) -> float:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), delay)
        if self._woken.is_set():
            self._woken.clear()
            return self.RETRY_S_MIN
        return min(delay * 2, self.RETRY_S_MAX)

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
                session = None if self.session is None else self.session()
                _, proto = await loop.create_connection(
                    lambda session=session: FrameProtocol(
                        self.on_frame, self.frame_bytes_max, self.counters, session, on_session=self.on_session,
                        traffic=self.traffic,
                    ),
                    self.host,
                    self.port,
                )
            except OSError:
                delay = await self._back_off(delay)
                continue
            try:
                ok = await asyncio.wait_for(asyncio.shield(proto.ready), Admission.DEADLINE_S)
            except TimeoutError:
                ok = False
                if proto.transport is not None:
                    proto.transport.close()
            if not ok:
                # Closed during the handshake: the peer is restarting, or is not who we expect.
                self.counters["handshake-failed"] += 1
                delay = await self._back_off(delay)
                continue
            delay = self.RETRY_S_MIN
            self._woken.clear()
            self.protocol = proto
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

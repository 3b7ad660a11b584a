"""The client library: an asyncio ``Client`` and a blocking facade.

``async with Client(cluster, client_id) as c: result = await c.invoke(op)`` returns once enough
replicas sent matching replies: 2f+1 with the read-only optimisation on (the default, ``read_only``
in cluster.toml), and for read-only and tentative results always; f+1 committed ones without it.
Many ``invoke`` calls may run at once from one process, up to the cluster's ``client_window``;
beyond that they wait their turn.

Timestamps start at the wall clock in microseconds, so a restarted client never reuses a
timestamp the replicas already hold a reply for (unless it issued over a million requests a second).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import Counter

from bft.config import Cluster
from bft.core.client import ClientCore
from bft.core.effects import Broadcast, Send
from bft.core.params import DEFAULT_PARAMS, Params
from bft.crypto import CLIENT
from bft.messages import Reply
from bft.runtime.session import Session
from bft.runtime.transport import FrameProtocol, Peer
from bft.runtime.wire import Wire, limits_of

TICK_S = 0.05


class QuorumTimeout(TimeoutError):
    """No quorum of replicas answered in time."""


class Client:
    def __init__(self, cluster: Cluster, client_id: int) -> None:
        keyring = cluster.keyring(CLIENT, client_id)
        self._setup(
            client_id, cluster.f, cluster.params, Wire(keyring, limits_of(cluster.params), Counter(), sessions=True),
            [(r.host, r.port) for r in cluster.replicas],
        )

    @classmethod
    def unreplicated(cls, host: str, port: int, client_id: int = 0, params: Params = DEFAULT_PARAMS) -> Client:
        """A client of ``bft serve``: one server, no authentication, one reply is enough."""
        self = cls.__new__(cls)
        self._setup(client_id, 0, params, Wire(None, limits_of(params), Counter(), replica=False), [(host, port)])
        return self

    def _setup(self, client_id: int, f: int, params: Params, wire: Wire, addrs: list[tuple[str, int]]) -> None:
        self.id = client_id
        self.core = ClientCore(client_id, f, params, first_timestamp=time.time_ns() // 1000)
        self.wire = wire
        self.dropped = wire.dropped
        self._addrs = addrs
        self._peers: list[Peer] = []
        self._futures: dict[int, asyncio.Future[bytes]] = {}
        self._deadlines: dict[int, tuple[float, float, bool]] = {}  # origin -> (when, timeout, read-only)
        self._window_open: asyncio.Event | None = None
        self._ticker: asyncio.Task | None = None

    @property
    def f(self) -> int:
        return self.core.f

    def _now_ms(self) -> int:
        return int(asyncio.get_running_loop().time() * 1000)

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._window_open = asyncio.Event()
        self._window_open.set()
        kr, encrypt = self.wire.keyring, self.core.params.encrypt
        for j, (host, port) in enumerate(self._addrs):
            # A session per connection: replies come only on it, from the replica it proved to be.
            session = None if kr is None else (lambda j=j: Session(kr, expect=j, encrypt=encrypt))
            peer = Peer(
                host, port, self._on_frame, self.core.params.frame_bytes_max, self.dropped, session,
                None if kr is None else (lambda conn: kr.use_session_key(conn.peer, conn.session.request_key)),
            )
            self._peers.append(peer)
            peer.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for p in self._peers:
            await p.close()
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()

    async def wait_connected(self, timeout: float = 5.0) -> None:
        """Wait until connections to a quorum of replicas are up (useful before measuring)."""
        need = min(len(self._peers), 2 * self.f + 1)
        deadline = time.monotonic() + timeout
        while sum(p.connected.is_set() for p in self._peers) < need:
            if time.monotonic() > deadline:
                raise QuorumTimeout(f"could not connect to {need} of {len(self._peers)} replicas")
            await asyncio.sleep(0.01)

    async def invoke(self, op: bytes, read_only: bool = False, timeout: float | None = 30.0) -> bytes:
        """Run ``op`` and return the agreed result; raise ``QuorumTimeout`` if no quorum answers."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self.core.can_submit():
            self._window_open.clear()
            remaining = None if deadline is None else deadline - loop.time()
            try:
                await asyncio.wait_for(self._window_open.wait(), remaining)
            except TimeoutError:
                raise QuorumTimeout("timed out waiting for a free slot in the client window") from None
        req = self.core.submit(op, self._now_ms(), read_only)
        fut: asyncio.Future[bytes] = loop.create_future()
        self._futures[req.timestamp] = fut
        if deadline is not None:
            # Failed by the ticker when due: one timer handle and wrapper future per call
            # (asyncio.wait_for) cost more than the rest of an operation's bookkeeping here.
            self._deadlines[req.timestamp] = (deadline, timeout, read_only)
        self._send(self.core.take_outbox())
        try:
            return await fut
        finally:
            self._futures.pop(req.timestamp, None)
            self._deadlines.pop(req.timestamp, None)
            if self.core.abandon(req.timestamp):
                self._window_open.set()

    def _expire(self, now: float) -> None:
        for origin, (deadline, timeout, read_only) in list(self._deadlines.items()):
            if now < deadline:
                continue
            del self._deadlines[origin]
            fut = self._futures.get(origin)
            if fut is None or fut.done():
                continue
            # With the read-only optimisation on (the default) every result needs 2f+1 matching
            # replies, as a read-only one always does; without it f+1 committed ones suffice.
            need = 2 * self.f + 1 if read_only or self.core.params.read_only else self.f + 1
            ts = self.core.inflight.of_origin(origin)
            answered = 0 if ts is None else len(self.core.inflight[ts].replies)
            fut.set_exception(QuorumTimeout(
                f"no {need} matching replies within {timeout:g} s "
                f"({answered} of {len(self._peers)} replicas answered; is the cluster up?)"
            ))

    # -- plumbing ---------------------------------------------------------------------------

    def _send(self, effects: list[Send | Broadcast]) -> None:
        now_ms = self._now_ms()
        sealed: dict[tuple[int, bool], bytes] = {}  # a read sent to 2f+1 replicas is sealed once
        for effect in effects:
            sign = self.core.must_sign(effect, now_ms)
            data = sealed.get((id(effect.msg), sign))
            if data is None:
                data = sealed[id(effect.msg), sign] = self.wire.seal(effect.msg, sign=sign)
            if isinstance(effect, Broadcast):
                for p in self._peers:
                    p.send(data)
            else:
                self._peers[effect.to].send(data)

    def _on_frame(self, data: bytes, conn: FrameProtocol) -> None:
        msg = self.wire.open(data, conn.peer)
        if not isinstance(msg, Reply):
            return
        if conn.peer is not None and conn.peer[1] != msg.replica:
            self.dropped["not-from-session-peer"] += 1
            return
        core = self.core
        core.on_reply(msg, self._now_ms())
        if core.outbox:  # a fallback or a resend goes at once, not at the next tick
            self._send(core.take_outbox())
        for ts, result in self.core.take_completed():
            fut = self._futures.get(ts)
            if fut is not None and not fut.done():
                fut.set_result(result)
            self._window_open.set()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_S)
            self._send(self.core.tick(self._now_ms()))
            self._expire(loop.time())


class BlockingClient:
    """A synchronous facade: runs a ``Client`` on an event loop in a background thread."""

    def __init__(self, cluster: Cluster, client_id: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client = Client(cluster, client_id)
        self._run(self._client.start())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def invoke(self, op: bytes, read_only: bool = False, timeout: float | None = 30.0) -> bytes:
        try:
            return self._run(self._client.invoke(op, read_only, timeout))
        except concurrent.futures.CancelledError:
            raise QuorumTimeout("client closed") from None

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

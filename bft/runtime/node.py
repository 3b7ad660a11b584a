"""The asyncio shell around a core: sockets in, core steps, frames out, timers, admin HTTP.

One ``Node`` drives either a PBFT ``Replica`` or the ``Unreplicated`` baseline. All protocol
decisions are the core's; this module only authenticates, decodes, delivers and sends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from bft.byzantine import held_ms, lie
from bft.config import Cluster
from bft.core.effects import Broadcast, Effect, Executed, Persist, Promise, ReplyTo, Send
from bft.core.params import DEFAULT_PARAMS, Params
from bft.core.replica import Replica
from bft.core.statetransfer import CheckpointDamaged
from bft.core.unreplicated import Unreplicated
from bft.crypto import CLIENT, REPLICA, Keyring
from bft.messages import Message, Request, Suspect
from bft.runtime.admin import start_admin
from bft.runtime.datadir import DataDir
from bft.runtime.metrics import OBSERVE_S, Metrics, Observer
from bft.runtime.session import Session
from bft.runtime.transport import Admission, FrameProtocol, Peer
from bft.runtime.trust import ClientTrust
from bft.runtime.wire import Wire, limits_of
from bft.service import Service

log = logging.getLogger("bft.node")

TICK_S = 0.02
SUMMARY_S = 10.0


def wall_ms() -> int:
    # Batch timestamps are compared across replicas (clock skew bound), so this is wall time.
    return time.time_ns() // 1_000_000


class Node:
    def __init__(
        self,
        core: Replica | Unreplicated,
        wire: Wire,
        host: str,
        port: int,
        peers: dict[int, tuple[str, int]],
        frame_bytes_max: int,
        admin_port: int = 0,
        name: str = "server",
        data: DataDir | None = None,
        rewrite: Callable[[Message], list[Message]] | None = None,
    ) -> None:
        self.core = core
        # A Byzantine replica for tests and demonstrations (bft.byzantine): what the honest core
        # sends is rewritten before it is sealed, so its lies carry its own valid MACs. None: honest.
        self.rewrite = rewrite
        self.rewritten = 0  # messages the rewrite changed
        self.wire = wire
        self.trust = ClientTrust(wire, lambda: self.core, self._dispatch, name)
        self.data = data
        self._held: list[Effect] | None = None  # effects waiting for the group commit, if one is due
        self._arrived: list[Request] = []  # requests of this event-loop iteration, for one batch
        self.host, self.port, self.admin_port = host, port, admin_port
        self.name = name
        self.transport_drops: Counter[str] = wire.dropped
        self.frame_bytes_max = frame_bytes_max
        kr = wire.keyring
        encrypt = isinstance(core, Replica) and core.params.encrypt
        self.metrics = Metrics(core.params.checkpoint_interval if isinstance(core, Replica) else 1)
        self.observer: Observer | None = None
        self.admin_peers: list[tuple[int, str, int]] = []  # (id, host, admin port): the dashboard's
        self.peers = {
            j: Peer(
                h, p, self._on_frame, frame_bytes_max, self.transport_drops,
                None if kr is None else (lambda j=j: Session(kr, expect=j, encrypt=encrypt)),
                traffic=self.metrics.peer(f"{REPLICA}-{j}"),
            )
            for j, (h, p) in peers.items()
        }
        self.admission = Admission(self.transport_drops)
        # The connection each client's replies go to: the one its last session runs on (or,
        # without keys, the one its last request came on).
        self.client_conns: dict[int, FrameProtocol] = {}
        self.replica_conns: dict[int, FrameProtocol] = {}  # inbound, by the replica that proved it
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._admin: web.AppRunner | None = None
        self.started_s = time.monotonic()
        self.failure: asyncio.Future[None] | None = None  # set when our own code raised
        self.recoveries = 0  # proactive recoveries so far, and how long the last one took
        self.recovery_s = 0.0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.failure = loop.create_future()
        loop.set_exception_handler(self._on_bug)
        if self.data is not None and isinstance(self.core, Replica):
            self._recover(self.data)
        self._server = await loop.create_server(self._accept, self.host,
            self.port,
            reuse_address=True,
        )
        for p in self.peers.values():
            p.start()
        jobs = [self._ticker(), self._summaries()]
        if isinstance(self.core, Replica):
            self.observer = Observer(self.name, self.core, self._drops, self.metrics)
        if isinstance(self.core, Replica) and self.wire.keyring is not None:
            jobs.append(self._recoveries())
        for job in jobs:
            task = loop.create_task(job)
            task.add_done_callback(self._task_done)
            self._tasks.append(task)
        if self.admin_port:
            self._admin = await start_admin(self, self.host, self.admin_port)
        log.info("%s listening on %s:%d", self.name, self.host, self.port)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for p in self.peers.values():
            await p.close()
        if self._server is not None:
            self._server.close()
            for conn in list(self.client_conns.values()) + list(self.replica_conns.values()):
                if conn.transport is not None:
                    conn.transport.close()
            await self._server.wait_closed()
        if self._admin is not None:
            await self._admin.cleanup()
        if self.data is not None:
            await self.data.close()

    def _recover(self, data: DataDir) -> None:
        core = self.core
        assert isinstance(core, Replica)
        saved, records = data.load()
        try:
            core.recover(saved, records)
        except CheckpointDamaged as exc:
            data.damaged(f"{data.checkpoints.path}: {exc}", data.checkpoints.path)
            core = self.core = Replica(core.id, core.f, core.params, core.execution.service_factory)
            core.recover(None, records)
        if saved is not None or records:
            data.resumed = {"checkpoint": core.stable, "executed": core.executed, "records": len(records)}
            log.info(
                "%s resumed in %s: checkpoint %d, %d records, executed %d, view %d",
                self.name, data.directory, core.stable, len(records), core.executed, core.view,
            )
        self._dispatch(core.take_outbox())  # peers queue it until they connect

    def _on_bug(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """An exception escaped a callback (a frame handler, a core step): hostile input never
        gets here, so it is a bug in our code. Fail-stop: a replica that carried on in an unknown
        state could turn into a Byzantine one; stopped, it is merely crashed, which the others
        tolerate, and the run that found the bug fails."""
        exc = context.get("exception")
        log.critical("%s stops on a bug: %s", self.name, context.get("message"), exc_info=exc)
        if self.failure is not None and not self.failure.done():
            self.failure.set_exception(exc if isinstance(exc, BaseException) else RuntimeError(context["message"]))

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            context = {"message": f"task {task.get_coro()!r} failed", "exception": task.exception()}
            self._on_bug(task.get_loop(), context)

    async def _ticker(self) -> None:
        """The core's clock, and the observer's on the same wake-up: on this machine (a VM) a
        wake-up costs more than the work it does, and an idle replica spent 23 ms of CPU a
        second on 131 of them (100 ticks, 20 polls), a loaded one the same share of its cores."""
        next_poll = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            self._dispatch(self.core.tick(wall_ms()))
            now = time.monotonic()
            if self.trust.doubts:
                self.trust.judge(now)
            if self.observer is not None and now >= next_poll:
                next_poll = now + OBSERVE_S
                self.observer.poll(now)

    def _drops(self) -> Counter[str]:
        return self.core.dropped + self.transport_drops

    async def _recoveries(self) -> None:
        """Proactive recovery, each replica in its turn: replica i at i/n of every period, by the
        wall clock, so that no two recover at once (at most one is ever "recovering")."""
        core = self.core
        assert isinstance(core, Replica)
        period = core.params.recovery_period_s
        offset = period * core.id / core.n
        while True:
            now = time.time()
            await asyncio.sleep(((now - offset) // period + 1) * period + offset - now)
            self.recover_proactively()

    def recover_proactively(self) -> None:
        """Castro and Liskov's proactive recovery (TOCS 2002), without the reboot: every session
        is closed (the peers reconnect with fresh ephemeral keys), the request keys the clients'
        sessions exported are forgotten (a tag made with one no longer verifies here: clients'
        requests in flight fall back to their signatures), and the state is checked against the
        certified checkpoint, the differing partitions fetched. Keys an intruder read from this
        replica's memory are useless from here on; its signing key is the one secret that must
        stay out of reach (kept offline or in an HSM, as the paper's secure co-processor)."""
        started = time.perf_counter()
        kr = self.wire.keyring
        assert kr is not None
        kr.forget_session_keys()
        conns = [*self.client_conns.values(), *self.replica_conns.values()]
        conns += [p.protocol for p in self.peers.values() if p.protocol is not None]
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        self._dispatch(self.core.audit(wall_ms()))
        self.recoveries += 1
        self.recovery_s = time.perf_counter() - started
        log.info("%s: proactive recovery %d: %d sessions closed, state checked in %.3f s",
                 self.name, self.recoveries, len(conns), self.recovery_s)

    async def _summaries(self) -> None:
        last = None
        while True:
            await asyncio.sleep(SUMMARY_S)
            now = self.status()
            if now != last:
                log.info("%s", " ".join(f"{k}={v}" for k, v in now.items() if k != "stats"))
                last = now

    # -- data path --------------------------------------------------------------------------

    def _accept(self) -> FrameProtocol:
        kr = self.wire.keyring
        if kr is None:
            return FrameProtocol(self._on_frame, self.frame_bytes_max, self.transport_drops)
        return FrameProtocol(
            self._on_frame, self.frame_bytes_max, self.transport_drops, Session(kr), self.admission, self._bind,
            self.metrics.peer("unauthenticated"),
        )

    def _bind(self, conn: FrameProtocol) -> None:
        """A session is up: its peer's previous connection, if any, is replaced (an honest peer
        that opens a new one has given up on the old), so each principal holds at most one."""
        kind, who = conn.peer
        conns = self.client_conns if kind == CLIENT else self.replica_conns
        if kind == CLIENT:
            self.wire.keyring.use_session_key(conn.peer, conn.session.request_key)
        elif who in self.peers:
            self.peers[who].wake()  # it is back: our connection to it need not wait out a back-off
        conn.traffic = self.metrics.peer(f"{kind}-{who}")  # the handshake's bytes stay unauthenticated's
        old = conns.get(who)
        conns[who] = conn
        if old is not None and old.transport is not None:
            old.transport.close()
        # Forgotten once closed, with its receive buffer (bench.fuzz found connections kept).
        conn.closed.add_done_callback(lambda _: conns.get(who) is conn and conns.pop(who))

    def _on_frame(self, data: bytes, conn: FrameProtocol) -> None:
        msg = self.wire.open(data, conn.peer)
        if self.wire.unverifiable:  # filled by a pre-prepare: rare, hence the check first
            if conn.peer is not None and conn.peer[0] == REPLICA:
                self.trust.doubt(time.monotonic())
            self.wire.unverifiable.clear()
        if self.wire.unauthentic:
            if conn.peer is not None and conn.peer[0] == REPLICA and isinstance(self.core, Replica):
                self._dispatch(self.core.offer_unverified(self.wire.unauthentic, wall_ms()))
            self.wire.unauthentic = []
        if msg is None:
            return
        self.metrics.msgs_in[msg.TYPE] += 1
        peer = conn.peer
        if peer is None:  # no keys (the unreplicated baseline): a request names its connection
            if isinstance(msg, Request) and self.client_conns.get(msg.client) is not conn:
                self.client_conns[msg.client] = conn
                conn.closed.add_done_callback(
                    lambda _, c=msg.client: self.client_conns.get(c) is conn and self.client_conns.pop(c)
                )
        elif not _from_peer(msg, peer):
            self.transport_drops["not-from-session-peer"] += 1
            return
        if isinstance(msg, Suspect):
            self.trust.distrust(msg.client)
            return
        if peer is not None and peer[0] == CLIENT:
            if self.trust.first_large_copy(msg):
                self._dispatch(self.core.keep_body(msg, wall_ms()))
                return
            if not self.trust.may_hold(msg):
                self.transport_drops["unsigned-request-at-backup"] += 1
                return
        if isinstance(msg, Request) and isinstance(self.core, Replica):
            # The requests read in this iteration (from every ready connection) go to the core
            # together at its end: one batch where the first would have gone alone.
            if not self._arrived:
                asyncio.get_running_loop().call_soon(self._step_arrived)
            self._arrived.append(msg)
            return
        self._dispatch(self.core.step(msg, wall_ms()))

    def _step_arrived(self) -> None:
        arrived, self._arrived = self._arrived, []
        self._dispatch(self.core.step_requests(arrived, wall_ms()))

    def _dispatch(self, effects: list[Effect]) -> None:
        """The router: the core's effects become frames, disk writes and nothing else.

        Persist, then send: a promise goes to the log's buffer, and from then until the group
        commit at the end of this event-loop iteration (written, and fsynced in "strict"), every
        effect waits, so nothing leaves before the promises made ahead of it are on disk."""
        if self.rewrite is not None:
            told: list[Effect] = []
            for effect in effects:
                out = lie(self.rewrite, effect)
                self.rewritten += out != [effect]
                told += out
            effects = told
        for effect in effects:
            if isinstance(effect, Promise):
                assert self.data is not None, "a core that keeps promises needs a data directory"
                self.data.append(effect.record)
                if self._held is None:
                    self._held = []
                    asyncio.get_running_loop().call_soon(self._group_commit)
            elif self._held is not None:
                self._held.append(effect)
            else:
                self._route(effect)

    def _group_commit(self) -> None:
        assert self.data is not None and self._held is not None
        self.data.commit()
        held, self._held = self._held, None
        for effect in held:
            self._route(effect)

    def _route(self, effect: Effect, held: bool = False) -> None:
        if self.rewrite is not None and not held and isinstance(effect, Send | Broadcast):
            delay_ms = held_ms(self.rewrite, effect.msg, self.core.params)
            if delay_ms:  # a liar that sends this late, as it is (bft.byzantine.DELAYING)
                self.rewritten += 1
                asyncio.get_running_loop().call_later(delay_ms / 1000, self._route, effect, True)
                return
        match effect:
            case Send(to, msg):
                peer = self.peers.get(to)
                if peer is not None:
                    peer.send(self.wire.seal(msg, to))
                    self.metrics.msgs_out[msg.TYPE] += 1
            case Broadcast(msg):
                data = self.wire.seal(msg)
                for p in self.peers.values():
                    p.send(data)
                self.metrics.msgs_out[msg.TYPE] += len(self.peers)
            case ReplyTo(client, reply):
                self.metrics.msgs_out[reply.TYPE] += 1
                conn = self.client_conns.get(client)
                if conn is None or not conn.send(self.wire.seal(reply)):
                    self.transport_drops["reply-undeliverable"] += 1
            case Persist():
                self.metrics.persisted(effect.seq)
                if self.data is not None:
                    self.data.save(effect)
            case Executed(batch):
                self.metrics.executed(batch, wall_ms())
            case _:
                raise AssertionError(f"the core asked for an unknown effect: {effect!r}")

    # -- admin ------------------------------------------------------------------------------

    def status(self) -> dict:
        core = self.core
        out: dict = {"node": self.name}
        if isinstance(core, Replica):
            out |= {
                "replica": core.id,
                "view": core.view,
                "primary": core.primary,
                "executed": core.executed,
                "stable_checkpoint": core.stable,
                "stable_digest": core.checkpoints.own[core.stable].root.hex(),
                "view_changing": core.view_changing,
                "log_slots": len(core.normal.log),
                "pending_requests": len(core.normal.pending),
            }
        if self.data is not None:
            out["persisted_checkpoint"] = self.data.checkpoints.saved_seq
            out["durability"] = core.params.durability if isinstance(core, Replica) else "memory"
            if self.data.problems:
                out["data_problems"] = self.data.problems
            if self.data.resumed:
                out["resumed"] = self.data.resumed
            if self.data.promises is not None:
                out["promise_log"] = {k: round(v, 6) for k, v in sorted(self.data.promises.stats.items())}
        if isinstance(core, Replica) and self.wire.keyring is not None:
            out["proactive_recoveries"] = self.recoveries
            out["last_recovery_s"] = round(self.recovery_s, 4)
        if self.rewrite is not None:
            out["rewritten"] = self.rewritten
        out["dropped"] = dict(sorted(self._drops().items()))
        out["stats"] = dict(sorted((core.stats + self.wire.stats).items()))
        return out

def _from_peer(msg: Message, peer: tuple[str, int]) -> bool:
    """A client's session carries its own requests only; a replica's, its own messages and the
    client requests it relays (each still under its client's authenticator)."""
    kind, who = peer
    if isinstance(msg, Request):
        return kind == REPLICA or msg.client == who
    return kind == REPLICA and msg.sender == who


def replica_node(
    cluster: Cluster,
    replica_id: int,
    service: Callable[[], Service],
    data_dir: Path | None = None,
    rewrite: Callable[[Message], list[Message]] | None = None,
) -> Node:
    """A replica; its stable checkpoints and promise log go to ``data_dir`` (default:
    data/replica-I beside the cluster file), and it resumes from them when it starts. With
    ``rewrite`` (a behaviour of bft.byzantine) it is a Byzantine one."""
    keyring = cluster.keyring(REPLICA, replica_id)
    params = cluster.params
    core = Replica(replica_id, cluster.f, params, service)
    me = cluster.replicas[replica_id]
    peers = {r.id: (r.host, r.port) for r in cluster.replicas if r.id != replica_id}
    wire = Wire(keyring, limits_of(params), Counter(), sessions=True)
    data = DataDir(data_dir or cluster.path.parent / "data" / f"replica-{replica_id}", params.durability, wire.limits)
    node = Node(
        core, wire, me.host, me.port, peers, params.frame_bytes_max, me.admin_port, f"replica-{replica_id}", data,
        rewrite,
    )
    node.admin_peers = [(r.id, r.host, r.admin_port) for r in cluster.replicas]
    return node


def unreplicated_node(
    host: str, port: int, service: Service, params: Params = DEFAULT_PARAMS, keyring: Keyring | None = None
) -> Node:
    """The benchmarks' baseline: one server, no agreement. With ``keyring`` (replica 0's of a
    cluster of f = 0) its clients reach it over sessions and tag their requests, as a replica's
    do, so that the cost of replication can be read apart from the cost of authentication."""
    wire = Wire(keyring, limits_of(params), Counter(), replica=True, sessions=True)
    return Node(Unreplicated(params, service), wire, host, port, {}, params.frame_bytes_max, name="unreplicated")

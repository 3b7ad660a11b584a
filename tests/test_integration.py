"""Real replica processes on 127.0.0.1 with real keys, driven by the client library and the CLI."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import msgpack
import pytest

from bft.crypto import CLIENT
from bft.messages import DEFAULT_LIMITS, Commit, Hello, Prepare, Reply, Request, decode_payload, frame, split_frame
from bft.runtime.wire import Wire
from bft.service import KVService
from client import BlockingClient, Client, QuorumTimeout

pytestmark = pytest.mark.integration


def value_of(result: bytes) -> bytes | None:
    ok, value = msgpack.unpackb(result)
    assert ok is True
    return value


async def workload(
    c: Client, name: bytes, count: int, concurrency: int = 8, keys: int = 50, read_only_too: bool = False
) -> None:
    """``count`` writes to ``keys`` keys of our own in rounds of ``keys`` concurrent ones, each
    round followed by a read of every key (ordered, or ordered and read-only in turn) that must
    return what was written."""
    model: dict[bytes, bytes] = {}
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        key = b"%s-%d" % (name, i % keys)
        async with sem:
            value = b"%s=%d" % (key, i)
            await c.invoke(KVService.put(key, value))
            model[key] = value

    for start in range(0, count, keys):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + keys))))
        for j, (key, value) in enumerate(sorted(model.items())):
            read_only = read_only_too and j % 2 == 1
            assert value_of(await c.invoke(KVService.get(key), read_only=read_only)) == value


async def test_two_clients_then_one_backup_killed(local_cluster) -> None:
    cluster = local_cluster.cluster
    async with Client(cluster, 0) as a, Client(cluster, 1) as b:
        await asyncio.gather(a.wait_connected(), b.wait_connected())
        await asyncio.gather(workload(a, b"alice", 500), workload(b, b"bob", 500))
        executed = [local_cluster.status(i)["executed"] for i in range(cluster.n)]
        assert min(executed) > 0
        local_cluster.kill(3)
        await asyncio.gather(workload(a, b"alice", 200), workload(b, b"bob", 200))
        # Everything the clients saw agrees with a fresh reader's view of the state.
        async with Client(cluster, 2) as c:
            assert value_of(await c.invoke(KVService.get(b"alice-49"))) == b"alice-49=199"
            assert value_of(await c.invoke(KVService.get(b"bob-0"))) == b"bob-0=150"
    live = [local_cluster.status(i) for i in range(3)]
    assert len({s["executed"] for s in live}) == 1
    assert all(s["stable_checkpoint"] > 0 for s in live)  # checkpoints kept the log bounded
    assert all(s["log_slots"] <= cluster.params.log_window for s in live)


def _raw_frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


async def test_garbage_and_forgeries_are_dropped_and_counted(local_cluster) -> None:
    cluster = local_cluster.cluster
    target = cluster.replicas[1]
    client_ring = cluster.keyring("client", 0)
    async with Client(cluster, 0) as c:
        await c.wait_connected()
        assert value_of(await c.invoke(KVService.put(b"k", b"before"))) is None
        before = local_cluster.status(1)["dropped"]
        attacks = [
            os.urandom(64),  # no framing at all: the length prefix is garbage, connection closed
            _raw_frame(os.urandom(200)),  # random frame body
            _raw_frame(b"\x01\x03" + os.urandom(30)),  # prepare header, nonsense inside
        ]
        # A prepare claiming to come from replica 2 with a tag made by a client key.
        prep = Prepare(0, 1, bytes(32), 2)
        payload = msgpack.packb((0, 1, bytes(32), 2))
        forged_auth = client_ring.authenticator(Prepare.TYPE, payload)
        attacks.append(_raw_frame(frame(prep, payload, forged_auth)))
        # A commit with a zeroed authenticator.
        payload = msgpack.packb((0, 1, bytes(32), 0))
        attacks.append(_raw_frame(frame(Commit(0, 1, bytes(32), 0), payload, bytes(16 * cluster.n))))
        # A request signed for client 0 but claiming client 5 (replays: the test after this one).
        req = Request.make(5, 1, KVService.put(b"k", b"forged"))
        attacks.append(_raw_frame(frame(req, req.raw, client_ring.authenticator(Request.TYPE, req.raw))))
        # An oversized announced frame.
        attacks.append(struct.pack("!I", cluster.params.frame_bytes_max + 1) + b"x" * 10)
        for data in attacks:
            with socket.create_connection((target.host, target.port)) as s:
                s.sendall(data)
                await asyncio.sleep(0.05)
        for i in range(20):
            assert value_of(await c.invoke(KVService.put(b"k", b"after-%d" % i))) in (b"before", b"after-%d" % (i - 1))
        after = local_cluster.status(1)["dropped"]
    assert after.get("bad-authentication", 0) - before.get("bad-authentication", 0) >= 3
    assert after.get("frame-too-large", 0) - before.get("frame-too-large", 0) >= 1
    assert sum(after.values()) - sum(before.values()) >= len(attacks) - 1
    assert local_cluster.procs[1].poll() is None  # still running


class Recorder:
    """A TCP relay in front of one replica that keeps every frame a client sends through it:
    what an eavesdropper on the client's link would capture."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.frames: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        replica_r, replica_w = await asyncio.open_connection(*self.upstream)
        self._writers += [client_w, replica_w]

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            buf = b""
            while data := await src.read(1 << 16):
                dst.write(data)
                if record:
                    buf += data
                    while len(buf) >= 4 and len(buf) >= 4 + (size := struct.unpack_from("!I", buf)[0]):
                        self.frames.append(buf[4:4 + size])
                        buf = buf[4 + size:]
            dst.close()

        await asyncio.gather(copy(client_r, replica_w, True), copy(replica_r, client_w, False), return_exceptions=True)


# A frame of protocol version 0, counted as "bad-version": sent after a replayed frame on the same
# connection, its count going up shows that the replica has handled the replayed frame.
MARKER = bytes(8)


async def _replay(lc, replica: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send one captured frame on a connection of our own, and wait until the replica handled it."""
    marked = lc.status(replica)["dropped"].get("bad-version", 0)
    r = lc.cluster.replicas[replica]
    reader, writer = await asyncio.open_connection(r.host, r.port)
    writer.write(_raw_frame(data) + _raw_frame(MARKER))
    await writer.drain()
    for _ in range(200):
        if lc.status(replica)["dropped"].get("bad-version", 0) > marked:
            return reader, writer
        await asyncio.sleep(0.05)
    raise AssertionError(f"replica {replica} did not handle the replayed frame")


async def _next_frame(reader: asyncio.StreamReader, timeout_s: float) -> bytes | None:
    try:
        (size,) = struct.unpack("!I", await asyncio.wait_for(reader.readexactly(4), timeout_s))
        return await asyncio.wait_for(reader.readexactly(size), timeout_s)
    except TimeoutError:
        return None


async def test_replayed_client_frames_are_not_executed_again_but_do_redirect_a_backups_replies(
    local_cluster,
) -> None:
    """Frames captured on client 0's link to the primary, replayed on new connections to backup 1.

    What holds today: a replayed request is never executed again. Inside the exactly-once window
    the replica answers it from its reply cache (counted as a retransmitted reply); once the
    window has moved past it, it is dropped and counted as "old-timestamp".

    What does not (a known weakness; the next issue's sessions fix it): a replica sends a client's
    replies to the connection its last HELLO or request came in on, and a replayed one passes
    authentication, so the replayer takes over backup 1's replies to client 0 until the client
    itself sends to backup 1 again. The client still completes (the other three replicas are the
    2f+1 it needs), but one more such replay at another backup would stall it until it resends.
    When sessions land, the assertions marked WEAKNESS below must be turned around."""
    lc = local_cluster
    cluster = lc.cluster
    primary = cluster.replicas[0]
    recorder = Recorder(primary.host, primary.port)
    tapped = replace(cluster, replicas=(replace(primary, port=await recorder.start()), *cluster.replicas[1:]))
    opener = Wire(cluster.keyring(CLIENT, 0), DEFAULT_LIMITS, Counter())  # client 0's keys open its replies
    conns: list[asyncio.StreamWriter] = []
    try:
        async with Client(tapped, 0) as c:
            await c.wait_connected()
            first = await c.invoke(KVService.put(b"k", b"first"))
            assert value_of(await c.invoke(KVService.put(b"k", b"second"))) == b"first"
            captured = [decode_payload(split_frame(f)) for f in recorder.frames]
            hello = recorder.frames[[type(m) for m in captured].index(Hello)]
            put_first = next(
                (f, m) for f, m in zip(recorder.frames, captured, strict=True)
                if isinstance(m, Request) and m.op == KVService.put(b"k", b"first")
            )

            # A replayed HELLO: backup 1 now sends client 0's replies to the replayer, up to and
            # including its reply to the client's next request (timestamps run on by one).
            reader, writer = await _replay(lc, 1, hello)
            conns.append(writer)
            assert value_of(await c.invoke(KVService.put(b"k", b"third"))) == b"second"
            third = put_first[1].timestamp + 2
            for _ in range(3):
                stolen = opener.open(await _next_frame(reader, 5) or b"")
                assert isinstance(stolen, Reply) and (stolen.client, stolen.replica) == (0, 1)  # WEAKNESS
                if stolen.timestamp == third:
                    break
            assert stolen.timestamp == third

            # The replayed put, still inside the window: answered from the cache, not run again.
            before = lc.status(1)
            reader, writer = await _replay(lc, 1, put_first[0])
            conns.append(writer)
            again = opener.open(await _next_frame(reader, 5) or b"")
            assert isinstance(again, Reply) and again.timestamp == put_first[1].timestamp  # WEAKNESS
            assert again.result == first
            after = lc.status(1)
            assert after["stats"]["retransmitted-replies"] == before["stats"].get("retransmitted-replies", 0) + 1
            assert after["stats"]["executed-requests"] == before["stats"]["executed-requests"]
            assert value_of(await c.invoke(KVService.get(b"k"))) == b"third"

            # Once the client's window has moved past it, the replay is dropped and counted.
            window = cluster.params.client_window
            await asyncio.gather(*(c.invoke(KVService.put(b"w-%d" % i, b"x")) for i in range(window)))
            for _ in range(200):  # until backup 1 has executed everything the client saw complete
                before = lc.status(1)
                if before["executed"] == lc.status(0)["executed"]:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("backup 1 did not catch up with the primary")
            reader, writer = await _replay(lc, 1, put_first[0])
            conns.append(writer)
            after = lc.status(1)
            assert after["dropped"].get("old-timestamp", 0) == before["dropped"].get("old-timestamp", 0) + 1
            assert after["stats"]["executed-requests"] == before["stats"]["executed-requests"]
            assert await _next_frame(reader, 0.3) is None  # no reply for it
            assert value_of(await c.invoke(KVService.get(b"k"))) == b"third"
    finally:
        for w in conns:
            w.close()
        await recorder.close()


async def test_unreplicated_server_speaks_the_same_protocol(unreplicated_server) -> None:
    host, port = unreplicated_server
    async with Client.unreplicated(host, port) as c:
        await c.wait_connected()
        assert value_of(await c.invoke(KVService.put(b"x", b"1"))) is None
        results = await asyncio.gather(*(c.invoke(KVService.put(b"y%d" % i, b"v")) for i in range(100)))
        assert all(value_of(r) is None for r in results)
        assert value_of(await c.invoke(KVService.get(b"x"))) == b"1"


def test_blocking_client_and_cli(local_cluster) -> None:
    cluster = local_cluster.cluster
    with BlockingClient(cluster, 3) as c:
        c.invoke(KVService.put(b"cli", b"from-python"))
    cmd = [sys.executable, "-m", "bft", "invoke", "--config", str(cluster.path), "--client", "4"]
    out = subprocess.run([*cmd, "get", "cli"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "from-python"
    out = subprocess.run([*cmd, "put", "cli", "from-cli"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "from-python"
    status = subprocess.run(
        [sys.executable, "-m", "bft", "status", "--config", str(cluster.path)], capture_output=True, text=True
    )
    assert status.returncode == 0 and len(status.stdout.strip().splitlines()) == cluster.n + 1


def test_invoke_without_a_cluster_fails_with_one_line(tmp_path) -> None:
    from bft import config as cfg

    from .conftest import free_base_port

    cfg.keygen(tmp_path, 1, 1, base_port=free_base_port(4))
    cmd = [sys.executable, "-m", "bft", "invoke", "--config", str(tmp_path / "cluster.toml"), "--timeout", "1"]
    out = subprocess.run([*cmd, "get", "k"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    # f = 1, and the read-only optimisation is on: a result needs 2f+1 = 3 matching replies.
    assert out.stderr == "bft: error: no 3 matching replies within 1 s (0 of 4 replicas answered; is the cluster up?)\n"


async def test_client_timeout_raises(tmp_path) -> None:
    from bft import config as cfg

    from .conftest import free_base_port

    cfg.keygen(tmp_path, 1, 1, base_port=free_base_port(4))
    async with Client(cfg.load(tmp_path / "cluster.toml"), 0) as c:
        with pytest.raises(QuorumTimeout, match=r"^no 3 matching replies within 0.3 s \(0 of 4 replicas answered;"):
            await c.invoke(KVService.get(b"k"), timeout=0.3)


async def chain(c: Client, key: bytes, count: int, progress: list[int]) -> None:
    """Sequential puts of 1..count to one key: each must return the previous value, so a lost or
    doubly executed operation breaks the chain."""
    prev = value_of(await c.invoke(KVService.get(key)))
    start = int(prev) if prev else 0
    for i in range(start + 1, start + count + 1):
        old = value_of(await c.invoke(KVService.put(key, b"%d" % i)))
        assert old == (b"%d" % (i - 1) if i > 1 else None), f"{key!r}: put {i} found {old!r}"
        progress[0] += 1


@pytest.mark.parametrize("f", [1, 2])
async def test_primary_killed_under_load(tmp_path, f: int) -> None:
    from bft.core.params import Params

    from .conftest import LocalCluster

    lc = LocalCluster(tmp_path / "c", f, "kv", Params(checkpoint_interval=32, log_window=64, view_timeout_ms=400))
    try:
        cluster = lc.cluster
        clients = [Client(cluster, i) for i in range(4)]
        for c in clients:
            await c.start()
        await asyncio.gather(*(c.wait_connected() for c in clients))
        progress = [0]
        work = asyncio.gather(*(chain(c, b"chain-%d" % i, 150, progress) for i, c in enumerate(clients)))
        while progress[0] < 100:
            await asyncio.sleep(0.01)
        victims = [0] if f == 1 else [0, 3]  # the primary (and, for f = 2, a backup too)
        for v in victims:
            lc.kill(v)
        await asyncio.wait_for(work, 60)
        live = [lc.status(i) for i in range(cluster.n) if i not in victims]
        assert all(s["view"] >= 1 for s in live)
        assert len({s["executed"] for s in live}) == 1
        for c in clients:
            await c.close()
    finally:
        lc.stop()


async def test_second_view_change_after_restarting_the_old_primary(tmp_path) -> None:
    from bft.core.params import Params

    from .conftest import LocalCluster

    lc = LocalCluster(tmp_path / "c", 1, "kv", Params(checkpoint_interval=32, log_window=64, view_timeout_ms=400))
    try:
        async with Client(lc.cluster, 0) as c:
            await c.wait_connected()
            progress = [0]
            await chain(c, b"k", 20, progress)
            lc.kill(0)
            await chain(c, b"k", 20, progress)  # view 1, primary 1
            lc.restart(0)
            await chain(c, b"k", 40, progress)  # the old primary catches up as a backup
            lc.kill(1)
            await chain(c, b"k", 20, progress)  # view 2, primary 2
            assert progress[0] == 100
            assert all(lc.status(i)["view"] >= 2 for i in (0, 2, 3))
    finally:
        lc.stop()


async def test_wiped_replica_catches_up_by_state_transfer_and_restart_resumes_from_disk(tmp_path) -> None:
    import shutil

    from bft.core.params import Params

    from .conftest import LocalCluster, wait_for_port

    lc = LocalCluster(tmp_path / "c", 1, "kv", Params(checkpoint_interval=32, log_window=64))
    data = lc.cluster.path.parent / "data"
    try:
        async with Client(lc.cluster, 0) as a, Client(lc.cluster, 1) as b:
            await asyncio.gather(a.wait_connected(), b.wait_connected())
            await asyncio.gather(workload(a, b"a", 500), workload(b, b"b", 500))
            assert (data / "replica-3" / "checkpoint.msgpack").exists()
            lc.kill(2)
            lc.kill(3)
            shutil.rmtree(data / "replica-2")  # replica 2 comes back with nothing
            assert not (data / "replica-2").exists()
            lc.restart(2)
            lc.restart(3)  # replica 3 comes back from its data directory
            wait_for_port(lc.cluster.replicas[3].host, lc.cluster.replicas[3].admin_port)  # restart waits for less
            resumed = lc.status(3)
            assert resumed["stable_checkpoint"] >= 32 and resumed["executed"] >= resumed["stable_checkpoint"]
            assert resumed["persisted_checkpoint"] == resumed["stable_checkpoint"]  # what it read back
            await asyncio.gather(workload(a, b"a", 200), workload(b, b"b", 200))
            for _ in range(100):  # give the replicas a few status rounds to settle
                s = [lc.status(i) for i in range(4)]
                if len({x["stable_checkpoint"] for x in s}) == 1 and len({x["executed"] for x in s}) == 1:
                    break
                await asyncio.sleep(0.1)
        # State transfers alone do not tell the two restarts apart (replica 3 may need some to
        # catch up from its checkpoint too): what they read from disk when they started does.
        logs = lc.cluster.path.parent / "logs"
        from_disk = re.search(r"resumed in \S+: checkpoint (\d+)", (logs / "replica-3.restarted.log").read_text())
        assert from_disk is not None and int(from_disk[1]) >= 32
        assert "resumed in" not in (logs / "replica-2.restarted.log").read_text()
        assert s[2]["stats"].get("state-transfers", 0) >= 1  # so all it has came by state transfer
        assert len({x["executed"] for x in s}) == 1
        assert len({(x["stable_checkpoint"], x["stable_digest"]) for x in s}) == 1
    finally:
        lc.stop()

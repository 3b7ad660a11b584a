"""Real replica processes on 127.0.0.1 with real keys, driven by the client library and the CLI."""

from __future__ import annotations

import asyncio
import json
import re
import struct
import subprocess
import sys

import msgpack
import pytest

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


async def test_unreplicated_server_speaks_the_same_protocol(unreplicated_server) -> None:
    host, port = unreplicated_server
    async with Client.unreplicated(host, port) as c:
        await c.wait_connected()
        assert value_of(await c.invoke(KVService.put(b"x", b"1"))) is None
        results = await asyncio.gather(*(c.invoke(KVService.put(b"y%d" % i, b"v")) for i in range(100)))
        assert all(value_of(r) is None for r in results)
        assert value_of(await c.invoke(KVService.get(b"x"))) == b"1"


async def test_the_authenticated_unreplicated_server_takes_only_its_clients(tmp_path) -> None:
    """``bft serve --config`` (a cluster of f = 0): the baseline with sessions and request tags,
    as replicas have them, so a benchmark can tell replication's cost from authentication's."""
    from bft import config
    from bft.local import free_base_port, wait_for_port

    cluster = config.load(config.keygen(tmp_path, f=0, clients=1, base_port=free_base_port(1)))
    cmd = [sys.executable, "-m", "bft", "serve", "--service", "kv", "--config", str(cluster.path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(cluster.replicas[0].host, cluster.replicas[0].port)
        async with Client(cluster, 0) as c:
            await c.wait_connected()
            assert value_of(await c.invoke(KVService.put(b"x", b"1"))) is None
            assert value_of(await c.invoke(KVService.get(b"x"), read_only=True)) == b"1"
        stranger = config.load(config.keygen(tmp_path / "other", f=0, clients=1, base_port=cluster.replicas[0].port))
        async with Client(stranger, 0) as c:  # same address, other keys: no session
            with pytest.raises(QuorumTimeout):
                await c.invoke(KVService.get(b"x"), timeout=0.5)
    finally:
        proc.terminate()
        proc.wait(5)
    replicated = config.load(config.keygen(tmp_path / "f1", f=1, clients=1, base_port=free_base_port(4)))
    out = subprocess.run([*cmd[:-1], str(replicated.path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.strip().endswith("an authenticated server needs f = 0")


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
    # A boxed table: rule, heading, rule, a row per replica, rule; --json the same rows.
    assert status.returncode == 0, status.stderr
    lines = status.stdout.strip().splitlines()
    assert len(lines) == cluster.n + 4 and all(line.startswith(("|", "+")) for line in lines)
    assert [c.strip() for c in lines[1].strip("|").split("|")][:3] == ["ENDPOINT", "ID", "VIEW"]
    rows = json.loads(subprocess.run(
        [sys.executable, "-m", "bft", "status", "--config", str(cluster.path), "--json"],
        capture_output=True, text=True, check=True,
    ).stdout)
    assert [r["replica"] for r in rows] == list(range(cluster.n))
    assert all(r["error"] == "" and r["view"] == 0 and r["is_primary"] == (r["replica"] == 0) for r in rows)
    assert max(r["executed"] for r in rows) >= 2  # the two puts


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

"""Fuzzing one replica of a real 4-replica kv cluster over TCP while a correct client works.

A fuzzer process (this module with ``--worker``) opens connections to a backup (replica 1) and
sends hostile frames as fast as the replica reads them: random bytes; random headers; real sealed
messages of every type in bft/messages.py with bits flipped, bytes cut off or appended; the same
messages with a field changed (at any depth of the payload) and then authenticated with real keys
from the cluster (replica 3's, so the fuzzer is the one Byzantine replica f = 1 allows, and
client 7's), so they pass the MAC or signature and must be refused by later checks; valid
messages of replica 3 and client 7 about the live sequence numbers; forged tags and signatures;
and now and then a length prefix over ``frame_bytes_max``, which makes the replica close the
connection (the fuzzer reconnects and goes on). Meanwhile a correct client (client 0) keeps
writing and reading back keys of its own, and this process watches the target: its process alive
and its /status answering, every half second.

At the end it prints frames sent and per second, the target's dropped counters by reason (the
increase during the fuzz), whether it stayed up, the client's operations and their throughput
during the fuzz against before it, and the target's RSS before and after; and writes
``bench/results/fuzz.{md,json}``. If the target stops or the client stalls, the frames the fuzzer
sent last are saved to ``bench/results/fuzz-last-frames.jsonl`` (hex, newest last) and the
target's log tail is printed and kept in the JSON. A measurement, not a test.

    python -m bench.fuzz [--frames 1000000] [--seconds-max 300] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import tempfile
import time
import typing
import urllib.request
from collections import Counter, deque
from pathlib import Path

import msgpack

from bench.micro import RESULTS, machine
from bench.recovery import rss_mb
from bft import config as cfg
from bft.core.params import Params
from bft.crypto import CLIENT, REPLICA
from bft.local import LocalCluster
from bft.messages import (
    CLIENT_TYPES,
    HEADER,
    MAC_BYTES,
    SIGNATURE_BYTES,
    SIGNED_TYPES,
    VERSION,
    Batch,
    Message,
    PrePrepare,
    Reply,
    Request,
    ViewChange,
    digest,
    encode_payload,
)
from bft.runtime.process import run_async
from bft.runtime.wire import Wire, limits_of
from bft.service import KVService
from client import Client, QuorumTimeout

TARGET = 1  # a backup of view 0
LIAR = 3  # the replica whose key the fuzzer holds: the one fault f = 1 allows
FUZZ_CLIENT = 7  # the client key the fuzzer holds
CORRECT_CLIENT = 0
LENGTH = struct.Struct("!I")
BATCH_FRAMES = 32  # frames per write
RECENT_FRAMES = 2000  # kept to save if the target stops or the client stalls
ALL_TYPES = typing.get_args(Message)

# What the fuzzer sends, and how often (weights).
KINDS = {
    "random-bytes": 12,  # a frame of random bytes
    "random-header": 10,  # a well-formed header (random type, sender, tag length), random after it
    "sealed-mutated": 18,  # a properly sealed message, then bits flipped / cut / extended
    "forged-mutated": 10,  # sealed with the wrong key or random tags, then mutated
    "field-changed-valid-mac": 30,  # a field changed, then authenticated with a real key
    "forged-tag": 10,  # a well-formed message with a forged tag or signature
    "valid": 10,  # a valid message of replica 3 / client 7 about the live sequence numbers
}
OVERSIZED_EVERY = 20_000  # about one frame in this many announces more than frame_bytes_max
DESYNC_EVERY = 5_000  # about one in this many has a length prefix that disagrees with its frame


# -- the fuzzer process ------------------------------------------------------------------------


class Frames:
    """Makes hostile frames (without their length prefix) for one target replica."""

    def __init__(self, cluster: cfg.Cluster, rng: random.Random) -> None:
        self.rng = rng
        self.n = cluster.n
        self.frame_bytes_max = cluster.params.frame_bytes_max
        self.replica_kr = cluster.keyring(REPLICA, LIAR)
        self.client_kr = cluster.keyring(CLIENT, FUZZ_CLIENT)
        self.foreign_kr = cluster.keyring(CLIENT, FUZZ_CLIENT - 1)  # a real key, of the wrong sender
        limits = limits_of(cluster.params)
        self.replica_wire = Wire(self.replica_kr, limits, Counter())
        self.client_wire = Wire(self.client_kr, limits, Counter())
        self.view = self.stable = self.executed = 0
        self.timestamp = 1
        self.samples: list[tuple[Message, bytes]] = []
        self.refresh(0, 0, 0)

    def refresh(self, view: int, stable: int, executed: int) -> None:
        """Rebuild the sample messages around the target's live view and sequence numbers."""
        self.view, self.stable, self.executed = view, stable, executed
        self.samples = [(m, self._seal(m)) for m in self._messages()]
        covered = {type(m) for m, _ in self.samples}
        missing = [t.__name__ for t in ALL_TYPES if t not in covered]
        assert not missing, f"bench.fuzz makes no sample of {missing}: add one"

    def _int(self) -> int:
        """A live sequence number most of the time, else anything."""
        rng = self.rng
        if rng.random() < 0.7:
            return max(0, self.executed + rng.randint(-3, 20))
        return rng.choice([0, 1, self.stable, self.stable + 1, rng.randrange(1 << 32), (1 << 63) - 1])

    def _messages(self) -> list[Message]:
        rng, view, me, cl = self.rng, self.view, LIAR, FUZZ_CLIENT
        self.timestamp += 1
        d = digest(b"fuzz %d" % rng.randrange(1 << 30))
        request = Request.make(cl, self.timestamp, KVService.put(b"fuzz-%d" % rng.randrange(8), os.urandom(8)))
        request = request.with_auth(self.client_kr.authenticator(Request.TYPE, request.raw))
        seq = self._int()
        pp = PrePrepare.make(view, seq, int(time.time() * 1000), (request, d), me)
        vc = ViewChange(
            view + 1, self.stable, ((self.stable, d),), ((seq, d, view),), ((seq, ((d, view),)),), me
        )
        raw = encode_payload(vc)
        vc = dataclasses.replace(vc, raw=raw, signature=self.replica_kr.sign(ViewChange.TYPE, raw))
        values = {  # field name -> value, for every message type's fields
            "view": view, "seq": seq, "timestamp": self.timestamp, "replica": me, "client": cl,
            "digest": d, "result": b"fuzz", "tentative": False, "digest_only": False,
            "stable": self.stable, "settled": max(self.stable, self.executed - 1), "view_changing": False,
            "checkpoint": (self.stable, d), "decisions": ((seq, d),), "view_changes": (vc,),
            "manifest": msgpack.packb([d, d]), "index": rng.randrange(4), "offset": 0, "total": 4,
            "data": b"fuzz",
        }
        out: list[Message] = [request, pp, Batch(seq, pp.timestamp, (request,), me, pp.digest), vc]
        for cls in ALL_TYPES:
            if cls in (Request, PrePrepare, Batch, ViewChange):
                continue
            names = [f.name for f in dataclasses.fields(cls) if f.init and f.compare]
            unknown = [name for name in names if name not in values]
            assert not unknown, f"bench.fuzz has no value for {cls.__name__}.{unknown}: add one"
            out.append(cls(**{name: values[name] for name in names}))
        return out

    def _seal(self, msg: Message) -> bytes:
        if isinstance(msg, Request):
            return self.client_wire.seal(msg)
        if msg.TYPE in CLIENT_TYPES:
            return self.client_wire.seal(msg)
        return self.replica_wire.seal(msg)

    def _auth(self, type_: int, payload: bytes) -> tuple[int, bytes]:
        """(sender, authenticator) of a payload under the fuzzer's real keys."""
        if type_ in CLIENT_TYPES:
            return FUZZ_CLIENT, self.client_kr.authenticator(type_, payload)
        if type_ in SIGNED_TYPES:
            return LIAR, self.replica_kr.sign(type_, payload)
        if type_ == Reply.TYPE:
            return LIAR, self.replica_kr.tag_for((CLIENT, FUZZ_CLIENT), type_, payload)
        return LIAR, self.replica_kr.authenticator(type_, payload)

    @staticmethod
    def _header(type_: int, sender: int, auth: bytes) -> bytes:
        return HEADER.pack(VERSION, type_, sender, len(auth)) + auth

    # -- mutations ------------------------------------------------------------------------

    def _flip(self, data: bytes) -> bytes:
        rng = self.rng
        b = bytearray(data)
        how = rng.random()
        if how < 0.45 and b:  # bit flips
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif how < 0.65:  # cut off
            del b[rng.randrange(len(b) + 1):]
        elif how < 0.8:  # bytes appended
            b += os.urandom(rng.randint(1, 64))
        elif b:  # a run of bytes replaced
            i = rng.randrange(len(b))
            b[i:i + 8] = os.urandom(rng.randint(0, 8))
        return bytes(b)

    def _value(self) -> object:
        rng = self.rng
        return rng.choice([
            0, 1, -1, self._int(), self.view + 1, (1 << 63) - 1, 1 << 63, -(1 << 63), (1 << 64) - 1,
            True, False, None, 1.5, "text", b"", os.urandom(rng.randint(1, 40)), bytes(32), os.urandom(32),
            [], [0, 1], [[b"", b""]], {1: 2}, b"x" * rng.choice([33, 64, 4096]),
        ])

    def _change(self, obj: object, depth: int = 0) -> object:
        """``obj`` (a decoded msgpack payload) with one element, at some depth, changed."""
        rng = self.rng
        if isinstance(obj, list) and obj and (depth == 0 or rng.random() < 0.6):
            obj = list(obj)
            i = rng.randrange(len(obj))
            how = rng.random()
            if how < 0.1:
                del obj[i]
            elif how < 0.2:
                obj.insert(i, self._value())
            else:
                obj[i] = self._change(obj[i], depth + 1)
            return obj
        if isinstance(obj, bytes) and obj and rng.random() < 0.5:
            try:  # a nested encoding (a request body, a view change in a NEW-VIEW): change inside
                inner = msgpack.unpackb(obj)
            except Exception:
                return self._flip(obj)
            return msgpack.packb(self._change(inner, depth + 1))
        if isinstance(obj, int) and not isinstance(obj, bool) and rng.random() < 0.5:
            return obj + rng.choice([-1, 1, self.n, 1 << 32])
        return self._value()

    # -- kinds ------------------------------------------------------------------------------

    def make(self, kind: str) -> bytes:
        rng = self.rng
        if kind == "random-bytes":
            return os.urandom(rng.randint(0, 300))
        if kind == "random-header":
            type_ = rng.choice([*(t.TYPE for t in ALL_TYPES), 0, 17, 255])
            auth_len = rng.choice([0, MAC_BYTES, MAC_BYTES * self.n, SIGNATURE_BYTES, rng.randrange(1 << 16)])
            version = VERSION if rng.random() < 0.9 else rng.randrange(256)
            head = HEADER.pack(version, type_, rng.choice([0, 1, 2, 3, 7, rng.randrange(1 << 32)]), auth_len)
            return head + os.urandom(rng.randint(0, 200))
        msg, sealed = rng.choice(self.samples)
        if kind == "valid":
            return sealed
        if kind == "sealed-mutated":
            return self._flip(sealed)
        payload = sealed[HEADER.size + HEADER.unpack_from(sealed)[3]:]
        if kind == "field-changed-valid-mac":
            try:
                payload = msgpack.packb(self._change(msgpack.unpackb(payload)))
            except (ValueError, OverflowError, TypeError):
                payload = self._flip(payload)
            sender, auth = self._auth(msg.TYPE, payload)
            if rng.random() < 0.1:
                sender = rng.choice([0, 1, 2, rng.randrange(1 << 32)])  # the payload's sender disagrees
            return self._header(msg.TYPE, sender, auth) + payload
        # A forged authenticator: right shape, wrong key or random bytes.
        sender = FUZZ_CLIENT if msg.TYPE in CLIENT_TYPES else msg.sender
        how = rng.random()
        if msg.TYPE in SIGNED_TYPES:
            auth = os.urandom(SIGNATURE_BYTES) if how < 0.5 else self.foreign_kr.authenticator(msg.TYPE, payload)
        elif how < 0.4:
            auth = os.urandom(len(sealed) - len(payload) - HEADER.size)
        elif how < 0.7:
            auth = self.foreign_kr.authenticator(msg.TYPE, payload)  # a real key, not the sender's
        else:
            sender = rng.choice([0, 2, FUZZ_CLIENT - 1])  # our tag, claiming another sender
            auth = self._auth(msg.TYPE, payload)[1]
        frame = self._header(msg.TYPE, sender, auth) + payload
        return self._flip(frame) if kind == "forged-mutated" else frame


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.addr = (host, port)
        self.sock: socket.socket | None = None
        self.desynced = False  # a length prefix that disagreed with its frame went out on it

    def open(self, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while True:
            try:
                self.sock = socket.create_connection(self.addr, timeout=10)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.desynced = False

    def drain(self) -> bool:
        """Read what the replica sent us (replies to client 7, answers to replica 3); False if
        it closed the connection."""
        assert self.sock is not None
        try:
            while select.select([self.sock], [], [], 0)[0]:
                if not self.sock.recv(1 << 16):
                    return False
        except OSError:
            return False
        return True

    def closed_by_peer(self, timeout_s: float = 5.0) -> bool:
        """After an oversized length prefix: wait for the replica to close the connection."""
        assert self.sock is not None
        self.sock.settimeout(timeout_s)
        try:
            while self.sock.recv(1 << 16):
                pass
            return True
        except TimeoutError:
            return False
        except OSError:
            return True


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status(host: str, port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=2) as resp:
            return json.load(resp)
    except (OSError, ValueError):
        return None


def worker(a: argparse.Namespace) -> None:
    cluster = cfg.load(a.config)
    target = cluster.replicas[a.target]
    rng = random.Random(a.seed)
    frames = Frames(cluster, rng)
    kinds, weights = list(KINDS), list(KINDS.values())
    conns = [Connection(target.host, target.port) for _ in range(a.connections)]
    for c in conns:
        c.open(10)
    recent: deque[tuple[int, str, bytes]] = deque(maxlen=RECENT_FRAMES)
    sent: Counter[str] = Counter()
    events: Counter[str] = Counter()
    stopped = False

    def dump(*_: object) -> None:
        with open(a.dump, "w") as out:
            for i, kind, data in recent:
                out.write(json.dumps({"connection": i, "kind": kind, "frame_hex": data.hex()}) + "\n")
        print(f"fuzz: saved the last {len(recent)} frames to {a.dump}", flush=True)

    def stop(*_: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGUSR1, dump)
    signal.signal(signal.SIGTERM, stop)
    t0 = last_print = last_refresh = time.monotonic()
    total = 0
    turn = 0
    limit_reason = "frames"
    while total < a.frames and not stopped:
        now = time.monotonic()
        if now - t0 > a.seconds_max:
            limit_reason = "time"
            break
        if now - last_refresh > 2:
            last_refresh = now
            s = _status(target.host, target.admin_port)
            if s is not None:
                frames.refresh(s["view"], s["stable_checkpoint"], s["executed"])
        if now - last_print > 5:
            last_print = now
            rate = total / (now - t0)
            print(f"fuzz: {total:,} of {a.frames:,} frames, {rate:,.0f} frames/s, "
                  f"{events['closed-by-replica']} closed by the replica after an oversized length", flush=True)
        turn = (turn + 1) % len(conns)
        conn = conns[turn]
        batch: list[bytes] = []
        oversized = False
        for _ in range(min(BATCH_FRAMES, a.frames - total)):
            roll = rng.randrange(OVERSIZED_EVERY)
            if roll == 0:
                size = frames.frame_bytes_max + 1 + rng.randrange(1 << 31)
                data = LENGTH.pack(size) + os.urandom(rng.randint(0, 64))
                kind, oversized = "oversized-length", True
            else:
                kind = rng.choices(kinds, weights)[0]
                body = frames.make(kind)
                prefix = len(body)
                if roll <= OVERSIZED_EVERY // DESYNC_EVERY:
                    kind, prefix = "desync-length", max(0, prefix + rng.choice([-9, -1, 1, 40]))
                    conn.desynced = True
                data = LENGTH.pack(prefix) + body
            batch.append(data)
            recent.append((turn, kind, data))
            sent[kind] += 1
            total += 1
            if oversized:
                break
        try:
            assert conn.sock is not None
            conn.sock.sendall(b"".join(batch))
            alive = conn.drain()
        except OSError:
            alive = False
        if oversized:
            if conn.closed_by_peer():
                events["closed-by-replica"] += 1
            else:
                # Out of step, the stream may hold the prefix inside a frame the replica still reads.
                events["oversized-not-closed-desynced" if conn.desynced else "oversized-not-closed"] += 1
            alive = False
        if not alive:
            if not oversized:
                events["connection-lost"] += 1  # a desynchronised stream that came to a huge length, say
            conn.close()
            try:
                conn.open(5)
                events["reconnects"] += 1
            except OSError:
                events["target-unreachable"] += 1
                print("fuzz: the target refuses connections: it stopped", flush=True)
                dump()
                break
    elapsed = time.monotonic() - t0
    for c in conns:
        c.close()
    report = {
        "frames": total, "seconds": elapsed, "frames_per_s": total / elapsed if elapsed else 0.0,
        "stopped_by": limit_reason if not stopped else "signal", "kinds": dict(sorted(sent.items())),
        "events": dict(sorted(events.items())), "connections": a.connections, "seed": a.seed,
        "cpu_s": time.process_time(),
    }
    Path(a.report).write_text(json.dumps(report, indent=2) + "\n")
    print(f"fuzz: done, {total:,} frames in {elapsed:.1f} s ({report['frames_per_s']:,.0f} frames/s)", flush=True)


# -- the measurement ----------------------------------------------------------------------------


class Load:
    """Client 0 writing and reading back keys of its own, ``concurrency`` at a time; every
    completion time is kept, and any wrong result or stall."""

    def __init__(self, c: Client, concurrency: int) -> None:
        self.c = c
        self.concurrency = concurrency
        self.done: list[float] = []
        self.problems: list[str] = []
        self.stop = False
        self.stall: asyncio.Event = asyncio.Event()

    async def loop(self, j: int) -> None:
        n = 0
        key = b"client-%d" % j
        while not self.stop:
            value = b"%d" % n
            try:
                await self.c.invoke(KVService.put(key, value), timeout=20)
                self.done.append(time.monotonic())
                ok, got = msgpack.unpackb(await self.c.invoke(KVService.get(key), read_only=n % 2 == 1, timeout=20))
                self.done.append(time.monotonic())
            except QuorumTimeout as exc:
                self.problems.append(f"stall: {exc}")
                self.stall.set()
                continue
            if not ok or got != value:
                self.problems.append(f"wrong result: {key!r} read {got!r} after writing {value!r}")
            n += 1

    def between(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.done if t0 <= t < t1)


async def measure(a: argparse.Namespace, lc: LocalCluster) -> dict:
    cluster = lc.cluster
    proc = lc.procs[TARGET]
    report_path = Path(lc.cluster.path.parent) / "fuzz-report.json"
    async with Client(cluster, CORRECT_CLIENT) as c:
        await c.wait_connected(10)
        load = Load(c, a.concurrency)
        tasks = [asyncio.create_task(load.loop(j)) for j in range(a.concurrency)]
        print(f"before the fuzz: the correct client for {a.baseline_s:.0f} s", flush=True)
        await asyncio.sleep(2)  # warm-up
        t0 = time.monotonic()
        await asyncio.sleep(a.baseline_s)
        t1 = time.monotonic()
        before_ops = load.between(t0, t1)
        status_before = await asyncio.to_thread(lc.status, TARGET)
        rss_before = rss_mb(proc.pid)
        print(f"  {before_ops:,} operations, {before_ops / (t1 - t0):,.0f} ops/s; target RSS {rss_before:.1f} MB",
              flush=True)
        fuzzer = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.fuzz", "--worker", "--config", str(cluster.path), "--target", str(TARGET),
            "--frames", str(a.frames), "--seconds-max", str(a.seconds_max), "--seed", str(a.seed),
            "--connections", str(a.connections), "--report", str(report_path), "--dump", str(a.dump),
        )
        f0 = time.monotonic()
        cpu0 = [cpu_s(p.pid) for p in lc.procs]
        down: list[str] = []
        status_misses = 0
        last_print = f0
        dumped = False
        rss_series: list[tuple[float, float]] = [(0.0, rss_before)]
        while fuzzer.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fuzzer.wait(), 0.5)
            now = time.monotonic()
            if proc.poll() is not None:
                down.append(f"process exited with status {proc.returncode} after {now - f0:.1f} s")
            else:
                try:
                    await asyncio.to_thread(lc.status, TARGET)
                except OSError as exc:
                    status_misses += 1
                    down.append(f"/status did not answer after {now - f0:.1f} s: {exc}")
            if (down or load.stall.is_set()) and not dumped and fuzzer.returncode is None:
                dumped = True
                fuzzer.send_signal(signal.SIGUSR1)  # save the frames that came just before
            if proc.poll() is not None:
                fuzzer.send_signal(signal.SIGTERM)
                await fuzzer.wait()
                break
            if now - last_print > 10:
                last_print = now
                recent = load.between(now - 10, now)
                rss_series.append((round(now - f0, 1), rss_mb(proc.pid)))
                print(f"  [{now - f0:4.0f} s] correct client {load.between(f0, now):,} operations "
                      f"({recent / 10:,.0f} ops/s now); target {'up' if not down else 'DOWN'}, "
                      f"RSS {rss_series[-1][1]:.1f} MB", flush=True)
        f1 = time.monotonic()
        during_ops = load.between(f0, f1)
        alive = proc.poll() is None
        cpu = [round(cpu_s(p.pid) - c0, 1) if p.poll() is None else None for p, c0 in zip(lc.procs, cpu0, strict=True)]
        rss_after = rss_mb(proc.pid) if alive else float("nan")
        load.stop = True
        await asyncio.wait(tasks, timeout=30)
        for t in tasks:
            t.cancel()
    # With the load stopped, does the target come level with the others (by executing or fetching)?
    caught_up_s = None
    others: list[dict] = []
    status_after: dict = {}
    stopped_at = time.monotonic()
    while alive and time.monotonic() - stopped_at < 30:
        with contextlib.suppress(OSError):
            others = [await asyncio.to_thread(lc.status, i) for i in range(cluster.n) if i != TARGET]
            status_after = await asyncio.to_thread(lc.status, TARGET)
            if status_after["executed"] >= max(o["executed"] for o in others):
                caught_up_s = time.monotonic() - stopped_at
                break
        await asyncio.sleep(0.2)
    fuzz = json.loads(report_path.read_text()) if report_path.exists() else {}
    dropped_before = status_before["dropped"]
    dropped = {
        k: v - dropped_before.get(k, 0) for k, v in status_after.get("dropped", {}).items()
        if v != dropped_before.get(k, 0)
    }
    log_tail = ""
    if down or load.problems:
        log = cluster.path.parent / "logs" / f"replica-{TARGET}.log"
        log_tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    return {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "target": TARGET,
        "params": "defaults (durability strict)", "frames_asked": a.frames, "fuzz": fuzz,
        "fuzz_seconds": f1 - f0,
        "stayed_up": not down and alive, "down": down, "status_misses": status_misses,
        "dropped_during_fuzz": dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
        "client": {
            "concurrency": a.concurrency, "before_ops": before_ops, "before_s": t1 - t0,
            "before_ops_per_s": before_ops / (t1 - t0), "during_ops": during_ops,
            "during_ops_per_s": during_ops / (f1 - f0), "problems": load.problems[:20],
        },
        "rss_mb": {"before": rss_before, "after": rss_after, "during": rss_series},
        "target_after": {k: status_after.get(k) for k in ("view", "log_slots", "pending_requests", "stats")},
        "cpu_s_during_fuzz": {"replicas": cpu, "fuzzer": fuzz.get("cpu_s")},
        "target_caught_up_s": caught_up_s,
        "target_executed_after": status_after.get("executed"),
        "others_executed_after": [s["executed"] for s in others],
        "target_view_after": status_after.get("view"),
        "log_tail": log_tail,
    }


def markdown(r: dict) -> str:
    fz, cl = r["fuzz"], r["client"]
    ev = fz.get("events", {})
    rss_max = max((mb for _, mb in r["rss_mb"]["during"]), default=float("nan"))
    ratio = cl["during_ops_per_s"] / cl["before_ops_per_s"] if cl["before_ops_per_s"] else float("nan")
    limit = "" if fz.get("stopped_by") == "frames" else f" (stopped by the {fz.get('stopped_by')} limit)"
    lines = [
        "| measurement | result |",
        "|---|---|",
        f"| frames sent to replica {r['target']} (a backup) | {fz.get('frames', 0):,}{limit} in "
        f"{fz.get('seconds', 0):.0f} s |",
        f"| frames per second | {fz.get('frames_per_s', 0):,.0f} |",
        f"| oversized length prefixes: connection closed by the replica / not, the stream already out of step "
        f"(a desync-length frame before) / not, in step | {ev.get('closed-by-replica', 0)} / "
        f"{ev.get('oversized-not-closed-desynced', 0)} / {ev.get('oversized-not-closed', 0)} |",
        f"| reconnects (after those, and after streams out of step came to a length over the limit) | "
        f"{ev.get('reconnects', 0)} |",
        f"| target stayed up (process alive, /status answering every half second) | "
        f"{'yes' if r['stayed_up'] else 'NO: ' + '; '.join(r['down'][:3])} |",
        f"| correct client: operations during the fuzz | {cl['during_ops']:,} "
        f"({len(cl['problems'])} problems) |",
        f"| correct client: throughput before / during | {cl['before_ops_per_s']:,.0f} / "
        f"{cl['during_ops_per_s']:,.0f} ops/s ({ratio:.2f}x) |",
        f"| target RSS before / after (highest sample during) | {r['rss_mb']['before']:.1f} / "
        f"{r['rss_mb']['after']:.1f} MB ({rss_max:.1f}) |",
        f"| CPU seconds during the fuzz: replicas 0-3 / the fuzzer | {r['cpu_s_during_fuzz']['replicas']} / "
        f"{r['cpu_s_during_fuzz']['fuzzer'] or 0:.1f} |",
        f"| load stopped: target level with the others (executed {r['target_executed_after']}, others "
        f"{r['others_executed_after']}) | "
        + (f"after {r['target_caught_up_s']:.1f} s |" if r["target_caught_up_s"] is not None else "NO, not in 30 s |"),
    ]
    drops = ["", "Target's dropped counters, increase during the fuzz:", "", "| reason | count |", "|---|---|"]
    drops += [f"| {k} | {v:,} |" for k, v in r["dropped_during_fuzz"].items()]
    kinds = ["", "Frames sent, by kind:", "", "| kind | frames |", "|---|---|"]
    kinds += [f"| {k} | {v:,} |" for k, v in fz.get("kinds", {}).items()]
    return "\n".join(lines + drops + kinds)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Writes bench/results/fuzz.{md,json}. A measurement, not a test."
    )
    ap.add_argument("--frames", type=int, default=1_000_000, help="frames to send (default 1,000,000)")
    ap.add_argument("--seconds-max", type=float, default=300.0, help="stop sending after this long (default 300)")
    ap.add_argument("--seed", type=int, default=1, help="the fuzzer's random seed")
    ap.add_argument("--connections", type=int, default=4, help="fuzzer connections to the target")
    ap.add_argument("--concurrency", type=int, default=4, help="the correct client's operations in flight")
    ap.add_argument("--baseline-s", type=float, default=10.0, help="seconds of correct load before the fuzz")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--target", type=int, default=TARGET, help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    ap.add_argument("--dump", default=str(RESULTS / "fuzz-last-frames.jsonl"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    a.dump = str(a.out / "fuzz-last-frames.jsonl")
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        lc = LocalCluster(Path(tmp) / "fuzz", 1, "kv", Params())
        try:
            r = run_async(measure(a, lc))
        finally:
            lc.stop()
    md = markdown(r)
    print()
    print(md)
    if r["log_tail"]:
        print(f"\ntarget log, last lines:\n{r['log_tail']}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fuzz.json").write_text(json.dumps(r, indent=2) + "\n")
    (a.out / "fuzz.md").write_text(f"Machine: {r['machine']}, {r['date']}\n\n{md}\n")


if __name__ == "__main__":
    main()

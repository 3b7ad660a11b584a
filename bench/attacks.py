"""Attacks on a real 4-replica cluster: what a Byzantine replica or a faulty client costs correct clients.

In one run on this machine, for each scenario, a fresh cluster of real replica processes
(bft.local.LocalCluster, f = 1, the kv service, ``durability = "memory"`` so the disk stays out of
it, as in bench.micro; default parameters otherwise) and the same workload: ``--clients`` closed
loops (clients 0-3), each writing keys of its own and reading each back at once (every other read
read-only), every result checked against what the loop wrote (a put returns the old value, a get
the new one). A wrong result, or an operation without a quorum in 20 s, is printed loudly and
fails the run. The replicas get SETTLE_S to connect to each other, then the clients connect and
are measured from their first operation on (no warm-up: what a liar costs from the start is
measured too) for ``--seconds``: their throughput, their longest stall (the longest gap between
completions, over all of them together, the ends of the window included), the replicas' RSS
(VmRSS from /proc, sampled every 0.25 s, the largest over replicas and time) and their CPU time
per operation (less at the mercy of the machine's other work than throughput). The scenarios:

- fault-free, first, last and after every REFERENCE_EVERY other scenarios: the machine is shared
  and its speed drifts, so each scenario is compared with the mean of the fault-free runs just
  before and just after it;
- one backup (3) killed before the run;
- each behaviour of ``bft replica --byzantine`` (bft/byzantine.py CATALOGUE) as a backup (3) and,
  for the normal-case lies, as the primary (0). The view-change lies matter only in a view change:
  there the primary (0, correct) is paused (SIGSTOP) 2 s into the run until the awake correct
  replicas have started a view change, then continued, and the liar is a backup (3) or the new
  view's primary (1); the same view change without a liar is the reference beside them.
  ``lying-state`` matters only in a state transfer: a correct backup (2) is killed until the
  others' stable checkpoint is a log window past it, then restarted from its data directory, so
  it must fetch the state, from the liar among others (again, up to three times, until it caught
  one of the liar's lies: a corrupt manifest or partition). This one and its reference without
  a liar run with ``durability = "log"``, so that the restarted replica is a correct one (with
  "memory" it would count among the f faulty ones until it caught up). A paused (SIGSTOP) backup
  would not do: it catches up from the others' messages waiting in its sockets, without a state
  transfer. ``slow-primary`` acts only as the primary (a backup sends no PRE-PREPARE to hold).
- a faulty "big MAC" client (5), in a process of its own: requests whose tag is good for the
  replica it sends them to only, with no valid signature, to every replica (4 every 10 ms); after
  ``--seconds`` it stops and the correct clients go on for RECOVERY_S;
- a keyless attacker, in a process of its own: the frames of client 4's link to every replica,
  captured by a relay before the run (as tests/test_integration.py's ``Recorder``), replayed
  on new connections to every replica (REPLAYS_PER_S, from 127.0.0.10), client 4's own sessions
  left open (it must still work afterwards);
- the same attacker holding idle unauthenticated connections: IDLE_PER_SOURCE from each of the
  addresses in IDLE_SOURCES to every replica, more than a replica admits unauthenticated at once
  (Admission: 64, 16 per address), each opened again as soon as the replica closes it.
  In these three a fresh client (6) connects 2 s into the attack (and in fault-free too, for
  reference): the time it takes is printed.

Then BFS through a real FUSE mount (``bfs mount``): a tar of a few hundred small files from this
repository's source tree extracted into the mount, fault-free and with one lying backup
(``lying-replies``), both clusters up at once and taking turns, ``--bfs-rounds`` times each, the
median; every file is compared byte for byte with the archive afterwards.
Skipped, with the reason printed, without /dev/fuse, fusermount3 or pyfuse3.

Floors, each printed PASS or FAIL: crashed backup >= 70% of fault-free throughput; each Byzantine
replica and faulty client >= 50% and no stall longer than one view change (STALL_BOUND_S, below);
RSS in every scenario <= 2x the fault-free RSS; after an attacker stops, correct clients back
within 10% of their fault-free throughput (over a 1 s window) in 5 s, against the same cluster's
throughput in the BEFORE_S before the attacker started (against the fault-free runs minutes away
too, printed beside it); BFS beside a lying replica within 2x the fault-free time; no wrong
result anywhere. Writes ``bench/results/attacks.{md,json,png}``.
A measurement, not a test.

    python -m bench.attacks [--seconds 10] [--clients 4] [--only SUBSTRING] [--no-bfs]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import msgpack

from bench.micro import RESULTS, machine, process_cpu_s, pyplot, rss_mb, save, write_results
from bft import config as cfg
from bft.byzantine import CATALOGUE
from bft.core.params import Params
from bft.crypto import CLIENT
from bft.local import LocalCluster
from bft.messages import MAC_BYTES, SIGNATURE_BYTES, Request, frame
from bft.runtime.process import run_async
from bft.runtime.session import Session
from bft.service import KVService
from client import Client, QuorumTimeout

PARAMS = Params(durability="memory")
OP_TIMEOUT_S = 20.0
# Between the replicas' ports accepting connections and the clients connecting: the replicas'
# connections to each other come up (the first operation on a cluster just started took 0.7 s
# once here). No warm-up operations: what a liar costs from the start (a slow primary in view 0)
# is measured, from the first operation on.
SETTLE_S = 1.0
REFERENCE_EVERY = 3  # a fault-free run after every this many scenarios, against drift on a shared machine
KEYS_PER_CLIENT = 16
EVENT_AT_S = 2.0  # into the measured window: the pause that forces a view change or a state transfer
PAUSE_MAX_S = 10.0
RECOVERY_S = 6.0  # the correct clients go on this long after an attacker stops
BEFORE_S = 3.0  # and run this long before it starts
RECOVERY_WINDOW_S = 1.0
RECOVERY_FLOOR_S = 5.0
# One view change, as correct clients see it: a client resends to every replica after
# request_timeout_ms; a backup holding the request starts a view change view_timeout_ms after it
# arrived; the new primary then has up to another view timeout to produce the NEW-VIEW before
# the backups give up on it and move on (the next view change would wait twice as long). Plus half a
# second for scheduling on a shared 2-core machine (five busy processes).
STALL_MARGIN_S = 0.5
STALL_BOUND_S = (PARAMS.request_timeout_ms + 2 * PARAMS.view_timeout_ms) / 1000 + STALL_MARGIN_S
RSS_FACTOR = 2.0
CRASH_FLOOR, BYZANTINE_FLOOR, BFS_FACTOR = 0.7, 0.5, 2.0

LIAR_BACKUP, PRIMARY, NEXT_PRIMARY, BEHIND = 3, 0, 1, 2
FAULTY_CLIENT, VICTIM, PROBE = 5, 4, 6  # correct clients are 0 .. clients-1 (at most 4)
PROBE_SLOW_S = 1.0  # a fresh client taking longer than this to connect is reported
BIG_MAC_ROUND_S = 0.01  # the faulty client sends one request to each replica this often
REPLAYS_PER_S = 200  # replays of a captured stream on a new connection, over all replicas
REPLAY_SOURCE = "127.0.0.10"
IDLE_SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 7))  # 5 x 16 = 80 per replica, 64 admitted
IDLE_PER_SOURCE = 16
LENGTH = struct.Struct("!I")


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # fault-free | reference | crash | byzantine | client
    liar: tuple[int, str] | None = None
    crash: int | None = None
    event: str | None = None  # view-change | state-transfer
    attacker: str | None = None  # big-mac | replay | idle
    probe: bool = False  # a fresh client connects during the run
    note: str = ""
    durability: str = PARAMS.durability


def fault_free(k: int) -> Scenario:
    return Scenario(f"fault-free ({k})", "fault-free", probe=True)


def schedule(chosen: list[Scenario]) -> list[Scenario]:
    """``chosen`` with a fault-free run first, after every REFERENCE_EVERY of them, and last."""
    out = [fault_free(1)]
    chunks = [chosen[i:i + REFERENCE_EVERY] for i in range(0, len(chosen), REFERENCE_EVERY)] or [[]]
    for k, chunk in enumerate(chunks, 2):
        out += [*chunk, fault_free(k)]
    return out


def scenarios() -> list[Scenario]:
    """Every scenario but the fault-free references."""
    out = [Scenario("crashed backup (3)", "crash", crash=LIAR_BACKUP, note="killed before the run")]
    for behaviour in ("lying-replies", "wrong-checkpoints", "status-flood"):
        out.append(Scenario(f"{behaviour}, backup 3", "byzantine", liar=(LIAR_BACKUP, behaviour)))
        out.append(Scenario(f"{behaviour}, primary 0", "byzantine", liar=(PRIMARY, behaviour)))
    # A replica killed and restarted from its promise log is correct (README, Durability); one
    # restarted with durability = "memory" would count among the f faulty ones until caught up.
    restarted = f"backup {BEHIND} killed, restarted from disk into a state transfer; durability log"
    out.append(Scenario("backup restarted, no liar", "reference", event="state-transfer", note=restarted,
                        durability="log"))
    out.append(Scenario("lying-state, backup 3", "byzantine", liar=(LIAR_BACKUP, "lying-state"),
                        event="state-transfer", note=restarted, durability="log"))
    out.append(Scenario("view change, no liar", "reference", event="view-change", note="primary 0 paused"))
    for behaviour in ("hiding-view-changes", "claiming-view-changes"):
        out.append(Scenario(
            f"{behaviour}, backup 3", "byzantine", liar=(LIAR_BACKUP, behaviour), event="view-change",
            note="primary 0 paused",
        ))
        out.append(Scenario(
            f"{behaviour}, next primary 1", "byzantine", liar=(NEXT_PRIMARY, behaviour), event="view-change",
            note="primary 0 paused; the liar is view 1's primary",
        ))
    out.append(Scenario("slow-primary, primary 0", "byzantine", liar=(PRIMARY, "slow-primary")))
    out.append(Scenario("big-MAC client (5)", "client", attacker="big-mac", probe=True,
                        note="tags good for one replica each, no signature"))
    out.append(Scenario("replayed frames (keyless)", "client", attacker="replay", probe=True,
                        note=f"client {VICTIM}'s captured link, {REPLAYS_PER_S}/s"))
    out.append(Scenario("idle connections (keyless)", "client", attacker="idle", probe=True,
                        note=f"{len(IDLE_SOURCES)} addresses x {IDLE_PER_SOURCE} per replica"))
    covered = {s.liar[1] for s in out if s.liar}
    assert covered == set(CATALOGUE), f"behaviours without a scenario: {set(CATALOGUE) - covered}"
    return out


# -- measuring ------------------------------------------------------------------------------------


def value_of(result: bytes) -> tuple[bool, object]:
    try:
        ok, value = msgpack.unpackb(result)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return False, result
    return ok is True, value


class Load:
    """Closed loops, one per client: put a key of our own, then read it back (every other read on
    the read-only path); each result must be what the loop wrote. ``done`` holds each completion's
    time (monotonic) and the view its client knew then."""

    def __init__(self, cluster: cfg.Cluster, ids: list[int]) -> None:
        self.cluster, self.ids = cluster, ids
        self.done: list[tuple[float, int]] = []
        self.wrong: list[str] = []
        self.errors: list[str] = []
        self.stopping = False
        self.clients: list[Client] = []
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self.clients = [Client(self.cluster, i) for i in self.ids]
        for c in self.clients:
            await c.start()
        await asyncio.gather(*(c.wait_connected(10) for c in self.clients))

    def go(self) -> None:
        self.tasks = [asyncio.create_task(self._loop(c)) for c in self.clients]

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.wait(self.tasks, timeout=OP_TIMEOUT_S + 5)
        for c in self.clients:
            await c.close()

    async def _op(self, c: Client, op: bytes, read_only: bool, expected: set, what: str) -> bool:
        try:
            result = await c.invoke(op, read_only=read_only, timeout=OP_TIMEOUT_S)
        except QuorumTimeout as exc:
            self.errors.append(f"client {c.id}: {what}: {exc}")
            print(f"  !!! NO QUORUM: client {c.id}: {what}: {exc}", flush=True)
            return False
        self.done.append((time.monotonic(), c.core.view))
        ok, value = value_of(result)
        if not ok or value not in expected:
            self.wrong.append(f"client {c.id}: {what}: expected {sorted(map(repr, expected))}, got {result!r}")
            print(f"  !!! WRONG RESULT: client {c.id}: {what}: expected one of {expected}, got {result!r}", flush=True)
        return True

    async def _loop(self, c: Client) -> None:
        model: dict[bytes, set] = {}  # what each key may hold (more than one value after a put timed out)
        n = 0
        while not self.stopping:
            key = b"client%d-key%d" % (c.id, n % KEYS_PER_CLIENT)
            value = b"client%d-value%d" % (c.id, n)
            before = model.get(key, {None})
            if await self._op(c, KVService.put(key, value), False, before, f"put {key!r}"):
                model[key] = {value}
            else:  # it may or may not have been executed
                model[key] = before | {value}
            if self.stopping:
                break
            if await self._op(c, KVService.get(key), n % 2 == 1, model[key], f"get {key!r}"):
                model[key] = {value} if value in model[key] else model[key]
            n += 1


def window(times: list[float], start: float, end: float) -> dict:
    """Throughput and longest gap between completions in [start, end], the ends counted as gaps."""
    lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
    inside = times[lo:hi]
    edges = [start, *inside, end]
    gaps = [(b - a, a) for a, b in itertools.pairwise(edges)]
    stall, at = max(gaps)
    return {"ops": len(inside), "seconds": end - start, "ops_per_s": len(inside) / (end - start),
            "longest_stall_s": stall, "stall_at_s": at - start}


def recovery(times: list[float], stop: float, end: float, target: float) -> float | None:
    """Seconds from ``stop`` to the first RECOVERY_WINDOW_S window whose throughput is at least
    90% of ``target`` (None: not before ``end``)."""
    t = stop
    while t + RECOVERY_WINDOW_S <= end:
        count = bisect.bisect_left(times, t + RECOVERY_WINDOW_S) - bisect.bisect_left(times, t)
        if count / RECOVERY_WINDOW_S >= 0.9 * target:
            return t - stop
        t += 0.05
    return None


def windows_rates(times: list[float], start: float, end: float) -> list[float]:
    """Throughput in consecutive RECOVERY_WINDOW_S windows of [start, end]."""
    out = []
    t = start
    while t + RECOVERY_WINDOW_S <= end:
        count = bisect.bisect_left(times, t + RECOVERY_WINDOW_S) - bisect.bisect_left(times, t)
        out.append(count / RECOVERY_WINDOW_S)
        t += RECOVERY_WINDOW_S
    return out


async def status(lc: LocalCluster, replica: int) -> dict:
    return await asyncio.to_thread(lc.status, replica)


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if await check():
                return True
        await asyncio.sleep(0.05)
    return False


class Sampler:
    """Each replica process's RSS (the largest seen) and CPU time (the last seen, so a killed
    one's counts up to its end), every 0.25 s."""

    def __init__(self, lc: LocalCluster) -> None:
        self.lc = lc
        self.rss: dict[int, float] = {}  # replica -> MB
        self.cpu0: dict[int, float] = {}  # pid -> CPU s when first seen
        self.cpu: dict[int, tuple[int, float]] = {}  # pid -> (replica, CPU s last seen)
        self.sample()
        self.cpu0 = {pid: c for pid, (_, c) in self.cpu.items()}

    def sample(self) -> None:
        for i, p in enumerate(self.lc.procs):
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    self.rss[i] = max(self.rss.get(i, 0.0), rss_mb(p.pid))
                    self.cpu[p.pid] = (i, process_cpu_s([p.pid]))

    def cpu_by_replica(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for pid, (i, c) in self.cpu.items():
            out[i] = round(out.get(i, 0.0) + c - self.cpu0.get(pid, 0.0), 2)
        return dict(sorted(out.items()))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.sample()


# -- events that make a lie matter ----------------------------------------------------------------


async def force_view_change(lc: LocalCluster, sc: Scenario) -> dict:
    """Pause the primary until the awake correct replicas have started a view change, then go on."""
    liar = sc.liar[0] if sc.liar else None
    awake = [i for i in range(lc.cluster.n) if i not in (PRIMARY, liar)]

    async def started() -> bool:
        states = [await status(lc, i) for i in awake]
        return all(s["view"] >= 1 or s["view_changing"] for s in states)

    pid = lc.procs[PRIMARY].pid
    t = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        ok = await until(started, PAUSE_MAX_S)
    finally:
        os.kill(pid, signal.SIGCONT)
    out = {"primary_paused_s": round(time.monotonic() - t, 2), "view_change_started": ok}
    print(f"    primary {PRIMARY} paused {out['primary_paused_s']} s until the others started a view change "
          f"({'yes' if ok else 'NOT within ' + str(PAUSE_MAX_S) + ' s'})", flush=True)
    return out


async def force_state_transfer(lc: LocalCluster, sc: Scenario, until_t: float) -> dict:
    """Kill a correct backup until the others' stable checkpoint is a log window past it, then
    restart it from its data directory: it must fetch the state (a paused process would not, the
    others' messages wait for it in the sockets). With a liar, again (up to 3 times, time
    permitting) until the restarted replica caught one of the liar's lies."""
    liar = sc.liar[0] if sc.liar else None
    awake = [i for i in range(lc.cluster.n) if i not in (BEHIND, liar)]
    out: dict = {"down_s": [], "caught_up_s": [], "state_transfers": 0, "liar_rewritten": 0}
    for _ in range(3):
        if time.monotonic() > until_t - 4:
            break
        left_at = (await status(lc, BEHIND))["executed"]

        async def collected(left_at: int = left_at) -> bool:
            return min([(await status(lc, i))["stable_checkpoint"] for i in awake]) > left_at + PARAMS.log_window

        t = time.monotonic()
        lc.kill(BEHIND)
        behind_enough = await until(collected, PAUSE_MAX_S)
        await asyncio.to_thread(lc.restart, BEHIND)
        down = time.monotonic() - t
        target = max([(await status(lc, i))["stable_checkpoint"] for i in awake])

        async def caught_up(target: int = target) -> bool:
            s = await status(lc, BEHIND)
            return s["stats"].get("state-transfers", 0) > 0 and s["executed"] >= target

        t = time.monotonic()
        ok = await until(caught_up, PAUSE_MAX_S)
        s = await status(lc, BEHIND)
        out["down_s"].append(round(down, 2))
        out["caught_up_s"].append(round(time.monotonic() - t, 2) if ok else None)
        out["state_transfers"] += s["stats"].get("state-transfers", 0)
        out["state_drops"] = {k: v for k, v in s["dropped"].items() if "state" in k or "partition" in k}
        if liar is not None:
            out["liar_rewritten"] = (await status(lc, liar)).get("rewritten", 0)
        print(f"    backup {BEHIND} down {down:.2f} s ({'a window behind' if behind_enough else 'NOT behind'}), "
              + (f"caught up by state transfer {out['caught_up_s'][-1]} s after its restart" if ok
                 else f"NOT caught up by state transfer within {PAUSE_MAX_S:g} s")
              + (f"; the liar rewrote {out['liar_rewritten']} messages" if liar is not None else "")
              + (f"; its drops {out['state_drops']}" if out["state_drops"] else ""), flush=True)
        out["lies_caught"] = sum(v for k, v in out["state_drops"].items() if not k.startswith("unrequested"))
        if liar is None or out["lies_caught"]:
            break
    return out


# -- the attackers (each in a process of its own: ``--attacker KIND``) ------------------------------


async def open_session(host: str, port: int, keyring, replica: int) -> tuple:
    reader, writer = await asyncio.open_connection(host, port)
    session = Session(keyring, expect=replica)
    writer.write(LENGTH.pack(len(data := session.initiate())) + data)
    (size,) = LENGTH.unpack(await asyncio.wait_for(reader.readexactly(4), 5))
    finish = session.receive_handshake(await asyncio.wait_for(reader.readexactly(size), 5))
    assert finish is not None and session.established, "the replica did not complete the handshake"
    writer.write(LENGTH.pack(len(finish)) + finish)
    await writer.drain()
    keyring.use_session_key(session.peer, session.request_key)
    return reader, writer, session


async def drain(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(1 << 16):
            pass


async def big_mac(cluster: cfg.Cluster, stop: asyncio.Event, _capture: Path | None) -> dict:
    """Client FAULTY_CLIENT's requests, each to one replica with a tag good for that replica only."""
    kr = cluster.keyring(CLIENT, FAULTY_CLIENT)
    conns = [await open_session(r.host, r.port, kr, r.id) for r in cluster.replicas]
    readers = [asyncio.create_task(drain(reader)) for reader, _, _ in conns]
    sent, ts = 0, 1
    while not stop.is_set():
        for j, (_, writer, session) in enumerate(conns):
            req = Request.make(FAULTY_CLIENT, ts, KVService.put(b"poison", b"%d" % ts))
            tags = kr.authenticator(Request.TYPE, req.raw)
            only_j = bytes(j * MAC_BYTES) + tags[j * MAC_BYTES:(j + 1) * MAC_BYTES]
            auth = only_j + bytes((cluster.n - j - 1) * MAC_BYTES) + bytes(SIGNATURE_BYTES)
            sealed = session.seal(frame(req, req.raw, auth))
            if not writer.is_closing():
                writer.write(LENGTH.pack(len(sealed)) + sealed)
                sent += 1
            ts += 1
        await asyncio.sleep(BIG_MAC_ROUND_S)
    closed = sum(t.done() for t in readers)  # a reader ends when its replica closed the connection
    for _, writer, _ in conns:
        writer.close()
    for t in readers:
        t.cancel()
    return {"requests_sent": sent, "connections_closed_by_replicas": closed}


async def replay(cluster: cfg.Cluster, stop: asyncio.Event, capture: Path | None) -> dict:
    """The captured streams of a client's links, each replayed whole on a new connection to every
    replica, REPLAYS_PER_S in all; counts what came back (an ACCEPT and then a close, or a close)."""
    assert capture is not None
    streams = [bytes.fromhex(s) for s in json.loads(capture.read_text())["streams"]]
    targets = [(r.host, r.port) for r in cluster.replicas]
    counts = {"replays": 0, "answered_bytes": 0, "answered": 0, "closed_at_once": 0, "connect_failed": 0}
    running: set[asyncio.Task] = set()
    sem = asyncio.Semaphore(64)

    async def one(stream: bytes, host: str, port: int) -> None:
        async with sem:
            try:
                reader, writer = await asyncio.open_connection(host, port, local_addr=(REPLAY_SOURCE, 0))
            except OSError:
                counts["connect_failed"] += 1
                return
            try:
                writer.write(stream)
                got = 0
                with contextlib.suppress(TimeoutError, ConnectionError, OSError):
                    while chunk := await asyncio.wait_for(reader.read(1 << 16), 2):
                        got += len(chunk)
                counts["answered_bytes"] += got
                counts["answered" if got else "closed_at_once"] += 1
            finally:
                writer.close()

    i = 0
    next_at = time.monotonic()
    while not stop.is_set():
        stream = streams[i % len(streams)]
        host, port = targets[(i // len(streams)) % len(targets)]
        task = asyncio.create_task(one(stream, host, port))
        running.add(task)
        task.add_done_callback(running.discard)
        counts["replays"] += 1
        i += 1
        next_at += 1 / REPLAYS_PER_S
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.wait(running, timeout=3) if running else None
    return counts


async def idle(cluster: cfg.Cluster, stop: asyncio.Event, _capture: Path | None) -> dict:
    """IDLE_PER_SOURCE connections from each address of IDLE_SOURCES to every replica that send
    nothing; each opened again once the replica closes it (0.5 s later if it did so at once)."""
    counts = {"opened": 0, "closed_at_deadline": 0, "refused_at_once": 0, "connect_failed": 0}
    held = {"now": 0, "max": 0}

    async def hold(host: str, port: int, source: str) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
            except OSError:
                counts["connect_failed"] += 1
                await asyncio.sleep(0.5)
                continue
            counts["opened"] += 1
            t = time.monotonic()
            held["now"] += 1
            held["max"] = max(held["max"], held["now"])
            try:
                read = asyncio.create_task(drain(reader))
                await asyncio.wait([read, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
                read.cancel()
            finally:
                held["now"] -= 1
                writer.close()
            if stop.is_set():
                break
            if time.monotonic() - t < 1.0:
                counts["refused_at_once"] += 1
                await asyncio.sleep(0.5)
            else:
                counts["closed_at_deadline"] += 1

    tasks = [
        asyncio.create_task(hold(r.host, r.port, source))
        for r in cluster.replicas for source in IDLE_SOURCES for _ in range(IDLE_PER_SOURCE)
    ]
    await stop.wait()
    await asyncio.wait(tasks, timeout=3)
    return counts | {"held_max": held["max"]}


ATTACKERS = {"big-mac": big_mac, "replay": replay, "idle": idle}


async def attacker_main(kind: str, config: Path, capture: Path | None) -> None:
    cluster = cfg.load(config)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"started": True}), flush=True)
    out = await ATTACKERS[kind](cluster, stop, capture)
    print(json.dumps(out | {"cpu_s": round(time.process_time(), 2)}), flush=True)


class Recorder:
    """A TCP relay in front of one replica that keeps the bytes a client sends through it (what an
    eavesdropper on the client's link captures); as tests/test_integration.py's."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.stream = bytearray()
        self.recording = True
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._relays: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
        if self._relays:
            await asyncio.wait(self._relays, timeout=2)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)
        replica_r, replica_w = await asyncio.open_connection(*self.upstream)
        self._writers += [client_w, replica_w]

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            while data := await src.read(1 << 16):
                dst.write(data)
                if record and self.recording:
                    self.stream += data
            dst.close()

        await asyncio.gather(copy(client_r, replica_w, True), copy(replica_r, client_w, False), return_exceptions=True)


class Attacker:
    """``python -m bench.attacks --attacker KIND`` as a child process, stopped with SIGTERM."""

    def __init__(self, kind: str, config: Path, capture: Path | None) -> None:
        self.args = [sys.executable, "-m", "bench.attacks", "--attacker", kind, "--config", str(config)]
        if capture is not None:
            self.args += ["--capture", str(capture)]
        self.proc: asyncio.subprocess.Process | None = None
        self.summary: dict = {}

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(*self.args, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        assert b"started" in line, f"the attacker did not start: {line!r}"

    async def stop(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), 15)
            self.summary = json.loads(out.decode().strip().splitlines()[-1])
        except (TimeoutError, ValueError, IndexError):
            self.proc.kill()
            await self.proc.wait()
            self.summary = {"error": "the attacker did not stop cleanly"}


async def capture_client_link(lc: LocalCluster, directory: Path) -> tuple[Client, list[Recorder], Path]:
    """Client VICTIM, connected through a Recorder to every replica, does some work; its captured
    streams (handshakes and sealed frames) go to a file. The client stays connected."""
    cluster = lc.cluster
    recorders = [Recorder(r.host, r.port) for r in cluster.replicas]
    ports = [await rec.start() for rec in recorders]
    tapped = replace(cluster, replicas=tuple(replace(r, port=p) for r, p in zip(cluster.replicas, ports, strict=True)))
    victim = Client(tapped, VICTIM)
    await victim.start()
    await victim.wait_connected(10)
    for i in range(20):
        await victim.invoke(KVService.put(b"victim", b"%d" % i), timeout=OP_TIMEOUT_S)
        await victim.invoke(KVService.get(b"victim"), read_only=True, timeout=OP_TIMEOUT_S)
    for rec in recorders:
        rec.recording = False
    path = directory / "captured.json"
    path.write_text(json.dumps({"streams": [bytes(rec.stream).hex() for rec in recorders if rec.stream]}))
    return victim, recorders, path


async def probe(cluster: cfg.Cluster, timeout_s: float = 15.0) -> dict:
    """A fresh client connects and does one put: how long that takes."""
    t = time.monotonic()
    c = Client(cluster, PROBE)
    await c.start()
    try:
        await c.wait_connected(timeout_s)
        connected = time.monotonic() - t
        await c.invoke(KVService.put(b"probe", b"x"), timeout=timeout_s)
        return {"connected_s": round(connected, 3), "first_op_s": round(time.monotonic() - t, 3)}
    except QuorumTimeout as exc:
        return {"failed": str(exc), "after_s": round(time.monotonic() - t, 2)}
    finally:
        await c.close()


# -- one scenario ---------------------------------------------------------------------------------


async def measure(lc: LocalCluster, sc: Scenario, clients: int, seconds: float, directory: Path) -> dict:
    cluster = lc.cluster
    if sc.crash is not None:
        lc.kill(sc.crash)
    live = [i for i in range(cluster.n) if i != sc.crash]
    victim = recorders = capture = None
    if sc.attacker == "replay":
        victim, recorders, capture = await capture_client_link(lc, directory)
    load = Load(cluster, list(range(clients)))
    await load.start()  # connected, no operation yet
    out: dict = {"scenario": sc.name, "kind": sc.kind, "liar": list(sc.liar) if sc.liar else None, "note": sc.note}
    attacker = None
    if sc.attacker:
        # The same cluster and clients without the attacker first: what "back" means after it.
        before = time.monotonic()
        load.go()
        await asyncio.sleep(BEFORE_S)
        before_end = time.monotonic()
        attacker = Attacker(sc.attacker, cluster.path, capture)
        await attacker.start()  # its process up and its attack beginning, outside both windows
    sampler = Sampler(lc)
    sampling = asyncio.create_task(sampler.run())
    t0 = time.monotonic()
    if attacker is None:
        load.go()
    else:
        out["before_window_s"] = [round(before - t0, 3), round(before_end - t0, 3)]
    background: list[asyncio.Task] = []
    if sc.event == "view-change":
        async def vc() -> dict:
            await asyncio.sleep(max(0.0, t0 + EVENT_AT_S - time.monotonic()))
            return await force_view_change(lc, sc)
        background.append(asyncio.create_task(vc()))
    elif sc.event == "state-transfer":
        async def st() -> dict:  # earlier: room for more than one try in the window
            await asyncio.sleep(max(0.0, t0 + EVENT_AT_S / 2 - time.monotonic()))
            return await force_state_transfer(lc, sc, t0 + seconds)
        background.append(asyncio.create_task(st()))
    probe_task = None
    if sc.probe:
        async def probing() -> dict:
            await asyncio.sleep(2.0)
            return await probe(cluster)
        probe_task = asyncio.create_task(probing())
    await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))
    t1 = time.monotonic()
    sampler.sample()
    cpu = sampler.cpu_by_replica()
    if attacker is not None:
        await attacker.stop()
        out["attacker"] = attacker.summary
        out["attacker_stopped_s"] = round(time.monotonic() - t0, 2)
        await asyncio.sleep(RECOVERY_S)
    t_end = time.monotonic()
    for task in background:
        out["event"] = await task
    if probe_task is not None:
        out["probe"] = await probe_task
    if victim is not None:
        t = time.monotonic()
        try:
            await victim.invoke(KVService.put(b"victim", b"after"), timeout=OP_TIMEOUT_S)
            out["victim_after_s"] = round(time.monotonic() - t, 3)
        except QuorumTimeout as exc:
            out["victim_after_s"] = None
            print(f"  !!! the victim client's sessions no longer work: {exc}", flush=True)
        await victim.close()
        for rec in recorders or []:
            await rec.close()
    sampling.cancel()
    await load.stop()
    times = sorted(t for t, _ in load.done)
    out |= window(times, t0, t1)
    # What the run cost the replicas, per operation: less at the mercy of the machine's other work
    # than throughput is (their CPU time only grows while they run).
    out["replica_cpu_ms_per_op"] = sum(cpu.values()) * 1e3 / max(1, out["ops"])
    out["t0"] = t0  # removed before writing
    out["times"] = [round(t - t0, 4) for t in times]  # removed before writing (kept for recovery)
    out["attack_end_s"] = round(t1 - t0, 3)
    out["end_s"] = round(t_end - t0, 3)
    later = [t for t, view in load.done if view >= 1]
    out["first_op_in_later_view_s"] = round(min(later) - t0, 2) if later else None
    out["wrong"], out["errors"] = load.wrong, load.errors
    client_stats: Counter[str] = Counter()
    for c in load.clients:
        client_stats.update(c.core.stats)
    out["client_stats"] = dict(sorted(client_stats.items()))
    out["rss_mb"] = {str(i): round(v, 1) for i, v in sorted(sampler.rss.items())}
    out["rss_max_mb"] = round(max(sampler.rss.values()), 1)
    out["replica_cpu_s"] = cpu
    states = {}
    for i in live:
        with contextlib.suppress(OSError):
            s = await status(lc, i)
            states[str(i)] = {
                "view": s["view"], "executed": s["executed"], "stable": s["stable_checkpoint"],
                "rewritten": s.get("rewritten"),
                "dropped_top": dict(sorted(s["dropped"].items(), key=lambda kv: -kv[1])[:6]),
                "stats": {k: v for k, v in s["stats"].items() if any(
                    w in k for w in ("view-change", "state-", "learn", "distrust", "suspect", "slow-primary"))},
            }
    out["replicas"] = states
    return out


def run_scenario(sc: Scenario, clients: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        lc = LocalCluster(Path(tmp) / "cluster", 1, "kv", replace(PARAMS, durability=sc.durability),
                          byzantine=sc.liar)
        try:
            time.sleep(SETTLE_S)
            return run_async(measure(lc, sc, clients, seconds, Path(tmp)))
        finally:
            lc.stop()


# -- BFS through a FUSE mount ---------------------------------------------------------------------


def fuse_missing() -> str | None:
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse on this machine"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    if shutil.which("tar") is None:
        return "no tar on this machine"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 does not import: {exc}"
    return None


def source_tar(path: Path, copies: int = 2) -> dict[str, str]:
    """A tar of this repository's tracked files (as they are in the working tree), ``copies``
    times under copy-I/; returns each member's sha256."""
    root = Path(__file__).resolve().parent.parent
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    files = sorted(p for p in listed if (root / p).is_file() and (root / p).stat().st_size < 64 * 1024)
    digests = {}
    with tarfile.open(path, "w") as tar:
        for i in range(copies):
            for p in files:
                name = f"copy-{i}/{p}"
                tar.add(root / p, arcname=name)
                digests[name] = hashlib.sha256((root / p).read_bytes()).hexdigest()
    return digests


BFS_CASES = (("fault-free", None), ("lying backup 3", (LIAR_BACKUP, "lying-replies")))


def extract(archive: Path, dest: Path, digests: dict[str, str]) -> tuple[float, int]:
    """Seconds to extract ``archive`` into ``dest`` and how many files then differ from the archive."""
    dest.mkdir()
    t = time.perf_counter()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)
    seconds = time.perf_counter() - t
    bad = [n for n, d in digests.items() if hashlib.sha256((dest / n).read_bytes()).hexdigest() != d]
    for n in bad[:5]:
        print(f"  !!! WRONG FILE CONTENT through the mount: {n}", flush=True)
    return seconds, len(bad)


def run_bfs(rounds: int) -> dict:
    """Both clusters up and mounted at once, their rounds taking turns, so that the machine's drift
    falls on both alike."""
    missing = fuse_missing()
    if missing:
        print(f"\nBFS: SKIPPED, {missing}", flush=True)
        return {"skipped": missing}
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "src.tar"
        digests = source_tar(archive)
        size = archive.stat().st_size
        print(f"\nBFS through a FUSE mount: extracting a tar of {len(digests)} files ({size / 2**20:.1f} MB), "
              f"{rounds} rounds, the two clusters taking turns", flush=True)
        out: dict = {"files": len(digests), "tar_mb": round(size / 2**20, 2)}
        clusters: dict[str, tuple[LocalCluster, Path]] = {}
        try:
            for name, liar in BFS_CASES:
                lc = LocalCluster(Path(tmp) / name.replace(" ", "-"), 1, "bfs", PARAMS, byzantine=liar)
                mnt = Path(tmp) / f"mnt-{len(clusters)}"
                mnt.mkdir()
                clusters[name] = (lc, mnt)
                mounted = subprocess.run(
                    [sys.executable, "-m", "bfs", "mount", "--config", str(lc.cluster.path), "--client", "0",
                     str(mnt)],
                    capture_output=True, text=True, timeout=60,
                )
                if mounted.returncode != 0:
                    print(f"  !!! bfs mount failed: {mounted.stderr.strip()}", flush=True)
                    return out | {"error": f"bfs mount failed: {mounted.stderr.strip()}"}
                out[name] = {"seconds": [], "wrong_files": 0}
            time.sleep(SETTLE_S)
            for r in range(rounds):
                for name, _ in BFS_CASES:
                    _, mnt = clusters[name]
                    seconds, wrong = extract(archive, mnt / f"x{r}", digests)
                    out[name]["seconds"].append(seconds)
                    out[name]["wrong_files"] += wrong
                    print(f"  round {r + 1}, {name}: {seconds:.2f} s, {len(digests) - wrong}/{len(digests)} "
                          "files identical", flush=True)
            for name, liar in BFS_CASES:
                out[name]["median_s"] = statistics.median(out[name]["seconds"])
                if liar is not None:
                    out[name]["liar_rewritten"] = clusters[name][0].status(liar[0]).get("rewritten")
        finally:
            for lc, mnt in clusters.values():
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
                lc.stop()
    return out


# -- the report -----------------------------------------------------------------------------------


def analyse(results: dict) -> None:
    """Reference figures, recovery times and the floors, into ``results``. Each scenario is compared
    with the mean of the fault-free runs just before and just after it (the machine is shared: its
    speed drifts over a run); RSS with the largest of every fault-free run."""
    runs = results["scenarios"]
    refs = [k for k, r in enumerate(runs) if r["kind"] == "fault-free"]
    ref_rss = max(runs[k]["rss_max_mb"] for k in refs)
    overall = statistics.mean(runs[k]["ops_per_s"] for k in refs)
    ff_windows = [w for k in refs for w in windows_rates(runs[k]["times"], 0.0, runs[k]["attack_end_s"])]
    results["reference"] = {
        "ops_per_s": overall, "runs_ops_per_s": [runs[k]["ops_per_s"] for k in refs], "rss_mb": ref_rss,
        "fault_free_1s_windows_below_90pct_of_own_run": sum(
            w < 0.9 * runs[k]["ops_per_s"]
            for k in refs for w in windows_rates(runs[k]["times"], 0.0, runs[k]["attack_end_s"])),
        "fault_free_1s_windows": len(ff_windows),
    }
    for k, r in enumerate(runs):
        if r["kind"] == "fault-free":
            base = overall
        else:
            before = max(j for j in refs if j < k)
            after = min((j for j in refs if j > k), default=before)
            base = statistics.mean([runs[before]["ops_per_s"], runs[after]["ops_per_s"]])
        r["reference_ops_per_s"] = base
        r["ratio"] = r["ops_per_s"] / base
        floors: dict[str, bool] = {}
        if r["kind"] == "crash":
            floors[f"throughput >= {CRASH_FLOOR:.0%}"] = r["ratio"] >= CRASH_FLOOR
        if r["kind"] in ("byzantine", "client"):
            floors[f"throughput >= {BYZANTINE_FLOOR:.0%}"] = r["ratio"] >= BYZANTINE_FLOOR
            floors[f"stall <= {STALL_BOUND_S:.1f} s"] = r["longest_stall_s"] <= STALL_BOUND_S
        if r["kind"] != "fault-free":
            floors[f"RSS <= {RSS_FACTOR:g}x"] = r["rss_max_mb"] <= RSS_FACTOR * ref_rss
        if r.get("attacker_stopped_s") is not None:
            # "Back" against the same cluster's throughput just before the attack (the fault-free
            # runs minutes away are shown too: the machine's speed moves more than 10% in minutes).
            before_w = window(r["times"], *r["before_window_s"])
            r["before_attack_ops_per_s"] = before_w["ops_per_s"]
            back = recovery(r["times"], r["attacker_stopped_s"], r["end_s"], before_w["ops_per_s"])
            r["recovery_s"] = None if back is None else round(back, 2)
            back_ff = recovery(r["times"], r["attacker_stopped_s"], r["end_s"], base)
            r["recovery_vs_fault_free_runs_s"] = None if back_ff is None else round(back_ff, 2)
            after_w = window(r["times"], r["attacker_stopped_s"], r["end_s"])
            r["after_attack"] = {"ops_per_s": after_w["ops_per_s"], "longest_stall_s": after_w["longest_stall_s"]}
            floors[f"back within {RECOVERY_FLOOR_S:g} s"] = back is not None and back <= RECOVERY_FLOOR_S
        floors["no wrong result"] = not r["wrong"] and not r["errors"]
        r["floors"] = floors
        r["rates_1s"] = [round(x) for x in windows_rates(r["times"], r.get("before_window_s", [0.0])[0], r["end_s"])]
    bfs = results.get("bfs", {})
    if "median_s" in bfs.get("fault-free", {}) and "median_s" in bfs.get("lying backup 3", {}):
        base, lying = bfs["fault-free"]["median_s"], bfs["lying backup 3"]["median_s"]
        bfs["ratio"] = lying / base
        bfs["floors"] = {
            f"lying within {BFS_FACTOR:g}x": lying <= BFS_FACTOR * base,
            "no wrong file": not bfs["fault-free"]["wrong_files"] and not bfs["lying backup 3"]["wrong_files"],
        }


def verdicts(floors: dict[str, bool]) -> str:
    return "; ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in floors.items())


def table(results: dict) -> str:
    ref = results["reference"]
    rows = [
        f"Fault-free runs: {', '.join(f'{x:.0f}' for x in ref['runs_ops_per_s'])} ops/s (mean "
        f"{ref['ops_per_s']:.0f}); each scenario is compared with the mean of the fault-free runs before and "
        f"after it. Largest fault-free replica RSS {ref['rss_mb']:.1f} MB. "
        f"Stall bound {STALL_BOUND_S:.1f} s = request_timeout_ms {PARAMS.request_timeout_ms} + 2 x view_timeout_ms "
        f"{PARAMS.view_timeout_ms} + {STALL_MARGIN_S} s margin.",
        "",
        "| scenario | ops/s | x fault-free (its reference) | longest stall s (at s) | replica RSS max MB "
        "| replica CPU ms/op | load | notes | floors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["scenarios"]:
        notes = [r["note"]] if r["note"] else []
        if r.get("first_op_in_later_view_s") is not None:
            notes.append(f"first op in a later view at {r['first_op_in_later_view_s']} s")
        ev = r.get("event") or {}
        if "state_transfers" in ev:
            notes.append(f"{ev['state_transfers']} state transfers, caught up {ev['caught_up_s']} s after restarts"
                         + (f", {ev['lies_caught']} lies caught by the restarted replica" if r["liar"] else ""))
        if r["liar"]:
            notes.append(f"the liar rewrote {r['replicas'][str(r['liar'][0])]['rewritten']} messages")
        if r.get("attacker_stopped_s") is not None:
            back, back_ff = r.get("recovery_s"), r.get("recovery_vs_fault_free_runs_s")
            notes.append(
                f"{r['before_attack_ops_per_s']:.0f} ops/s before the attack, {r['after_attack']['ops_per_s']:.0f} "
                "after; " + (f"back within 10% of before {back} s after the attacker stopped" if back is not None
                             else "NOT back within 10% of before")
                + (f" (of the fault-free runs: {back_ff} s)" if back_ff is not None
                   else " (NOT back within 10% of the fault-free runs)"))
        if "probe" in r:
            p = r["probe"]
            notes.append(f"fresh client connected in {p['connected_s']} s" if "connected_s" in p
                         else f"fresh client FAILED to connect ({p.get('after_s')} s)")
        if "victim_after_s" in r:
            notes.append(f"victim client's next op {r['victim_after_s']} s")
        if r["wrong"] or r["errors"]:
            notes.append(f"**{len(r['wrong'])} wrong results, {len(r['errors'])} without quorum**")
        rows.append(
            f"| {r['scenario']} | {r['ops_per_s']:.0f} | {r['ratio']:.2f} ({r['reference_ops_per_s']:.0f}) "
            f"| {r['longest_stall_s']:.2f} ({r['stall_at_s']:.1f}) | {r['rss_max_mb']:.1f} "
            f"| {r['replica_cpu_ms_per_op']:.2f} | {r['load_average'][0]:.1f} | {'; '.join(notes)} "
            f"| {verdicts(r['floors']) or '-'} |"
        )
    bfs = results.get("bfs", {})
    rows.append("")
    if "skipped" in bfs:
        rows.append(f"BFS through FUSE: skipped ({bfs['skipped']}).")
    elif bfs:
        rows += [
            f"BFS through a FUSE mount: `tar -xf` of {bfs['files']} files ({bfs['tar_mb']} MB) from this repository, "
            "median of the rounds, every file compared byte for byte afterwards.",
            "",
            "| cluster | extract s (rounds) | wrong files | floors |",
            "|---|---|---|---|",
        ]
        for name in ("fault-free", "lying backup 3"):
            b = bfs.get(name, {})
            if "median_s" not in b:
                rows.append(f"| {name} | {b.get('error', 'not run')} | | |")
                continue
            fl = verdicts(bfs.get("floors", {})) if name != "fault-free" else "-"
            ratio = f" ({bfs['ratio']:.2f}x)" if name != "fault-free" and "ratio" in bfs else ""
            rows.append(f"| {name} | {b['median_s']:.2f}{ratio} ({', '.join(f'{s:.2f}' for s in b['seconds'])}) "
                        f"| {b['wrong_files']} | {fl} |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    runs = results["scenarios"]
    names = [r["scenario"] for r in runs]
    ratios = [r["ratio"] for r in runs]
    kinds = {"fault-free": "tab:gray", "reference": "tab:olive", "crash": "tab:blue", "byzantine": "tab:green",
             "client": "tab:purple"}
    colors = ["tab:red" if not all(r["floors"].values()) else kinds[r["kind"]] for r in runs]
    bfs = results.get("bfs", {})
    if "ratio" in bfs:
        names.append("BFS tar, lying backup (time, fault-free / lying)")
        ratios.append(1 / bfs["ratio"])
        colors.append("tab:orange" if all(bfs["floors"].values()) else "tab:red")
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(names) + 1.5))
    ys = range(len(names))[::-1]
    ax.barh(list(ys), ratios, color=colors)
    for y, v in zip(ys, ratios, strict=True):
        ax.text(v + 0.01, y, f"{v:.2f}", va="center", fontsize=7)
    ax.set_yticks(list(ys), names, fontsize=7)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.axvline(CRASH_FLOOR, color="tab:blue", ls="--", lw=0.8, label=f"crashed backup floor {CRASH_FLOOR:.0%}")
    ax.axvline(BYZANTINE_FLOOR, color="tab:green", ls="--", lw=0.8, label=f"Byzantine floor {BYZANTINE_FLOOR:.0%}")
    ax.set_xlabel("correct clients' throughput relative to the fault-free runs before and after; red: a floor failed",
                  fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=2)
    ax.set_title(f"Attacks on 4 replicas (f = 1), kv, {results['clients']} closed loops ({results['machine']})",
                 fontsize=8)
    return save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured length of each scenario")
    ap.add_argument("--clients", type=int, default=4, choices=range(1, 5), help="closed loops (clients 0..N-1)")
    ap.add_argument("--only", help="run only scenarios whose name contains this (the fault-free runs always run)")
    ap.add_argument("--bfs-rounds", type=int, default=3)
    ap.add_argument("--no-bfs", action="store_true", help="leave out the BFS part")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--attacker", choices=list(ATTACKERS), help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--capture", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.attacker:
        run_async(attacker_main(a.attacker, a.config, a.capture))
        return
    # Stopped with SIGTERM, still stop the replicas (they run in sessions of their own).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    todo = schedule([s for s in scenarios() if not a.only or a.only in s.name])
    results: dict = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "seconds": a.seconds, "clients": a.clients,
        "params": {"durability": PARAMS.durability, "request_timeout_ms": PARAMS.request_timeout_ms,
                   "view_timeout_ms": PARAMS.view_timeout_ms, "stall_bound_s": STALL_BOUND_S},
        "load_average_before": os.getloadavg(), "scenarios": [],
    }
    print(f"{len(todo)} scenarios of {a.seconds:g} s, {a.clients} closed loops, kv, f = 1, durability memory; "
          f"{results['machine']}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    started = time.monotonic()
    for k, sc in enumerate(todo, 1):
        liar = f" (replica {sc.liar[0]} runs --byzantine {sc.liar[1]})" if sc.liar else ""
        print(f"[{k}/{len(todo)}] {sc.name}{liar} ...", flush=True)
        r = run_scenario(sc, a.clients, a.seconds)
        r["load_average"] = os.getloadavg()
        results["scenarios"].append(r)
        extra = ""
        if "attacker" in r:
            extra = f"; attacker {r['attacker']}"
        if "probe" in r:
            extra += f"; fresh client {r['probe']}"
        print(f"    {r['ops_per_s']:.0f} ops/s, longest stall {r['longest_stall_s']:.2f} s at "
              f"{r['stall_at_s']:.1f} s, RSS max {r['rss_max_mb']:.1f} MB, replica CPU {r['replica_cpu_s']}, "
              f"views {[s['view'] for s in r['replicas'].values()]}, load {r['load_average'][0]:.2f}{extra}",
              flush=True)
        if r["wrong"] or r["errors"]:
            print(f"    !!! {len(r['wrong'])} WRONG RESULTS, {len(r['errors'])} operations without a quorum",
                  flush=True)
    if not a.no_bfs:
        results["bfs"] = run_bfs(a.bfs_rounds)
    results["load_average_after"] = os.getloadavg()
    results["total_s"] = round(time.monotonic() - started, 1)
    analyse(results)
    md = table(results)
    md += (f"\n\nLoad average (1 min) {results['load_average_before'][0]:.2f} before, "
           f"{results['load_average_after'][0]:.2f} after; the whole run took {results['total_s']:.0f} s. "
           f"Fault-free 1 s windows below 90% of their own run's mean: "
           f"{results['reference']['fault_free_1s_windows_below_90pct_of_own_run']} of "
           f"{results['reference']['fault_free_1s_windows']} (the noise the recovery measure sees).")
    failed = [(r["scenario"], n) for r in results["scenarios"] for n, ok in r["floors"].items() if not ok]
    failed += [("BFS", n) for n, ok in results.get("bfs", {}).get("floors", {}).items() if not ok]
    md += "\n\n" + ("Every floor PASSES." if not failed else
                    "FAILED floors: " + "; ".join(f"{s}: {n}" for s, n in failed) + ".")
    slow = [(r["scenario"], r["probe"]) for r in results["scenarios"]
            if "probe" in r and r["probe"].get("connected_s", PROBE_SLOW_S + 1) > PROBE_SLOW_S]
    for name, p in slow:
        md += (f"\n\nNot a floor, but: during \"{name}\" a fresh client (client {PROBE}, starting 2 s in) "
               + (f"needed {p['connected_s']} s to get sessions with 2f+1 replicas"
                  if "connected_s" in p else f"got no sessions with 2f+1 replicas in {p['after_s']} s")
               + f" (the attack lasted {a.seconds:g} s).")
    print("\n" + md, flush=True)
    for r in results["scenarios"]:
        del r["times"], r["t0"]
    write_results(a.out, "attacks", results, md, plot)


if __name__ == "__main__":
    main()

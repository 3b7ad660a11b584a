"""Fuzzing one replica of a real 4-replica kv cluster over TCP while a correct client works.

A fuzzer process (this module with ``--worker``) connects to a backup (replica 1) and sends it
hostile frames as fast as the replica reads them. Replicas take frames only inside authenticated
sessions (bft.runtime.session), so the fuzzer runs real session handshakes with the keys of the
cluster: as replica 3 (the one Byzantine replica f = 1 allows; its real process is stopped first,
or it and the fuzzer would take the session of replica 3 from each other at every reconnection,
since a principal holds one session with a replica at a time) for most frames, and as client 7
for a fifth of them. Each hostile frame is sealed with its connection's session, so it passes the
session layer and reaches the wire decoder and the core: random bytes; random headers; real sealed
messages of every type in bft/messages.py with bits flipped, bytes cut off or appended; the same
messages with a field changed (at any depth of the payload) and then authenticated with real keys
(replica 3's, client 7's), so they pass the MAC or signature and must be refused by later checks;
valid messages of replica 3 and client 7 about the live sequence numbers; forged tags and
signatures. A replica's session may carry client 7's requests too (replicas relay requests); the
session of client 7 carries its requests only, and the rest on it, replica 3's messages among
them, must be refused ("not-from-session-peer", or "bad-authentication"). Now and then a frame
has a length prefix over the limit, or one that disagrees with its frame (a desync length):
either ends the session (the replica closes it), and the fuzzer reconnects with a new handshake
and goes on.

Besides, about one connection per 2,000 frames never completes a handshake (UNAUTH_KINDS): it
sends nothing (idle), a garbage or oversized handshake frame, a fresh INIT cut short (framed as cut,
or its length prefix and only part of it), an INIT and FINISH recorded from an earlier handshake of
the fuzzer's (or either alone), or a misaddressed INIT; the fuzzer records when the target closes
each (at once, or at its handshake deadline). Every 250,000 frames it opens more idle connections
at once than the target admits unauthenticated (Admission), counts those refused and tries an
honest handshake during that (refused) and after (accepted); at the end, with all its connections
closed, it checks that the target admits as many as before (no pending slot leaked). Meanwhile a
correct client (client 0) keeps writing and reading back keys of its own, and this process watches
the target: its process alive and its /status answering, every half second.

At the end it prints frames sent and per second, what became of the sessions and of the
unauthenticated connections, the target's dropped counters by reason (the increase during the
fuzz), whether it stayed up, the client's operations and their throughput during the fuzz against
before it, and the target's RSS before and after; and writes ``bench/results/fuzz.{md,json}``. If
the target stops or the client stalls, the frames the fuzzer sent last are saved to
``bench/results/fuzz-last-frames.jsonl`` (newest last: the session each went on, its kind, its
length prefix and the frame before sealing, in hex: sealed it is good on that session only) and
the target's log tail is printed and kept in the JSON. A measurement, not a test.

    python -m bench.fuzz [--frames 1000000] [--seconds-max 300] [--seed 1] [--liar-process stop|keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import inspect
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
import msgspec

from bench.micro import RESULTS, machine, process_cpu_s, rss_mb
from bft import config as cfg
from bft.core.params import Params
from bft.crypto import CLIENT, REPLICA, Keyring
from bft.local import LocalCluster
from bft.messages import (
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
from bft.runtime.session import HANDSHAKE_BYTES_MAX, Session
from bft.runtime.session import VERSION as SESSION_VERSION
from bft.runtime.transport import Admission
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
CLIENT_SESSION_SHARE = 0.2  # of the frames, those sent in the session of client 7 (else replica 3)

# Connections that never complete a handshake, and how often each kind is opened (weights).
UNAUTH_KINDS = {
    "idle": 3,  # sends nothing
    "garbage": 3,  # a frame of random bytes (at most the handshake limit) for its INIT
    "garbage-oversized": 1,  # a length prefix over the handshake limit
    "truncated-init": 2,  # a fresh INIT cut short, framed as cut
    "partial-init": 2,  # a fresh INIT's length prefix and only part of it, then nothing
    "replayed-init-finish": 2,  # INIT and FINISH recorded from an earlier handshake of ours
    "replayed-init": 1,  # a recorded INIT, then nothing
    "replayed-finish": 1,  # a recorded FINISH as the first frame
    "init-misaddressed": 1,  # an INIT for another replica, or from an unknown principal or itself
}
UNAUTH_EVERY = 2_000  # about one unauthenticated connection opened per this many frames
UNAUTH_OPEN_MAX = 40  # the most of them open at once (below PENDING_MAX, but for a saturation)
PENDING_MAX = inspect.signature(Admission).parameters["pending_max"].default
HANDSHAKE_DEADLINE_S = Admission.DEADLINE_S
SATURATE_EVERY = 250_000  # frames between saturations: PENDING_MAX + SATURATE_EXTRA idle at once
SATURATE_EXTRA = 8


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
        request = request.with_auth(self.client_kr.request_auth(Request.TYPE, request.raw))
        seq = self._int()
        pp = PrePrepare.make(view, seq, int(time.time() * 1000), (request, d), me)
        vc = ViewChange(
            view + 1, self.stable, ((self.stable, d),), ((seq, d, view),), ((seq, ((d, view),)),), me
        )
        raw = encode_payload(vc)
        vc = msgspec.structs.replace(vc, raw=raw, signature=self.replica_kr.sign(ViewChange.TYPE, raw))
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
            names = cls.__struct_fields__
            unknown = [name for name in names if name not in values]
            assert not unknown, f"bench.fuzz has no value for {cls.__name__}.{unknown}: add one"
            out.append(cls(**{name: values[name] for name in names}))
        return out

    def _seal(self, msg: Message) -> bytes:
        if isinstance(msg, Request):
            return self.client_wire.seal(msg)
        return self.replica_wire.seal(msg)

    def _auth(self, type_: int, payload: bytes) -> tuple[int, bytes]:
        """(sender, authenticator) of a payload under the fuzzer's real keys."""
        if type_ == Request.TYPE:
            return FUZZ_CLIENT, self.client_kr.request_auth(type_, payload)
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
        sender = FUZZ_CLIENT if msg.TYPE == Request.TYPE else msg.sender
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


def framed(data: bytes) -> bytes:
    return LENGTH.pack(len(data)) + data


def _exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed during the handshake")
        out += chunk
    return out


def handshake(sock: socket.socket, keyring: Keyring, replica: int) -> tuple[Session, bytes, bytes]:
    """The initiator's side of a session handshake on a blocking socket (as
    tests/sessionconn.blocking_session); returns the session and its INIT and FINISH, to replay."""
    session = Session(keyring, expect=replica)
    init = session.initiate()
    sock.sendall(framed(init))
    (size,) = LENGTH.unpack(_exactly(sock, 4))
    if size > HANDSHAKE_BYTES_MAX:
        raise ConnectionError(f"an ACCEPT of {size} bytes")
    finish = session.receive_handshake(_exactly(sock, size))
    assert finish is not None and session.established
    sock.sendall(framed(finish))
    if keyring.me[0] == CLIENT:  # as the client library does: its request tags for this replica
        keyring.use_session_key(session.peer, session.request_key)
    return session, init, finish


def closed_now(sock: socket.socket) -> bool:
    """Whether the peer has closed ``sock`` (non-blocking; what it sent meanwhile is discarded)."""
    try:
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(1 << 16):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    return False


class SessionConnection:
    """The fuzzer's session with the target as one principal. A principal holds one session
    with a replica at a time (a new one replaces the old), so there is one of these per principal."""

    def __init__(self, name: str, host: str, port: int, keyring: Keyring, replica: int) -> None:
        self.name = name
        self.addr = (host, port)
        self.keyring = keyring
        self.replica = replica
        self.sock: socket.socket | None = None
        self.session: Session | None = None
        self.serial = 0  # sessions opened so far

    def open(self, deadline_s: float, events: Counter[str]) -> tuple[bytes, bytes]:
        """A new connection and handshake, retried (while the target refuses unauthenticated
        connections, say) until ``deadline_s``; returns its INIT and FINISH."""
        end = time.monotonic() + deadline_s
        while True:
            sock = None
            try:
                sock = socket.create_connection(self.addr, timeout=10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.session, init, finish = handshake(sock, self.keyring, self.replica)
                self.sock = sock
                self.serial += 1
                return init, finish
            except OSError:
                if sock is not None:
                    sock.close()
                events["session-handshake-failed-retried"] += 1
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.session = None

    def drain(self) -> bool:
        """Read what the replica sent us (replies to client 7); False if it closed the connection."""
        assert self.sock is not None
        return not closed_now(self.sock)

    def closed_by_peer(self, timeout_s: float = 5.0) -> bool:
        """After an oversized or desync length: wait for the replica to close the connection."""
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


def probe(host: str, port: int, keyring: Keyring) -> bool:
    """Whether an honest handshake gets through now (closed at once after)."""
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            handshake(sock, keyring, TARGET)
            return True
    except OSError:
        return False


@dataclasses.dataclass
class Unauthenticated:
    kind: str
    sock: socket.socket
    opened: float


class Unauthenticateds:
    """Connections that never complete a handshake, each of a kind of UNAUTH_KINDS, watched
    until the target closes them: at once for a bad handshake frame or a refusal (the target
    holds PENDING_MAX of them at most), at its handshake deadline for one that stops short."""

    def __init__(self, cluster: cfg.Cluster, host: str, port: int, rng: random.Random) -> None:
        self.addr = (host, port)
        self.rng = rng
        self.frame_bytes_max = cluster.params.frame_bytes_max
        self.replica_kr = cluster.keyring(REPLICA, LIAR)
        self.recorded: deque[tuple[bytes, bytes]] = deque(maxlen=16)  # INIT, FINISH of our sessions
        self.open_now: list[Unauthenticated] = []
        self.opened: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def data(self, kind: str) -> bytes:
        rng = self.rng
        init, finish = rng.choice(self.recorded)
        if kind == "idle":
            return b""
        if kind == "garbage":
            return framed(os.urandom(rng.randint(0, HANDSHAKE_BYTES_MAX)))
        if kind == "garbage-oversized":
            return LENGTH.pack(HANDSHAKE_BYTES_MAX + 1 + rng.randrange(self.frame_bytes_max)) + os.urandom(32)
        if kind in ("truncated-init", "partial-init"):
            fresh = Session(self.replica_kr, expect=TARGET).initiate()
            cut = fresh[:rng.randrange(len(fresh))]
            return framed(cut) if kind == "truncated-init" else LENGTH.pack(len(fresh)) + cut
        if kind == "replayed-init-finish":
            return framed(init) + framed(finish)
        if kind == "replayed-init":
            return framed(init)
        if kind == "replayed-finish":
            return framed(finish)
        assert kind == "init-misaddressed", kind
        if rng.random() < 0.5:  # to another replica
            return framed(Session(self.replica_kr, expect=rng.choice([0, 2, 3])).initiate())
        who = rng.choice([(CLIENT, 99), (REPLICA, 4), (REPLICA, TARGET), ("server", 1)])  # unknown, or itself
        return framed(msgpack.packb([SESSION_VERSION, *who, TARGET, os.urandom(32), False]))

    def open(self, kind: str, events: Counter[str]) -> None:
        data = self.data(kind)
        try:
            sock = socket.create_connection(self.addr, timeout=2)
        except OSError:
            events["unauthenticated-connect-failed"] += 1
            return
        self.opened[kind] += 1
        u = Unauthenticated(kind, sock, time.monotonic())
        try:
            if data:
                sock.sendall(data)
        except OSError:
            self._outcome(u, 0.0)
            sock.close()
            return
        sock.setblocking(False)
        self.open_now.append(u)

    def _outcome(self, u: Unauthenticated, after_s: float) -> None:
        if after_s < 1.0:
            when = "closed at once"
        elif abs(after_s - HANDSHAKE_DEADLINE_S) <= 2.0:
            when = "closed at the deadline"
        else:
            when = f"closed after {after_s:.0f} s"
        self.outcomes[f"{u.kind}: {when}"] += 1

    def poll(self, events: Counter[str]) -> None:
        now = time.monotonic()
        keep = []
        for u in self.open_now:
            if closed_now(u.sock):
                self._outcome(u, now - u.opened)
                u.sock.close()
            elif now - u.opened > HANDSHAKE_DEADLINE_S + 5:
                self.outcomes[f"{u.kind}: NOT closed by the target"] += 1
                events["unauthenticated-not-closed"] += 1
                u.sock.close()
            else:
                keep.append(u)
        self.open_now = keep

    def close_all(self, why: str) -> None:
        for u in self.open_now:
            self.outcomes[f"{u.kind}: closed by the fuzzer {why}"] += 1
            u.sock.close()
        self.open_now = []


def hold_idle(addr: tuple[str, int], count: int, wait_s: float) -> tuple[list[socket.socket], int]:
    """``count`` idle connections; how many the target closed within ``wait_s`` (refused)."""
    socks = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            socks.append(socket.create_connection(addr, timeout=2))
    time.sleep(wait_s)
    for s in socks:
        s.setblocking(False)
    return socks, sum(closed_now(s) for s in socks)


def _status(host: str, port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=2) as resp:
            return json.load(resp)
    except (OSError, ValueError):
        return None


def worker(a: argparse.Namespace) -> None:
    cluster = cfg.load(a.config)
    target = cluster.replicas[a.target]
    addr = (target.host, target.port)
    rng = random.Random(a.seed)
    frames = Frames(cluster, rng)
    kinds, weights = list(KINDS), list(KINDS.values())
    unauth_kinds, unauth_weights = list(UNAUTH_KINDS), list(UNAUTH_KINDS.values())
    events: Counter[str] = Counter()
    unauth = Unauthenticateds(cluster, *addr, rng)
    as_replica = SessionConnection(f"replica {LIAR}", *addr, frames.replica_kr, a.target)
    as_client = SessionConnection(f"client {FUZZ_CLIENT}", *addr, frames.client_kr, a.target)
    prober = cluster.keyring(CLIENT, FUZZ_CLIENT - 1)  # a third principal, for handshakes that only probe
    for c in (as_replica, as_client):
        unauth.recorded.append(c.open(10, events))
    recent: deque[dict] = deque(maxlen=RECENT_FRAMES)
    sent: Counter[str] = Counter()
    by_session: Counter[str] = Counter()
    stopped = False

    def dump(*_: object) -> None:
        with open(a.dump, "w") as out:
            for rec in recent:
                out.write(json.dumps(rec) + "\n")
        print(f"fuzz: saved the last {len(recent)} frames to {a.dump}", flush=True)

    def stop(*_: object) -> None:
        nonlocal stopped
        stopped = True

    def saturate() -> None:
        """More idle unauthenticated connections at once than the target admits; an honest
        handshake then (refused) and after they are closed (accepted). Ours open before are
        closed first: one reaching its deadline meanwhile would free a slot."""
        unauth.close_all("before a saturation")
        time.sleep(0.1)
        socks, refused = hold_idle(addr, PENDING_MAX + SATURATE_EXTRA, 0.3)
        events["saturation-connections"] += len(socks)
        events["saturation-refused"] += refused
        events["probe-while-saturated-" + ("accepted" if probe(*addr, prober) else "refused")] += 1
        for s in socks:
            s.close()
        time.sleep(0.3)
        events["probe-after-saturation-" + ("accepted" if probe(*addr, prober) else "refused")] += 1

    signal.signal(signal.SIGUSR1, dump)
    signal.signal(signal.SIGTERM, stop)
    limit = frames.frame_bytes_max + MAC_BYTES  # what the target reads of a frame in a session
    t0 = last_print = last_refresh = time.monotonic()
    total = 0
    next_saturation = SATURATE_EVERY
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
                  f"{events['reconnects']} new sessions, {sum(unauth.opened.values())} unauthenticated "
                  f"connections ({len(unauth.open_now)} open)", flush=True)
        unauth.poll(events)
        if rng.random() < BATCH_FRAMES / UNAUTH_EVERY and len(unauth.open_now) < UNAUTH_OPEN_MAX:
            unauth.open(rng.choices(unauth_kinds, unauth_weights)[0], events)
        if total >= next_saturation:
            next_saturation += SATURATE_EVERY
            saturate()
        conn = as_client if rng.random() < CLIENT_SESSION_SHARE else as_replica
        assert conn.session is not None
        batch: list[bytes] = []
        ends: str | None = None  # what ends this session
        for _ in range(min(BATCH_FRAMES, a.frames - total)):
            roll = rng.randrange(OVERSIZED_EVERY)
            body = b""
            if roll == 0:
                prefix = limit + 1 + rng.randrange(1 << 31)
                data = LENGTH.pack(prefix) + os.urandom(rng.randint(0, 64))
                kind = ends = "oversized-length"
            else:
                kind = rng.choices(kinds, weights)[0]
                body = frames.make(kind)
                sealed = conn.session.seal(body)
                prefix = len(sealed)
                if roll <= OVERSIZED_EVERY // DESYNC_EVERY:
                    # Bytes after it, so that whichever length the target reads, it has it whole.
                    kind = ends = "desync-length"
                    prefix = max(0, prefix + rng.choice([-9, -1, 1, 40]))
                    data = LENGTH.pack(prefix) + sealed + os.urandom(64)
                else:
                    data = LENGTH.pack(prefix) + sealed
            batch.append(data)
            recent.append({
                "session": f"{conn.name} #{conn.serial}", "kind": kind, "length_prefix": prefix,
                "sealed_bytes": len(data) - LENGTH.size, "frame_hex": body.hex(),
            })
            sent[kind] += 1
            by_session[conn.name] += 1
            total += 1
            if ends:
                break
        try:
            assert conn.sock is not None
            conn.sock.sendall(b"".join(batch))
            alive = conn.drain()
        except OSError:
            alive = False
        if ends:
            events[f"{ends}: " + ("closed by the target" if conn.closed_by_peer() else "NOT closed")] += 1
            alive = False
        elif not alive:
            events[f"session of {conn.name} lost"] += 1  # closed by the target unasked: a bug, or a new session of ours
        if not alive:
            conn.close()
            try:
                unauth.recorded.append(conn.open(10, events))
                events["reconnects"] += 1
            except OSError:
                events["target-unreachable"] += 1
                print("fuzz: the target refuses connections: it stopped", flush=True)
                dump()
                break
    elapsed = time.monotonic() - t0
    for c in (as_replica, as_client):
        c.close()
    # Every unauthenticated connection ended: does the target admit PENDING_MAX again (none of
    # its pending count leaked)?
    unauth.close_all("at the end")
    time.sleep(0.5)
    socks, final_refused = hold_idle(addr, PENDING_MAX, 0.5)
    for s in socks:
        s.close()
    time.sleep(0.3)
    report = {
        "frames": total, "seconds": elapsed, "frames_per_s": total / elapsed if elapsed else 0.0,
        "stopped_by": limit_reason if not stopped else "signal", "kinds": dict(sorted(sent.items())),
        "by_session": dict(sorted(by_session.items())), "events": dict(sorted(events.items())),
        "unauthenticated": {
            "opened": dict(sorted(unauth.opened.items())), "outcomes": dict(sorted(unauth.outcomes.items())),
        },
        "final_idle_refused": final_refused, "final_probe_accepted": probe(*addr, prober),
        "pending_max": PENDING_MAX, "seed": a.seed, "cpu_s": time.process_time(),
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
    if a.liar_process == "stop":
        # The fuzzer is replica 3. Left running, the real one and the fuzzer would take the
        # session of replica 3 with the target from each other at every reconnection.
        lc.kill(LIAR)
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
            "--report", str(report_path), "--dump", str(a.dump),
        )
        f0 = time.monotonic()
        cpu0 = [process_cpu_s([p.pid]) if p.poll() is None else 0.0 for p in lc.procs]
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
        cpu = [
            round(process_cpu_s([p.pid]) - c0, 1) if p.poll() is None else None
            for p, c0 in zip(lc.procs, cpu0, strict=True)
        ]
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
    live = [i for i in range(cluster.n) if i != TARGET and lc.procs[i].poll() is None]
    while alive and time.monotonic() - stopped_at < 30:
        with contextlib.suppress(OSError):
            others = [await asyncio.to_thread(lc.status, i) for i in live]
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
        "liar_process": a.liar_process,
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
        # Each closes every session: the fuzzer's too (bft.runtime.node.Node.recover_proactively).
        "target_proactive_recoveries_during": status_after.get("proactive_recoveries", 0)
        - status_before.get("proactive_recoveries", 0),
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
    by_session = fz.get("by_session", {})
    lost = {k: v for k, v in ev.items() if k.startswith("session of")}
    liar = "stopped: the fuzzer is replica 3" if r.get("liar_process") == "stop" else "running"
    un = fz.get("unauthenticated", {})
    lines = [
        "| measurement | result |",
        "|---|---|",
        f"| frames sent to replica {r['target']} (a backup) in sessions | {fz.get('frames', 0):,}{limit} in "
        f"{fz.get('seconds', 0):.0f} s |",
        f"| frames per second | {fz.get('frames_per_s', 0):,.0f} |",
        "| of them in the session of " + " / ".join(by_session) + " | "
        + " / ".join(f"{v:,}" for v in by_session.values()) + " |",
        f"| the real replica {LIAR}'s process | {liar} |",
        f"| oversized length prefixes: session closed by the target / not | "
        f"{ev.get('oversized-length: closed by the target', 0)} / {ev.get('oversized-length: NOT closed', 0)} |",
        f"| desync lengths (a length prefix that disagrees with its frame): session closed by the target / not | "
        f"{ev.get('desync-length: closed by the target', 0)} / {ev.get('desync-length: NOT closed', 0)} |",
        f"| new sessions after those / handshakes retried (target refusing) | {ev.get('reconnects', 0)} / "
        f"{ev.get('session-handshake-failed-retried', 0)} |",
        "| sessions closed by the target unasked (its proactive recoveries during the fuzz, which close all) | "
        + (", ".join(f"{k}: {v}" for k, v in lost.items()) or "none")
        + f" ({r.get('target_proactive_recoveries_during', 0)}) |",
        f"| unauthenticated connections opened (by kind below) / not closed by the target | "
        f"{sum(un.get('opened', {}).values()):,} / {ev.get('unauthenticated-not-closed', 0)} |",
        f"| saturations ({PENDING_MAX} + {SATURATE_EXTRA} idle connections at once): connections / refused at "
        f"once | {ev.get('saturation-connections', 0)} / {ev.get('saturation-refused', 0)} |",
        f"| an honest handshake during a saturation: accepted / refused; after it: accepted / refused | "
        f"{ev.get('probe-while-saturated-accepted', 0)} / {ev.get('probe-while-saturated-refused', 0)}; "
        f"{ev.get('probe-after-saturation-accepted', 0)} / {ev.get('probe-after-saturation-refused', 0)} |",
        f"| after the fuzz: of {fz.get('pending_max', PENDING_MAX)} idle connections, refused (0: no pending "
        f"slot leaked); an honest handshake | {fz.get('final_idle_refused')}; "
        f"{'accepted' if fz.get('final_probe_accepted') else 'REFUSED'} |",
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
    kinds = ["", "Frames sent in sessions, by kind:", "", "| kind | frames |", "|---|---|"]
    kinds += [f"| {k} | {v:,} |" for k, v in fz.get("kinds", {}).items()]
    unauth = ["", "Unauthenticated connections, by kind and what the target did:", "",
              "| kind | opened | outcome |", "|---|---|---|"]
    outcomes = un.get("outcomes", {})
    for kind, n in un.get("opened", {}).items():
        seen = [f"{k.split(': ', 1)[1]} {v}" for k, v in outcomes.items() if k.split(": ", 1)[0] == kind]
        unauth.append(f"| {kind} | {n:,} | {', '.join(seen)} |")
    return "\n".join(lines + drops + kinds + unauth)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Writes bench/results/fuzz.{md,json}. A measurement, not a test."
    )
    ap.add_argument("--frames", type=int, default=1_000_000, help="frames to send (default 1,000,000)")
    ap.add_argument("--seconds-max", type=float, default=300.0, help="stop sending after this long (default 300)")
    ap.add_argument("--seed", type=int, default=1, help="the fuzzer's random seed")
    ap.add_argument(
        "--liar-process", choices=["stop", "keep"], default="stop",
        help="stop the real replica 3 (the fuzzer takes its place; default) or keep it running",
    )
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

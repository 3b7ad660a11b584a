"""The protocol's own CPU per operation, without the network: four replica cores and the clients'
cores in one process, every message sealed and opened by the real wire and session code (AES-GCM
tags, request tags, signatures as the parameters say), delivered in order, no sockets.

What the kernel and the event loop cost is left out on purpose: this is the part our code
decides, measured as CPU time of this process (min of ``--repeat`` runs), so it is steadier than
end-to-end figures on a shared machine and a change can be judged by it before ``bench.micro``
confirms it end to end. ``--profile`` prints where the time goes.

    python -m bench.cpu [--clients 1,16,64] [--ops 3000] [--sign-every-request] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from bft import config as cfg
from bft.core.client import ClientCore
from bft.core.effects import Broadcast, ReplyTo, Send
from bft.core.params import DEFAULT_PARAMS
from bft.core.replica import Replica
from bft.crypto import CLIENT, REPLICA
from bft.messages import Request
from bft.runtime.session import Session
from bft.runtime.wire import Wire, limits_of
from bft.service import NullService


class Bench:
    """A cluster of f = 1 and ``clients`` clients; ``round()`` runs one operation per client,
    all submitted together (the primary takes them as one burst, as the runtime hands them)."""

    def __init__(self, directory: Path, clients: int, sign_every_request: bool) -> None:
        params = replace(DEFAULT_PARAMS, durability="memory", sign_every_request=sign_every_request)
        cluster = cfg.load(cfg.keygen(directory, 1, clients, base_port=20000, params=params))
        lim = limits_of(params)
        self.n = cluster.n
        self.replicas = [Replica(i, 1, params, NullService) for i in range(self.n)]
        self.clients = [ClientCore(c, 1, params) for c in range(clients)]
        kr = {(REPLICA, i): cluster.keyring(REPLICA, i) for i in range(self.n)}
        kr |= {(CLIENT, c): cluster.keyring(CLIENT, c) for c in range(clients)}
        self.wires = {p: Wire(k, lim, Counter(), sessions=True) for p, k in kr.items()}
        # (sender, receiver) -> the sender's and the receiver's session of the connection the
        # runtime uses: a replica's own to each peer; a client's to each replica, both ways.
        self.sessions: dict[tuple, tuple[Session, Session]] = {}
        pairs = [((REPLICA, i), (REPLICA, j)) for i in range(self.n) for j in range(self.n) if i != j]
        pairs += [((CLIENT, c), (REPLICA, j)) for c in range(clients) for j in range(self.n)]
        for a, b in pairs:
            out, into = Session(kr[a], expect=b[1]), Session(kr[b])
            into.receive_handshake(out.receive_handshake(into.receive_handshake(out.initiate())))
            if a[0] == CLIENT:
                kr[a].use_session_key(b, out.request_key)
                kr[b].use_session_key(a, into.request_key)
            self.sessions[a, b] = (out, into)
            if a[0] == CLIENT:
                self.sessions[b, a] = (into, out)  # replies come back on the client's connection
        self.queue: list[tuple[tuple, tuple, bytes]] = []
        self.frames = 0
        self.now = 1_000_000

    def _send(self, src: tuple, dst: tuple, data: bytes) -> None:
        self.queue.append((src, dst, self.sessions[src, dst][0].seal(data)))

    def _post(self, i: int, effects: list) -> None:
        src, wire = (REPLICA, i), self.wires[REPLICA, i]
        for e in effects:
            if isinstance(e, Broadcast):
                data = wire.seal(e.msg)
                for j in range(self.n):
                    if j != i:
                        self._send(src, (REPLICA, j), data)
            elif isinstance(e, Send):
                self._send(src, (REPLICA, e.to), wire.seal(e.msg, e.to))
            elif isinstance(e, ReplyTo):
                self._send(src, (CLIENT, e.client), wire.seal(e.reply))

    def round(self) -> None:
        burst: dict[int, list[Request]] = {j: [] for j in range(self.n)}
        for c, core in enumerate(self.clients):
            core.submit(NullService.op(0), self.now)
            for e in core.take_outbox():
                data = self.wires[CLIENT, c].seal(e.msg, sign=core.must_sign(e, self.now))
                for j in [e.to] if isinstance(e, Send) else range(self.n):
                    burst[j].append(self._deliver((CLIENT, c), (REPLICA, j), data))
        for j, reqs in burst.items():
            if reqs:
                self._post(j, self.replicas[j].step_requests(reqs, self.now))
        while self.queue:
            src, dst, sealed = self.queue.pop(0)
            msg = self._open(src, dst, sealed)
            if dst[0] == CLIENT:
                core = self.clients[dst[1]]
                core.on_reply(msg, self.now)
                core.take_completed()
            else:
                self._post(dst[1], self.replicas[dst[1]].step(msg, self.now))
        self.now += 1

    def _deliver(self, src: tuple, dst: tuple, data: bytes):
        return self._open(src, dst, self.sessions[src, dst][0].seal(data))

    def _open(self, src: tuple, dst: tuple, sealed: bytes):
        self.frames += 1
        msg = self.wires[dst].open(self.sessions[src, dst][1].open(sealed), src)
        assert msg is not None, f"{src} -> {dst}: {self.wires[dst].dropped}"
        return msg


def measure(clients: int, ops: int, repeat: int, sign: bool, profile: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(Path(tmp), clients, sign)
        rounds = max(1, ops // clients)
        for _ in range(max(5, rounds // 10)):
            b.round()  # warm-up: the first checkpoint's costs are not the steady state's
        best = float("inf")
        for _ in range(repeat):
            frames0, t0 = b.frames, time.process_time()
            for _ in range(rounds):
                b.round()
            best = min(best, time.process_time() - t0)
        frames = b.frames - frames0
        if profile:
            prof = cProfile.Profile()
            prof.runcall(lambda: [b.round() for _ in range(rounds)])
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        done = rounds * clients
        assert all(not c.inflight for c in b.clients), "every operation completed"
        return {"clients": clients, "us_per_op": best / done * 1e6, "frames_per_op": frames / done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,16,64", help="clients per round, comma-separated")
    ap.add_argument("--ops", type=int, default=3000, help="operations per measured run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sign-every-request", action="store_true", help="sign_every_request = true (default: false)")
    ap.add_argument("--profile", action="store_true", help="print the 25 costliest functions per row")
    args = ap.parse_args()
    try:
        counts = [int(c) for c in args.clients.split(",")]
        if min(counts) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--clients wants positive integers separated by commas, not {args.clients!r}")
    sign = args.sign_every_request
    print(f"sign_every_request = {str(sign).lower()}; CPU time of this process, min of {args.repeat} runs")
    print("| clients per round | CPU µs per operation | frames per operation |")
    print("|---|---|---|")
    for c in counts:
        r = measure(c, args.ops, args.repeat, sign, args.profile)
        print(f"| {c} | {r['us_per_op']:.1f} | {r['frames_per_op']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

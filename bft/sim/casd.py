"""CASD atomic broadcast in the simulator: n ``bft.casd`` nodes on a diffusion graph, each with its
own clock, over links whose delays come from a distribution, with faulty nodes of one failure
model; every choice from streams named after the seed, so a run replays exactly.

Faults (``draw_faulty``), each a superset of the one before:
- omission: a faulty node loses each message it sends with some chance, or stops (crashes);
- timing: its clock is off by up to ten times epsilon (early or late timestamps) and it holds
  relays back, up to four link bounds;
- byzantine: it also equivocates (a different payload to half its neighbours), rewrites payloads
  it relays, strips signatures, and its late relays carry its accomplices' signatures.

The checks (``check``), over the correct nodes, each violation reported with its seed:
- atomicity: a message delivered by one correct node is delivered by all;
- order: correct nodes deliver the messages they share in the same order, with the same content;
- timeliness: a correct sender's broadcast at T is delivered by every correct node at its own
  clock's T + Delta.
"""

from __future__ import annotations

import functools
import heapq
import random
from collections import Counter
from dataclasses import dataclass, field, replace

from bft.casd.protocol import Bounds, CasdNode, Delivered, Diffuse, Variant, signed
from bft.crypto import REPLICA, Keyring, PrivateKeys
from bft.sim.casdnet import DELAYS, SKEWS, choose, graph, worst_diameter

BROADCAST, ARRIVE, WAKE = 0, 1, 2
FAULT_MODELS = ("none", "omission", "timing", "byzantine")


@dataclass(frozen=True, slots=True)
class CasdConfig:
    variant: Variant = Variant.OMISSION
    n: int = 7
    faulty: int = 2  # pi, the bound the protocol assumes
    faulty_actual: int | None = None  # how many nodes fail (None: pi, the most the bound allows)
    faults: str = "own"  # a fault model, or "own": the variant's
    graph: str = "complete"
    delays: str = "bounded"
    skews: str = "bounded"
    link_us: int = 4_000  # delta assumed
    skew_us: int = 2_000  # epsilon assumed
    broadcasts: int = 40
    duration_us: int = 400_000  # broadcasts spread over this
    learn: tuple[int, int] | None = None  # the learned link bound's (floor, ceiling); None: fixed
    crashes: tuple[tuple[int, int], ...] = ()  # (node, real time): these stop then, whatever else fails

    def fault_model(self) -> str:
        return self.variant.value if self.faults == "own" else self.faults


@dataclass(slots=True)
class Faulty:
    drop: float = 0.0
    crash_us: int | None = None
    clock_error_us: int = 0
    late_us: int = 0
    equivocate: bool = False
    alter: bool = False
    strip: bool = False
    collude: bool = False


@dataclass(slots=True)
class CasdResult:
    seed: int
    config: CasdConfig
    delta_us: int  # Delta of the configured bounds
    violations: list[str] = field(default_factory=list)  # "seed S: kind: what"
    kinds: Counter[str] = field(default_factory=Counter)
    # Real time from a correct sender's broadcast to each correct node's delivery of it.
    latencies_us: list[int] = field(default_factory=list)
    broadcasts: int = 0
    messages: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    link_us_used: list[int] = field(default_factory=list)  # the bound each correct broadcast carried
    broken: set[tuple[int, int]] = field(default_factory=set)  # broadcasts (sender, T) with a violation
    bounds: Bounds | None = None

    def delta_for(self, link_us: int) -> int:
        assert self.bounds is not None
        return self.bounds.delta_us(self.config.variant, link_us)

    @property
    def ok(self) -> bool:
        return not self.violations


def draw_faulty(model: str, rng: random.Random, nodes: list[int], cfg: CasdConfig) -> dict[int, Faulty]:
    if model not in FAULT_MODELS:
        raise ValueError(f"unknown fault model {model!r} (choose {', '.join(FAULT_MODELS)})")
    out: dict[int, Faulty] = {}
    if model == "none":
        return out
    for i in nodes:
        f = Faulty(drop=rng.uniform(0.2, 1.0))
        if rng.random() < 0.5:
            f.crash_us = rng.randrange(cfg.duration_us)
        if model in ("timing", "byzantine"):
            f.clock_error_us = rng.randint(-10 * cfg.skew_us, 10 * cfg.skew_us)
            f.late_us = rng.randint(0, 4 * (cfg.link_us + cfg.skew_us))
            f.drop /= 2  # a timing-faulty node's messages mostly arrive, at the wrong time
        if model == "byzantine":
            f.equivocate, f.alter, f.strip, f.collude = (rng.random() < 0.5 for _ in range(4))
        out[i] = f
    return out


@functools.lru_cache(maxsize=4)
def keyrings(n: int) -> tuple[Keyring, ...]:
    """Every node's keys, the same in every run: signatures change nothing a run decides."""
    rng = random.Random(f"casd-keys-{n}")
    private = [PrivateKeys(rng.randbytes(32), rng.randbytes(32)) for _ in range(n)]
    public = {i: p.public() for i, p in enumerate(private)}
    return tuple(Keyring((REPLICA, i), p, public, {}) for i, p in enumerate(private))


class CasdSimulation:
    def __init__(self, seed: int, cfg: CasdConfig) -> None:
        self.seed, self.cfg = seed, cfg
        self.links = graph(cfg.graph, cfg.n)
        d = worst_diameter(self.links, cfg.faulty)
        if d is None:
            raise ValueError(f"graph {cfg.graph} falls apart when {cfg.faulty} nodes fail: no Delta bounds it")
        self.bounds = Bounds(cfg.link_us, cfg.skew_us, cfg.faulty, d)
        self.delay = choose(DELAYS, cfg.delays, "delay")
        skew = choose(SKEWS, cfg.skews, "skew")
        self.net_rng = random.Random(f"{seed}-casd-net")
        frng = random.Random(f"{seed}-casd-faults")
        count = cfg.faulty if cfg.faulty_actual is None else cfg.faulty_actual
        self.faulty = draw_faulty(cfg.fault_model(), frng, frng.sample(range(cfg.n), count), cfg)
        # A correct clock is within epsilon of the others (offsets within +-epsilon/2 when in bounds).
        crng = random.Random(f"{seed}-casd-clocks")
        self.offset = [skew(crng) for _ in range(cfg.n)]
        for i, f in self.faulty.items():
            self.offset[i] += f.clock_error_us
        for i, at in cfg.crashes:
            self.faulty.setdefault(i, Faulty()).crash_us = at
        rings = keyrings(cfg.n) if cfg.variant is Variant.BYZANTINE else (None,) * cfg.n
        self.nodes = [CasdNode(i, cfg.variant, self.bounds, rings[i], cfg.learn) for i in range(cfg.n)]
        self.queue: list[tuple[int, int, int, object]] = []
        self.counter = 0
        self.woken: list[set[int]] = [set() for _ in range(cfg.n)]
        self.result = CasdResult(seed, cfg, self.bounds.delta_us(cfg.variant), bounds=self.bounds)
        self.sent_at: dict[tuple[int, int], int] = {}  # (sender, T) -> real time of the broadcast
        self.delivered: dict[int, list[Delivered]] = {i: [] for i in range(cfg.n) if i not in self.faulty}
        self.frng = random.Random(f"{seed}-casd-acts")

    def local(self, i: int, real_us: int) -> int:
        return real_us + self.offset[i]

    def _push(self, at: int, kind: int, payload: object) -> None:
        self.counter += 1
        heapq.heappush(self.queue, (at, self.counter, kind, payload))

    def _arm(self, i: int) -> None:
        wake = self.nodes[i].wake_us()
        if wake is not None:
            real = wake - self.offset[i]
            if real not in self.woken[i]:
                self.woken[i].add(real)
                self._push(real, WAKE, i)

    # -- sending, with the faults of the sender -----------------------------------------------

    def _send(self, now: int, i: int, msgs: list[Diffuse]) -> None:
        f = self.faulty.get(i)
        for msg in msgs:
            for j in self.links[i]:
                out = msg if f is None else self._misbehave(now, i, f, msg, j)
                if out is None:
                    continue
                held = f.late_us and self.frng.randint(0, f.late_us) if f is not None else 0
                self.result.messages += 1
                self._push(now + held + max(0, self.delay(self.net_rng)), ARRIVE, (j, out))

    def _misbehave(self, now: int, i: int, f: Faulty, msg: Diffuse, to: int) -> Diffuse | None:
        if (f.crash_us is not None and now >= f.crash_us) or self.frng.random() < f.drop:
            return None
        rings = keyrings(self.cfg.n) if self.cfg.variant is Variant.BYZANTINE else None
        other = replace(msg, payload=msg.payload + b"'")  # what half its neighbours get instead
        if f.equivocate and msg.sender == i and to % 2:
            # Its own broadcast: a second payload, signed as validly as the first.
            msg = signed(replace(other, signatures=()), rings[i]) if rings else other
        elif f.alter and msg.sender != i and to % 2:
            msg = other  # with signatures, the sender's no longer verifies
        if rings and f.strip and len(msg.signatures) > 1 and self.frng.random() < 0.5:
            msg = replace(msg, signatures=msg.signatures[:1])
        if rings and f.collude:
            signers = {s for s, _ in msg.signatures}
            for k in sorted(self.faulty):
                if k not in signers and k != i:
                    msg = signed(msg, rings[k])
        return msg

    # -- events -------------------------------------------------------------------------------

    def _broadcast(self, now: int, i: int, payload: bytes) -> None:
        f = self.faulty.get(i)
        if f is not None and f.crash_us is not None and now >= f.crash_us:
            return
        msgs = self.nodes[i].broadcast(payload, self.local(i, now))
        self.result.broadcasts += 1
        self.sent_at[msgs[0].key] = now
        if i not in self.faulty:
            self.result.link_us_used.append(msgs[0].link_us)
        self._send(now, i, msgs)
        self._arm(i)

    def _arrive(self, now: int, j: int, msg: Diffuse) -> None:
        f = self.faulty.get(j)
        if f is not None and f.crash_us is not None and now >= f.crash_us:
            return
        node = self.nodes[j]
        before = dict(node.refused)
        self._send(now, j, node.receive(msg, self.local(j, now)))
        if j not in self.faulty:
            self.result.refused.update({k: v - before.get(k, 0) for k, v in node.refused.items()})
        self._arm(j)

    def _wake(self, now: int, i: int) -> None:
        self.woken[i].discard(now)
        done = self.nodes[i].tick(self.local(i, now))
        if i in self.delivered:
            self.delivered[i].extend(done)
            for d in done:
                if self.local(i, now) != d.at_us:
                    _violation(self, "timeliness", f"node {i} delivered {(d.sender, d.timestamp_us)} after T + Delta",
                               (d.sender, d.timestamp_us))
            self.result.latencies_us += [
                now - self.sent_at[(d.sender, d.timestamp_us)] for d in done if d.sender not in self.faulty
            ]
        self._arm(i)

    def run(self) -> CasdResult:
        wrng = random.Random(f"{self.seed}-casd-work")
        for k in range(self.cfg.broadcasts):
            self._push(wrng.randrange(self.cfg.duration_us), BROADCAST, (wrng.randrange(self.cfg.n), b"m%d" % k))
        while self.queue:
            now, _, kind, payload = heapq.heappop(self.queue)
            if kind == BROADCAST:
                self._broadcast(now, *payload)
            elif kind == ARRIVE:
                self._arrive(now, *payload)
            else:
                self._wake(now, payload)
        check(self)
        return self.result


def _violation(sim: CasdSimulation, kind: str, what: str, key: tuple[int, int] | None = None) -> None:
    if key is not None:
        sim.result.broken.add(key)
    sim.result.kinds[kind] += 1
    sim.result.violations.append(f"seed {sim.seed}: {kind}: {what}")


def check(sim: CasdSimulation) -> None:
    delivered = sim.delivered
    correct = sorted(delivered)
    seen: dict[tuple[int, int], dict[int, bytes | None]] = {}
    for i in correct:
        for d in delivered[i]:
            seen.setdefault((d.sender, d.timestamp_us), {})[i] = d.payload
    for key, by in sorted(seen.items()):
        if len(by) < len(correct):
            missing = [i for i in correct if i not in by]
            _violation(sim, "atomicity", f"{key} delivered by {sorted(by)}, not by {missing}", key)
        if len(set(by.values())) > 1:
            _violation(sim, "order", f"{key} delivered with different contents: {sorted(by.items())}", key)
    first = correct[0] if correct else None
    for i in correct[1:]:
        common = set(seen) & {(d.sender, d.timestamp_us) for d in delivered[i]}
        mine = [(d.sender, d.timestamp_us) for d in delivered[first] if (d.sender, d.timestamp_us) in common]
        theirs = [(d.sender, d.timestamp_us) for d in delivered[i] if (d.sender, d.timestamp_us) in common]
        if mine != theirs:
            _violation(sim, "order", f"nodes {first} and {i} deliver their common messages in different orders")
    for key in sorted(sim.sent_at):
        if key[0] in sim.faulty:
            continue
        by = seen.get(key, {})
        late = [i for i in correct if i not in by]
        if late:
            _violation(sim, "timeliness", f"correct {key} not delivered at T + Delta by {late}", key)


def run_casd(seed: int, cfg: CasdConfig) -> CasdResult:
    return CasdSimulation(seed, cfg).run()

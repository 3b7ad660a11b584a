"""Which client requests a replica's runtime takes, and which clients it stops trusting.

The core decides what to do with a request; this decides what reaches it from a client's own
session (a backup holds and relays only what anyone can check) and when a client whose request
some replica could not authenticate becomes a suspect: one whose requests every replica then
takes only signed (README, "Faulty clients"; the "big MAC" attack, Clement et al. 2009).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bft.core.effects import Broadcast, Effect
from bft.core.replica import Replica
from bft.core.unreplicated import Unreplicated
from bft.crypto import CLIENT
from bft.messages import Request, Suspect
from bft.runtime.wire import Wire

log = logging.getLogger("bft.node")

# How long a request in a pre-prepare that we could not authenticate may stay unresolved before
# its client is made suspect. A correct client's request tagged under keys we lost (a restart)
# resolves within a round of prepares, from the votes of f+1 replicas (bft.core.large); a "big
# MAC" client's never does. Well inside the view timeout, so the suspicion reaches the others
# before the view change its stalled slot costs.
DOUBT_S = 0.3


class ClientTrust:
    def __init__(
        self, wire: Wire, core: Callable[[], Replica | Unreplicated], dispatch: Callable[[list[Effect]], None],
        name: str,
    ) -> None:
        self.wire = wire
        self.core = core  # the node's current core (a damaged checkpoint replaces it)
        self.dispatch = dispatch
        self.name = name
        # Clients of the configuration whose request (digest) we hold unauthenticated, since when.
        self.doubts: dict[int, tuple[bytes, float]] = {}

    def doubt(self, now: float) -> None:
        """The pre-prepare just opened held requests we could not authenticate (``Wire.open``)."""
        wire, kr = self.wire, self.wire.keyring
        held = {q.client: q.digest for q in wire.unauthentic}
        for client in wire.unverifiable:
            if client not in wire.suspects and kr.has_verifier((CLIENT, client)):
                self.doubts.setdefault(client, (held[client], now))

    def judge(self, now: float) -> None:
        """Doubts old enough: a client whose request a held pre-prepare still names is made
        suspect, by us and (SUSPECT) by every replica; one whose request resolved is not."""
        core = self.core()
        for client, (d, since) in list(self.doubts.items()):
            if now - since < DOUBT_S:
                continue
            del self.doubts[client]
            if isinstance(core, Replica) and core.large.awaited(d) and self.distrust(client):
                self.dispatch([Broadcast(Suspect(client, core.id))])

    def distrust(self, client: int) -> bool:
        """A request of ``client`` in a pre-prepare failed its tag and its signature here (or at
        the replica whose SUSPECT this is): from now on only its signed requests are taken, by
        every replica, so no primary proposes one of its requests that a backup cannot check.
        At most once per client of the configuration; False if nothing changed. A lying replica
        can make every client suspect: that costs each primary one signature check per request,
        not correctness (README, "faulty clients")."""
        kr = self.wire.keyring
        if client in self.wire.suspects or kr is None or not kr.has_verifier((CLIENT, client)):
            return False
        self.wire.suspects.add(client)
        log.warning("%s: client %d sent requests some replica cannot authenticate: signed ones only", self.name, client)
        self.dispatch(self.core().distrust(client))
        return True

    def may_hold(self, req: Request) -> bool:
        """A backup holds a read-write request a client sent it directly (a resend to all, or a
        large one) for its view timer, and relays it: only if its signature is good, so that the
        primary, and anyone, can check it too. A tag good for this backup alone would otherwise
        make it suspect a correct primary that cannot check the request and never proposes it.
        Read-only requests are answered at once and held by nobody."""
        core = self.core()
        if req.read_only or not isinstance(core, Replica) or core.is_primary() or req.client in self.wire.suspects:
            return True  # (a suspect's requests had their signature checked by the wire already)
        return self.wire.signed(req)

    def first_large_copy(self, req: Request) -> bool:
        """A backup's first copy of a large read-write request, sent by its client: kept by its
        body, not held (``Replica.keep_body``), so with no signature check (three per 4 KB
        request, more than the rest of its cost). A second copy is its client's resend, which
        ``may_hold`` checks and the core holds."""
        core = self.core()
        if req.read_only or not isinstance(core, Replica) or core.is_primary() or req.client in self.wire.suspects:
            return False
        return core.large.is_large(req) and req.digest not in core.large.bodies

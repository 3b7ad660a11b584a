"""Turning messages into authenticated frames and frames back into trusted messages.

``Wire.open`` is the only way a received frame reaches a core: it authenticates the frame before
decoding the payload, then checks the clients' tags on every request a pre-prepare carries. Any
failure is counted by reason in ``dropped`` and yields None. With no keyring (the unreplicated
baseline) frames carry no tags and nothing is checked.

Over sessions (``sessions=True``, as replicas and clients run) a frame already carries its
connection's GMAC tag, and the connection is bound to the principal that ran the handshake: a
replica's message or reply sent on its own session needs no tag of its own, and a request its
client sent on its own session none checked. What travels further keeps its own proof: a client's
request (relayed, and carried in pre-prepares) its authenticator, view changes their signatures.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import msgspec

from bft.bounds import REPLICAS_MAX
from bft.core.budgets import QSET_ENTRIES_MAX
from bft.core.params import Params
from bft.core.state import PARTITION_CHUNK_BYTES
from bft.crypto import CLIENT, REPLICA, Keyring, Principal
from bft.messages import (
    MAC_BYTES,
    SIGNED_TYPES,
    Batch,
    DecodeError,
    Limits,
    Message,
    NewView,
    PrePrepare,
    Reply,
    Request,
    ViewChange,
    decode_payload,
    encode_payload,
    frame,
    split_frame,
)


def limits_of(params: Params, n: int = REPLICAS_MAX) -> Limits:
    """The decoding bounds that follow from a cluster's protocol parameters and its n replicas
    (a ``Wire`` with keys takes n from its keyring)."""
    return Limits(
        frame_bytes_max=params.frame_bytes_max,
        op_bytes_max=params.op_bytes_max,
        batch_len_max=params.batch_size_max,
        snapshot_bytes_max=params.frame_bytes_max - 1024,
        replicas_max=n,
        window_max=params.log_window,
        # What a correct VIEW-CHANGE holds: the checkpoints of its window (ViewChanges._valid
        # refuses more), and the Q entries ViewChanges.record_pre_prepare keeps per slot.
        checkpoints_max=params.log_window // params.checkpoint_interval + 2,
        qset_digests_max=QSET_ENTRIES_MAX,
        chunk_bytes_max=PARTITION_CHUNK_BYTES,
    )


class Wire:
    def __init__(
        self, keyring: Keyring | None, limits: Limits, dropped: Counter[str], replica: bool | None = None,
        sessions: bool = False,
    ) -> None:
        self.keyring = keyring
        self.sessions = sessions and keyring is not None
        # The keyring knows n: what a NEW-VIEW or an authenticator may hold follows from it.
        self.limits = limits if keyring is None else replace(limits, replicas_max=min(limits.replicas_max, keyring.n))
        self.dropped = dropped
        assert keyring is not None or replica is not None, "without keys, say which side we are"
        # Our slot in an authenticator: our replica id; a client reads the one tag of a reply.
        self.index = keyring.me[1] if keyring is not None and keyring.me[0] == REPLICA else 0
        self.is_replica = keyring.me[0] == REPLICA if replica is None else replica
        # Clients some replica could not authenticate (bft.runtime.node tells the others): their
        # requests are taken only with a valid signature, which every replica can check, so a
        # primary does not propose what backups cannot accept. At most one entry per client.
        self.suspects: set[int] = set()
        self.unverifiable: list[int] = []  # clients of requests held by reference by ``open``
        # Their bodies, for the core (``Replica.offer_unverified``): they resolve a batch that
        # f+1 replicas vouch for, one of which checked them.
        self.unauthentic: list[Request] = []
        self.stats: Counter[str] = Counter()

    # -- sending ----------------------------------------------------------------------------

    def seal(self, msg: Message, dest: int | None = None, sign: bool = False) -> bytes:
        """Frame ``msg`` for replica ``dest``, for every replica (None), or for the client of a
        reply. A relayed request keeps its client's authenticator; a client's own is signed too
        if ``sign`` (``ClientCore.must_sign``)."""
        kr = self.keyring
        if isinstance(msg, Request):
            if not msg.auth and kr is not None and kr.me[0] == CLIENT:
                msg = msg.with_auth(kr.request_auth(Request.TYPE, msg.raw, sign))
            return frame(msg, msg.raw, msg.auth)
        if isinstance(msg, NewView) and kr is not None:
            msg = msgspec.structs.replace(msg, view_changes=tuple(self._signed(vc) for vc in msg.view_changes))
        payload = encode_payload(msg)
        if kr is not None and msg.TYPE in SIGNED_TYPES:
            auth = kr.sign(msg.TYPE, payload)
        elif kr is None or self.sessions:
            auth = b""
        elif isinstance(msg, Reply):
            auth = kr.tag_for((CLIENT, msg.client), msg.TYPE, payload)
        elif dest is None:
            auth = kr.authenticator(msg.TYPE, payload)
        else:
            blob = bytearray(MAC_BYTES * kr.n)
            blob[dest * MAC_BYTES:(dest + 1) * MAC_BYTES] = kr.tag_for((REPLICA, dest), msg.TYPE, payload)
            auth = bytes(blob)
        return frame(msg, payload, auth)

    def _signed(self, vc: ViewChange) -> ViewChange:
        """Our own view change inside a NEW-VIEW needs the signature the others saw."""
        if vc.signature:
            return vc
        if vc.replica != self.keyring.me[1]:
            raise ValueError(f"view change of replica {vc.replica} has no signature to forward")
        raw = vc.raw or encode_payload(vc)
        return msgspec.structs.replace(vc, raw=raw, signature=self.keyring.sign(ViewChange.TYPE, raw))

    # -- receiving --------------------------------------------------------------------------

    def signed(self, req: Request) -> bool:
        """Whether ``req`` carries its client's valid signature (one Ed25519 check)."""
        self.stats["requests-checked-by-signature"] += 1
        return self.keyring.check_request_signature(req.client, Request.TYPE, req.raw, req.auth)

    def _authentic(self, client: int, raw: bytes, auth: bytes, signed_only: bool = False) -> bool:
        """A request's tag for us or, failing that (or if we must), its client's signature: one
        Ed25519 check, only when the cheap one failed."""
        kr = self.keyring
        if not signed_only and kr.check_tag((CLIENT, client), Request.TYPE, raw, auth, self.index):
            return True
        self.stats["requests-checked-by-signature"] += 1
        return kr.check_request_signature(client, Request.TYPE, raw, auth)

    def open(self, data: bytes, peer: Principal | None = None) -> Message | None:
        """``peer``: who the session the frame came on belongs to (with ``sessions``)."""
        try:
            env = split_frame(data, self.limits)
        except DecodeError as exc:
            self.dropped[str(exc)] += 1
            return None
        kr = self.keyring
        if self.is_replica == (env.type == Reply.TYPE):
            self.dropped["unexpected-type"] += 1
            return None
        if kr is not None:
            if self.sessions and peer is not None and peer[1] == env.sender and env.type not in SIGNED_TYPES and (
                peer[0] == (CLIENT if env.type == Request.TYPE else REPLICA)
            ):
                # Its own session vouches for it (a suspect's requests still need a signature).
                ok = env.type != Request.TYPE or env.sender not in self.suspects or self._authentic(
                    env.sender, env.payload, env.auth, True
                )
            elif env.type == Request.TYPE:
                ok = self._authentic(env.sender, env.payload, env.auth, env.sender in self.suspects)
            elif env.type in SIGNED_TYPES:
                ok = kr.check_signature(env.sender, env.type, env.payload, env.auth)
            else:
                ok = kr.check_tag((REPLICA, env.sender), env.type, env.payload, env.auth, self.index)
            if not ok:
                self.dropped["bad-authentication"] += 1
                return None
        try:
            msg = decode_payload(env, self.limits)
        except DecodeError as exc:
            self.dropped[str(exc)] += 1
            return None
        if kr is not None and isinstance(msg, PrePrepare | Batch):
            held = {
                i for i, r in enumerate(msg.requests)
                if isinstance(r, Request) and not self._authentic(r.client, r.raw, r.auth)
            }
            if held and isinstance(msg, Batch):
                # Its digest binds its requests to a pre-prepare, not to their clients: a batch
                # fetched for a pre-prepare of the primary's alone (large or held requests) may
                # be that primary's forgery. Every request in it must prove its client; the
                # bodies may still serve a pre-prepare that f+1 replicas vouch for.
                self.dropped["bad-request-authentication"] += 1
                self.unauthentic += [r for r in msg.requests if isinstance(r, Request)]
                return None
            if held:
                # The client is faulty, or the primary forged it. Not the whole pre-prepare is
                # dropped (that let one faulty client force view changes, the "big MAC" attack):
                # the request stays by reference, as a large one does, until its body comes
                # authentic (from its client) or the slot is decided without us.
                self.stats["unauthentic-requests-held"] += len(held)
                # Tagged with a key our proactive recovery retired: a correct client's request
                # that was on its way, held as any other but no reason to suspect its client.
                self.unverifiable += [
                    r.client for r in (msg.requests[i] for i in sorted(held))
                    if not kr.is_stale((CLIENT, r.client), Request.TYPE, r.raw, r.auth, self.index)
                ]
                self.unauthentic += [msg.requests[i] for i in sorted(held)]
                refs = tuple(r.digest if i in held else r for i, r in enumerate(msg.requests))
                msg = msgspec.structs.replace(msg, requests=refs)
        if kr is not None and isinstance(msg, NewView):
            # Its shape first, the signatures after: at most n view changes, one per replica,
            # all for its view. A NEW-VIEW of a thousand copies of one view change is rejected
            # before a thousand signature checks.
            replicas = {vc.replica for vc in msg.view_changes}
            if len(replicas) != len(msg.view_changes) or any(vc.view != msg.view for vc in msg.view_changes):
                self.dropped["malformed-new-view"] += 1
                return None
            if not replicas <= set(range(kr.n)):
                self.dropped["malformed-new-view"] += 1
                return None
            for vc in msg.view_changes:
                if not kr.check_signature(vc.replica, ViewChange.TYPE, vc.raw, vc.signature):
                    self.dropped["bad-view-change-signature"] += 1
                    return None
        return msg

"""Keys, MAC authenticators and signatures.

Every node (replica or client) owns an Ed25519 key (signatures on the rare messages that must
convince third parties, and the session handshakes of bft.runtime.session) and an X25519 key.
Each ordered pair of nodes shares a MAC key derived from X25519 + HKDF, distinct per direction,
so a tag from a to b says "a sent this to b". Tags are keyed BLAKE2b truncated to 16 bytes: about
a microsecond, against tens for an Ed25519 verify.

A client's request travels on (relayed by the primary in a pre-prepare), so its tags are the ones
that must outlive a connection. The key a client tags a request for replica j with is the one
its latest session with j exported, not the static one: a replica that refreshes its sessions
(proactive recovery) refreshes these keys too, and forgets the old ones, so keys read from a
compromised replica's memory stop working once it recovered. The static key serves only until a
client's first session with that replica. Clients also sign each request: a replica that cannot
check its tag (its session with that client is newer than the request, or the client is faulty)
checks the signature instead, and only then.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bft.messages import MAC_BYTES, SIGNATURE_BYTES, signed_bytes

REPLICA = "replica"
CLIENT = "client"
Principal = tuple[str, int]


@dataclass(frozen=True, slots=True)
class PublicKeys:
    sign: bytes  # Ed25519 public key, 32 bytes
    kex: bytes  # X25519 public key, 32 bytes


@dataclass(frozen=True, slots=True)
class PrivateKeys:
    sign: bytes  # Ed25519 private seed, 32 bytes
    kex: bytes  # X25519 private key, 32 bytes

    @staticmethod
    def generate() -> PrivateKeys:
        raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        return PrivateKeys(
            Ed25519PrivateKey.generate().private_bytes(*raw),
            X25519PrivateKey.generate().private_bytes(*raw),
        )

    def public(self) -> PublicKeys:
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        return PublicKeys(
            Ed25519PrivateKey.from_private_bytes(self.sign).public_key().public_bytes(*raw),
            X25519PrivateKey.from_private_bytes(self.kex).public_key().public_bytes(*raw),
        )


def mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, key=key, digest_size=MAC_BYTES).digest()


def _pair_key(shared: bytes, src: Principal, dst: Principal) -> bytes:
    info = f"bft-mac {src[0]}:{src[1]} -> {dst[0]}:{dst[1]}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _tagged_with(
    keys: tuple[bytes | None, ...], peer: Principal, type_: int, payload: bytes, auth: bytes, index: int
) -> bool:
    """Whether the tag at position ``index`` of ``auth`` is ``peer``'s under one of ``keys``."""
    tag = auth[index * MAC_BYTES:(index + 1) * MAC_BYTES]
    if len(tag) != MAC_BYTES or not keys[0]:
        return False
    data = signed_bytes(type_, peer[1], payload)
    # The current key first (outside any(): this runs for every request at every replica); an
    # older one is tried only when it fails.
    if hmac.compare_digest(tag, mac(keys[0], data)):
        return True
    return any(key and hmac.compare_digest(tag, mac(key, data)) for key in keys[1:])


class Keyring:
    """One node's view of the keys: its own private keys and a MAC key to and from every peer.

    ``replicas`` and ``clients`` map ids to public keys. Tags in an authenticator are ordered by
    replica id; a reply carries one tag for its client.
    """

    def __init__(
        self,
        me: Principal,
        private: PrivateKeys,
        replicas: dict[int, PublicKeys],
        clients: dict[int, PublicKeys],
    ) -> None:
        self.me = me
        self.n = len(replicas)
        self._signer = Ed25519PrivateKey.from_private_bytes(private.sign)
        # Who signs what: replicas their view changes (and everyone their session handshakes,
        # bft.runtime.session), clients their requests.
        self._identities: dict[Principal, Ed25519PublicKey] = {
            (REPLICA, r): Ed25519PublicKey.from_public_bytes(pk.sign) for r, pk in replicas.items()
        }
        if me[0] == REPLICA:
            self._identities |= {(CLIENT, c): Ed25519PublicKey.from_public_bytes(pk.sign) for c, pk in clients.items()}
        kex = X25519PrivateKey.from_private_bytes(private.kex)
        self._out: dict[Principal, bytes] = {}
        self._in: dict[Principal, bytes] = {}
        # Clients only talk to replicas; replicas talk to everyone.
        peers: list[tuple[Principal, PublicKeys]] = [((REPLICA, r), pk) for r, pk in replicas.items()]
        if me[0] == REPLICA:
            peers += [((CLIENT, c), pk) for c, pk in clients.items()]
        for peer, pk in peers:
            if peer == me:
                continue
            shared = kex.exchange(X25519PublicKey.from_public_bytes(pk.kex))
            self._out[peer] = _pair_key(shared, me, peer)
            self._in[peer] = _pair_key(shared, peer, me)
        self._replica_out = [self._out.get((REPLICA, r), b"") for r in range(self.n)]
        self._in_previous: dict[Principal, bytes] = {}  # a client's key of its session before
        # Client keys a proactive recovery retired: they authenticate nothing any more, but a
        # request tagged with one just before is stale, not a faulty client's (``is_stale``).
        self._retired: dict[Principal, bytes] = {}

    def knows(self, peer: Principal) -> bool:
        return peer in self._in

    def use_session_key(self, peer: Principal, key: bytes) -> None:
        """A session with ``peer`` (a client's with a replica) exported ``key`` for request tags.
        A replica still accepts the previous one: requests tagged just before a reconnection are
        still on their way through pre-prepares."""
        if self.me[0] == CLIENT:
            self._out[peer] = self._replica_out[peer[1]] = key
        else:
            self._in_previous[peer] = self._in.get(peer, b"")
            self._in[peer] = key

    def forget_session_keys(self) -> None:
        """Proactive recovery: no request tag made with a key we held so far verifies here again."""
        self._retired = {peer: key for peer, key in self._in.items() if peer[0] == CLIENT}
        for peer in self._retired:
            del self._in[peer]
        self._in_previous.clear()

    def authenticator(self, type_: int, payload: bytes) -> bytes:
        """One tag per replica (an empty slot for ourselves), for a message every replica may read."""
        data = signed_bytes(type_, self.me[1], payload)
        return b"".join(mac(k, data) if k else bytes(MAC_BYTES) for k in self._replica_out)

    def tag_for(self, peer: Principal, type_: int, payload: bytes) -> bytes:
        return mac(self._out[peer], signed_bytes(type_, self.me[1], payload))

    def check_tag(self, peer: Principal, type_: int, payload: bytes, auth: bytes, index: int) -> bool:
        """Check the tag at position ``index`` of ``auth`` (our replica id, or 0 for a reply)."""
        keys = (self._in.get(peer), self._in_previous.get(peer))
        return _tagged_with(keys, peer, type_, payload, auth, index)

    def is_stale(self, peer: Principal, type_: int, payload: bytes, auth: bytes, index: int) -> bool:
        """Whether a tag that failed was made with a key our last proactive recovery retired."""
        return _tagged_with((self._retired.get(peer),), peer, type_, payload, auth, index)

    def request_auth(self, type_: int, payload: bytes, sign: bool = True) -> bytes:
        """A client's request authenticator: a tag per replica, then (if ``sign``) the client's
        signature, which a replica checks only where a tag cannot vouch for the request."""
        tags = self.authenticator(type_, payload)
        return tags + self.sign(type_, payload) if sign else tags

    def check_request_signature(self, client: int, type_: int, payload: bytes, auth: bytes) -> bool:
        return self._check_signed((CLIENT, client), type_, payload, auth[self.n * MAC_BYTES:])

    def has_verifier(self, peer: Principal) -> bool:
        return peer in self._identities

    def sign_raw(self, data: bytes) -> bytes:
        return self._signer.sign(data)

    def verify_raw(self, peer: Principal, data: bytes, signature: bytes) -> bool:
        verifier = self._identities.get(peer)
        if verifier is None or len(signature) != SIGNATURE_BYTES:
            return False
        try:
            verifier.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def sign(self, type_: int, payload: bytes) -> bytes:
        return self._signer.sign(signed_bytes(type_, self.me[1], payload))

    def check_signature(self, replica: int, type_: int, payload: bytes, signature: bytes) -> bool:
        return self._check_signed((REPLICA, replica), type_, payload, signature)

    def _check_signed(self, signer: Principal, type_: int, payload: bytes, signature: bytes) -> bool:
        # A signer of the configuration first: an id a frame header cannot even hold (a request
        # inside a pre-prepare names its client in its own body) is nobody's (found by bench.fuzz).
        if signer not in self._identities:
            return False
        return self.verify_raw(signer, signed_bytes(type_, signer[1], payload), signature)

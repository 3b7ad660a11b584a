"""Keys, MAC authenticators and signatures.

Every node (replica or client) owns an Ed25519 key (signatures on the rare messages that must
convince third parties) and an X25519 key. Each ordered pair of nodes shares a MAC key derived
from X25519 + HKDF, distinct per direction, so a tag from a to b says "a sent this to b". Tags are
keyed BLAKE2b truncated to 16 bytes: about a microsecond, against tens for an Ed25519 verify.
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
        self._verifiers = {
            rid: Ed25519PublicKey.from_public_bytes(pk.sign) for rid, pk in replicas.items()
        }
        # Session handshakes (bft.runtime.session) prove who is at the other end of a connection.
        self._identities: dict[Principal, Ed25519PublicKey] = {(REPLICA, r): v for r, v in self._verifiers.items()}
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

    def knows(self, peer: Principal) -> bool:
        return peer in self._in

    def authenticator(self, type_: int, payload: bytes) -> bytes:
        """One tag per replica (an empty slot for ourselves), for a message every replica may read."""
        data = signed_bytes(type_, self.me[1], payload)
        return b"".join(mac(k, data) if k else bytes(MAC_BYTES) for k in self._replica_out)

    def tag_for(self, peer: Principal, type_: int, payload: bytes) -> bytes:
        return mac(self._out[peer], signed_bytes(type_, self.me[1], payload))

    def check_tag(self, peer: Principal, type_: int, payload: bytes, auth: bytes, index: int) -> bool:
        """Check the tag at position ``index`` of ``auth`` (our replica id, or 0 for a reply)."""
        key = self._in.get(peer)
        if key is None:
            return False
        tag = auth[index * MAC_BYTES:(index + 1) * MAC_BYTES]
        if len(tag) != MAC_BYTES:
            return False
        return hmac.compare_digest(tag, mac(key, signed_bytes(type_, peer[1], payload)))

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
        verifier = self._verifiers.get(replica)
        if verifier is None or len(signature) != SIGNATURE_BYTES:
            return False
        try:
            verifier.verify(signature, signed_bytes(type_, replica, payload))
        except InvalidSignature:
            return False
        return True

"""Authenticated, fresh sessions: one handshake per TCP connection, then every frame protected.

A frame that is authentic in itself (a client's request, a signed view change) can be replayed: on
another connection, or later. Before sessions, a captured HELLO replayed on a new connection
re-pointed its client's replies to the replayer, and replayed STATUS frames made a replica resend
its log again and again. A session binds a connection to one principal and makes every frame on
it unique to that connection and position, so nothing recorded can be played back.

The handshake is a signed Diffie-Hellman exchange (station-to-station, as in SIGMA/TLS 1.3):

    initiator -> responder   INIT    [version, kind, id, responder id, ephemeral X25519, encrypt]
    responder -> initiator   ACCEPT  [ephemeral X25519, Ed25519 signature over the transcript]
    initiator -> responder   FINISH  [Ed25519 signature over the transcript]

Both ephemeral keys are fresh per connection, so the transcript (and with it every key derived
from it) never repeats: a recorded FINISH does not complete a new handshake. Afterwards each frame
carries a 16-byte AES-GCM tag under the direction's key with the frame as associated data (GMAC),
or with ``encrypt`` is sealed with AES-GCM; the frame counter is the nonce. TCP delivers in order,
so the counter is implicit; a dropped, replayed or reordered frame fails its tag and closes the
session. GMAC, not keyed BLAKE2b: with AES instructions it costs about 1 µs for a 200-byte frame
and for a 4 KiB one, against 4 and 11 µs (bench.security prints both).

Only replicas accept connections; initiators (clients, and replicas sending to a peer) name the
replica they expect, and the signature proves they reached it. Static keys sign; nothing else
outlives a connection, so closing every connection refreshes every session key (proactive
recovery does that, `bft.runtime.node`). A client's session also exports the key its request
tags for that replica use (`request_key`), so those are refreshed with it.
"""

from __future__ import annotations

import hashlib
import struct

import msgpack
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bft.crypto import CLIENT, REPLICA, Keyring, Principal
from bft.messages import MAC_BYTES

VERSION = 1
# Each handshake frame is a few dozen bytes; this is all an unauthenticated peer may send at once.
HANDSHAKE_BYTES_MAX = 256
_NONCE = struct.Struct("!IQ")  # 96 bits: zero, then the frame's position on the connection
_KINDS = (REPLICA, CLIENT)


class SessionError(ValueError):
    """The peer broke the handshake or a frame's protection: close the connection."""


class Session:
    """One end of one connection: the handshake state and, once done, the frame keys."""

    __slots__ = (
        "_aead_in", "_aead_out", "_claimed", "_secret", "_transcript", "encrypt",
        "expect", "keyring", "peer", "received", "request_key", "sent",
    )

    def __init__(self, keyring: Keyring, expect: int | None = None, encrypt: bool = False) -> None:
        """``expect``: the replica an initiator connects to; None on the accepting side."""
        self.keyring = keyring
        self.expect = expect
        self.encrypt = encrypt
        self.peer: Principal | None = None  # set once the peer proved who it is
        self._claimed: Principal | None = None  # who an INIT says it is, until its FINISH proves it
        self._secret = X25519PrivateKey.generate()
        self._transcript = b""
        self._aead_in: AESGCM | None = None
        self._aead_out: AESGCM | None = None
        self.sent = self.received = 0
        # The key the initiator (a client) tags its requests for this replica with, while this
        # session is its latest (bft.crypto.Keyring.use_session_key).
        self.request_key = b""

    @property
    def established(self) -> bool:
        return self.peer is not None

    # -- handshake --------------------------------------------------------------------------

    def initiate(self) -> bytes:
        assert self.expect is not None, "only the connecting side starts a handshake"
        kind, node = self.keyring.me
        init = msgpack.packb([VERSION, kind, node, self.expect, _public(self._secret), self.encrypt])
        self._transcript = init
        return init

    def receive_handshake(self, data: bytes) -> bytes | None:
        """Take the peer's next handshake frame; returns our answer (or None once done)."""
        fields = _fields(data)
        if self.expect is None and not self._transcript:
            return self._on_init(data, fields)
        if self.expect is not None and self.peer is None:
            return self._on_accept(fields)
        if self.expect is None and self.peer is None:
            self._on_finish(fields)
            return None
        raise SessionError("handshake frame after the handshake")

    def _on_init(self, data: bytes, f: list) -> bytes:
        if len(f) != 6 or f[0] != VERSION or f[1] not in _KINDS or type(f[2]) is not int:
            raise SessionError("malformed session INIT")
        if f[3] != self.keyring.me[1] or self.keyring.me[0] != REPLICA or type(f[5]) is not bool:
            raise SessionError("session INIT for another replica")
        claimed: Principal = (f[1], f[2])
        if not self.keyring.has_verifier(claimed) or claimed == self.keyring.me:
            raise SessionError(f"session INIT from unknown {claimed[0]} {claimed[1]}")
        self.encrypt = f[5]
        mine = _public(self._secret)
        self._transcript = hashlib.sha256(data + mine).digest()
        self._derive(_exchange(self._secret, f[4]), initiator=False)
        self._claimed = claimed
        return msgpack.packb([mine, self.keyring.sign_raw(b"bft-session-accept" + self._transcript)])

    def _on_accept(self, f: list) -> bytes:
        if len(f) != 2 or type(f[0]) is not bytes or type(f[1]) is not bytes:
            raise SessionError("malformed session ACCEPT")
        self._transcript = hashlib.sha256(self._transcript + f[0]).digest()
        replica: Principal = (REPLICA, self.expect)
        if not self.keyring.verify_raw(replica, b"bft-session-accept" + self._transcript, f[1]):
            raise SessionError(f"replica {self.expect} did not prove its identity")
        self._derive(_exchange(self._secret, f[0]), initiator=True)
        self.peer = replica
        return msgpack.packb([self.keyring.sign_raw(b"bft-session-finish" + self._transcript)])

    def _on_finish(self, f: list) -> None:
        claimed = self._claimed
        if claimed is None or len(f) != 1 or type(f[0]) is not bytes:
            raise SessionError("malformed session FINISH")
        if not self.keyring.verify_raw(claimed, b"bft-session-finish" + self._transcript, f[0]):
            raise SessionError(f"{claimed[0]} {claimed[1]} did not prove its identity")
        self.peer = claimed

    def _derive(self, shared: bytes, initiator: bool) -> None:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=96, salt=self._transcript, info=b"bft-session keys")
        keys = hkdf.derive(shared)
        forward, backward, self.request_key = keys[:32], keys[32:64], keys[64:]
        out, into = (forward, backward) if initiator else (backward, forward)
        self._aead_out, self._aead_in = AESGCM(out), AESGCM(into)

    # -- frames -----------------------------------------------------------------------------

    def seal(self, frame: bytes) -> bytes:
        assert self._aead_out is not None, "no frames before the handshake"
        nonce = _NONCE.pack(0, self.sent)
        self.sent += 1
        if self.encrypt:
            return self._aead_out.encrypt(nonce, frame, None)
        return frame + self._aead_out.encrypt(nonce, b"", frame)

    def open(self, data: bytes) -> bytes:
        assert self._aead_in is not None, "no frames before the handshake"
        nonce = _NONCE.pack(0, self.received)
        self.received += 1
        try:
            if self.encrypt:
                return self._aead_in.decrypt(nonce, data, None)
            body = data[:-MAC_BYTES]
            self._aead_in.decrypt(nonce, data[-MAC_BYTES:], body)
            return body
        except Exception as exc:  # InvalidTag, or a frame too short to hold a tag: the same to us
            raise SessionError("a frame failed its session tag") from exc


def _fields(data: bytes) -> list:
    try:
        fields = msgpack.unpackb(data, max_bin_len=HANDSHAKE_BYTES_MAX, max_array_len=8, max_str_len=16)
    except Exception as exc:  # msgpack raises several types for hostile bytes; all mean malformed
        raise SessionError("malformed handshake frame") from exc
    if type(fields) is not list:
        raise SessionError("malformed handshake frame")
    return fields


def _public(secret: X25519PrivateKey) -> bytes:
    return secret.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _exchange(secret: X25519PrivateKey, public: object) -> bytes:
    if type(public) is not bytes or len(public) != 32:
        raise SessionError("malformed ephemeral key")
    try:
        return secret.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # a low-order point gives an all-zero secret, which X25519 refuses
        raise SessionError("unusable ephemeral key") from exc

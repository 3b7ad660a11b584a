"""The replicated service interface and the two services used by tests and benchmarks.

A service is a deterministic state machine. Replicas call ``execute`` in the agreed order with the
agreed batch time; every correct replica must return the same bytes and reach the same state.
A malformed operation is the client's problem: it yields an error result, never an exception.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Protocol

import msgpack

from bft.messages import DIGEST_BYTES


class Service(Protocol):
    def execute(self, op: bytes, client: int, timestamp_ms: int) -> bytes:
        """Apply ``op`` for ``client`` at the agreed time and return the result."""

    def is_read_only(self, op: bytes) -> bool:
        """True when ``op`` does not change the state (eligible for the read-only path)."""

    def snapshot(self) -> bytes:
        """The whole state as bytes, for checkpoints and state transfer."""

    def restore(self, snapshot: bytes) -> None:
        """Replace the state with one produced by ``snapshot``; raise ValueError if malformed."""

    def digest(self) -> bytes:
        """A digest of the state: equal states give equal digests on every replica."""


class NullService:
    """The paper's null operation: an argument of any size, a result of a requested size.

    An operation is a 4-byte big-endian result size followed by the argument bytes.
    """

    RESULT_BYTES_MAX = 16 * 1024 * 1024

    @staticmethod
    def op(result_bytes: int = 0, arg: bytes = b"") -> bytes:
        return struct.pack("!I", result_bytes) + arg

    def execute(self, op: bytes, client: int, timestamp_ms: int) -> bytes:
        if len(op) < 4:
            return b""
        (size,) = struct.unpack_from("!I", op)
        return bytes(min(size, self.RESULT_BYTES_MAX))

    def is_read_only(self, op: bytes) -> bool:
        return True

    def snapshot(self) -> bytes:
        return b""

    def restore(self, snapshot: bytes) -> None:
        if snapshot:
            raise ValueError("the null service has no state")

    def digest(self) -> bytes:
        return bytes(DIGEST_BYTES)


class KVService:
    """A key-value store. Operations and results are msgpack arrays:

    ``["put", key, value] -> [true, old value or nil]``, ``["get", key] -> [true, value or nil]``,
    ``["del", key] -> [true, old value or nil]``, anything else ``-> [false, "reason"]``.

    The digest is kept per bucket (a one-level partition tree) so a checkpoint rehashes only the
    buckets written since the last one.
    """

    BUCKETS = 256

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._bucket_keys: list[set[bytes]] = [set() for _ in range(self.BUCKETS)]
        self._bucket_digests = [b""] * self.BUCKETS
        self._dirty: set[int] = set(range(self.BUCKETS))

    @staticmethod
    def put(key: bytes, value: bytes) -> bytes:
        return msgpack.packb(["put", key, value])

    @staticmethod
    def get(key: bytes) -> bytes:
        return msgpack.packb(["get", key])

    @staticmethod
    def delete(key: bytes) -> bytes:
        return msgpack.packb(["del", key])

    def _bucket(self, key: bytes) -> int:
        return hashlib.blake2b(key, digest_size=1).digest()[0] % self.BUCKETS

    @staticmethod
    def _parse(op: bytes) -> list | None:
        try:
            cmd = msgpack.unpackb(op, max_str_len=16, max_array_len=3, max_map_len=0, max_ext_len=0)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return None
        if not isinstance(cmd, list) or not cmd or not all(isinstance(a, bytes) for a in cmd[1:]):
            return None
        if (cmd[0], len(cmd)) not in (("put", 3), ("get", 2), ("del", 2)):
            return None
        return cmd

    def execute(self, op: bytes, client: int, timestamp_ms: int) -> bytes:
        cmd = self._parse(op)
        if cmd is None:
            return msgpack.packb([False, "malformed operation"])
        name, key = cmd[0], cmd[1]
        if name == "get":
            return msgpack.packb([True, self._data.get(key)])
        b = self._bucket(key)
        self._dirty.add(b)
        if name == "put":
            old = self._data.get(key)
            self._data[key] = cmd[2]
            self._bucket_keys[b].add(key)
        else:
            old = self._data.pop(key, None)
            self._bucket_keys[b].discard(key)
        return msgpack.packb([True, old])

    def is_read_only(self, op: bytes) -> bool:
        cmd = self._parse(op)
        return cmd is not None and cmd[0] == "get"

    def snapshot(self) -> bytes:
        return msgpack.packb(sorted(self._data.items()))

    def restore(self, snapshot: bytes) -> None:
        try:
            items = msgpack.unpackb(snapshot, max_str_len=0, max_map_len=0, max_ext_len=0)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise ValueError("malformed kv snapshot") from exc
        if not isinstance(items, list) or not all(
            isinstance(kv, list) and len(kv) == 2 and all(isinstance(x, bytes) for x in kv) for kv in items
        ):
            raise ValueError("malformed kv snapshot")
        self.__init__()
        for k, v in items:
            self._data[k] = v
            self._bucket_keys[self._bucket(k)].add(k)

    def digest(self) -> bytes:
        for b in self._dirty:
            h = hashlib.blake2b(digest_size=DIGEST_BYTES)
            for k in sorted(self._bucket_keys[b]):
                v = self._data[k]
                h.update(len(k).to_bytes(4, "big") + k + len(v).to_bytes(4, "big") + v)
            self._bucket_digests[b] = h.digest()
        self._dirty.clear()
        return hashlib.blake2b(b"".join(self._bucket_digests), digest_size=DIGEST_BYTES).digest()


SERVICES = {"null": NullService, "kv": KVService}


def make_service(name: str) -> Service:
    try:
        return SERVICES[name]()
    except KeyError:
        raise ValueError(f"unknown service {name!r} (choose from {', '.join(SERVICES)})") from None

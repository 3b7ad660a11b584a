"""The replicated service interface, the registry of services, and the two services used by tests
and benchmarks.

A service is a deterministic state machine. Replicas call ``execute`` in the agreed order with the
agreed batch time; every correct replica must return the same bytes and reach the same state.
A malformed operation is the client's problem: it yields an error result, never an exception.

Services register as entry points of the ``bft.services`` group (``name = "module:factory"``),
so bft knows none of them by import: this package declares ``null`` and ``kv``, the file system
declares ``bfs``. A factory takes the service's options, the ``[name]`` table of cluster.toml
(``{}`` when there is none), validates them itself, and raises ValueError with a one-line message
on one it does not accept. A factory may carry ``defaults``: the options ``bft keygen`` writes out.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Protocol

import msgpack

SERVICE_GROUP = "bft.services"


class Service(Protocol):
    def execute(self, op: bytes, client: int, timestamp_ms: int) -> bytes:
        """Apply ``op`` for ``client`` at the agreed time and return the result."""

    def is_read_only(self, op: bytes) -> bool:
        """True when ``op`` does not change the state (eligible for the read-only path)."""

    def partitions(self) -> tuple[bytes, ...]:
        """The state as a fixed number of encoded partitions, for checkpoints and state
        transfer. A partition unchanged since the previous call must be returned as the very
        same bytes object: that is how a checkpoint costs only what changed."""

    def restore(self, partitions: Sequence[bytes]) -> None:
        """Replace the state by one produced by ``partitions``; raise ValueError if malformed."""


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

    def partitions(self) -> tuple[bytes, ...]:
        return ()

    def restore(self, partitions: Sequence[bytes]) -> None:
        if partitions:
            raise ValueError("the null service has no state")


class KVService:
    """A key-value store. Operations and results are msgpack arrays:

    ``["put", key, value] -> [true, old value or nil]``, ``["get", key] -> [true, value or nil]``,
    ``["del", key] -> [true, old value or nil]``, anything else ``-> [false, "reason"]``.

    Keys are spread over 256 partitions by hash; a checkpoint re-encodes only the partitions
    written since the previous one.
    """

    BUCKETS = 256

    def __init__(self) -> None:
        self._buckets: list[dict[bytes, bytes]] = [{} for _ in range(self.BUCKETS)]
        self._encoded: list[bytes] = [b""] * self.BUCKETS
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
        b = self._bucket(key)
        bucket = self._buckets[b]
        if name == "get":
            return msgpack.packb([True, bucket.get(key)])
        self._dirty.add(b)
        if name == "put":
            old = bucket.get(key)
            bucket[key] = cmd[2]
        else:
            old = bucket.pop(key, None)
        return msgpack.packb([True, old])

    def is_read_only(self, op: bytes) -> bool:
        cmd = self._parse(op)
        return cmd is not None and cmd[0] == "get"

    def partitions(self) -> tuple[bytes, ...]:
        for b in self._dirty:
            self._encoded[b] = msgpack.packb(sorted(self._buckets[b].items()))
        self._dirty.clear()
        return tuple(self._encoded)

    def restore(self, partitions: Sequence[bytes]) -> None:
        if len(partitions) != self.BUCKETS:
            raise ValueError(f"a kv snapshot has {self.BUCKETS} partitions, not {len(partitions)}")
        buckets: list[dict[bytes, bytes]] = []
        for b, data in enumerate(partitions):
            try:
                items = msgpack.unpackb(data, max_str_len=0, max_map_len=0, max_ext_len=0)
            except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
                raise ValueError("malformed kv partition") from exc
            if not isinstance(items, list) or not all(
                isinstance(kv, list) and len(kv) == 2 and all(type(x) is bytes for x in kv) for kv in items
            ):
                raise ValueError("malformed kv partition")
            if any(self._bucket(k) != b for k, _ in items):
                raise ValueError("kv partition holds a key of another partition")
            buckets.append(dict(items))
        self._buckets = buckets
        self._encoded = list(partitions)
        self._dirty = set()

    def items(self) -> dict[bytes, bytes]:
        """Every key and value (for tests and tools; not part of the service interface)."""
        return {k: v for bucket in self._buckets for k, v in bucket.items()}


def _no_options(name: str, options: dict) -> None:
    if options:
        raise ValueError(f"the {name} service takes no options (got {', '.join(sorted(options))})")


def null_service(options: dict) -> NullService:
    """The ``null`` entry point."""
    _no_options("null", options)
    return NullService()


def kv_service(options: dict) -> KVService:
    """The ``kv`` entry point."""
    _no_options("kv", options)
    return KVService()


def _registered() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=SERVICE_GROUP)}


def service_names() -> list[str]:
    """The names of the installed services, sorted."""
    return sorted(_registered())


def _factory(name: str) -> Callable[[dict], Service]:
    registered = _registered()
    ep = registered.get(name)
    if ep is None:
        known = ", ".join(sorted(registered)) or f"none: no package declares {SERVICE_GROUP} entry points"
        raise ValueError(f"unknown service {name!r} (installed: {known})")
    return ep.load()


def make_service(name: str, options: dict | None = None) -> Service:
    """A fresh instance of a service, with its options (the service's table in cluster.toml)."""
    return _factory(name)(dict(options or {}))


def service_defaults() -> dict[str, dict]:
    """Every installed service's default options that it declares, by name (for ``bft keygen``)."""
    defaults = {}
    for name in service_names():
        options = getattr(_factory(name), "defaults", None)
        if options:
            defaults[name] = dict(options)
    return defaults

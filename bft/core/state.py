"""Checkpointed state as a flat partition tree, and fetching it partition by partition.

A snapshot is the service's partitions plus one partition of the replica's own (the exactly-once
table and the agreed time). Its digest is the hash of the partitions' digests (the root of a
two-level tree, as the paper's partition tree with one level of interior nodes). Services return
the same bytes object for a partition that did not change, so taking a checkpoint hashes only
what changed since the previous one and shares the rest with it in memory.

A replica behind a certified checkpoint asks for its manifest (the partition digests), checks it
against the certified root, and then fetches only the partitions whose digests differ from its
own, a few at a time, checking each against the manifest. A replica that sends a wrong partition
is caught at once and the fetch moves to another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from bft.core.clients import ClientTable
from bft.messages import DIGEST_BYTES, digest
from bft.service import Service


@dataclass(frozen=True, slots=True)
class Snapshot:
    root: bytes
    parts: tuple[bytes, ...]
    digests: tuple[bytes, ...]

    def manifest(self) -> bytes:
        return msgpack.packb(list(self.digests))


def root_of(digests: tuple[bytes, ...]) -> bytes:
    return digest(b"".join(digests))


def capture(service: Service, clients: ClientTable, batch_time_ms: int, previous: Snapshot | None) -> Snapshot:
    parts = (*service.partitions(), msgpack.packb((clients.encode(), batch_time_ms)))
    same_shape = previous is not None and len(previous.parts) == len(parts)
    digests = tuple(
        previous.digests[i] if same_shape and part is previous.parts[i] else digest(part)
        for i, part in enumerate(parts)
    )
    return Snapshot(root_of(digests), parts, digests)


def decode_manifest(data: bytes, root: bytes, parts_max: int) -> tuple[bytes, ...] | None:
    """The partition digests in ``data`` if they hash to ``root``, else None."""
    try:
        digests = msgpack.unpackb(data, max_str_len=0, max_map_len=0, max_ext_len=0, max_array_len=parts_max)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if not isinstance(digests, list) or not all(type(d) is bytes and len(d) == DIGEST_BYTES for d in digests):
        return None
    digests = tuple(digests)
    return digests if digests and root_of(digests) == root else None


def rebuild(
    factory: Callable[[], Service], window: int, parts: tuple[bytes, ...]
) -> tuple[Service, ClientTable, int]:
    """A fresh service, exactly-once table and agreed time from a snapshot's partitions."""
    if not parts:
        raise ValueError("empty snapshot")
    service = factory()
    service.restore(parts[:-1])
    clients = ClientTable(window)
    try:
        table, batch_time = msgpack.unpackb(parts[-1], max_map_len=0, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError("malformed replica partition") from exc
    if type(table) is not bytes or type(batch_time) is not int:
        raise ValueError("malformed replica partition")
    clients.restore(table)
    return service, clients, batch_time


class Transfer:
    """Fetching the partitions of checkpoint ``seq`` (whose manifest we hold) that we lack."""

    WINDOW = 8  # partitions asked for at once: bounds what a peer queues for us

    def __init__(self, seq: int, root: bytes, digests: tuple[bytes, ...], have: Snapshot, source: int) -> None:
        self.seq = seq
        self.root = root
        self.digests = digests
        self.source = source
        own = dict(zip(have.digests, have.parts, strict=True))
        self.parts: list[bytes | None] = [own.get(d) for d in digests]
        self.queue = [i for i, p in enumerate(self.parts) if p is None]
        self.asked: dict[int, int] = {}  # partition -> when we asked

    @property
    def fetched_all(self) -> bool:
        return not self.queue and not self.asked

    def to_ask(self, now_ms: int, timeout_ms: int) -> list[int]:
        """Partitions to request now: those asked too long ago again, then new ones."""
        again = [i for i, at in self.asked.items() if now_ms - at >= timeout_ms]
        while self.queue and len(self.asked) < self.WINDOW:
            again.append(self.queue.pop(0))
        for i in again:
            self.asked[i] = now_ms
        return again

    def offer(self, index: int, data: bytes) -> bool:
        """Accept partition ``index`` if it is one we asked for and matches the manifest."""
        if index not in self.asked or digest(data) != self.digests[index]:
            return False
        del self.asked[index]
        self.parts[index] = data
        return True

    def snapshot(self) -> Snapshot:
        assert self.fetched_all
        return Snapshot(self.root, tuple(p for p in self.parts if p is not None), self.digests)

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


# A partition travels in chunks of at most this many bytes, so none exceeds a frame however
# large the partition grew (a kv bucket of big values, many cached replies, a file's blocks).
PARTITION_CHUNK_BYTES = 1 << 20
# What a partition may claim to total while we fetch it: a liar cannot make us buffer more.
PARTITION_BYTES_MAX = 1 << 30


class Transfer:
    """Fetching the partitions of checkpoint ``seq`` (whose manifest we hold) that we lack, each
    chunk by chunk from one of the checkpoint's voters, the voters taking turns by partition; a
    partition that does not match the manifest, or whose source goes quiet, is fetched again
    from the next voter."""

    WINDOW = 8  # partitions asked for at once: bounds what a peer queues for us

    def __init__(self, seq: int, root: bytes, digests: tuple[bytes, ...], have: Snapshot, sources: list[int]) -> None:
        assert sources, "a transfer needs a replica to fetch from"
        self.seq = seq
        self.root = root
        self.digests = digests
        self.sources = sources
        own = dict(zip(have.digests, have.parts, strict=True))
        self.parts: list[bytes | None] = [own.get(d) for d in digests]
        self.queue = [i for i, p in enumerate(self.parts) if p is None]
        self.asked: dict[int, int] = {}  # partition -> when we asked for its next chunk
        self.filling: dict[int, bytearray] = {}  # partition -> its chunks so far
        self.tries: dict[int, int] = {}  # partition -> sources that failed it

    @property
    def fetched_all(self) -> bool:
        return not self.queue and not self.asked

    def source(self, index: int) -> int:
        return self.sources[(index + self.tries.get(index, 0)) % len(self.sources)]

    def _retry(self, index: int) -> None:
        self.tries[index] = self.tries.get(index, 0) + 1
        self.filling.pop(index, None)
        self.asked[index] = -(1 << 62)  # at once, from the next source

    def to_ask(self, now_ms: int, timeout_ms: int) -> list[tuple[int, int, int]]:
        """(partition, offset, source) to request now: chunks asked too long ago again (from
        the next source), chunks that follow one that just came, then new partitions."""
        for i, at in list(self.asked.items()):
            if at >= 0 and now_ms - at >= timeout_ms:
                self._retry(i)
        ready = [i for i, at in self.asked.items() if at < 0]
        while self.queue and len(self.asked) < self.WINDOW:
            ready.append(self.queue.pop(0))
        for i in ready:
            self.asked[i] = now_ms
        return [(i, len(self.filling.get(i, b"")), self.source(i)) for i in ready]

    def offer(self, index: int, offset: int, total: int, data: bytes, sender: int) -> str | None:
        """Take a chunk of partition ``index``; None if taken, else why it was not."""
        if index not in self.asked or sender != self.source(index):
            return "unrequested-partition"
        have = self.filling.setdefault(index, bytearray())
        if offset != len(have) or total > PARTITION_BYTES_MAX or offset + len(data) > total or not (data or total == 0):
            self._retry(index)
            return "malformed-partition"
        have += data
        if len(have) < total:
            self.asked[index] = -1  # ask for the next chunk at once
            return None
        del self.asked[index], self.filling[index]
        if digest(bytes(have)) != self.digests[index]:
            self._retry(index)
            return "partition-digest-mismatch"
        self.parts[index] = bytes(have)
        return None

    def snapshot(self) -> Snapshot:
        assert self.fetched_all
        return Snapshot(self.root, tuple(p for p in self.parts if p is not None), self.digests)

"""The exactly-once table: for each client, the replies to its recent requests.

The paper keeps one timestamp and one reply per client, which allows one request in flight per
client. We keep a window of ``client_window`` timestamps instead, so one client process can have
many operations in flight: a request whose timestamp has a cached reply gets that reply again; a
timestamp at or below ``newest - window`` is too old and dropped; anything else has not been
executed (the cache holds every executed timestamp inside the window) and may run. With a window
of 1 this is exactly the paper's rule. The table is part of the checkpointed state.
"""

from __future__ import annotations

import heapq

import msgpack


class ClientTable:
    def __init__(self, window: int) -> None:
        self.window = window
        self._newest: dict[int, int] = {}
        self._replies: dict[int, dict[int, bytes]] = {}
        # Each client's cached timestamps, oldest first: pruning the window costs O(log window)
        # per execution, not a scan of the whole window (5.8% of a backup's time at 64 clients).
        self._heaps: dict[int, list[int]] = {}

    def cached(self, client: int, timestamp: int) -> bytes | None:
        replies = self._replies.get(client)
        return None if replies is None else replies.get(timestamp)

    def too_old(self, client: int, timestamp: int) -> bool:
        newest = self._newest.get(client)
        return newest is not None and timestamp <= newest - self.window

    def is_new(self, client: int, timestamp: int) -> bool:
        return not self.too_old(client, timestamp) and self.cached(client, timestamp) is None

    def record(self, client: int, timestamp: int, result: bytes) -> None:
        replies = self._replies.setdefault(client, {})
        heap = self._heaps.setdefault(client, [])
        if timestamp not in replies:
            heapq.heappush(heap, timestamp)
        replies[timestamp] = result
        newest = max(timestamp, self._newest.get(client, timestamp))
        self._newest[client] = newest
        if len(replies) > self.window:
            floor = newest - self.window
            while heap[0] <= floor:
                del replies[heapq.heappop(heap)]

    def encode(self) -> bytes:
        return msgpack.packb(
            sorted((c, self._newest[c], sorted(r.items())) for c, r in self._replies.items())
        )

    def restore(self, data: bytes) -> None:
        try:
            rows = msgpack.unpackb(data, max_str_len=0, max_map_len=0, max_ext_len=0)
            newest = {}
            replies = {}
            for client, top, items in rows:
                if not (type(client) is int and type(top) is int):
                    raise TypeError("client row")
                row = {}
                for ts, res in items:
                    if not (type(ts) is int and type(res) is bytes):
                        raise TypeError("client reply")
                    row[ts] = res
                newest[client], replies[client] = top, row
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise ValueError("malformed client table") from exc
        self._newest, self._replies = newest, replies
        self._heaps = {client: sorted(row) for client, row in replies.items()}

"""The unreplicated baseline: one server executing requests as they come, with the same
exactly-once table and the same messages, so the client library and benchmarks are shared."""

from __future__ import annotations

from collections import Counter

from bft.core.clients import ClientTable
from bft.core.effects import ReplyTo
from bft.core.params import Params
from bft.messages import Message, Reply, Request
from bft.service import Service


class Unreplicated:
    def __init__(self, params: Params, service: Service) -> None:
        self.service = service
        self.clients = ClientTable(params.client_window)
        self.dropped: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.last_time_ms = 0

    def step(self, msg: Message, now_ms: int) -> list[ReplyTo]:
        if not isinstance(msg, Request):
            self.dropped["unexpected-type"] += 1
            return []
        cached = self.clients.cached(msg.client, msg.timestamp)
        if cached is None:
            if self.clients.too_old(msg.client, msg.timestamp):
                self.dropped["old-timestamp"] += 1
                return []
            self.last_time_ms = max(now_ms, self.last_time_ms + 1)
            cached = self.service.execute(msg.op, msg.client, self.last_time_ms)
            self.clients.record(msg.client, msg.timestamp, cached, msg.settled)
            self.stats["executed-requests"] += 1
        return [ReplyTo(msg.client, Reply(0, msg.timestamp, msg.client, 0, cached))]

    def tick(self, now_ms: int) -> list[ReplyTo]:
        return []

"""A replica's admin HTTP endpoint: ``/status`` (JSON) and ``/metrics`` (Prometheus), both read
from the node's ``status()``."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

Status = Callable[[], dict]


async def start_admin(status: Status, started_s: float, host: str, port: int) -> web.AppRunner:
    """Serve ``status`` on host:port until the returned runner is cleaned up."""
    registry = CollectorRegistry()
    registry.register(_Collector(status))

    async def get_status(_: web.Request) -> web.Response:
        return web.json_response(status() | {"uptime_s": round(time.monotonic() - started_s, 1)})

    async def get_metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/status", get_status)
    app.router.add_get("/metrics", get_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


class _Collector:
    def __init__(self, status: Status) -> None:
        self.status = status

    def collect(self):
        s = self.status()
        for key in ("view", "executed", "stable_checkpoint", "log_slots", "pending_requests", "proactive_recoveries"):
            if key in s:
                yield GaugeMetricFamily(f"bft_{key}", f"replica {key.replace('_', ' ')}", value=s[key])
        dropped = CounterMetricFamily("bft_dropped_messages", "messages dropped, by reason", labels=["reason"])
        for reason, count in s["dropped"].items():
            dropped.add_metric([reason], count)
        yield dropped
        stats = CounterMetricFamily("bft_events", "protocol events, by kind", labels=["kind"])
        for kind, count in s["stats"].items():
            stats.add_metric([kind], count)
        yield stats

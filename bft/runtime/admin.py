"""A replica's admin HTTP endpoint, read-only: ``/`` (the dashboard), ``/status`` (JSON),
``/metrics`` (Prometheus), ``/history`` (this replica's recent samples) and ``/cluster`` (every
replica's status and history, fetched here: a browser reaches this port, not the others)."""

from __future__ import annotations

import asyncio
import time
from importlib.resources import files
from typing import Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from bft.runtime.metrics import Metrics, Observer

PEER_TIMEOUT_S = 1.0
PAGE = files("bft.runtime").joinpath("dashboard.html").read_text()


class Admin(Protocol):
    """What the endpoint reads from its node."""

    started_s: float
    metrics: Metrics
    observer: Observer | None
    admin_peers: list[tuple[int, str, int]]

    def status(self) -> dict: ...


async def start_admin(node: Admin, host: str, port: int) -> web.AppRunner:
    """Serve ``node``'s status on host:port until the returned runner is cleaned up."""
    registry = CollectorRegistry()
    registry.register(_Collector(node))

    def status() -> dict:
        return node.status() | {"uptime_s": round(time.monotonic() - node.started_s, 1)}

    def history() -> list[dict]:
        return [] if node.observer is None else list(node.observer.history)

    async def get_status(_: web.Request) -> web.Response:
        return web.json_response(status())

    async def get_metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    async def get_history(_: web.Request) -> web.Response:
        return web.json_response(history())

    async def get_cluster(request: web.Request) -> web.Response:
        me = status().get("replica")

        async def one(i: int, h: str, p: int) -> dict:
            row: dict = {"replica": i, "endpoint": f"{h}:{p}"}
            if i == me:
                return row | {"status": status(), "history": history()}
            try:
                async with request.app["http"].get(f"http://{h}:{p}/status") as a, \
                        request.app["http"].get(f"http://{h}:{p}/history") as b:
                    return row | {"status": await a.json(), "history": await b.json()}
            except (OSError, TimeoutError, ValueError, aiohttp.ClientError) as exc:
                return row | {"error": f"unreachable ({type(exc).__name__})"}

        rows = await asyncio.gather(*(one(*peer) for peer in node.admin_peers))
        return web.json_response({"me": me, "t": round(time.time(), 1), "replicas": rows})

    async def get_page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def http_session(app: web.Application):
        app["http"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT_S))
        yield
        await app["http"].close()

    app = web.Application()
    app.cleanup_ctx.append(http_session)
    app.router.add_get("/", get_page)
    app.router.add_get("/status", get_status)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/history", get_history)
    app.router.add_get("/cluster", get_cluster)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


class _Collector:
    def __init__(self, node: Admin) -> None:
        self.node = node

    def collect(self):
        s = self.node.status()
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
        yield from self.node.metrics.families()

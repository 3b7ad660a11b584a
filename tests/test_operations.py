"""Operating a cluster, with real replica processes: the dashboard at / of an admin port in
headless Chromium (a screenshot is saved to build/dashboard.png), the operator metrics on
/metrics, and JSON logs in which each view change and each kind of drop is logged once."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bft.core.params import Params
from bft.service import KVService
from client import Client

from .conftest import LocalCluster, require

ROOT = Path(__file__).parent.parent
SCREENSHOT = ROOT / "build" / "dashboard.png"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


async def puts(cluster, count: int, clients: int = 4) -> None:
    async def one(k: int) -> None:
        async with Client(cluster, k) as c:
            for i in range(count // clients):
                await c.invoke(KVService.put(b"ops-%d" % k, b"%d" % i), timeout=30)

    await asyncio.gather(*(one(k) for k in range(clients)))


def metrics(lc: LocalCluster, replica: int) -> dict[str, list]:
    r = lc.cluster.replicas[replica]
    with urllib.request.urlopen(f"http://{r.host}:{r.admin_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def sample(samples: list, name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


@pytest.fixture(scope="module")
def operated(tmp_path_factory) -> Iterator[LocalCluster]:
    """A cluster that went through what an operator watches for: load, a wiped backup back by
    state transfer, garbage on a replica's port, and a paused primary replaced."""
    params = Params(checkpoint_interval=16, log_window=32, view_timeout_ms=500)
    started = time.monotonic()
    lc = LocalCluster(tmp_path_factory.mktemp("ops") / "cluster", 1, "kv", params, log_format="json")
    try:
        lc.kill(3)
        shutil.rmtree(lc.cluster.path.parent / "data" / "replica-3")
        asyncio.run(puts(lc.cluster, 400))
        lc.restart(3)
        r1 = lc.cluster.replicas[1]
        for _ in range(5):  # not a handshake: dropped as bad-handshake, logged once
            with socket.create_connection((r1.host, r1.port)) as s:
                s.sendall(b"\x00\x00\x00\x05hello")
                time.sleep(0.2)
        lc.procs[0].send_signal(signal.SIGSTOP)
        asyncio.run(puts(lc.cluster, 40))
        lc.procs[0].send_signal(signal.SIGCONT)
        asyncio.run(puts(lc.cluster, 40))
        deadline = time.monotonic() + 20
        while lc.status(3)["executed"] < lc.status(1)["executed"] and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(max(0.0, 5.5 - (time.monotonic() - started)))  # two dashboard samples
        yield lc
    finally:
        lc.stop()


def test_metrics_an_operator_alerts_on(operated) -> None:
    m = metrics(operated, 1)
    latency = m["bft_request_latency_seconds"]
    assert sample(latency, "bft_request_latency_seconds_count") >= 480
    assert sample(latency, "bft_request_latency_seconds_bucket", le="+Inf") >= 480
    assert 0 < sample(latency, "bft_request_latency_seconds_sum") < 480 * 5
    assert sample(m["bft_batch_size"], "bft_batch_size_count") >= 1
    assert sample(m["bft_checkpoint_seconds"], "bft_checkpoint_seconds_count") >= 1
    assert sample(m["bft_view_change_seconds"], "bft_view_change_seconds_count") >= 1
    assert sum(s.value for s in m["bft_view_changes"]) >= 1
    for direction in ("in", "out"):
        assert sample(m[f"bft_messages_{direction}"], f"bft_messages_{direction}_total", type="Prepare") > 0
        assert sample(m["bft_peer_bytes"], "bft_peer_bytes_total", peer="replica-2", direction=direction) > 0
        assert sample(m["bft_peer_bytes"], "bft_peer_bytes_total", peer="client-0", direction=direction) > 0
    assert sample(m["bft_peer_bytes"], "bft_peer_bytes_total", peer="unauthenticated", direction="in") >= 5 * 9
    m3 = metrics(operated, 3)  # wiped, and back by state transfer
    assert sample(m3["bft_state_transfer_seconds"], "bft_state_transfer_seconds_count") >= 1


def test_json_logs_tell_each_view_change_and_drop_once(operated) -> None:
    lines = (operated.cluster.path.parent / "logs" / "replica-1.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    messages = [r["message"] for r in records]
    started = [m for m in messages if m.startswith("replica-1: view change to view 1 (")]
    assert len(started) == 1, started
    assert any(m.startswith("replica-1: entered view 1, primary 1, after ") for m in messages)
    garbage = [m for m in messages if m.startswith("replica-1: dropped") and m.endswith(": bad-handshake")]
    assert len(garbage) == 1, garbage  # five connections, one line within the minute
    transfer = (operated.cluster.path.parent / "logs" / "replica-3.restarted.log").read_text()
    assert "state transfer done in" in transfer


def test_dashboard_in_headless_chromium(operated, tmp_path) -> None:
    browser = chromium()
    require(browser, "headless Chromium is not installed (Debian: apt-get install chromium)")
    r = operated.cluster.replicas[2]
    url = f"http://{r.host}:{r.admin_port}/"
    flags = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1280,1000", "--virtual-time-budget=4000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=90).stdout
    assert "served by replica 2" in dom and "4 / 4" in dom, dom[-2000:]
    executed = operated.status(1)["executed"]
    assert f"<td>{executed}</td>" in dom or f"<b>{executed}</b>" in dom
    assert dom.count("<polyline") >= 4  # a throughput line for each replica
    assert "bad-handshake" in dom  # in the drops table
    SCREENSHOT.parent.mkdir(exist_ok=True)
    subprocess.run([*flags, f"--screenshot={SCREENSHOT}", url], capture_output=True, timeout=90, check=True)
    head = SCREENSHOT.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") == 1280
    print(f"dashboard screenshot: {SCREENSHOT}")

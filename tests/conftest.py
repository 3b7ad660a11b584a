"""Fixtures that run real replica processes over real TCP on 127.0.0.1, and ``require``: the one
way a test may decline to run for want of something the machine lacks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bft.core.params import Params
from bft.local import LocalCluster, free_base_port, wait_for_port

__all__ = ["CI", "LocalCluster", "free_base_port", "require", "wait_for_port"]

# CI sets CI=true: there a test that cannot run is a failure, so a green run means it ran.
CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require(condition: object, reason: str) -> None:
    """Skip the calling test (or fixture) unless ``condition`` holds, with ``reason`` printed in
    the summary (pytest runs with -rs); under CI=true fail it instead. Every test that needs a
    capability of the machine (a FUSE device, root, a program) asks through here."""
    if condition:
        return
    if CI:
        pytest.fail(f"CI=true, and this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Under CI=true a skip that did not come through ``require`` (a stray ``skipif``) fails too."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true, and this test was skipped: {reason}"


@pytest.fixture
def local_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    lc = LocalCluster(tmp_path / "cluster", 1, "kv", Params(checkpoint_interval=32, log_window=64))
    try:
        yield lc
    finally:
        lc.stop()


@pytest.fixture
def unreplicated_server() -> Iterator[tuple[str, int]]:
    port = free_base_port(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bft", "serve", "--service", "kv", "--port", str(port)], stdout=subprocess.DEVNULL
    )
    try:
        wait_for_port("127.0.0.1", port)
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(5)

"""Fixtures that run real replica processes over real TCP on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bft.core.params import Params
from bft.local import LocalCluster, free_base_port, wait_for_port

__all__ = ["LocalCluster", "free_base_port", "wait_for_port"]


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

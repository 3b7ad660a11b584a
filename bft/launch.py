"""Starting and stopping local replica processes: ``bft up``, the test cluster and the benchmarks.

Each replica is a ``python -m bft replica`` process of its own, in a new session so that a
Ctrl-C in the terminal reaches only the launcher, which then stops the replicas in order.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from bft.config import Cluster


def replica_command(
    cluster: Cluster, replica: int, service: str, log_file: Path, log_level: str, byzantine: str | None = None,
    log_format: str = "text",
) -> list[str]:
    """The command line that runs replica ``replica`` of ``cluster`` with ``service``; with
    ``byzantine`` (a name from bft.byzantine.BEHAVIOURS) a replica that lies."""
    command = [
        sys.executable, "-m", "bft", "replica", "--config", str(cluster.path), "--id", str(replica),
        "--service", service, "--log-level", log_level, "--log-file", str(log_file), "--log-format", log_format,
    ]
    return [*command, "--byzantine", byzantine] if byzantine else command


def start_replicas(
    cluster: Cluster, service: str, log_dir: Path, log_level: str = "info", byzantine: dict[int, str] | None = None,
    log_format: str = "text",
) -> list[subprocess.Popen]:
    """Start every replica of ``cluster``; replica i logs to ``log_dir/replica-i.log``, and lies
    with behaviour ``byzantine[i]`` if it has one."""
    log_dir.mkdir(parents=True, exist_ok=True)
    byzantine = byzantine or {}
    return [
        subprocess.Popen(
            replica_command(
                cluster, r.id, service, log_dir / f"replica-{r.id}.log", log_level, byzantine.get(r.id), log_format
            ),
            start_new_session=True,
        )
        for r in cluster.replicas
    ]


def stop_replicas(procs: list[subprocess.Popen], timeout_s: float = 5.0) -> None:
    """SIGTERM every process still running, then SIGKILL those not gone within ``timeout_s``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

"""A local cluster of real replica processes on 127.0.0.1, for tests and benchmarks."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from bft import config as cfg
from bft.core.params import Params
from bft.launch import replica_command, start_replicas, stop_replicas


def free_base_port(count: int) -> int:
    """A base port such that base .. base+100+count are free (replica and admin ports)."""
    rng = random.Random()
    for _ in range(200):
        # Below Linux's ephemeral range (32768+), where client sockets would take ports under us.
        base = rng.randrange(10_000, 32_000)
        ports = [base + i for i in range(count)] + [base + 100 + i for i in range(count)]
        try:
            socks = []
            for p in ports:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
                socks.append(s)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError("no free port range found")


def wait_for_port(host: str, port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def replica_status(cluster: cfg.Cluster, replica: int) -> dict:
    r = cluster.replicas[replica]
    with urllib.request.urlopen(f"http://{r.host}:{r.admin_port}/status", timeout=2) as resp:
        return json.load(resp)


class LocalCluster:
    """3f+1 replica processes; with ``byzantine=(i, behaviour)`` replica i lies as that behaviour
    of bft.byzantine.BEHAVIOURS says (restarted, it lies again)."""

    def __init__(
        self, directory: Path, f: int, service: str, params: Params, byzantine: tuple[int, str] | None = None,
        log_format: str = "text",
    ) -> None:
        n = 3 * f + 1
        cfg.keygen(directory, f, clients=8, base_port=free_base_port(n), params=params)
        self.cluster = cfg.load(directory / "cluster.toml")
        self.service = service
        self.byzantine = dict([byzantine]) if byzantine else {}
        self.log_format = log_format
        self.procs = start_replicas(self.cluster, service, directory / "logs", "info", self.byzantine, log_format)
        for r in self.cluster.replicas:
            wait_for_port(r.host, r.port)
            wait_for_port(r.host, r.admin_port)

    def kill(self, replica: int) -> None:
        p = self.procs[replica]
        p.send_signal(signal.SIGKILL)
        p.wait()

    def restart(self, replica: int) -> None:
        """Start a killed replica again, from its data directory (remove that first for a replica
        that comes back with nothing: it catches up from the others)."""
        log = self.cluster.path.parent / "logs" / f"replica-{replica}.restarted.log"
        command = replica_command(
            self.cluster, replica, self.service, log, "info", self.byzantine.get(replica), self.log_format
        )
        self.procs[replica] = subprocess.Popen(command)
        r = self.cluster.replicas[replica]
        wait_for_port(r.host, r.port)
        wait_for_port(r.host, r.admin_port)

    def status(self, replica: int) -> dict:
        return replica_status(self.cluster, replica)

    def stop(self) -> None:
        stop_replicas(self.procs)

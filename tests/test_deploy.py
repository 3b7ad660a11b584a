"""The Docker files cannot be built here (no Docker engine); check what can be checked: the
compose file's structure, and that the image's commands exist in this project."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent


def test_compose_runs_3f_plus_1_replicas_from_generated_keys() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    replicas = sorted(name for name in services if name.startswith("replica"))
    assert replicas == ["replica0", "replica1", "replica2", "replica3"]
    for i, name in enumerate(replicas):
        cmd = services[name]["command"]
        assert cmd[:2] == ["replica", "--config"] and cmd[cmd.index("--id") + 1] == str(i)
        assert services[name]["depends_on"]["keygen"]["condition"] == "service_completed_successfully"
    keygen = " ".join(services["keygen"]["command"])
    assert "--hosts replica0,replica1,replica2,replica3" in keygen


def test_keygen_hosts_option_writes_one_host_per_replica(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bft", "keygen", "--out", str(tmp_path), "--hosts", "a,b,c,d"],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert re.findall(r'host = "(\w)"', (tmp_path / "cluster.toml").read_text()) == ["a", "b", "c", "d"]


def test_dockerfile_copies_what_exists() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src

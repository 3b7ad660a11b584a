"""The Docker files' structure, checked without an engine: `make docker-test`
(deploy/docker-test.sh) builds and runs them on a real one, and is not part of `make test`."""

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


def test_each_replica_container_holds_only_its_own_private_key() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    keygen = " ".join(services["keygen"]["command"])
    # Volume keyI is filled with replica I's key alone.
    assert "for i in 0 1 2 3; do install -o bft -g bft -m 0600 /tmp/gen/keys/replica-$$i.key /key$$i/; done" in keygen
    for i in range(4):
        volumes = services[f"replica{i}"]["volumes"]
        assert sorted(volumes) == sorted(["cluster:/cluster:ro", f"key{i}:/cluster/keys:ro", f"data{i}:/data"])
        assert services[f"replica{i}"]["ports"] == [f"127.0.0.1:${{BFT_ADMIN{i}:-{7100 + i}}}:{7100 + i}"]
    client = services["client"]
    assert "clientkeys:/cluster/keys:ro" in client["volumes"]
    assert client["devices"] == ["/dev/fuse"] and client["cap_add"] == ["SYS_ADMIN"]
    assert client["command"][:2] == ["mount", "--foreground"]


def test_keygen_hosts_option_writes_one_host_per_replica(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bft", "keygen", "--out", str(tmp_path), "--hosts", "a,b,c,d"],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert re.findall(r'host = "(\w)"', (tmp_path / "cluster.toml").read_text()) == ["a", "b", "c", "d"]


def test_dockerfile_runs_replicas_unprivileged_and_checks_their_health() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "ARG BASE_IMAGE=python:3.11-slim" in text
    assert text.count("FROM ${BASE_IMAGE}") == 2  # multi-stage, one base
    assert "\nUSER bft\n" in text and "HEALTHCHECK" in text and "bft status" in text


def test_dockerfile_copies_what_exists() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src

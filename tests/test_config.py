"""Key generation, loading cluster.toml (every problem is one ConfigError line) and the CLI's errors."""

from __future__ import annotations

import copy
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from bft import config
from bft.config import ConfigError
from bft.core.params import Params
from bft.crypto import CLIENT, REPLICA, Keyring

BASE_PORT = 17100
KEY_NAMES = {f"replica-{i}.key" for i in range(4)} | {"client-0.key", "client-1.key"}


@pytest.fixture
def cluster_dir(tmp_path) -> Path:
    config.keygen(tmp_path, f=1, clients=2, base_port=BASE_PORT)
    return tmp_path


def _doc(cluster_dir: Path) -> dict:
    return tomllib.loads((cluster_dir / "cluster.toml").read_text())


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _config_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as exc_info:
        fn(*args, **kwargs)
    message = str(exc_info.value)
    assert message
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------
# keygen


def test_keygen_writes_config_and_private_keys(tmp_path):
    path = config.keygen(tmp_path / "c", f=1, clients=2, base_port=BASE_PORT)
    assert path == tmp_path / "c" / "cluster.toml"
    assert path.is_file()
    keys = tmp_path / "c" / "keys"
    assert {p.name for p in keys.iterdir()} == KEY_NAMES
    for p in keys.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        private = tomllib.loads(p.read_text())
        assert set(private) == {"sign_private", "kex_private"}
        assert all(len(bytes.fromhex(v)) == 32 for v in private.values())
    text = path.read_text()
    for p in keys.iterdir():  # no private key material in the shared config
        for value in tomllib.loads(p.read_text()).values():
            assert value not in text


def test_keygen_output_loads_and_every_key_matches(cluster_dir):
    cluster = config.load(cluster_dir / "cluster.toml")
    assert cluster.f == 1
    assert cluster.n == 4
    assert cluster.params == Params()
    assert [r.id for r in cluster.replicas] == [0, 1, 2, 3]
    assert [r.port for r in cluster.replicas] == [BASE_PORT + i for i in range(4)]
    assert [r.admin_port for r in cluster.replicas] == [BASE_PORT + 100 + i for i in range(4)]
    assert {r.host for r in cluster.replicas} == {"127.0.0.1"}
    assert sorted(cluster.clients) == [0, 1]
    assert cluster.keys_dir == cluster_dir / "keys"
    rings = [cluster.keyring(REPLICA, i) for i in range(4)] + [cluster.keyring(CLIENT, c) for c in range(2)]
    assert all(isinstance(r, Keyring) for r in rings)
    assert [r.me for r in rings] == [(REPLICA, i) for i in range(4)] + [(CLIENT, 0), (CLIENT, 1)]
    assert len({r.sign(1, b"x") for r in rings}) == 6  # six distinct signing keys


def test_keygen_writes_custom_params_and_hosts(tmp_path):
    params = Params(checkpoint_interval=16, log_window=64)
    hosts = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    path = config.keygen(tmp_path, f=1, clients=0, base_port=BASE_PORT, params=params, hosts=hosts)
    cluster = config.load(path)
    assert cluster.params == params
    assert [r.host for r in cluster.replicas] == hosts
    assert cluster.clients == {}


def test_keygen_refuses_to_overwrite_without_force(cluster_dir):
    before = _snapshot(cluster_dir)
    message = _config_error(config.keygen, cluster_dir, f=1, clients=2, base_port=BASE_PORT)
    assert "--force" in message
    assert str(cluster_dir / "cluster.toml") in message
    assert _snapshot(cluster_dir) == before  # nothing was touched


def test_keygen_with_force_replaces_cluster_and_keys(cluster_dir):
    before = _snapshot(cluster_dir)
    old = config.load(cluster_dir / "cluster.toml")
    config.keygen(cluster_dir, f=1, clients=2, base_port=BASE_PORT + 1000, force=True)
    after = _snapshot(cluster_dir)
    assert set(after) == set(before)
    assert all(after[name] != before[name] for name in before)
    new = config.load(cluster_dir / "cluster.toml")
    assert new.replicas[0].port == BASE_PORT + 1000
    assert all(o.keys != n.keys for o, n in zip(old.replicas, new.replicas, strict=True))
    for name in KEY_NAMES:
        assert stat.S_IMODE((cluster_dir / "keys" / name).stat().st_mode) == 0o600
    new.keyring(REPLICA, 2)  # the new keys match the new config


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"f": -1}, "--f"),
        ({"f": 65}, "--f"),
        ({"clients": -1}, "--clients"),
        ({"base_port": 0}, "--base-port"),
        ({"base_port": 65535}, "--base-port"),
        ({"hosts": ["a", "b"]}, "2 hosts given for 4 replicas"),
    ],
)
def test_keygen_rejects_bad_arguments(tmp_path, kwargs, needle):
    args = {"f": 1, "clients": 1, "base_port": BASE_PORT} | kwargs
    assert needle in _config_error(config.keygen, tmp_path / "out", **args)
    assert not (tmp_path / "out" / "cluster.toml").exists()


# ---------------------------------------------------------------------------------------------
# load


def test_load_missing_file(tmp_path):
    message = _config_error(config.load, tmp_path / "nope.toml")
    assert "not found" in message
    assert "nope.toml" in message


def test_load_directory_is_an_error(tmp_path):
    assert "cannot read config file" in _config_error(config.load, tmp_path)


def test_load_invalid_toml(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text("f = 1\n[[replicas]\nid = 0\n")
    message = _config_error(config.load, path)
    assert "is not valid TOML" in message
    assert str(path) in message


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def mutate(doc: dict) -> None:
        target = doc
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return mutate


def _delete(*keys):
    def mutate(doc: dict) -> None:
        target = doc
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]

    return mutate


LOAD_ERRORS = {
    "f-needs-7-replicas": (_set("f", 2), "f = 2 needs exactly 7 [[replicas]] entries"),
    "one-replica-missing": (lambda d: d["replicas"].pop(), "f = 1 needs exactly 4 [[replicas]] entries"),
    "no-replicas": (_delete("replicas"), "needs exactly 4"),
    "f-not-int": (_set("f", "1"), "'f' must be an integer"),
    "f-missing": (_delete("f"), "'f' must be an integer"),
    "bad-hex-sign-key": (_set("replicas", 1, "sign_key", "zz" * 32), "replica 1: 'sign_key' must be 32 bytes of hex"),
    "short-kex-key": (_set("replicas", 2, "kex_key", "ab" * 31), "replica 2: 'kex_key' must be 32 bytes of hex"),
    "int-key": (_set("replicas", 0, "sign_key", 5), "'sign_key' must be 32 bytes of hex"),
    "client-bad-hex": (_set("clients", 1, "kex_key", "0x12"), "client 1: 'kex_key' must be 32 bytes of hex"),
    "unknown-param": (_set("protocol", "bogus_knob", 3), "unknown protocol parameter 'bogus_knob'"),
    "window-not-multiple": (
        _set("protocol", "log_window", 200),
        "log_window must be a positive multiple of checkpoint_interval",
    ),
    "zero-param": (_set("protocol", "batch_size_max", 0), "batch_size_max must be a positive integer"),
    "str-param": (_set("protocol", "inflight_max", "2"), "inflight_max must be a positive integer"),
    "frame-below-op": (
        _set("protocol", "frame_bytes_max", 1024),
        "frame_bytes_max must exceed op_bytes_max by at least 4096",
    ),
    "protocol-not-table": (_set("protocol", 3), "[protocol] must be a table"),
    "replica-out-of-order": (_set("replicas", 2, "id", 3), "replica 2: entries must be listed with id = 0, 1, 2"),
    "empty-host": (_set("replicas", 1, "host", ""), "replica 1: 'host' must be a non-empty string"),
    "port-out-of-range": (_set("replicas", 3, "port", 70000), "replica 3: 'port' must be an integer in [1, 65535]"),
    "duplicate-client": (_set("clients", 1, "id", 0), "client id 0 is listed twice"),
    "negative-client": (_set("clients", 0, "id", -4), "client: 'id' must be an integer"),
    "stray-setting": (_set("replica_count", 4), "unknown setting 'replica_count'"),
    "service-not-table": (_set("bfs", 3), "unknown setting 'bfs'"),
}


@pytest.mark.parametrize("case", sorted(LOAD_ERRORS))
def test_load_errors_are_one_line_config_errors(cluster_dir, case):
    mutate, needle = LOAD_ERRORS[case]
    doc = copy.deepcopy(_doc(cluster_dir))
    mutate(doc)
    path = cluster_dir / "cluster.toml"
    path.write_text(tomli_w.dumps(doc))
    message = _config_error(config.load, path)
    assert needle in message
    assert message.startswith(str(path))


def test_load_accepts_the_unmodified_round_trip(cluster_dir):
    # The same rewrite the error cases use, without a change, still loads.
    path = cluster_dir / "cluster.toml"
    original = config.load(path)
    path.write_text(tomli_w.dumps(_doc(cluster_dir)))
    assert config.load(path) == original


def test_load_defaults_omitted_protocol_parameters(cluster_dir):
    doc = _doc(cluster_dir)
    doc["protocol"] = {"checkpoint_interval": 32, "log_window": 64}
    path = cluster_dir / "cluster.toml"
    path.write_text(tomli_w.dumps(doc))
    assert config.load(path).params == Params(checkpoint_interval=32, log_window=64)


def test_service_tables_are_passed_through_unchecked(cluster_dir):
    """Each service checks its own options (bft/service.py); the loader only hands them over."""
    doc = _doc(cluster_dir)
    assert doc["bfs"]["name_max"] == 255  # keygen writes out what each service declares
    doc["bfs"]["name_max"] = 8
    doc["blobstore"] = {"anything": ["goes", 1]}
    path = cluster_dir / "cluster.toml"
    path.write_text(tomli_w.dumps(doc))
    services = config.load(path).services
    assert services["bfs"]["name_max"] == 8
    assert services["blobstore"] == {"anything": ["goes", 1]}


def test_keygen_writes_only_the_service_tables_given(tmp_path):
    config.keygen(tmp_path, f=0, clients=0, base_port=BASE_PORT, services={"kv2": {"shards": 2}})
    doc = _doc(tmp_path)
    assert doc["kv2"] == {"shards": 2}
    assert "bfs" not in doc
    assert "replicas" in _config_error(config.keygen, tmp_path / "x", f=0, services={"replicas": {}})


def test_key_file_not_matching_config(cluster_dir):
    keys = cluster_dir / "keys"
    (keys / "replica-1.key").write_bytes((keys / "replica-2.key").read_bytes())
    cluster = config.load(cluster_dir / "cluster.toml")
    message = _config_error(cluster.keyring, REPLICA, 1)
    assert "replica-1.key does not match the public keys" in message
    cluster.keyring(REPLICA, 2)  # the original still matches

    (keys / "client-0.key").write_bytes((keys / "client-1.key").read_bytes())
    assert "client-0.key does not match" in _config_error(cluster.keyring, CLIENT, 0)


def test_key_file_missing_or_malformed(cluster_dir):
    keys = cluster_dir / "keys"
    cluster = config.load(cluster_dir / "cluster.toml")
    (keys / "replica-3.key").unlink()
    assert "replica-3.key not found" in _config_error(cluster.keyring, REPLICA, 3)
    (keys / "replica-0.key").write_text('sign_private = "00"\nkex_private = "00"\n')
    assert "'sign_private' must be 32 bytes of hex" in _config_error(cluster.keyring, REPLICA, 0)
    (keys / "replica-1.key").write_text("sign_private = \n")
    assert "cannot read key file" in _config_error(cluster.keyring, REPLICA, 1)


@pytest.mark.parametrize(("kind", "node_id", "needle"), [
    (CLIENT, 2, "client id 2 is not authorised"),
    (CLIENT, 99, "client id 99 is not authorised"),
    (REPLICA, 4, "replica id 4 is not in"),
    (REPLICA, -1, "replica id -1 is not in"),
])
def test_keyring_for_unknown_node(cluster_dir, kind, node_id, needle):
    cluster = config.load(cluster_dir / "cluster.toml")
    assert needle in _config_error(cluster.keyring, kind, node_id)


# ---------------------------------------------------------------------------------------------
# CLI


def _bft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bft", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("bft: error:"), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_cli_keygen_twice(tmp_path):
    out = tmp_path / "cluster"
    first = _bft("keygen", "--out", str(out), "--f", "1", "--clients", "2", "--base-port", str(BASE_PORT), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "wrote" in first.stdout
    assert first.stderr == ""
    assert config.load(out / "cluster.toml").n == 4

    before = _snapshot(out)
    second = _bft("keygen", "--out", str(out), cwd=tmp_path)
    assert second.returncode == 2
    assert second.stdout == ""
    assert "--force" in _one_error_line(second.stderr)
    assert _snapshot(out) == before


def test_cli_replica_with_missing_config(tmp_path):
    result = _bft("replica", "--config", "/nonexistent", "--id", "0", cwd=tmp_path)
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert "/nonexistent" in line
    assert "not found" in line


def test_cli_invoke_with_bad_timeout(tmp_path):
    result = _bft("invoke", "--config", "/nonexistent", "--timeout", "soon", "get", "k", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: bft invoke")
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bft invoke: error: argument --timeout")
    assert "'soon'" in last
    assert "Traceback" not in result.stderr


def test_cli_help(tmp_path):
    result = _bft("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: bft")
    for command in ("keygen", "replica", "up", "invoke", "serve", "status", "sim"):
        assert command in result.stdout
    assert result.stderr == ""


def test_cli_bfs_df_errors_are_one_line(cluster_dir, tmp_path):
    def bfs_df(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "bfs", "df", *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bfs: error:"), result.stderr
        return lines[0]

    assert "give --config" in bfs_df()
    assert "not found" in bfs_df("--config", str(tmp_path / "missing.toml"))
    # Nobody listens on the cluster's ports.
    assert "does not answer" in bfs_df("--config", str(cluster_dir / "cluster.toml"), "--timeout", "0.5")

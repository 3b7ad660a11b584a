"""Cluster configuration (TOML) and key generation.

``cluster.toml`` holds f, the protocol parameters with their defaults written out, every replica
(id, host, port, admin port, public keys), every authorised client (id, public keys), and a table
of options per service (``[bfs]``), which is the service's own to check (bft/service.py). Each
node's private keys live in ``keys/replica-I.key`` or ``keys/client-C.key`` beside it, mode 0600.
Every problem is reported as a ``ConfigError`` whose message is one line naming it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import tomli_w

from bft.core.params import Params
from bft.crypto import CLIENT, REPLICA, Keyring, PrivateKeys, PublicKeys
from bft.service import service_defaults

# The top-level keys of cluster.toml; any other table holds a service's options.
CLUSTER_KEYS = frozenset({"f", "protocol", "replicas", "clients"})


class ConfigError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    id: int
    host: str
    port: int
    admin_port: int
    keys: PublicKeys


@dataclass(frozen=True, slots=True)
class Cluster:
    path: Path
    f: int
    params: Params
    replicas: tuple[ReplicaInfo, ...]
    clients: dict[int, PublicKeys]
    services: dict[str, dict] = field(default_factory=dict)  # each service's options table, e.g. [bfs]

    @property
    def n(self) -> int:
        return len(self.replicas)

    @property
    def keys_dir(self) -> Path:
        return self.path.parent / "keys"

    def key_path(self, kind: str, node_id: int) -> Path:
        return self.keys_dir / f"{kind}-{node_id}.key"

    def keyring(self, kind: str, node_id: int) -> Keyring:
        if kind == REPLICA and not 0 <= node_id < self.n:
            raise ConfigError(f"replica id {node_id} is not in {self.path} (ids 0..{self.n - 1})")
        if kind == CLIENT and node_id not in self.clients:
            raise ConfigError(f"client id {node_id} is not authorised in {self.path}")
        private = load_private(self.key_path(kind, node_id))
        expected = self.replicas[node_id].keys if kind == REPLICA else self.clients[node_id]
        if private.public() != expected:
            raise ConfigError(f"{self.key_path(kind, node_id)} does not match the public keys in {self.path}")
        return Keyring(
            (kind, node_id), private, {r.id: r.keys for r in self.replicas}, dict(self.clients)
        )


def _hex(table: dict, key: str, where: str, size: int = 32) -> bytes:
    value = table.get(key)
    try:
        raw = bytes.fromhex(value)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != size:
        raise ConfigError(f"{where}: '{key}' must be {size} bytes of hex")
    return raw


def _int(table: dict, key: str, where: str, lo: int = 0, hi: int = 2**31) -> int:
    value = table.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise ConfigError(f"{where}: '{key}' must be an integer in [{lo}, {hi}]")
    return value


def _public(table: dict, where: str) -> PublicKeys:
    return PublicKeys(_hex(table, "sign_key", where), _hex(table, "kex_key", where))


def load(path: str | os.PathLike) -> Cluster:
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found (create one with 'bft keygen --out DIR')") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    f = _int(doc, "f", str(p), 0, 64)
    proto = doc.get("protocol", {})
    if not isinstance(proto, dict):
        raise ConfigError(f"{p}: [protocol] must be a table")
    known = {fl.name for fl in fields(Params)}
    unknown = set(proto) - known
    if unknown:
        raise ConfigError(f"{p}: unknown protocol parameter {sorted(unknown)[0]!r}")
    try:
        params = Params(**proto)
    except ValueError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    rows = doc.get("replicas")
    if not isinstance(rows, list) or len(rows) != 3 * f + 1:
        raise ConfigError(f"{p}: f = {f} needs exactly {3 * f + 1} [[replicas]] entries")
    replicas = []
    for i, row in enumerate(rows):
        where = f"{p}: replica {i}"
        if not isinstance(row, dict) or type(row.get("id")) is not int or row.get("id") != i:
            raise ConfigError(f"{where}: entries must be listed with id = 0, 1, 2, ... in order")
        host = row.get("host")
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{where}: 'host' must be a non-empty string")
        replicas.append(
            ReplicaInfo(
                i, host, _int(row, "port", where, 1, 65535), _int(row, "admin_port", where, 0, 65535),
                _public(row, where),
            )
        )
    clients = {}
    rows = doc.get("clients", [])
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ConfigError(f"{p}: [[clients]] entries must be tables with id, sign_key and kex_key")
    for row in rows:
        where = f"{p}: client"
        cid = _int(row, "id", where)
        if cid in clients:
            raise ConfigError(f"{p}: client id {cid} is listed twice")
        clients[cid] = _public(row, f"{where} {cid}")
    services = {}
    for name in sorted(set(doc) - CLUSTER_KEYS):
        if not isinstance(doc[name], dict):
            raise ConfigError(f"{p}: unknown setting {name!r} (a service's options go in its own [{name}] table)")
        services[name] = doc[name]
    return Cluster(p, f, params, tuple(replicas), clients, services)


def load_private(path: Path) -> PrivateKeys:
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"key file {path} not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}") from None
    return PrivateKeys(_hex(doc, "sign_private", str(path)), _hex(doc, "kex_private", str(path)))


def keygen(
    out: str | os.PathLike,
    f: int = 1,
    clients: int = 4,
    host: str = "127.0.0.1",
    base_port: int = 7000,
    force: bool = False,
    params: Params | None = None,
    hosts: list[str] | None = None,
    services: dict[str, dict] | None = None,
) -> Path:
    """Write ``out/cluster.toml`` and ``out/keys/*.key``; refuse to overwrite unless ``force``.
    ``services`` are the options tables to write (default: each installed service's defaults)."""
    if f < 0 or f > 64:
        raise ConfigError("--f must be between 0 and 64")
    if clients < 0 or clients > 100_000:
        raise ConfigError("--clients must be between 0 and 100000")
    n = 3 * f + 1
    if not 1 <= base_port <= 65535 - 200 - n:
        raise ConfigError(f"--base-port must leave room for {n} replica ports and their admin ports")
    if hosts is not None and len(hosts) != n:
        raise ConfigError(f"{len(hosts)} hosts given for {n} replicas")
    services = service_defaults() if services is None else services
    if not CLUSTER_KEYS.isdisjoint(services):
        raise ConfigError(f"a service cannot be named {sorted(CLUSTER_KEYS & set(services))[0]!r}")
    root = Path(out)
    path = root / "cluster.toml"
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to replace the cluster and its keys")
    keys_dir = root / "keys"
    try:
        keys_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {keys_dir}: {exc.strerror}") from None

    def write_key(name: str) -> PublicKeys:
        private = PrivateKeys.generate()
        key_path = keys_dir / name
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(tomli_w.dumps({"sign_private": private.sign.hex(), "kex_private": private.kex.hex()}))
        os.chmod(key_path, 0o600)
        return private.public()

    doc = {
        "f": f,
        "protocol": asdict(params or Params()),
        **services,  # each service's options, as a table of its name
        "replicas": [],
        "clients": [],
    }
    for i in range(n):
        pk = write_key(f"{REPLICA}-{i}.key")
        doc["replicas"].append(
            {
                "id": i,
                "host": hosts[i] if hosts else host,
                "port": base_port + i,
                "admin_port": base_port + 100 + i,
                "sign_key": pk.sign.hex(),
                "kex_key": pk.kex.hex(),
            }
        )
    for c in range(clients):
        pk = write_key(f"{CLIENT}-{c}.key")
        doc["clients"].append({"id": c, "sign_key": pk.sign.hex(), "kex_key": pk.kex.hex()})
    path.write_text(
        "# PBFT cluster: f, protocol parameters, replicas and authorised clients.\n"
        "# Private keys are in keys/ beside this file (mode 0600); copy each to its own host only.\n"
        + tomli_w.dumps(doc)
    )
    return path

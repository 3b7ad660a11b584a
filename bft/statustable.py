"""Every replica's ``/status`` at once, for ``bft status``: fetched in parallel, then an
etcd-style table (``etcdctl endpoint status``) for people or JSON for programs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from bft.config import Cluster

# Columns of the table: (heading, key of the row).
COLUMNS = (
    ("ENDPOINT", "endpoint"), ("ID", "replica"), ("VIEW", "view"), ("PRIMARY", "primary"),
    ("IS PRIMARY", "is_primary"), ("EXECUTED", "executed"), ("STABLE", "stable_checkpoint"),
    ("VIEW CHANGING", "view_changing"), ("DROPPED", "dropped_total"), ("UPTIME S", "uptime_s"),
    ("ERRORS", "error"),
)
_INT_KEYS = ("view", "primary", "executed", "stable_checkpoint")


def row_of(endpoint: str, replica: int, s: object) -> dict:
    """One replica's row from what its admin port answered; an ``error`` instead when it is not
    a replica's status (anything may listen on an admin port)."""
    row: dict = {"endpoint": endpoint, "replica": replica}
    dropped = s.get("dropped") if isinstance(s, dict) else None
    if not isinstance(dropped, dict) or not all(type(s.get(k)) is int for k in _INT_KEYS) \
            or not all(type(v) is int for v in dropped.values()):
        return row | {"error": "answered, but not with a replica's status"}
    row |= {k: s[k] for k in _INT_KEYS}
    row |= {
        "is_primary": s["primary"] == replica,
        "view_changing": bool(s.get("view_changing", False)),
        "dropped_total": sum(dropped.values()),
        "dropped": dropped,
        "uptime_s": s.get("uptime_s"),
        "error": "",
    }
    return row


def fetch(url: str, timeout_s: float) -> object:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.load(resp)


def collect(cluster: Cluster, timeout_s: float, only: int | None = None) -> list[dict]:
    """A row per replica (or only replica ``only``), each asked at the same time."""
    replicas = [r for r in cluster.replicas if only is None or r.id == only]

    def one(r) -> dict:
        endpoint = f"{r.host}:{r.admin_port}"
        try:
            return row_of(endpoint, r.id, fetch(f"http://{endpoint}/status", timeout_s))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return {"endpoint": endpoint, "replica": r.id, "error": f"unreachable ({getattr(exc, 'reason', exc)})"}

    with ThreadPoolExecutor(max_workers=max(1, len(replicas))) as pool:
        return list(pool.map(one, replicas))


def table(rows: list[dict]) -> str:
    """The rows as a boxed table, one line per replica."""
    cells = [[h for h, _ in COLUMNS]] + [[_cell(row.get(k)) for _, k in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(values: list[str]) -> str:
        return "|" + "|".join(f" {v:^{w}} " for v, w in zip(values, widths, strict=True)) + "|"

    return "\n".join([rule, line(cells[0]), rule, *(line(c) for c in cells[1:]), rule])


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

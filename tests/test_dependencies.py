"""Dependencies run one way: services register by entry point, bft imports no bfs, the client
library imports no replica, server or FUSE package, and no package imports another's private
names. (lint-imports checks the import contracts in pyproject.toml statically; these tests check
what actually gets imported, and the errors a user sees.)"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import bft
from bft.service import KVService, NullService, make_service, service_defaults, service_names

ROOT = Path(bft.__file__).parent.parent
PACKAGES = ("bft", "bfs", "client", "bench")


def _imported_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return set(out.stdout.split())


def test_the_client_library_loads_no_replica_server_or_fuse_code() -> None:
    loaded = _imported_after("import client")
    unwanted = {"bft.runtime.node", "bft.core.replica", "bft.cli", "aiohttp", "prometheus_client", "pyfuse3"}
    assert not loaded & unwanted, sorted(loaded & unwanted)


def test_bft_loads_no_bfs_until_a_service_is_asked_for() -> None:
    loaded = _imported_after("import bft.cli, bft.local, bft.launch, bft.runtime.node, bft.sim.simulator")
    assert not {m for m in loaded if m == "bfs" or m.startswith("bfs.")}


def test_services_are_found_through_their_entry_points() -> None:
    assert {"null", "kv", "bfs"} <= set(service_names())
    assert isinstance(make_service("kv"), KVService)
    assert isinstance(make_service("null", {}), NullService)
    assert type(make_service("bfs")).__module__ == "bfs.fs"
    with pytest.raises(ValueError) as exc_info:
        make_service("nfs")
    message = str(exc_info.value)
    assert "\n" not in message
    assert "unknown service 'nfs'" in message
    assert all(name in message for name in ("null", "kv", "bfs"))
    with pytest.raises(ValueError, match="takes no options"):
        make_service("kv", {"buckets": 3})


def test_bfs_declares_and_checks_its_own_options() -> None:
    defaults = service_defaults()
    assert set(defaults) == {"bfs"}
    assert defaults["bfs"]["name_max"] == 255
    assert make_service("bfs", defaults["bfs"]).limits.name_max == 255
    for bad, needle in (({"name_max": 300}, "name_max"), ({"inodes_max": "many"}, "inodes_max"),
                        ({"colour": 3}, "unknown [bfs] setting 'colour'")):
        with pytest.raises(ValueError) as exc_info:
            make_service("bfs", bad)
        assert needle in str(exc_info.value)
        assert "\n" not in str(exc_info.value)


def test_bfs_mount_without_pyfuse3_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    from bfs import cli

    monkeypatch.setitem(sys.modules, "pyfuse3", None)  # as if not installed: importing it fails
    with pytest.raises(SystemExit) as exc_info:
        cli.main(["mount", "--config", str(tmp_path / "cluster.toml"), str(tmp_path)])
    assert exc_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("bfs: error: mounting needs pyfuse3")
    assert "bft-bfs[fuse]" in lines[0]


def _private_imports(path: Path, module: str) -> list[str]:
    """``from M import _x`` and ``import M._x`` where M is not in this module's own package."""
    package = module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            source = node.module
            if source != package and not source.startswith(package + "."):
                found += [f"{module} imports {source}.{a.name}" for a in node.names if a.name.startswith("_")
                          and not a.name.startswith("__")]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if any(part.startswith("_") and not part.startswith("__") for part in a.name.split(".")):
                    found.append(f"{module} imports {a.name}")
    return found


def test_no_package_imports_another_packages_private_names() -> None:
    problems = []
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            problems += _private_imports(path, module)
    assert not problems, "\n".join(problems)

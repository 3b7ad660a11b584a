"""bft/core must stay sans-IO and deterministic: no networking, clocks, randomness or OS access,
neither in its own modules nor in any module of ours that they import, however indirectly.

The imports are read from the source (every import statement, at any depth in a file, relative
ones resolved), and followed through every module of the project they reach, parent packages
included, since importing ``a.b.c`` runs ``a`` and ``a.b`` first. lint-imports checks the same
for the packages of the import-linter contracts; this test also names the chain that leads to a
forbidden import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bft

FORBIDDEN = {"asyncio", "socket", "time", "random", "os", "threading", "subprocess", "selectors", "datetime"}
FORBIDDEN_EXTERNAL = {"aiohttp", "prometheus_client", "uvloop", "pyfuse3"}
FORBIDDEN_OURS = ("bft.runtime", "bft.cli", "bft.sim", "bft.local", "bft.launch")


def _source(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(root: Path, module: str, path: Path) -> list[tuple[str, int]]:
    """Every module that ``module`` imports, as (absolute name, line)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module
            found.append((name, node.lineno))
            # ``from package import submodule`` imports the submodule too
            found += [(f"{name}.{a.name}", node.lineno) for a in node.names if _source(root, f"{name}.{a.name}")]
    return found


def _forbidden(name: str) -> bool:
    top = name.split(".")[0]
    return top in FORBIDDEN | FORBIDDEN_EXTERNAL or any(name == m or name.startswith(m + ".") for m in FORBIDDEN_OURS)


def violations(root: Path, package: str, start: str) -> list[str]:
    """Each forbidden import reachable from the modules of package ``start`` (under ``root``),
    following the imports of every module of ``package``, with the chain that reaches it."""
    start_dir = root.joinpath(*start.split("."))
    queue = [f"{start}.{p.stem}" if p.name != "__init__.py" else start for p in sorted(start_dir.glob("*.py"))]
    assert queue, f"no modules in {start_dir}"
    via: dict[str, str | None] = dict.fromkeys(queue)
    problems = []
    while queue:
        module = queue.pop(0)
        path = _source(root, module)
        assert path is not None, f"{module} has no source under {root}"
        for name, line in _imports(root, module, path):
            if _forbidden(name):
                chain, m = [], module
                while m is not None:
                    chain.append(m)
                    m = via[m]
                problems.append(f"{' -> '.join(reversed(chain))} imports {name} ({path.name}:{line})")
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the module and the packages it is in
                ours = ".".join(parts[:i])
                if parts[0] == package and ours not in via and _source(root, ours) is not None:
                    via[ours] = module
                    queue.append(ours)
    return problems


@pytest.mark.parametrize("start", ["bft.core", "bft.casd"])
def test_core_imports_nothing_that_does_io_however_indirectly(start: str) -> None:
    root = Path(bft.__file__).parent.parent
    problems = violations(root, "bft", start)
    assert not problems, "\n".join(problems)


def test_the_check_follows_imports_through_other_modules(tmp_path: Path) -> None:
    """The checker itself: an IO import two modules away from the core, inside a function,
    reached through a relative ``from ..package import module``, is found, with its chain."""
    files = {
        "pkg/__init__.py": "",
        "pkg/core/__init__.py": "",
        "pkg/core/pure.py": "import hashlib\nfrom ..lib import helper\n",
        "pkg/lib/__init__.py": "",
        "pkg/lib/helper.py": "from pkg import util\n",
        "pkg/util.py": "def f():\n    import time\n    return time\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    problems = violations(tmp_path, "pkg", "pkg.core")
    assert problems == ["pkg.core.pure -> pkg.lib.helper -> pkg.util imports time (util.py:2)"], problems

"""bft/core must stay sans-IO and deterministic: no networking, clocks, randomness or OS access."""

from __future__ import annotations

import ast
from pathlib import Path

import bft.core

FORBIDDEN = {"asyncio", "socket", "time", "random", "os", "threading", "subprocess", "selectors", "datetime"}


def test_core_imports_nothing_that_does_io() -> None:
    core = Path(bft.core.__file__).parent
    files = sorted(core.glob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"

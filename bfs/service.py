"""BFS as a bft service: the factory that the ``bfs`` entry point of ``bft.services`` names.

Its options are the ``[bfs]`` table of cluster.toml: the fields of ``Limits``. They are checked
here, by the file system that owns them, not by bft's configuration loader.
"""

from __future__ import annotations

from dataclasses import asdict, fields

from bfs.fs import FileSystem, Limits

_SETTINGS = frozenset(f.name for f in fields(Limits))


def make(options: dict) -> FileSystem:
    """A fresh file system with the limits in ``options``; ValueError (one line) if one is bad."""
    unknown = sorted(set(options) - _SETTINGS)
    if unknown:
        raise ValueError(f"unknown [bfs] setting {unknown[0]!r} (known: {', '.join(sorted(_SETTINGS))})")
    return FileSystem(Limits(**options))


make.defaults = asdict(Limits())  # written out by `bft keygen`, to be edited there

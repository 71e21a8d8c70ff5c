"""Named SQL: each backend keeps every statement it runs in one .sql file.

Format (as in Procrastinate): a line `-- name --`, comment lines describing
the query, then the statement up to the next name line.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

_NAME = re.compile(r"^-- ([a-z_][a-z0-9_]*) --\s*$")


def load_queries(backend: str) -> dict[str, str]:
    """All named statements of a backend."""
    text = (
        resources.files("mainspring.store").joinpath("sql").joinpath(f"{backend}.sql").read_text()
    )
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        match = _NAME.match(line)
        if match:
            if name:
                queries[name] = "\n".join(lines).strip()
            name, lines = match.group(1), []
        elif name and not line.startswith("--"):
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip()
    return queries


def load_migrations(backend: str) -> list[tuple[int, str, str]]:
    """The backend's migrations as (version, name, sql), in order."""
    folder = resources.files("mainspring.store").joinpath("migrations").joinpath(backend)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            stem = Path(entry.name).stem
            version = int(stem.split("_", 1)[0])
            found.append((version, stem, entry.read_text()))
    return sorted(found)

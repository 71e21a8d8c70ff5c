"""The plain-text report every model benchmark prints: a title, the checks, a summary."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from mainspring.bench.jobs import Check


def host_line(host: Mapping[str, Any], duration_s: float) -> str:
    """Where it ran: CPUs, Python, database, load at the start, revision, total time."""
    return (
        f"{host.get('cpu_count')} CPUs, {host.get('python')}, {host.get('db_version')}; load "
        f"{host.get('load_average_at_start')}; revision {host.get('revision')}; "
        f"total {duration_s:.0f} s"
    )


def render_checks(
    title: str, checks: Sequence[Check], lines: Sequence[str], *, ratio: bool = False
) -> str:
    """The checks as a table under `title` (printed apart: as a table title it would wrap at
    the table's width), then `lines`; a "ratio" column when `ratio`."""
    from rich.console import Console
    from rich.table import Table

    columns = (
        ("metric", "rate", "ratio", "target", "")
        if ratio
        else ("metric", "mainspring", "target", "")
    )
    table = Table(*columns)
    for c in checks:
        verdict = "" if c.passed is None else ("✓ pass" if c.passed else "✗ FAIL")
        cells = (
            (c.metric, c.mainspring, c.ratio, c.target)
            if ratio
            else (c.metric, c.mainspring, c.target)
        )
        table.add_row(*cells, verdict)
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False, color_system=None)
    console.print(title, highlight=False)
    console.print(table)
    for line in lines:
        console.print(line, highlight=False)
    return out.getvalue()

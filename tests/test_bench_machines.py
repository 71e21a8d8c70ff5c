"""`mainspring bench machines`: a small run is consistent on both backends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mainspring.cli import main

MACHINES = 60


def bench_machines(backend: str, url: str) -> dict[str, Any]:
    args = ["bench", "machines", "--backend", backend, "--url", url,
            "--machines", str(MACHINES), "--concurrency", "20", "--format", "json"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def assert_consistent(data: dict[str, Any]) -> None:
    assert data["machines"] == MACHINES
    assert data["completed"] == MACHINES
    assert data["transitions"] == 3 * MACHINES
    assert data["transitions_per_s"] > 0
    assert data["transitions_per_s"] == pytest.approx(data["machines_per_s"] * 3)
    assert [c["metric"] for c in data["checks"]][:3] == [
        "start (1,000/batch)", "machines (1 worker, c=20)", "transitions (3/machine)",
    ]  # fmt: skip


def test_bench_machines_completes_every_machine_on_sqlite(tmp_path: Path) -> None:
    data = bench_machines("sqlite", f"sqlite:///{tmp_path}/bench.db")
    assert_consistent(data)
    assert data["checks"][2]["passed"] is None  # the target is PostgreSQL's


def test_bench_machines_completes_every_machine_on_postgres(pg_url: str) -> None:
    data = bench_machines("postgres", pg_url)
    assert_consistent(data)
    assert data["checks"][2]["target"] == "≥ 3,000/s"

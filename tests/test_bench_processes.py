"""`mainspring bench processes`: a small run is consistent on both backends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from mainspring.cli import main


def bench(backend: str, url: str) -> dict[str, Any]:
    args = ["bench", "processes", "--backend", backend, "--url", url, "--messages", "640",
            "--children", "8", "--local-messages", "2000", "--redistribute", "100",
            "--pg-ops", "200", "--format", "json"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def assert_consistent(data: dict[str, Any]) -> None:
    for key in ("remote_per_s", "remote_send_per_s", "local_per_s", "local_durable_per_s"):
        assert data[key] > 0, key
    assert data["redistribute_s"] > 0 and 0 < data["redistribute_moved"] < 100
    assert 0 < data["pg_join_leave_us"] < 10_000 and data["pg_members_us"] > 0


def test_bench_processes_on_sqlite(tmp_path: Path) -> None:
    data = bench("sqlite", f"sqlite:///{tmp_path}/bench.db")
    assert_consistent(data)
    assert data["checks"][0]["passed"] is None  # the remote target is PostgreSQL's


def test_bench_processes_on_postgres(pg_url: str) -> None:
    data = bench("postgres", pg_url.rsplit("/", 1)[0])
    assert_consistent(data)
    assert data["checks"][0]["target"] == "≥ 5,000/s"

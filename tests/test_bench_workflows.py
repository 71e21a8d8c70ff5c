"""`mainspring bench workflows`: a small run is consistent on both backends, and beside DBOS."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mainspring.cli import main

WORKFLOWS = 40


def bench_workflows(backend: str, url: str, *extra: str) -> dict[str, Any]:
    args = ["bench", "workflows", "--backend", backend, "--url", url, "--workflows",
            str(WORKFLOWS), "--concurrency", "20", "--format", "json", *extra]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def assert_consistent(data: dict[str, Any]) -> None:
    assert data["workflows"] == WORKFLOWS
    assert data["completed"] == WORKFLOWS
    assert data["activities"] == 3 * WORKFLOWS
    assert data["commits"] >= 4 * WORKFLOWS  # at least a workflow task and three activities
    assert data["workflows_per_s"] > 0
    assert [c["metric"] for c in data["checks"]][:2] == [
        "start (1,000/batch)", "workflows (1 worker, c=20)",
    ]  # fmt: skip


def test_bench_workflows_completes_every_workflow_on_sqlite(tmp_path: Path) -> None:
    data = bench_workflows("sqlite", f"sqlite:///{tmp_path}/bench.db")
    assert_consistent(data)
    assert data["dbos"] is None  # DBOS runs on PostgreSQL only
    assert data["checks"][1]["passed"] is None  # the targets are PostgreSQL's


def test_bench_workflows_completes_every_workflow_on_postgres(pg_url: str) -> None:
    data = bench_workflows("postgres", pg_url, "--no-peers")
    assert_consistent(data)
    assert data["dbos"] is None
    assert data["checks"][1]["target"] == "≥ 500/s, ≥ 10x DBOS"


@pytest.mark.skipif(importlib.util.find_spec("dbos") is None, reason="dbos (a bench extra)")
def test_bench_workflows_runs_dbos_on_the_same_server_and_prints_the_ratio(pg_url: str) -> None:
    data = bench_workflows("postgres", pg_url)
    assert_consistent(data)
    dbos = data["dbos"]
    assert dbos["error"] is None
    assert dbos["completed"] == WORKFLOWS
    assert dbos["workflows_per_s"] > 0
    assert dbos["config"]["mode"] == "queue"
    assert data["dbos_ratio"] == pytest.approx(data["workflows_per_s"] / dbos["workflows_per_s"])
    assert data["checks"][1]["ratio"].endswith("x DBOS")


def test_bench_workflows_takes_longer_journals_and_the_cache_size(tmp_path: Path) -> None:
    data = bench_workflows(
        "sqlite", f"sqlite:///{tmp_path}/bench.db", "--activities", "5", "--workflow-cache", "0"
    )
    assert (data["steps"], data["workflow_cache"]) == (5, 0)
    assert (data["completed"], data["activities"]) == (WORKFLOWS, 5 * WORKFLOWS)
    assert data["checks"][2]["metric"] == "activities (5/workflow)"

"""The asset commands: list, graph, materialize (with its progress), lineage."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from mainspring.cli import main


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, ["--app", "asset_cli_app:app", *args],
                                catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


def test_assets_list_materialize_lineage_and_graph(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASSET_CLI_URL", db_url)
    sys.modules.pop("asset_cli_app", None)
    assert "numbers <- " not in invoke("assets", "graph")
    assert "a_squared --> a_total" in invoke("assets", "graph", "--format", "mermaid")
    listed = json.loads(invoke("assets", "list", "--format", "json"))
    assert [a["name"] for a in listed] == ["numbers", "squared", "total"]
    assert listed[1]["scatter"] and listed[0]["latest"] is None
    out = invoke("assets", "materialize", "total", "--worker", "--timeout", "60")
    assert "materialized total" in out and "squared instances" in out
    assert "total  " in invoke("assets", "lineage", "total")
    lineage = json.loads(invoke("assets", "lineage", "total", "--format", "json"))
    assert len(lineage["nodes"]) == 3
    assert "  squared" in invoke("assets", "lineage", "numbers", "--downstream")
    listed = json.loads(invoke("assets", "list", "--format", "json"))
    assert all(a["latest"] is not None for a in listed)
    sys.modules.pop("asset_cli_app", None)


def test_serve_refuses_to_start_without_a_secret(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASSET_CLI_URL", db_url)
    monkeypatch.delenv("MAINSPRING_SECRET", raising=False)
    result = CliRunner().invoke(main, ["serve", "--app", "asset_cli_app:app"])
    assert result.exit_code == 1 and "MAINSPRING_SECRET" in result.output

"""The examples run as users would run them, on both backends (local servers on 127.0.0.1)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))


def example(name: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(name)


def test_the_scraper_scatters_over_every_page(db_url: str) -> None:
    counts = example("scraper").main(db_url)
    assert counts == {str(n): n for n in range(1, 26)}


def test_the_approval_gate_is_resumed_through_the_http_endpoint(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAINSPRING_SECRET", "example-secret")
    value = example("approval_gate").main(db_url)
    assert value == {"revenue": 1200, "regions": 3, "approved_by": "alice"}


def test_the_rate_limited_client_is_never_refused(db_url: str) -> None:
    summary = example("rate_limited_client").main(db_url)
    assert summary["ok"] == summary["calls"] == 40 and summary["refused"] == 0
    assert summary["seconds"] >= 1.0  # 40 calls at 20/s after a burst of 5

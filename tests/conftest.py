"""Shared fixtures: every engine test runs on both backends against real databases.

PostgreSQL comes from $MAINSPRING_TEST_POSTGRES_URL (default: the local server,
database `test`). A stopped local server is started. Under CI=true a missing
PostgreSQL fails the run instead of skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

import mainspring as ms

PG_URL = os.environ.get("MAINSPRING_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

_pg_state: dict[str, str | None] = {}


async def _try_connect() -> None:
    con = await asyncpg.connect(PG_URL, timeout=3)
    await con.close()


def _start_local_postgres() -> None:
    versions = sorted(glob.glob("/etc/postgresql/*"))
    if not versions:
        return
    version = os.path.basename(versions[-1])
    # Its readiness check can linger past the timeout; the connection attempt decides.
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            capture_output=True,
            timeout=60,
            check=False,
        )


def postgres_problem() -> str | None:
    """None when PostgreSQL is reachable (starting the local server if needed), else why not."""
    if "problem" not in _pg_state:
        problem: str | None = None
        try:
            asyncio.run(_try_connect())
        except Exception:
            _start_local_postgres()
            try:
                asyncio.run(_try_connect())
            except Exception as exc:
                problem = f"PostgreSQL at {PG_URL} is not reachable: {exc}"
        _pg_state["problem"] = problem
    return _pg_state["problem"]


async def _reset_postgres() -> None:
    con = await asyncpg.connect(PG_URL)
    try:
        tables = await con.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "AND tablename LIKE 'ms\\_%'"
        )
        if tables:
            names = ", ".join(f'"{t[0]}"' for t in tables)
            await con.execute(f"DROP TABLE IF EXISTS {names} CASCADE")
    finally:
        await con.close()


def require_postgres() -> str:
    problem = postgres_problem()
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{problem} (CI=true: PostgreSQL tests must run, not skip)")
        pytest.skip(problem)
    asyncio.run(_reset_postgres())
    return PG_URL


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/mainspring.db"
    return require_postgres()


@pytest.fixture
def pg_url() -> str:
    """A fresh, empty PostgreSQL database (for Postgres-only behaviour)."""
    return require_postgres()


@pytest.fixture
def app(db_url: str) -> Iterator[ms.App]:
    application = ms.App(db_url, lease_ttl=5.0, shutdown_grace=2.0)
    yield application
    application.close()

"""Asset pipelines: registration, partitions, IO, materializations, lineage, staleness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import mainspring as ms
from helpers import aio, running


def orders_pipeline(app: ms.App, calls: list[str], io: ms.IOManager | None = None) -> Any:
    @app.asset(partitions=ms.DailyPartitions(start="2026-01-01"), io=io)
    async def raw_orders(ctx: ms.AssetContext) -> list[dict[str, Any]]:
        calls.append(f"raw:{ctx.partition}")
        return [{"id": 1, "region": "eu", "day": ctx.partition},
                {"id": 2, "region": "us", "day": ctx.partition}]  # fmt: skip

    @app.asset(deps=[raw_orders])
    def clean_orders(ctx: ms.AssetContext, raw_orders: list[dict[str, Any]]) -> list[Any]:
        calls.append(f"clean:{ctx.partition}")
        ctx.metadata["rows"] = len(raw_orders)
        return [o for o in raw_orders if o["id"] > 0]

    @app.asset(deps=["clean_orders"], version="1")
    async def summary(ctx: ms.AssetContext, clean_orders: list[Any]) -> dict[str, Any]:
        calls.append(f"summary:{ctx.partition}")
        return {"orders": len(clean_orders)}

    return raw_orders, clean_orders, summary


def test_unknown_deps_and_cycles_are_errors_naming_the_assets(tmp_path: Path) -> None:
    app = ms.App(f"sqlite:///{tmp_path}/a.db")

    @app.asset
    def a(ctx: ms.AssetContext) -> int:
        return 1

    with pytest.raises(ms.ConfigError, match=r"'b' depends on unknown asset 'nope'"):
        app.asset(name="b", deps=["nope"])(lambda ctx: 1)
    with pytest.raises(ms.ConfigError, match=r"'c' depends on itself"):
        app.asset(name="c", deps=["c"])(lambda ctx: 1)
    # A cycle cannot be registered; check() names one if the graph is edited into one.
    app.asset(name="b", deps=[a])(lambda ctx, a: a)
    app.assets.defs["a"].deps.append("b")
    with pytest.raises(ms.ConfigError, match=r"cycle: a -> b -> a"):
        app.assets.check()


def test_partitions_ranges_and_validation() -> None:
    days = ms.DailyPartitions(start="2026-01-01")
    assert days.range("2026-10-30", "2026-11-02") == [
        "2026-10-30", "2026-10-31", "2026-11-01", "2026-11-02"]  # fmt: skip
    with pytest.raises(ms.ConfigError, match="not a partition"):
        days.validate("2025-12-31")
    assert ms.MonthlyPartitions(start="2026-11", end="2027-02").keys() == [
        "2026-11", "2026-12", "2027-01"]  # fmt: skip
    assert ms.HourlyPartitions(start="2026-01-01-00:00", end="2026-01-01-03:00").keys() == [
        "2026-01-01-00:00", "2026-01-01-01:00", "2026-01-01-02:00"]  # fmt: skip
    assert ms.StaticPartitions(["eu", "us"]).range("eu", "us") == ["eu", "us"]


def test_graph_as_text_and_mermaid(tmp_path: Path) -> None:
    app = ms.App(f"sqlite:///{tmp_path}/a.db")
    orders_pipeline(app, [])
    assert app.graph("text").splitlines() == [
        "raw_orders  [partitions=DailyPartitions]",
        "clean_orders <- raw_orders  [partitions=DailyPartitions]",
        "summary <- clean_orders  [partitions=DailyPartitions]",
    ]
    mermaid = app.graph(format="mermaid")
    assert mermaid.startswith("graph LR")
    assert "a_raw_orders --> a_clean_orders" in mermaid


@aio
async def test_materialize_builds_missing_upstream_in_order_with_lineage(app: ms.App) -> None:
    calls: list[str] = []
    raw, clean, summary = orders_pipeline(app, calls)
    async with running(app, concurrency=10):
        handle = await app.assets.materialize_async(summary, "2026-11-01")
        result = await handle.result_async(timeout=20)
    assert calls == ["raw:2026-11-01", "clean:2026-11-01", "summary:2026-11-01"]
    assert result["built"] == ["raw_orders", "clean_orders", "summary"]
    assert await app.assets.value_async(summary, "2026-11-01") == {"orders": 2}
    history = await app.assets.materializations_async(clean, "2026-11-01")
    assert [m.status for m in history] == ["completed"]
    assert history[0].metadata == {"rows": 2}
    assert history[0].duration_ms is not None and history[0].duration_ms >= 0
    lineage = await app.assets.lineage_async(summary, "2026-11-01")
    assert lineage.root.id == result["materialization"]
    assert [m.asset for m in lineage.nodes.values()] == ["summary", "clean_orders", "raw_orders"]
    assert "  clean_orders[2026-11-01]" in lineage.to_text()
    assert lineage.to_mermaid().startswith("graph BT")
    raw_id = (await app.assets.latest_async(raw, "2026-11-01")).id
    assert history[0].upstream == [{"asset": "raw_orders", "partition": "2026-11-01", "id": raw_id}]
    built = await app.assets.lineage_async(raw, "2026-11-01", direction="downstream")
    assert [m.asset for m in built.nodes.values()] == ["raw_orders", "clean_orders", "summary"]
    assert built.to_text().splitlines()[2].startswith("    summary[2026-11-01]")


@aio
async def test_fresh_upstream_is_reused_and_invalidate_marks_downstream_stale(app: ms.App) -> None:
    calls: list[str] = []
    raw, clean, summary = orders_pipeline(app, calls)
    async with running(app, concurrency=10):
        await (await app.assets.materialize_async(summary, "2026-11-01")).result_async(timeout=20)
        calls.clear()
        await (await app.assets.materialize_async(summary, "2026-11-01")).result_async(timeout=20)
        assert calls == ["summary:2026-11-01"]  # upstream fresh: only the target is rebuilt
        assert await app.assets.stale_async(summary) != []  # other days are missing
        stale = {s.partition: s.reason for s in await app.assets.stale_async(summary)}
        assert "2026-11-01" not in stale and stale["2026-11-02"] == "missing"

        assert await app.assets.invalidate_async(clean, "2026-11-01") == 2  # clean and summary
        stale = {s.partition: s.reason for s in await app.assets.stale_async(summary)}
        assert stale["2026-11-01"] == "invalidated"
        calls.clear()
        await (await app.assets.materialize_async(summary, "2026-11-01")).result_async(timeout=20)
        assert calls == ["clean:2026-11-01", "summary:2026-11-01"]

        # new upstream data makes the downstream stale ("upstream")
        await (await app.assets.materialize_async(raw, "2026-11-01")).result_async(timeout=20)
        stale = {s.partition: s for s in await app.assets.stale_async(clean)}
        assert (stale["2026-11-01"].reason, stale["2026-11-01"].upstream) == (
            "upstream",
            "raw_orders",
        )


@aio
async def test_backfill_runs_each_partition_with_bounded_parallelism(app: ms.App) -> None:
    calls: list[str] = []
    _raw, _clean, summary = orders_pipeline(app, calls)
    days = ms.DailyPartitions(start="2026-01-01").range("2026-10-01", "2026-10-05")
    async with running(app, concurrency=20):
        handle = await app.assets.backfill_async(summary, days, max_parallel=2)
        result = await handle.result_async(timeout=30)
    assert result == {"succeeded": days, "failed": []}
    assert sorted(c for c in calls if c.startswith("summary")) == [f"summary:{d}" for d in days]


@aio
async def test_file_io_stores_a_reference_and_db_io_keeps_large_values_out_of_line(
    app: ms.App, tmp_path: Path
) -> None:
    calls: list[str] = []
    raw, clean, _summary = orders_pipeline(app, calls, io=ms.FileIO(tmp_path / "data"))

    @app.asset
    def big(ctx: ms.AssetContext) -> list[int]:
        return list(range(20_000))

    async with running(app, concurrency=10):
        await (await app.assets.materialize_async(clean, "2026-11-01")).result_async(timeout=20)
        await (await app.assets.materialize_async(big)).result_async(timeout=20)
    ref = (await app.assets.latest_async(raw, "2026-11-01")).value_ref
    assert ref["io"] == "file" and ref["path"].startswith(str(tmp_path / "data"))
    assert len(await app.assets.value_async(clean, "2026-11-01")) == 2
    big_ref = (await app.assets.latest_async(big)).value_ref
    assert big_ref["io"] == "db" and "key" in big_ref and "value" not in big_ref
    assert await app.assets.value_async(big) == list(range(20_000))


@aio
async def test_a_failing_asset_records_a_failed_materialization_and_fails_the_plan(
    app: ms.App,
) -> None:
    @app.asset(max_attempts=2, backoff=ms.Backoff.constant(0.01))
    def flaky(ctx: ms.AssetContext) -> int:
        raise ValueError("source down")

    @app.asset(deps=[flaky])
    def after(ctx: ms.AssetContext, flaky: int) -> int:
        return flaky

    async with running(app, concurrency=10):
        handle = await app.assets.materialize_async(after)
        with pytest.raises(ms.RunFailed, match="asset flaky failed after 2 attempts: ValueError"):
            await handle.result_async(timeout=20)
    history = await app.assets.materializations_async(flaky)
    assert [m.status for m in history] == ["failed"]
    assert "source down" in history[0].error["message"]
    assert await app.assets.materializations_async(after) == []


def test_the_sync_client_api_from_the_issue(app: ms.App) -> None:
    calls: list[str] = []
    raw, clean, summary = orders_pipeline(app, calls)
    run = app.materialize(summary, partition="2026-11-01")
    app.run_worker(burst=True, install_signal_handlers=False)
    assert run.result(timeout=5)["asset"] == "summary"
    assert [m.status for m in app.materializations(summary, partition="2026-11-01")] == [
        "completed"]  # fmt: skip
    assert {m.asset for m in app.lineage(summary, partition="2026-11-01").nodes.values()} == {
        "summary", "clean_orders", "raw_orders"}  # fmt: skip
    assert "2026-11-01" not in {s.partition for s in app.stale(summary)}
    assert app.invalidate(clean, partition="2026-11-01") == 2
    days = ms.DailyPartitions(start="2026-01-01").range("2026-10-01", "2026-10-03")
    backfill = app.backfill(summary, partitions=days, max_parallel=2)
    app.run_worker(burst=True, install_signal_handlers=False)
    assert backfill.result(timeout=5) == {"succeeded": days, "failed": []}
    assert app.graph(format="mermaid").startswith("graph LR")
    assert app.assets.value(raw, "2026-10-02")[0]["day"] == "2026-10-02"

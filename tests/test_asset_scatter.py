"""Scatter/gather: instances as child runs, max_concurrent measured, key skipping, partial mode."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import mainspring as ms
from helpers import aio, eventually, running


def overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one moment."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def regions_pipeline(app: ms.App, options: ms.ScatterOptions, fail: set[str] = frozenset()) -> Any:
    ran: list[str] = []

    @app.asset
    def orders(ctx: ms.AssetContext) -> list[dict[str, Any]]:
        return [{"region": f"r{i:02d}", "amount": i} for i in range(20)]

    @app.asset(deps=[orders], scatter=lambda orders: [{"region": o["region"]} for o in orders],
               scatter_options=options)  # fmt: skip
    async def report(
        ctx: ms.AssetContext, key: dict[str, Any], orders: list[Any]
    ) -> dict[str, Any]:
        ran.append(key["region"])
        started = time.time()
        await asyncio.sleep(0.02)
        if key["region"] in fail:
            raise RuntimeError(f"no data for {key['region']}")
        total = sum(o["amount"] for o in orders if o["region"] == key["region"])
        return {"total": total, "span": [started, time.time()]}

    @app.asset(deps=[report], gather=True)
    def summary(ctx: ms.AssetContext, report: dict[ms.ScatterKey, Any]) -> dict[str, Any]:
        return {k["region"]: v["total"] for k, v in report.items()}

    return ran, report, summary


@aio
async def test_scatter_runs_one_instance_per_key_within_max_concurrent(app: ms.App) -> None:
    ran, report, summary = regions_pipeline(app, ms.ScatterOptions(max_concurrent=3))
    events: list[str] = []
    app.telemetry.attach("*", lambda name, meta: events.append(name))
    async with running(app, concurrency=20):
        handle = await app.assets.materialize_async(summary)
        await handle.result_async(timeout=30)
    value = await app.assets.value_async(summary)
    assert value == {f"r{i:02d}": i for i in range(20)}
    assert sorted(ran) == sorted(value)
    spans = [tuple(v["span"]) for v in (await app.assets.value_async(report)).values()]
    assert len(spans) == 20 and overlap(spans) <= 3  # measured from the committed results
    for name in ("scatter.start", "scatter.complete", "scatter.gather_ready",
                 "scatter.instance_complete"):  # fmt: skip
        assert name in events
    latest = await app.assets.latest_async(report)
    assert latest.metadata["scatter"]["completed"] == 20


@aio
async def test_rematerializing_skips_keys_done_from_the_same_upstream(app: ms.App) -> None:
    fail = {"r03", "r07"}
    options = ms.ScatterOptions(failure_mode="partial", failure_threshold=0.2, max_attempts=1)
    ran, report, summary = regions_pipeline(app, options, fail)
    async with running(app, concurrency=20):
        await (await app.assets.materialize_async(summary)).result_async(timeout=30)
        value = await app.assets.value_async(summary)
        assert sorted(value) == sorted(f"r{i:02d}" for i in range(20) if f"r{i:02d}" not in fail)
        latest = await app.assets.latest_async(report)
        assert (latest.metadata["scatter"]["failed"], latest.metadata["scatter"]["completed"]) == (
            2, 18)  # fmt: skip
        ran.clear()
        fail.clear()
        await (await app.assets.materialize_async(report)).result_async(timeout=30)
        assert sorted(ran) == ["r03", "r07"]  # only the keys not done yet
        assert len(await app.assets.value_async(report)) == 20


@aio
async def test_failures_above_the_threshold_fail_the_scatter(app: ms.App) -> None:
    fail = {"r01", "r02", "r03"}
    options = ms.ScatterOptions(failure_mode="partial", failure_threshold=0.1, max_attempts=2,
                                retry_strategy=ms.Backoff.constant(0.01))  # fmt: skip
    ran, _report, summary = regions_pipeline(app, options, fail)
    async with running(app, concurrency=20):
        handle = await app.assets.materialize_async(summary)
        with pytest.raises(ms.RunFailed, match="3 of 20 instances failed"):
            await handle.result_async(timeout=30)
    assert [r for r in ran if r == "r01"] == ["r01", "r01"]  # max_attempts per instance
    barriers = await (await app.store()).list_barriers("report", None, 5)
    assert barriers[0]["status"] == "failed" and barriers[0]["failed"] == 3


@aio
async def test_cancelling_the_materialization_cancels_pending_instances(app: ms.App) -> None:
    started: list[str] = []

    @app.asset
    def keys(ctx: ms.AssetContext) -> list[int]:
        return list(range(30))

    @app.asset(deps=[keys], scatter=lambda keys: keys,
               scatter_options=ms.ScatterOptions(max_concurrent=2))  # fmt: skip
    async def slow(ctx: ms.AssetContext, key: int, keys: list[int]) -> int:
        started.append(str(key))
        await asyncio.sleep(0.3)
        return key

    async with running(app, concurrency=10):
        handle = await app.assets.materialize_async(slow)
        await eventually(lambda: _true(len(started) >= 2))
        events: list[str] = []
        app.telemetry.attach("scatter.cancel", lambda name, meta: events.append(meta["asset"]))
        await app.assets.cancel_async(handle.id)
        assert events == ["slow"]
        await eventually(lambda: _terminal(app, handle.id))
        await asyncio.sleep(0.5)
    assert len(started) < 10
    runs = await app.list_runs_async(name="mainspring.assets.scatter:slow", limit=100)
    assert len(runs) == 30
    assert sum(r.state == "cancelled" for r in runs) >= 20
    assert {r.state for r in runs} <= {"cancelled", "completed"}


async def _true(value: bool) -> bool:
    return value


async def _terminal(app: ms.App, run_id: str) -> bool:
    return (await app.get_run_async(run_id)).terminal


@aio
async def test_scatter_instances_take_tokens_from_the_named_rate_limit(app: ms.App) -> None:
    app.rate_limits.configure("geo_api", allowed=10, period=1, burst=2)

    @app.asset
    def cities(ctx: ms.AssetContext) -> list[str]:
        return [f"c{i}" for i in range(8)]

    @app.asset(deps=[cities], scatter=lambda cities: cities,
               scatter_options=ms.ScatterOptions(rate_limit="geo_api"))  # fmt: skip
    async def geocoded(ctx: ms.AssetContext, key: str) -> float:
        return time.time()

    async with running(app, concurrency=20):
        await (await app.assets.materialize_async(geocoded)).result_async(timeout=30)
    starts = sorted((await app.assets.value_async(geocoded)).values())
    assert len(starts) == 8
    assert starts[-1] - starts[0] >= 0.5  # 2 at once, then 10 per second

"""The asset benchmark: a scatter of no-op instances, and the cost of recording a materialization.

``mainspring bench assets`` and ``benchmarks/bench_assets.py`` call :func:`run_assets_bench`
and print :func:`render`. The database is fresh, made the way the job benchmark makes its own.

Measurement
-----------
1. **scatter**: an asset ``bench.keys`` returns ``instances`` keys and the scatter asset
   ``bench.noop`` runs one no-op instance per key, gathered into its value. The client
   starts ``materialize(bench.noop)``; ONE worker in a subprocess (burst) runs the whole plan:
   the keys asset, the scatter step (which spawns every instance in one commit), the
   instances and the gather. The rate is ``instances`` over the time from the worker's first
   claim to its last commit: the whole materialization, not the instances alone.
2. **check**: the materialization completed, its value holds one result per key, and exactly
   ``instances`` instance runs completed.
3. **recording**: ``materializations`` sequential calls of what a finished asset adds to its
   step (the DbIO reference of a small value and the ``record_materialization`` upsert),
   timed one by one on the client: mean, p50, p99 in ms.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import mainspring as ms
from mainspring.app import App
from mainspring.bench.jobs import (
    Check,
    _backend_name,
    _BenchApp,
    _Databases,
    _fmt_rate,
    _Probe,
    _rate,
)
from mainspring.bench.report import host_line, render_checks
from mainspring.bench.worker import run_phases, spawn, worker_main
from mainspring.ids import uuid7
from mainspring.store.base import MaterializationRow

TARGET_INSTANCES: Final = 3_000.0  # per second, on PostgreSQL
TARGET_RECORD_MS: Final = 2.0
_COUNT_ENV: Final = "MAINSPRING_BENCH_INSTANCES"


@dataclass
class AssetsBenchResult:
    """Every figure of one asset benchmark run; None where a figure is not known."""

    backend: str
    instances: int
    concurrency: int
    host: dict[str, Any] = field(default_factory=dict)
    completed: int = 0  # instance runs completed in the database afterwards
    gathered: int = 0  # results in the gathered value
    elapsed_s: float | None = None  # worker's first claim -> last commit
    instances_per_s: float | None = None
    end_to_end_s: float | None = None  # materialize() -> result, worker start-up included
    record_ms_mean: float | None = None
    record_ms_p50: float | None = None
    record_ms_p99: float | None = None
    materializations: int = 0
    duration_s: float = 0.0

    def checks(self) -> list[Check]:
        pg = self.backend == "postgres"
        rate = self.instances_per_s
        met = None if not pg or rate is None else rate >= TARGET_INSTANCES
        mean = self.record_ms_mean
        return [
            Check(f"scatter of {self.instances:,} no-op instances (1 worker, c={self.concurrency})",
                  _fmt_rate(rate), target=f"≥ {TARGET_INSTANCES:,.0f}/s" if pg else "",
                  passed=met),
            Check("recording a materialization (mean)",
                  "—" if mean is None else f"{mean:.2f} ms",
                  target=f"< {TARGET_RECORD_MS:g} ms",
                  passed=None if mean is None else mean < TARGET_RECORD_MS),
            Check("  p50 / p99", "—" if self.record_ms_p50 is None else
                  f"{self.record_ms_p50:.2f} / {self.record_ms_p99:.2f} ms"),
        ]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checks"] = [asdict(c) for c in self.checks()]
        return data


def run_assets_bench(
    backend: str,
    url: str | None,
    instances: int,
    *,
    concurrency: int = 1000,
    materializations: int = 500,
) -> AssetsBenchResult:
    """Run the scatter and the recording measurements on `backend`; return the figures.

    `url` is as for :func:`mainspring.bench.jobs.run_jobs_bench`. Raises RuntimeError when
    the scatter is inconsistent (a key missing, an instance not completed).
    """
    backend = _backend_name(backend)
    if instances < 1 or concurrency < 1 or materializations < 1:
        raise ValueError("instances, concurrency and materializations must be at least 1")
    result = AssetsBenchResult(backend, instances, concurrency, materializations=materializations)
    os.environ[_COUNT_ENV] = str(instances)
    return run_phases(result, backend, url, lambda dbs: _measure(dbs, result))


def _bench_app(url: str, probe: _Probe | None = None) -> App:
    """An App with the benchmark's assets (the same in the client and the worker)."""
    app: App = App(url, migrate=False) if probe is None else _BenchApp(url, probe)
    count = int(os.environ.get(_COUNT_ENV, "10000"))

    @app.asset(name="bench.keys")
    def keys(ctx: ms.AssetContext) -> int:
        return count

    @app.asset(name="bench.noop", deps=[keys], scatter=lambda keys: range(keys),
               scatter_options=ms.ScatterOptions(max_attempts=1, timeout=None))  # fmt: skip
    async def noop(ctx: ms.AssetContext, key: int) -> None:
        return None

    return app


async def _measure(dbs: _Databases, r: AssetsBenchResult) -> None:
    r.host["db_version"] = await dbs.version()
    async with dbs.fresh() as url:
        app = _bench_app(url)
        try:
            store = await app.store()
            began = time.perf_counter()
            handle = await app.assets.materialize_async("bench.noop")
            timeout = max(300.0, r.instances / 100)
            child = await spawn(
                "mainspring.bench.assets", "_worker", "--url", url,
                "--concurrency", str(r.concurrency), "--timeout", str(timeout),
            )  # fmt: skip
            try:
                data = await child.result(timeout=timeout + 30)
            finally:
                await child.close()
            run = await handle.get_async()
            r.end_to_end_s = time.perf_counter() - began
            if run.state != "completed":
                raise RuntimeError(f"the benchmark materialization {run.state}: {run.error}")
            r.gathered = len(await app.assets.value_async("bench.noop"))
            compute = run.output["materialization"]  # the scatter's run: instances' parent
            r.completed = (await store.count_children([compute]))[compute].get("completed", 0)
            await _record(app, r)
        finally:
            await app.aclose()
    if r.gathered != r.instances or r.completed != r.instances:
        raise RuntimeError(
            f"inconsistent scatter: {r.gathered} of {r.instances} keys gathered, "
            f"{r.completed} instance runs completed"
        )
    r.elapsed_s = data["elapsed"]
    r.instances_per_s = _rate(r.instances, r.elapsed_s)


async def _record(app: App, r: AssetsBenchResult) -> None:
    """Time what recording adds to a finished asset: its value reference and its row."""
    store = await app.store()
    io_manager = ms.DbIO()
    upstream = [{"asset": "bench.keys", "partition": "", "id": uuid7()}]
    times = []
    for i in range(r.materializations):
        key = uuid7()
        began = time.perf_counter()
        ref = await io_manager.store(store, "bench.record", "", key, {"i": i, "rows": 10})
        now = datetime.now(UTC)
        await store.record_materialization(MaterializationRow(
            key, "bench.record", "", key, "completed", ref, upstream, {"rows": 10}, None,
            now, now, 0.1,
        ))  # fmt: skip
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    r.record_ms_mean = statistics.fmean(times)
    r.record_ms_p50 = times[len(times) // 2]
    r.record_ms_p99 = times[min(len(times) - 1, int(len(times) * 0.99))]


def render(result: AssetsBenchResult, fmt: str = "table") -> str:
    """The result as a rich table (plain text), or as JSON when fmt == "json"."""
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2, default=str)
    r = result
    summary = (
        f"{r.completed:,} instances completed, {r.gathered:,} gathered; first claim to last "
        f"commit {r.elapsed_s or 0:.2f} s, materialize to result {r.end_to_end_s or 0:.2f} s; "
        f"{host_line(r.host, r.duration_s)}"
    )
    return render_checks(f"mainspring bench assets: {r.backend}", r.checks(), [summary])


def main(argv: Sequence[str] | None = None) -> int:
    """The worker subprocess's entry point (internal)."""
    return worker_main("python -m mainspring.bench.assets", _bench_app, argv)


if __name__ == "__main__":
    from mainspring.bench import assets

    sys.exit(assets.main())

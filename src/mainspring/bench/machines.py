"""The machine benchmark: how many step transitions Mainspring commits per second.

``mainspring bench machines`` and ``benchmarks/bench_machines.py`` call
:func:`run_machines_bench` and print :func:`render`. The database is fresh, made the way the
job benchmark makes its own (:class:`mainspring.bench.jobs._Databases`).

Measurement
-----------
1. **start**: ``machines`` runs of a three-step machine (``a -> b -> c -> done``) are prepared
   with ``MachineDef.new_run`` and inserted through ``Store.insert_runs`` in batches of 1000
   (``enqueue_many_async`` takes task calls only), then ``ANALYZE``.
2. **drain**: ONE worker in a subprocess (``python -m mainspring.bench.machines _worker``)
   runs ``app.run_worker_async(burst=True)`` until every machine is done. Each machine commits
   three step outcomes (a -> b, b -> c, c -> done); each committed outcome is one
   *transition*. The worker instruments its store as the job benchmark does: the rates are
   over the time from the start of the first claim that returned runs to the end of the last
   commit, and the worker's CPU time is taken over the same span.
3. **check**: every machine is ``completed`` in the database, and the worker committed and
   ran exactly ``3 * machines`` steps; anything else raises.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import mainspring as ms
from mainspring.app import App
from mainspring.bench.jobs import (
    BATCH,
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

MACHINE: Final = "bench.three"
STEPS: Final = 3  # committed step outcomes per machine: a -> b, b -> c, c -> done
TARGET_TRANSITIONS: Final = 3_000.0  # per second, on PostgreSQL


@dataclass
class MachinesBenchResult:
    """Every figure of one machine benchmark run; None where a figure is not known."""

    backend: str
    machines: int
    concurrency: int
    host: dict[str, Any] = field(default_factory=dict)
    start_per_s: float | None = None  # machines inserted per second, in batches of BATCH
    transitions: int = 0  # step outcomes the worker committed
    completed: int = 0  # machines completed in the database afterwards
    elapsed_s: float | None = None  # first claim -> last commit
    machines_per_s: float | None = None
    transitions_per_s: float | None = None
    wall_s: float | None = None  # worker spawn -> exit: interpreter, imports, shutdown
    startup_s: float | None = None  # worker spawn -> store open
    cpu_s: float | None = None  # worker CPU between first claim and last commit
    cpu_cores: float | None = None  # that CPU time over the elapsed time
    duration_s: float = 0.0

    def checks(self) -> list[Check]:
        """The report rows; the transition rate has a target on PostgreSQL."""
        rate = self.transitions_per_s
        pg = self.backend == "postgres"
        target = f"≥ {TARGET_TRANSITIONS:,.0f}/s" if pg else ""
        met = None if not pg or rate is None else rate >= TARGET_TRANSITIONS
        rows = [
            Check(f"start ({BATCH:,}/batch)", _fmt_rate(self.start_per_s)),
            Check(f"machines (1 worker, c={self.concurrency})", _fmt_rate(self.machines_per_s)),
            Check(f"transitions ({STEPS}/machine)", _fmt_rate(rate), target=target, passed=met),
        ]
        if self.cpu_s is not None and self.cpu_cores is not None:
            per_k = self.cpu_s / max(1, self.transitions) * 1e6
            rows.append(
                Check("  worker CPU", f"{self.cpu_cores:.2f} cores, {per_k:.0f} ms/1k steps")
            )
        if self.wall_s is not None:
            startup = "" if self.startup_s is None else f", startup {self.startup_s:.2f} s"
            rows.append(Check("  wall: spawn to exit", f"{self.wall_s:.2f} s{startup}"))
        return rows

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checks"] = [asdict(c) for c in self.checks()]
        return data


def run_machines_bench(
    backend: str, url: str | None, machines: int, *, concurrency: int = 500
) -> MachinesBenchResult:
    """Run `machines` three-step machines to completion on `backend`; return the figures.

    `url` is as for :func:`mainspring.bench.jobs.run_jobs_bench`: the PostgreSQL server (the
    benchmark uses its own database there) or an SQLite file whose directory holds the
    temporary database. Raises RuntimeError when the drain is inconsistent (a machine not
    completed, or a step count other than three per machine).
    """
    backend = _backend_name(backend)
    if machines < 1:
        raise ValueError("machines must be at least 1")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    result = MachinesBenchResult(backend=backend, machines=machines, concurrency=concurrency)
    return run_phases(result, backend, url, lambda dbs: _measure(dbs, result))


def _bench_app(url: str, probe: _Probe | None = None) -> App:
    """An App with the three-step machine (the same name in the client and the worker)."""
    app: App = App(url, migrate=False) if probe is None else _BenchApp(url, probe)
    counter = probe or _Probe()

    @app.machine(name=MACHINE, max_attempts=1)
    class Three(ms.Machine):
        initial = "a"

        async def a(self, ctx: ms.StepContext, state: Any) -> ms.Outcome:
            counter.handled += 1
            return ms.Next("b", state)

        async def b(self, ctx: ms.StepContext, state: Any) -> ms.Outcome:
            counter.handled += 1
            return ms.Next("c", state)

        async def c(self, ctx: ms.StepContext, state: Any) -> ms.Outcome:
            counter.handled += 1
            return ms.Done(state)

    return app


async def _measure(dbs: _Databases, r: MachinesBenchResult) -> None:
    r.host["db_version"] = await dbs.version()
    async with dbs.fresh() as url:
        app = _bench_app(url)
        try:
            store = await app.store()  # connect before the clock starts
            definition = app.machines[MACHINE]
            started = time.perf_counter()
            for offset in range(0, r.machines, BATCH):
                now = datetime.now(UTC)
                last = min(r.machines, offset + BATCH)
                await store.insert_runs(
                    [definition.new_run({"i": i}, now) for i in range(offset, last)]
                )
            r.start_per_s = _rate(r.machines, time.perf_counter() - started)
            await dbs.analyze(url)
            timeout = max(300.0, r.machines / 100)
            child = await spawn(
                "mainspring.bench.machines", "_worker", "--url", url,
                "--concurrency", str(r.concurrency), "--timeout", str(timeout),
            )  # fmt: skip
            try:
                data = await child.result(timeout=max(330.0, r.machines / 100 + 30))
            finally:
                await child.close()
            status = await store.queue_status(definition.queue)
        finally:
            await app.aclose()
    r.transitions = data["committed"]
    r.completed = status.counts.get("completed", 0)
    expected = STEPS * r.machines
    if r.completed != r.machines or r.transitions != expected or data["handled"] != expected:
        raise RuntimeError(
            f"inconsistent drain: {r.completed} of {r.machines} machines completed in the "
            f"database, {r.transitions} step outcomes committed and {data['handled']} steps run "
            f"(expected {expected} of each)"
        )
    r.elapsed_s = data["elapsed"]
    r.machines_per_s = _rate(r.machines, r.elapsed_s)
    r.transitions_per_s = _rate(r.transitions, r.elapsed_s)
    r.cpu_s = data["cpu"]
    if r.cpu_s is not None and r.elapsed_s:
        r.cpu_cores = r.cpu_s / r.elapsed_s
    if child.exited is not None:
        r.wall_s = child.exited - child.spawned
    if data["opened_wall"] is not None:
        r.startup_s = data["opened_wall"] - child.spawned


def render(result: MachinesBenchResult, fmt: str = "table") -> str:
    """The result as a rich table (plain text), or as JSON when fmt == "json"."""
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2, default=str)
    r = result
    title = (
        f"mainspring bench machines: {r.backend}, {r.machines:,} machines of {STEPS} steps, "
        f"concurrency {r.concurrency}"
    )
    summary = (
        f"{r.completed:,} machines completed, {r.transitions:,} transitions committed in "
        f"{r.elapsed_s or 0:.2f} s; {host_line(r.host, r.duration_s)}"
    )
    return render_checks(title, r.checks(), [summary])


# --------------------------------------------------------------------------- worker process


def main(argv: Sequence[str] | None = None) -> int:
    """The worker subprocess's entry point (internal)."""
    return worker_main("python -m mainspring.bench.machines", _bench_app, argv)


if __name__ == "__main__":
    from mainspring.bench import machines

    sys.exit(machines.main())

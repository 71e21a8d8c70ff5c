"""The workflow benchmark: how many three-activity workflows Mainspring runs per second.

``mainspring bench workflows`` and ``benchmarks/bench_workflows.py`` call
:func:`run_workflows_bench` and print :func:`render`. The database is fresh, made the way the
job benchmark makes its own (:class:`mainspring.bench.jobs._Databases`).

Measurement
-----------
1. **start**: ``workflows`` runs of ``bench.three`` (``wf.activity`` three times in sequence,
   each activity a task returning its input plus one) are prepared with
   ``WorkflowDef.new_run`` and inserted through ``Store.insert_runs`` in batches of 1000
   (what ``app.start_async`` does one at a time), then ``ANALYZE``.
2. **drain**: ONE worker in a subprocess (``python -m mainspring.bench.workflows _worker``)
   runs ``app.run_worker_async(burst=True)`` until every workflow is done. Each workflow
   commits several outcomes: its own workflow tasks (start, then one wake-up per activity
   result) and its three activities. The worker instruments its store as the job benchmark
   does: the rate is over the time from the start of the first claim that returned runs to the
   end of the last commit, and the worker's CPU time is taken over the same span.
   ``--activities N`` makes it N activities (the three tasks in turn; DBOS is then not run):
   the longer the journal, the more a replay of it at every workflow task costs, which the
   workflow cache (``--workflow-cache``, the worker's ``App(workflow_cache_size=)``) saves.
3. **check**: every workflow is ``completed`` with output ``i + N``, every activity is
   ``completed`` and ran exactly once; anything else raises.
4. **peer** (PostgreSQL): DBOS Transact runs the same workflow on the same server, in its own
   database and process, through :mod:`mainspring.bench.dbos_peer`, measured the same way
   (first start to last completion, from the database's clock); the report prints the ratio.
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
from mainspring.app import DEFAULT_WORKFLOW_CACHE, App
from mainspring.bench.jobs import (
    BATCH,
    Check,
    _backend_name,
    _BenchApp,
    _Databases,
    _fmt_rate,
    _Probe,
    _rate,
    _ratio,
)
from mainspring.bench.report import host_line, render_checks
from mainspring.bench.worker import run_phases, spawn, worker_main
from mainspring.store.base import Store
from mainspring.workflows.workflow import WorkflowDef

WORKFLOW: Final = "bench.three"
ACTIVITIES: Final = ("bench.step1", "bench.step2", "bench.step3")
TARGET_RATE: Final = 500.0  # workflows per second, on PostgreSQL
TARGET_DBOS_FACTOR: Final = 10.0


@dataclass
class DbosFigures:
    """DBOS Transact's figures (from :mod:`mainspring.bench.dbos_peer`), or its error."""

    workflows_per_s: float | None = None
    elapsed_s: float | None = None
    completed: int = 0
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkflowsBenchResult:
    """Every figure of one workflow benchmark run; None where a figure is not known."""

    backend: str
    workflows: int
    concurrency: int
    workflow_cache: int = 0  # the worker's workflow_cache_size
    steps: int = len(ACTIVITIES)  # activities per workflow, in sequence (the peer runs 3)
    host: dict[str, Any] = field(default_factory=dict)
    start_per_s: float | None = None  # workflows inserted per second, in batches of BATCH
    completed: int = 0  # workflows completed with the right output
    activities: int = 0  # activity runs completed
    commits: int = 0  # outcomes the worker committed: workflow tasks and activities
    elapsed_s: float | None = None  # first claim -> last commit
    workflows_per_s: float | None = None
    wall_s: float | None = None  # worker spawn -> exit: interpreter, imports, shutdown
    startup_s: float | None = None  # worker spawn -> store open
    cpu_s: float | None = None  # worker CPU between first claim and last commit
    cpu_cores: float | None = None  # that CPU time over the elapsed time
    dbos: DbosFigures | None = None
    duration_s: float = 0.0

    @property
    def dbos_ratio(self) -> float | None:
        """Mainspring's workflow rate over DBOS's, when both are known."""
        return _ratio(
            self.workflows_per_s, None if self.dbos is None else self.dbos.workflows_per_s
        )

    def checks(self) -> list[Check]:
        """The report rows; the workflow rate has its targets on PostgreSQL."""
        rate, ratio, n = self.workflows_per_s, self.dbos_ratio, self.steps
        target, met = "", None
        if self.backend == "postgres":
            target = f"≥ {TARGET_RATE:,.0f}/s, ≥ {TARGET_DBOS_FACTOR:g}x DBOS"
            met = rate is not None and rate >= TARGET_RATE
            if self.dbos is not None:  # DBOS ran: the ratio decides too, unknown if it failed
                met = None if ratio is None else met and ratio >= TARGET_DBOS_FACTOR
        shown = "" if ratio is None else f"{ratio:.1f}x DBOS"
        rows = [
            Check(f"start ({BATCH:,}/batch)", _fmt_rate(self.start_per_s)),
            Check(
                f"workflows (1 worker, c={self.concurrency})",
                _fmt_rate(rate),
                ratio=shown,
                target=target,
                passed=met,
            ),
        ]
        if self.dbos is not None:
            peer = self.dbos.workflows_per_s
            rows.append(Check(f"  DBOS Transact ({_describe(self.dbos)})", _fmt_rate(peer)))
        activities = _rate(n * self.completed, self.elapsed_s)
        rows.append(Check(f"activities ({n}/workflow)", _fmt_rate(activities)))
        if self.completed:
            rows.append(Check("  commits per workflow", f"{self.commits / self.completed:.1f}"))
        if self.cpu_s is not None and self.cpu_cores is not None:
            per_k = self.cpu_s / max(1, self.completed) * 1e6
            rows.append(
                Check("  worker CPU", f"{self.cpu_cores:.2f} cores, {per_k:.0f} ms/1k workflows")
            )
        if self.wall_s is not None:
            startup = "" if self.startup_s is None else f", startup {self.startup_s:.2f} s"
            rows.append(Check("  wall: spawn to exit", f"{self.wall_s:.2f} s{startup}"))
        return rows

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dbos_ratio"] = self.dbos_ratio
        data["checks"] = [asdict(c) for c in self.checks()]
        return data


def _describe(peer: DbosFigures) -> str:
    """How DBOS was run, in a few words, for the report."""
    c = peer.config
    if peer.error is not None or not c:
        return "failed, see below"
    if c.get("mode") == "queue":
        polling = c.get("polling_interval_sec")
        how = f"queue, worker_concurrency {c.get('concurrency')}, polling {polling} s"
    else:
        how = f"start_workflow_async, {c.get('concurrency')} in flight"
    return f"{c.get('version')}, {how}, pool {c.get('sys_db_pool_size')}, {c.get('event_loop')}"


def run_workflows_bench(
    backend: str,
    url: str | None,
    workflows: int,
    *,
    concurrency: int = 500,
    peers: bool = True,
    workflow_cache: int | None = None,
    steps: int = len(ACTIVITIES),
) -> WorkflowsBenchResult:
    """Run `workflows` three-activity workflows to completion on `backend`; return the figures.

    `url` is as for :func:`mainspring.bench.jobs.run_jobs_bench`: the PostgreSQL server (the
    benchmark uses its own database there) or an SQLite file whose directory holds the
    temporary database. With `peers` on PostgreSQL, DBOS Transact runs the same workload on
    the same server; its failure is recorded in `dbos.error`, not raised. `workflow_cache` sets
    the worker's `App(workflow_cache_size=)` (None: the default; 0: replay every workflow
    task, as before the cache). `steps` is the number of activities per workflow (the
    three tasks in turn); DBOS runs its three-step workflow, so it is measured only when
    `steps` is 3 (a longer journal shows what replaying it costs). Raises RuntimeError
    when Mainspring's drain is inconsistent (a workflow or activity not completed, a wrong
    output, an activity run other than once).
    """
    backend = _backend_name(backend)
    if workflows < 1:
        raise ValueError("workflows must be at least 1")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    result = WorkflowsBenchResult(
        backend=backend, workflows=workflows, concurrency=concurrency,
        workflow_cache=DEFAULT_WORKFLOW_CACHE if workflow_cache is None else workflow_cache,
        steps=steps,
    )  # fmt: skip

    async def dbos(dbs: _Databases) -> None:
        result.dbos = await _run_dbos(dbs.server, workflows)

    with_dbos = peers and backend == "postgres" and steps == len(ACTIVITIES)
    return run_phases(
        result, backend, url, lambda dbs: _measure(dbs, result), *([dbos] if with_dbos else [])
    )


def _bench_app(url: str, probe: _Probe | None = None) -> App:
    """An App with the workflow and its activities (the same names in client and worker)."""
    app: App = App(url, migrate=False) if probe is None else _BenchApp(url, probe)
    counter = probe or _Probe()

    async def add_one(x: int) -> int:
        counter.handled += 1
        return x + 1

    step1, step2, step3 = (app.task(name=name, max_attempts=1)(add_one) for name in ACTIVITIES)

    async def three(wf: ms.Workflow, input: list[int]) -> int:
        x, steps = input
        for k in range(steps):  # three, unless --activities says otherwise
            x = await wf.activity((step1, step2, step3)[k % 3], x)
        return x

    app.workflow(name=WORKFLOW)(three)  # a call: the decorator is untyped
    return app


async def _start(store: Store, definition: WorkflowDef, r: WorkflowsBenchResult) -> dict[str, int]:
    """Insert the workflow runs in batches; each run's id and its expected output."""
    expected: dict[str, int] = {}
    started = time.perf_counter()
    for offset in range(0, r.workflows, BATCH):
        now = datetime.now(UTC)
        batch = [
            definition.new_run([i, r.steps], now)
            for i in range(offset, min(r.workflows, offset + BATCH))
        ]
        await store.insert_runs(batch)
        expected.update((run.id, i + r.steps) for i, run in enumerate(batch, offset))
    r.start_per_s = _rate(r.workflows, time.perf_counter() - started)
    return expected


async def _measure(dbs: _Databases, r: WorkflowsBenchResult) -> None:
    r.host["db_version"] = await dbs.version()
    async with dbs.fresh() as url:
        app = _bench_app(url)
        try:
            store = await app.store()  # connect before the clock starts
            definition = app.workflows[WORKFLOW]
            expected = await _start(store, definition, r)
            await dbs.analyze(url)
            limit = max(300.0, r.workflows / 20)
            child = await spawn(
                "mainspring.bench.workflows", "_worker", "--url", url,
                "--concurrency", str(r.concurrency), "--timeout", str(limit),
                "--workflow-cache", str(r.workflow_cache),
            )  # fmt: skip
            try:
                data = await child.result(timeout=limit + 30)
            finally:
                await child.close()
            ids = list(expected)
            rows = [run for at in range(0, len(ids), BATCH)
                    for run in await store.get_runs(ids[at : at + BATCH])]  # fmt: skip
            status = await store.queue_status(definition.queue)
        finally:
            await app.aclose()
    n = r.steps * r.workflows
    finished = [run for run in rows if run.state == "completed"]
    r.completed = sum(1 for run in finished if run.output == expected[run.id])
    r.activities = status.counts.get("completed", 0) - len(finished)  # the queue holds both
    r.commits = data["committed"]
    if r.completed != r.workflows or r.activities != n or data["handled"] != n:
        raise RuntimeError(
            f"inconsistent drain: {r.completed} of {r.workflows} workflows completed with the "
            f"right output, {r.activities} activities completed and {data['handled']} run "
            f"(expected {n} of each)"
        )
    r.elapsed_s = data["elapsed"]
    r.workflows_per_s = _rate(r.workflows, r.elapsed_s)
    r.cpu_s = data["cpu"]
    if r.cpu_s is not None and r.elapsed_s:
        r.cpu_cores = r.cpu_s / r.elapsed_s
    if child.exited is not None:
        r.wall_s = child.exited - child.spawned
    if data["opened_wall"] is not None:
        r.startup_s = data["opened_wall"] - child.spawned


async def _run_dbos(server: str, workflows: int) -> DbosFigures:
    """DBOS Transact on `server` with its benchmark defaults; a failure is returned, not raised."""
    limit = max(600.0, workflows / 5)
    try:
        child = await spawn(
            "mainspring.bench.dbos_peer", "--dsn", server, "--workflows", str(workflows),
            "--timeout", str(limit),
        )  # fmt: skip
        try:
            data = await child.result(timeout=limit + 60)
        finally:
            await child.close()
    except Exception as exc:
        return DbosFigures(error=f"{type(exc).__name__}: {exc}")
    return DbosFigures(
        workflows_per_s=data["workflows_per_s"], elapsed_s=data["elapsed"],
        completed=data["completed"], config=data["config"],
    )  # fmt: skip


def render(result: WorkflowsBenchResult, fmt: str = "table") -> str:
    """The result as a rich table (plain text), or as JSON when fmt == "json"."""
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2, default=str)
    r = result
    title = (
        f"mainspring bench workflows: {r.backend}, {r.workflows:,} workflows of "
        f"{r.steps} activities, concurrency {r.concurrency}, workflow cache "
        f"{r.workflow_cache:,}"
    )
    lines = [
        f"{r.completed:,} workflows and {r.activities:,} activities completed, {r.commits:,} "
        f"outcomes committed in {r.elapsed_s or 0:.2f} s; {host_line(r.host, r.duration_s)}"
    ]
    if r.dbos is not None and r.dbos.error:
        lines.append(f"DBOS Transact: error: {r.dbos.error}")
    elif r.dbos is not None:
        lines.append(
            f"DBOS Transact: {r.dbos.completed:,} workflows in {r.dbos.elapsed_s or 0:.2f} s "
            "(first start to last completion, database clock), same server, own database"
        )
    return render_checks(title, r.checks(), lines, ratio=True)


# --------------------------------------------------------------------------- worker process


def main(argv: Sequence[str] | None = None) -> int:
    """The worker subprocess's entry point (internal)."""
    return worker_main("python -m mainspring.bench.workflows", _bench_app, argv)


if __name__ == "__main__":
    from mainspring.bench import workflows

    sys.exit(workflows.main())

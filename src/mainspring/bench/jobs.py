"""The job benchmark: how fast Mainspring enqueues and runs no-op jobs, next to its peers.

``mainspring bench jobs`` and ``benchmarks/bench_jobs.py`` call :func:`run_jobs_bench` and
print :func:`render`. Every measurement gets a fresh database: on PostgreSQL the database
``ms_bench_<pid>`` on the given server (created and dropped through the ``postgres`` maintenance
database), on SQLite a new file in a temporary directory.

Measurements
------------
1. **enqueue single**: ``min(jobs, 3000)`` sequential ``await task.enqueue_async()`` calls.
2. **enqueue batch**: ``jobs`` runs through ``enqueue_many_async`` in batches of 1000.
3. **processing**: the runs of (2) (``ANALYZE`` first, as the peers do) are drained by ONE
   worker in a subprocess (``python -m mainspring.bench.jobs _worker ...``) in burst mode with
   an async no-op handler. The worker instruments its own store: the rate is ``jobs`` over
   the time from the start of the first claim that returned runs to the end of the last
   commit. The rate from store open, the wall time from spawn to exit (interpreter start,
   imports, shutdown) and the worker's CPU time are reported beside it.
4. **latency**: an idle worker (not burst) runs a task that records ``time.time()`` as it
   starts; 300 runs are enqueued one at a time, 5-10 ms apart, each carrying its client-side
   enqueue time; latency = start - enqueue time (one machine, one clock).
5. **flat claim cost** (``pending > 0``): ``pending`` available runs are written straight into
   ``ms_runs`` with one SQL statement, then ``VACUUM ANALYZE``; a worker (not burst) is stopped
   once the first ``min(20000, pending)`` runs are committed; the same with 10,000 pending
   (all of them). The ratio of the two rates shows whether a deep backlog slows claims.
6. **worker RSS**: 100,000 pending runs of a task that sleeps 2 s, concurrency 1000 (so 1,000
   runs are in flight); the worker's peak RSS (VmHWM from /proc, else psutil samples).
7. **peers** (PostgreSQL): PgQueuer and Procrastinate through :mod:`mainspring.bench.peers`.

The worker runs on the event loop ``app.run_worker`` picks (``loop="auto"``: uvloop when it
is installed); the peers use uvloop when it is importable too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import io
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urlsplit, urlunsplit

import mainspring
from mainspring.app import App, make_store
from mainspring.engine.loops import LoopKind, event_loop_factory
from mainspring.store.base import QueueDemand, Store

if TYPE_CHECKING:
    from mainspring.bench.peers import PeerResult
    from mainspring.engine.worker import Worker
    from mainspring.run import Claimed, Outcome

DEFAULT_POSTGRES: Final = "postgresql://postgres@127.0.0.1:5432"
BENCH_DB_PREFIX: Final = "ms_bench"  # + "_<pid>": parallel runs must not collide
MAINTENANCE_DB: Final = "postgres"

BATCH: Final = 1000
SINGLE_MAX: Final = 3000
LATENCY_RUNS: Final = 300
LATENCY_WARMUP: Final = 20
WINDOW_MAX: Final = 20_000
BASELINE_PENDING: Final = 10_000
RSS_PENDING: Final = 100_000
RSS_CONCURRENCY: Final = 1000
RSS_SLEEP: Final = 2.0
RSS_WAVES: Final = 3
COUNT_TIMEOUT: Final = 300.0  # seconds a backlog worker may take for its window

NOOP: Final = "bench.noop"
STAMP: Final = "bench.stamp"
SLEEP: Final = "bench.sleep"
EMPTY_INPUT: Final = '{"args":[],"kwargs":{}}'
_SRC: Final = str(Path(__file__).resolve().parents[2])  # the directory holding `mainspring`

# Targets (see render).
TARGET_PROCESS: Final = 5_000.0
TARGET_PGQ_FACTOR: Final = 2.0
TARGET_SINGLE: Final = 1_500.0
TARGET_P50_MS: Final = 10.0
TARGET_FLAT: Final = 0.8
TARGET_RSS_MB: Final = 150.0


# --------------------------------------------------------------------------- results


@dataclass
class PeerFigures:
    """One peer's figures (from :class:`mainspring.bench.peers.PeerResult`)."""

    system: str
    enqueue_single_per_s: float | None = None
    enqueue_batch_per_s: float | None = None
    process_per_s: float | None = None
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Check:
    """One row of the report: a figure, the peers' figures, a target and whether it is met."""

    metric: str
    mainspring: str
    pgqueuer: str = ""
    procrastinate: str = ""
    ratio: str = ""
    target: str = ""
    passed: bool | None = None


@dataclass
class JobsBenchResult:
    """Every figure of one benchmark run; None where a measurement did not run or failed."""

    backend: str
    jobs: int
    concurrency: int
    machine: dict[str, Any] = field(default_factory=dict)
    # 1. enqueue one at a time
    enqueue_single_n: int = 0
    enqueue_single_per_s: float | None = None
    # 2. enqueue in batches of 1000
    enqueue_batch_per_s: float | None = None
    # 3. processing by one worker process (burst, async no-op)
    process_per_s: float | None = None  # first claim -> last commit
    process_from_open_per_s: float | None = None  # store open -> last commit
    process_wall_s: float | None = None  # spawn -> exit: interpreter, imports, shutdown
    process_startup_s: float | None = None  # spawn -> store open
    process_cpu_s: float | None = None  # worker CPU between first claim and last commit
    process_cpu_cores: float | None = None  # that CPU time over the elapsed time
    # 4. enqueue-to-start latency with an idle worker
    latency_n: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    # 5. flat claim cost
    pending: int = 0
    pending_window: int = 0
    pending_per_s: float | None = None  # first `pending_window` runs of `pending`
    pending_first_10k_per_s: float | None = None  # first 10,000 runs of `pending`
    baseline_pending: int = 0
    baseline_per_s: float | None = None  # all runs of `baseline_pending`
    pending_ratio: float | None = None  # pending_per_s / baseline_per_s
    pending_prefill_s: float | None = None
    # 6. worker memory with RSS_CONCURRENCY runs in flight
    rss_peak_mb: float | None = None
    rss_idle_mb: float | None = None
    rss_inflight: int | None = None
    # 7. peers
    peers: dict[str, PeerFigures] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # measurements that failed
    notes: list[str] = field(default_factory=list)  # caveats of measurements that ran
    duration_s: float = 0.0

    def checks(self) -> list[Check]:
        """The report rows, with targets and pass/fail marks."""
        return _checks(self)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checks"] = [asdict(c) for c in self.checks()]
        return data


# --------------------------------------------------------------------------- entry point


def run_jobs_bench(
    backend: str,
    url: str | None,
    jobs: int,
    *,
    concurrency: int = 200,
    peers: bool = True,
    pending: int = 0,
    include_rss: bool = True,
    loop: LoopKind = "auto",
) -> JobsBenchResult:
    """Run the job benchmark on `backend` ("postgres" or "sqlite") and return every figure.

    `url` is the PostgreSQL server (any database path; the benchmark uses its own database
    `ms_bench_<pid>` there) or, for SQLite, a file whose directory holds the temporary databases;
    None means the local server / the system temporary directory. `loop` is the worker's
    event loop: "auto" (the default, what `app.run_worker` uses), "asyncio" or "uvloop".
    A measurement that fails is recorded in `errors` and the others still run.
    """
    backend = _backend_name(backend)
    if jobs < 1:
        raise ValueError("jobs must be at least 1")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    event_loop_factory(loop)  # validates it
    started = time.perf_counter()
    result = JobsBenchResult(backend=backend, jobs=jobs, concurrency=concurrency)
    result.machine = _machine_info(loop)
    bench = _Bench(backend, url, result, loop)
    try:
        asyncio.run(bench.run(pending=pending, include_rss=include_rss))
        if peers and backend == "postgres":
            bench.run_peers()
    finally:
        bench.cleanup()
    result.duration_s = time.perf_counter() - started
    return result


def _backend_name(backend: str) -> str:
    name = backend.lower()
    if name in ("postgres", "postgresql", "pg"):
        return "postgres"
    if name == "sqlite":
        return "sqlite"
    raise ValueError(f"unknown backend {backend!r}: use 'postgres' or 'sqlite'")


def _source_revision() -> str | None:
    """The git commit of a checkout the package runs from (with "-dirty"), else None."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", _SRC, "describe", "--always", "--dirty", "--abbrev=10"],
            capture_output=True, text=True, timeout=5, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _loop_name(loop: LoopKind) -> str:
    """The event loop the worker subprocess will actually run on."""
    factory = event_loop_factory(loop)
    return "asyncio" if factory is None else "uvloop"


def _machine_info(loop: LoopKind) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "revision": _source_revision(),
        "cpu_count": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "mainspring": mainspring.__version__,
        "asyncpg": version("asyncpg"),
        "sqlite": sqlite3.sqlite_version,
        "worker_event_loop": _loop_name(loop),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "db_version": None,
    }


# --------------------------------------------------------------------------- databases


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


@contextlib.asynccontextmanager
async def _connected(url: str) -> AsyncIterator[Store]:
    """An open store on `url` (its plain-SQL methods serve the benchmark's own statements)."""
    store = make_store(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


_PG_INPUT_TYPE: Final = (
    "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
    "WHERE attrelid = 'ms_runs'::regclass AND attname = 'input'"
)
_PG_PREFILL: Final = (  # {input_type}: json or jsonb, whichever the schema uses
    "INSERT INTO ms_runs (id, name, queue, state, input) "
    "SELECT 'bench-' || lpad(g::text, 10, '0'), $1, 'default', 'available', $2::{input_type} "
    "FROM generate_series($3::int, $4::int) AS g"
)
_SQLITE_PREFILL: Final = (
    "WITH RECURSIVE g(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM g WHERE x < ?) "
    "INSERT INTO ms_runs (id, name, queue, state, run_at, input, created_at, updated_at) "
    "SELECT printf('bench-%010d', x), ?, 'default', 'available', ?, ?, ?, ? FROM g"
)
_PREFILL_CHUNK: Final = 100_000  # rows per statement (keeps each under the pool's timeout)


class _Databases:
    """Fresh, migrated databases for one measurement each."""

    def __init__(self, backend: str, url: str | None) -> None:
        self.backend = backend
        self._count = 0
        self._tmp: str | None = None
        self.database = f"{BENCH_DB_PREFIX}_{os.getpid()}"
        if backend == "postgres":
            server = url or DEFAULT_POSTGRES
            if urlsplit(server).scheme not in ("postgres", "postgresql"):
                raise ValueError(f"expected a postgresql:// URL, got {server!r}")
            self.server = server
            self.maintenance = _with_database(server, MAINTENANCE_DB)
        else:
            folder: str | None = None
            if url:
                from mainspring.store.sqlite import path_from_url

                folder = str(Path(path_from_url(url)).resolve().parent)
            self._tmp = tempfile.mkdtemp(prefix="ms_bench_", dir=folder)
            self.server = url or "sqlite"
            self.maintenance = ""

    async def version(self) -> str:
        if self.backend == "sqlite":
            return f"SQLite {sqlite3.sqlite_version}"
        async with _connected(self.maintenance) as store:
            return f"PostgreSQL {await store.fetch_value('SHOW server_version')}"

    async def _admin(self, *statements: str) -> None:
        async with _connected(self.maintenance) as store:
            for statement in statements:  # one by one: DROP/CREATE DATABASE refuse a transaction
                await store.execute_script(statement)

    @contextlib.asynccontextmanager
    async def fresh(self) -> AsyncIterator[str]:
        """The URL of a new, migrated, empty database; dropped afterwards."""
        self._count += 1
        if self.backend == "postgres":
            await self._admin(
                f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)',
                f'CREATE DATABASE "{self.database}"',
            )
            url = _with_database(self.server, self.database)
        else:
            assert self._tmp is not None
            url = f"sqlite:///{self._tmp}/bench_{self._count}.db"
        try:
            await App(url, migrate=False).migrate_async()
            yield url
        finally:
            if self.backend == "postgres":
                await self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            else:
                self._remove_files(f"bench_{self._count}.db*")

    def _remove_files(self, pattern: str) -> None:
        assert self._tmp is not None
        for leftover in Path(self._tmp).glob(pattern):
            leftover.unlink(missing_ok=True)

    def cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    async def prefill(self, url: str, n: int, name: str, input_json: str) -> None:
        """Write `n` available runs of task `name` straight into ms_runs, then (VACUUM) ANALYZE."""
        async with _connected(url) as store:
            insert = _SQLITE_PREFILL
            if self.backend == "postgres":
                input_type = await store.fetch_value(_PG_INPUT_TYPE)
                if input_type not in ("json", "jsonb"):
                    raise RuntimeError(f"unexpected type {input_type!r} of ms_runs.input")
                insert = _PG_PREFILL.format(input_type=input_type)
            for first in range(1, n + 1, _PREFILL_CHUNK):
                last = min(n, first + _PREFILL_CHUNK - 1)
                if self.backend == "postgres":
                    await store.fetch_value(insert, name, input_json, first, last)
                else:
                    now = time.time()
                    await store.fetch_value(insert, first, last, name, now, input_json, now, now)
            await store.execute_script(
                "VACUUM ANALYZE ms_runs" if self.backend == "postgres" else "ANALYZE"
            )

    async def analyze(self, url: str) -> None:
        async with _connected(url) as store:
            await store.execute_script(
                "ANALYZE ms_runs" if self.backend == "postgres" else "ANALYZE"
            )


# --------------------------------------------------------------------------- tasks


class _Probe:
    """Per-process state of the worker subprocess: timings, counters, latencies."""

    def __init__(self, stop_after: int | None = None, checkpoints: Sequence[int] = ()) -> None:
        self.worker: Worker | None = None
        self.store: Store | None = None
        self.stop_after = stop_after
        self.stopped = False
        self.opened_wall: float | None = None
        self.opened_perf: float | None = None
        self.first_claim: float | None = None
        self.first_claim_cpu: float | None = None
        self.last_commit: float | None = None
        self.last_commit_cpu: float | None = None
        self.committed = 0
        self.handled = 0
        self.checkpoints: dict[int, float | None] = dict.fromkeys(checkpoints)
        self.latencies: list[float] = []
        self.expect_latencies = 0
        self.inflight = 0
        self.max_inflight = 0
        self.rss_idle_kb: int | None = None

    def instrument(self, store: Store) -> None:
        """Time the store's claims and commits (one wrapper call per batch, not per run)."""
        self.store = store
        self.opened_perf = time.perf_counter()
        self.opened_wall = time.time()
        self.rss_idle_kb = _proc_status_kb(os.getpid(), "VmRSS")
        claim = store.claim_runs
        commit = store.commit_outcomes

        async def claim_runs(
            node: str, demand: Sequence[QueueDemand], lease_ttl: float
        ) -> list[Claimed]:
            started, cpu = time.perf_counter(), time.process_time()
            rows = await claim(node, demand, lease_ttl)
            if rows and self.first_claim is None:
                self.first_claim, self.first_claim_cpu = started, cpu
            return rows

        async def commit_outcomes(outcomes: Sequence[Outcome]) -> set[str]:
            ids = await commit(outcomes)
            if ids and not self.stopped:
                self.committed += len(ids)
                self.last_commit, self.last_commit_cpu = time.perf_counter(), time.process_time()
                for mark, at in self.checkpoints.items():
                    if at is None and self.committed >= mark:
                        self.checkpoints[mark] = self.last_commit
                if self.stop_after is not None and self.committed >= self.stop_after:
                    self.stop()
            return ids

        store.claim_runs = claim_runs  # type: ignore[method-assign]
        store.commit_outcomes = commit_outcomes  # type: ignore[method-assign]

    def stop(self) -> None:
        if not self.stopped and self.worker is not None:
            self.stopped = True
            self.worker.stop()

    def to_dict(self) -> dict[str, Any]:
        base = self.first_claim
        elapsed = None
        if base is not None and self.last_commit is not None:
            elapsed = self.last_commit - base
        cpu = None
        if self.first_claim_cpu is not None and self.last_commit_cpu is not None:
            cpu = self.last_commit_cpu - self.first_claim_cpu
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "opened_wall": self.opened_wall,
            "open_to_first_claim": (
                None if base is None or self.opened_perf is None else base - self.opened_perf
            ),
            "elapsed": elapsed,
            "cpu": cpu,
            "committed": self.committed,
            "handled": self.handled,
            "checkpoints": {
                str(k): (None if v is None or base is None else v - base)
                for k, v in self.checkpoints.items()
            },
            "latencies": self.latencies,
            "max_inflight": self.max_inflight,
            "rss_idle_kb": self.rss_idle_kb,
            "maxrss_kb": usage.ru_maxrss,
            "process_cpu": usage.ru_utime + usage.ru_stime,
        }


class _BenchApp(App):
    """An App whose stores are instrumented by a probe."""

    def __init__(self, url: str, probe: _Probe) -> None:
        super().__init__(url, migrate=False)
        self.probe = probe

    async def open_store(self) -> Store:
        store = await super().open_store()
        self.probe.instrument(store)
        return store


def _bench_app(url: str, probe: _Probe | None = None) -> App:
    """An App with the benchmark's tasks (the same names in the client and the worker)."""
    app: App = App(url, migrate=False) if probe is None else _BenchApp(url, probe)
    state = probe or _Probe()

    @app.task(name=NOOP, max_attempts=1)
    async def noop() -> None:
        state.handled += 1

    @app.task(name=STAMP, max_attempts=1)
    async def stamp(sent: float, warm: bool = False) -> None:
        started = time.time()
        if warm:
            return
        state.latencies.append(started - sent)
        if len(state.latencies) >= state.expect_latencies:
            state.stop()

    @app.task(name=SLEEP, max_attempts=1)
    async def sleep(seconds: float) -> None:
        state.inflight += 1
        state.max_inflight = max(state.max_inflight, state.inflight)
        try:
            await asyncio.sleep(seconds)
        finally:
            state.inflight -= 1
            state.handled += 1

    return app


# --------------------------------------------------------------------------- worker process


@dataclass
class _WorkerOptions:
    url: str
    mode: str  # drain | count | latency | rss
    concurrency: int
    stop_after: int | None
    checkpoints: list[int]
    expect: int
    timeout: float
    loop: LoopKind


async def _worker_main(opts: _WorkerOptions) -> dict[str, Any]:
    from mainspring.engine.worker import Worker

    probe = _Probe(opts.stop_after, opts.checkpoints)
    probe.expect_latencies = opts.expect
    app = _bench_app(opts.url, probe)
    worker = Worker(
        app,
        concurrency=opts.concurrency,
        burst=opts.mode == "drain",
        install_signal_handlers=False,
    )
    probe.worker = worker
    running = asyncio.create_task(worker.run())
    error: str | None = None
    try:
        async with asyncio.timeout(opts.timeout):
            if opts.mode == "latency":
                await _announce_ready(probe, running)
            await asyncio.shield(running)
    except TimeoutError:
        error = f"worker timed out after {opts.timeout:g} s"
    out = probe.to_dict()
    out["error"] = error
    out["claimed_total"] = worker.claimed_total
    out["completed_total"] = worker.completed_total
    print(json.dumps(out), flush=True)  # before a possibly slow shutdown after a timeout
    if not running.done():
        worker.stop()
        worker.stop()  # the second stop releases in-flight runs at once
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 20)
    return out


async def _announce_ready(probe: _Probe, running: asyncio.Task[None]) -> None:
    """Print READY once the worker's store is open and, on PostgreSQL, it listens."""
    while not running.done():
        store = probe.store
        if store is not None and (store.backend != "postgres" or store.listening()):
            await asyncio.sleep(0.05)  # the listener is being registered
            print("READY", flush=True)
            return
        await asyncio.sleep(0.005)


def _worker_cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mainspring.bench.jobs _worker")
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=("drain", "count", "latency", "rss"), required=True)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--checkpoints", default="")
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    ns = parser.parse_args(list(argv))
    opts = _WorkerOptions(
        url=ns.url,
        mode=ns.mode,
        concurrency=ns.concurrency,
        stop_after=ns.stop_after,
        checkpoints=[int(c) for c in ns.checkpoints.split(",") if c],
        expect=ns.expect,
        timeout=ns.timeout,
        loop=cast(LoopKind, ns.loop),
    )
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(opts.loop)) as runner:
            out = runner.run(_worker_main(opts))
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)
    return 0 if out.get("error") is None else 1


def _proc_status_kb(pid: int, key: str) -> int | None:
    """A /proc/<pid>/status field in kB (Linux), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class _RssSampler:
    """Samples a process's peak RSS: VmHWM from /proc, else psutil's RSS, every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        kb = _proc_status_kb(self.pid, "VmHWM")
        if kb is None:
            try:
                psutil: Any = importlib.import_module("psutil")  # optional, untyped
                kb = int(psutil.Process(self.pid).memory_info().rss) // 1024
            except Exception:
                return
        self.peak_kb = max(self.peak_kb, kb)

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class _Child:
    """One worker subprocess; its stdout lines arrive on a queue, stderr is kept for errors."""

    def __init__(self, proc: asyncio.subprocess.Process, spawned: float) -> None:
        self.proc = proc
        self.spawned = spawned  # time.time() just before the spawn
        self.exited: float | None = None
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self.stderr = bytearray()
        self._readers = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]

    @classmethod
    async def start(cls, url: str, mode: str, concurrency: int, loop: str, **extra: Any) -> _Child:
        cmd = [
            sys.executable, "-m", "mainspring.bench.jobs", "_worker", "--url", url,
            "--mode", mode, "--concurrency", str(concurrency), "--loop", loop,
        ]  # fmt: skip
        for key, value in extra.items():
            if value is not None:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, env.get("PYTHONPATH", "")) if p)
        spawned = time.time()
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        return cls(proc, spawned)

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            await self.lines.put(raw.decode(errors="replace").strip())
        await self.lines.put(None)

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.stderr += raw
            del self.stderr[:-20_000]

    def _failure(self, what: str) -> RuntimeError:
        """An error naming what went wrong, with the end of the worker's log (the why)."""
        lines = self.stderr.decode(errors="replace").strip().splitlines()
        tail = "\n".join(lines[-8:])[-1500:]
        return RuntimeError(
            f"worker subprocess {what}" + (f"; its log ends:\n{tail}" if tail else "")
        )

    async def wait_line(self, predicate: Any, timeout: float) -> str:
        async with asyncio.timeout(timeout):
            while True:
                line = await self.lines.get()
                if line is None:
                    await self.proc.wait()
                    raise self._failure(f"exited with code {self.proc.returncode}")
                if predicate(line):
                    return line

    async def result(self, timeout: float, *, partial: bool = False) -> dict[str, Any]:
        """The worker's JSON line, then its exit (killed if it lingers).

        Raises when the worker reports an error, unless `partial` (a timed-out worker's
        figures so far are still wanted); its "error" key then says what happened.
        """
        try:
            line = await self.wait_line(lambda s: s.startswith("{"), timeout)
        except TimeoutError:
            self.kill()
            raise self._failure(f"timed out after {timeout:g} s") from None
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.kill()
        self.exited = time.time()
        data: dict[str, Any] = json.loads(line)
        if data.get("error") and not (partial and "committed" in data):
            raise self._failure(f"reported {data['error']!r}")
        return data

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def close(self) -> None:
        self.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 10)
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


# --------------------------------------------------------------------------- measurements


def _rate(n: int, seconds: float | None) -> float | None:
    if seconds is None:
        return None
    return n / seconds if seconds > 0 else math.inf


class _Bench:
    def __init__(self, backend: str, url: str | None, result: JobsBenchResult, loop: str) -> None:
        self.backend = backend
        self.result = result
        self.loop = loop
        self.dbs = _Databases(backend, url)

    def cleanup(self) -> None:
        self.dbs.cleanup()

    async def run(self, *, pending: int, include_rss: bool) -> None:
        """Every measurement in turn; SIGTERM cancels cleanly (kills children, drops databases)."""
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        handled = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, main.cancel)
            handled = True
        try:
            await self._measure(pending=pending, include_rss=include_rss)
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGTERM)

    async def _measure(self, *, pending: int, include_rss: bool) -> None:
        r = self.result
        try:
            r.machine["db_version"] = await self.dbs.version()
        except Exception as exc:
            r.errors["database"] = f"{type(exc).__name__}: {exc}"
            return
        steps: list[tuple[str, Any]] = [
            ("enqueue_single", self.enqueue_single),
            ("enqueue_batch+process", self.enqueue_batch_and_process),
            ("latency", self.latency),
        ]
        if pending > 0:
            steps.append(("pending", lambda: self.flat_claim(pending)))
        if include_rss:
            steps.append(("rss", self.rss))
        for name, step in steps:
            try:
                await step()
            except Exception as exc:
                r.errors[name] = f"{type(exc).__name__}: {exc}"

    async def enqueue_single(self) -> None:
        n = min(self.result.jobs, SINGLE_MAX)
        async with self.dbs.fresh() as url:
            app = _bench_app(url)
            task = app.tasks[NOOP]
            try:
                await app.store()  # connect before the clock starts
                started = time.perf_counter()
                for _ in range(n):
                    await task.enqueue_async()
                elapsed = time.perf_counter() - started
            finally:
                await app.aclose()
        self.result.enqueue_single_n = n
        self.result.enqueue_single_per_s = _rate(n, elapsed)

    async def enqueue_batch_and_process(self) -> None:
        r = self.result
        jobs = r.jobs
        async with self.dbs.fresh() as url:
            app = _bench_app(url)
            task = app.tasks[NOOP]
            try:
                await app.store()
                started = time.perf_counter()
                for offset in range(0, jobs, BATCH):
                    n = min(BATCH, jobs - offset)
                    await app.enqueue_many_async([task.call() for _ in range(n)])
                r.enqueue_batch_per_s = _rate(jobs, time.perf_counter() - started)
                await self.dbs.analyze(url)

                child = await _Child.start(url, "drain", r.concurrency, self.loop)
                try:
                    data = await child.result(timeout=max(300.0, jobs / 200))
                finally:
                    await child.close()
                status = await (await app.store()).queue_status("default")
            finally:
                await app.aclose()
        done = status.counts.get("completed", 0)
        if data["committed"] != jobs or done != jobs or data["handled"] != jobs:
            raise RuntimeError(
                f"inconsistent drain: {data['committed']} committed, {data['handled']} handled, "
                f"{done} completed in the database, expected {jobs}"
            )
        r.process_per_s = _rate(jobs, data["elapsed"])
        if data["elapsed"] is not None and data["open_to_first_claim"] is not None:
            r.process_from_open_per_s = _rate(jobs, data["elapsed"] + data["open_to_first_claim"])
        if child.exited is not None:
            r.process_wall_s = child.exited - child.spawned
        if data["opened_wall"] is not None:
            r.process_startup_s = data["opened_wall"] - child.spawned
        r.process_cpu_s = data["cpu"]
        if data["cpu"] is not None and data["elapsed"]:
            r.process_cpu_cores = data["cpu"] / data["elapsed"]

    async def latency(self) -> None:
        r = self.result
        async with self.dbs.fresh() as url:
            app = _bench_app(url)
            task = app.tasks[STAMP]
            child = await _Child.start(
                url, "latency", r.concurrency, self.loop, expect=LATENCY_RUNS, timeout=300
            )
            try:
                await app.store()
                await child.wait_line(lambda s: s == "READY", timeout=60)
                for _ in range(LATENCY_WARMUP):
                    await task.enqueue_async(time.time(), True)
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
                for _ in range(LATENCY_RUNS):
                    await task.enqueue_async(time.time())
                    await asyncio.sleep(random.uniform(0.005, 0.010))
                data = await child.result(timeout=120)
            finally:
                await child.close()
                await app.aclose()
        latencies = sorted(x * 1000 for x in data["latencies"])
        if len(latencies) < 2:
            raise RuntimeError(f"only {len(latencies)} latencies recorded")
        q = statistics.quantiles(latencies, n=100, method="inclusive")
        r.latency_n = len(latencies)
        r.latency_p50_ms, r.latency_p99_ms, r.latency_max_ms = q[49], q[98], latencies[-1]

    async def _count_rate(self, pending: int, window: int) -> tuple[float | None, dict[str, Any]]:
        """Fill `pending` runs, run a worker until `window` are committed; (rate, child data).

        A worker that times out first still yields a rate: the runs it committed over its time.
        """
        async with self.dbs.fresh() as url:
            started = time.perf_counter()
            await self.dbs.prefill(url, pending, NOOP, EMPTY_INPUT)
            prefill = time.perf_counter() - started
            marks = sorted({m for m in (BASELINE_PENDING, window) if m <= window})
            limit = max(COUNT_TIMEOUT, window / 100)
            child = await _Child.start(
                url, "count", self.result.concurrency, self.loop,
                stop_after=window, checkpoints=",".join(map(str, marks)), timeout=limit,
            )  # fmt: skip
            try:
                data = await child.result(timeout=limit + 30, partial=True)
            finally:
                await child.close()
        data["prefill_s"] = prefill
        at = data["checkpoints"].get(str(window))
        if at is not None:
            return _rate(window, at), data
        self.result.notes.append(
            f"{pending:,} pending: the worker committed only {data['committed']:,} of the first "
            f"{window:,} runs in {limit:g} s; the rate shown is over those"
        )
        return _rate(data["committed"], data["elapsed"]), data

    async def flat_claim(self, pending: int) -> None:
        r = self.result
        r.pending = pending
        r.pending_window = min(WINDOW_MAX, pending)
        r.pending_per_s, data = await self._count_rate(pending, r.pending_window)
        r.pending_prefill_s = data["prefill_s"]
        at_10k = data["checkpoints"].get(str(BASELINE_PENDING))
        if r.pending_window >= BASELINE_PENDING and at_10k is not None:
            r.pending_first_10k_per_s = _rate(BASELINE_PENDING, at_10k)
        r.baseline_pending = BASELINE_PENDING
        r.baseline_per_s, _ = await self._count_rate(BASELINE_PENDING, BASELINE_PENDING)
        if r.pending_per_s and r.baseline_per_s:
            r.pending_ratio = r.pending_per_s / r.baseline_per_s

    async def rss(self) -> None:
        r = self.result
        waves = RSS_WAVES * RSS_CONCURRENCY
        async with self.dbs.fresh() as url:
            await self.dbs.prefill(
                url, RSS_PENDING, SLEEP, f'{{"args":[{RSS_SLEEP}],"kwargs":{{}}}}'
            )
            child = await _Child.start(
                url, "rss", RSS_CONCURRENCY, self.loop, stop_after=waves, timeout=300
            )
            sampler = _RssSampler(child.proc.pid)
            sampler.start()
            try:
                data = await child.result(timeout=330)
            finally:
                await sampler.stop()
                await child.close()
        peak_kb = max(sampler.peak_kb, int(data["maxrss_kb"]))
        r.rss_peak_mb = peak_kb / 1024
        if data["rss_idle_kb"]:
            r.rss_idle_mb = data["rss_idle_kb"] / 1024
        r.rss_inflight = data["max_inflight"]

    def run_peers(self) -> None:
        from mainspring.bench.peers import run_peer

        for system in ("pgqueuer", "procrastinate"):
            try:
                peer: PeerResult = run_peer(system, self.dbs.server, self.result.jobs, timeout=900)
            except Exception as exc:
                self.result.peers[system] = PeerFigures(
                    system, error=f"{type(exc).__name__}: {exc}"
                )
                continue
            ok = peer.error is None
            self.result.peers[system] = PeerFigures(
                system=system,
                enqueue_single_per_s=peer.enqueue_single_per_s if ok else None,
                enqueue_batch_per_s=peer.enqueue_batch_per_s if ok else None,
                process_per_s=peer.process_per_s if ok else None,
                error=peer.error,
                config=peer.config,
            )


# --------------------------------------------------------------------------- report


def _fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}/s"


def _fmt_ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} ms"


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or not theirs:
        return None
    return ours / theirs


def _fmt_ratios(ours: float | None, peers: Sequence[float | None]) -> str:
    parts = [_ratio(ours, p) for p in peers]
    if all(p is None for p in parts):
        return ""
    return " / ".join("—" if p is None else f"{p:.2f}x" for p in parts)


def _peer_value(result: JobsBenchResult, system: str, attr: str) -> float | None:
    peer = result.peers.get(system)
    return None if peer is None else getattr(peer, attr)


def _checks(r: JobsBenchResult) -> list[Check]:
    pg = r.backend == "postgres"
    rows: list[Check] = []

    def peer_row(metric: str, attr: str, ours: float | None, target: str, ok: bool | None) -> None:
        pgq = _peer_value(r, "pgqueuer", attr)
        pq = _peer_value(r, "procrastinate", attr)
        rows.append(
            Check(
                metric, _fmt_rate(ours),
                _fmt_rate(pgq) if r.peers else "", _fmt_rate(pq) if r.peers else "",
                _fmt_ratios(ours, [pgq, pq]), target, ok,
            )
        )  # fmt: skip

    single = r.enqueue_single_per_s
    peer_row(
        f"enqueue single ({r.enqueue_single_n:,})", "enqueue_single_per_s", single,
        f"≥ {TARGET_SINGLE:,.0f}/s", None if single is None else single >= TARGET_SINGLE,
    )  # fmt: skip

    batch = r.enqueue_batch_per_s
    pgq_batch = _peer_value(r, "pgqueuer", "enqueue_batch_per_s")
    batch_ok = None if batch is None or pgq_batch is None else batch >= pgq_batch
    peer_row(
        f"enqueue batch ({BATCH:,}/call)", "enqueue_batch_per_s", batch,
        "≥ PgQueuer" if pg else "", batch_ok,
    )  # fmt: skip

    proc = r.process_per_s
    pgq_proc = _peer_value(r, "pgqueuer", "process_per_s")
    proc_ok: bool | None = None
    if proc is not None:
        proc_ok = proc >= TARGET_PROCESS
        if pg and pgq_proc is not None:
            proc_ok = proc_ok and proc >= TARGET_PGQ_FACTOR * pgq_proc
    target = f"≥ {TARGET_PROCESS:,.0f}/s" + (f", ≥ {TARGET_PGQ_FACTOR:g}x PgQ" if pg else "")
    peer_row(f"processing (1 worker, c={r.concurrency})", "process_per_s", proc, target, proc_ok)

    if r.process_from_open_per_s is not None:
        rows.append(Check("  from store open", _fmt_rate(r.process_from_open_per_s)))
    if r.process_wall_s is not None:
        startup = "" if r.process_startup_s is None else f", startup {r.process_startup_s:.2f} s"
        wall = _fmt_rate(_rate(r.jobs, r.process_wall_s))
        rows.append(Check("  wall: spawn to exit", f"{wall} ({r.process_wall_s:.2f} s{startup})"))
    if r.process_cpu_s is not None and r.process_cpu_cores is not None:
        per_k = r.process_cpu_s / r.jobs * 1000 * 1000
        rows.append(
            Check("  worker CPU", f"{r.process_cpu_cores:.2f} cores, {per_k:.0f} ms/1k runs")
        )

    if r.latency_n:
        p50_ok = (r.latency_p50_ms or 0) < TARGET_P50_MS if pg else None
        rows.append(
            Check(
                f"latency p50 (idle worker, {r.latency_n})", _fmt_ms(r.latency_p50_ms),
                target=f"< {TARGET_P50_MS:g} ms" if pg else "", passed=p50_ok,
            )
        )  # fmt: skip
        rows.append(Check("latency p99", _fmt_ms(r.latency_p99_ms)))
        rows.append(Check("latency max", _fmt_ms(r.latency_max_ms)))

    if r.pending:
        flat_ok = None if r.pending_ratio is None else r.pending_ratio >= TARGET_FLAT
        ratio = "" if r.pending_ratio is None else f"{r.pending_ratio:.2f}x"
        rows.append(
            Check(
                f"backlog {r.pending:,}: first {r.pending_window:,} runs",
                _fmt_rate(r.pending_per_s), ratio=ratio,
                target=f"≥ {TARGET_FLAT:g}x backlog {r.baseline_pending:,}", passed=flat_ok,
            )
        )  # fmt: skip
        if r.pending_first_10k_per_s is not None and r.pending_window > BASELINE_PENDING:
            first = _ratio(r.pending_first_10k_per_s, r.baseline_per_s)
            rows.append(
                Check(
                    f"backlog {r.pending:,}: first {BASELINE_PENDING:,} runs",
                    _fmt_rate(r.pending_first_10k_per_s),
                    ratio="" if first is None else f"{first:.2f}x",
                )
            )
        rows.append(Check(f"backlog {r.baseline_pending:,}: all runs", _fmt_rate(r.baseline_per_s)))

    if r.rss_peak_mb is not None:
        inflight = "" if r.rss_inflight is None else f" ({r.rss_inflight:,} in flight)"
        idle = "" if r.rss_idle_mb is None else f" (idle {r.rss_idle_mb:.0f} MB)"
        rows.append(
            Check(
                f"worker peak RSS{inflight}", f"{r.rss_peak_mb:.0f} MB{idle}",
                target=f"< {TARGET_RSS_MB:g} MB", passed=r.rss_peak_mb < TARGET_RSS_MB,
            )
        )  # fmt: skip
    return rows


def render(result: JobsBenchResult, fmt: str = "table") -> str:
    """The result as a rich table (plain text), or as JSON when fmt == "json"."""
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2, default=str)
    from rich.console import Console
    from rich.table import Table

    r = result
    m = r.machine
    title = f"mainspring bench jobs: {r.backend}, {r.jobs:,} jobs, concurrency {r.concurrency}"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("mainspring", justify="right")
    if r.peers:
        table.add_column("pgqueuer", justify="right")
        table.add_column("procrastinate", justify="right")
        table.add_column("ratio vs pgq / procr.", justify="right")
    else:
        table.add_column("ratio", justify="right")
    table.add_column("target")
    table.add_column("", justify="center")
    for c in r.checks():
        mark = "" if c.passed is None else ("✓ pass" if c.passed else "✗ FAIL")
        cells = [c.metric, c.mainspring]
        if r.peers:
            cells += [c.pgqueuer, c.procrastinate]
        cells += [c.ratio, c.target, mark]
        table.add_row(*cells)

    buffer = io.StringIO()
    console = Console(file=buffer, width=200, force_terminal=False, color_system=None)
    console.print(table)
    console.print(
        f"machine: {m.get('cpu_count')} CPUs, {m.get('python')}, {m.get('db_version')}, "
        f"{m.get('platform')}; load {m.get('load_average_at_start')}; "
        f"worker loop {m.get('worker_event_loop')}; revision {m.get('revision')}; "
        f"total {r.duration_s:.0f} s",
        highlight=False,
    )
    for name, peer in r.peers.items():
        loop = peer.config.get("event_loop", "?")
        version = peer.config.get("version", "?")
        console.print(f"{name} {version} (loop {loop})", highlight=False)
        if peer.error:
            console.print(f"  error: {peer.error}", highlight=False)
    for note in r.notes:
        console.print(f"note: {note}", highlight=False)
    for name, error in r.errors.items():
        console.print(f"error in {name}: {error}", highlight=False)
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_worker"]:
        return _worker_cli(args[1:])
    print("usage: python -m mainspring.bench.jobs _worker ... (internal); "
          "run benchmarks/bench_jobs.py or `mainspring bench jobs`", file=sys.stderr)  # fmt: skip
    return 2


if __name__ == "__main__":
    from mainspring.bench import jobs

    sys.exit(jobs.main())

"""Run the no-op-job workload through peer PostgreSQL job queues: PgQueuer and Procrastinate.

``mainspring bench jobs --backend postgres`` compares itself with these two libraries in the
same run. Each peer is measured in a *subprocess* (``python -m mainspring.bench.peers <system>
--dsn ... --jobs N``, which prints one JSON line) so that its memory, event loop and drivers
stay isolated from ours; :func:`run_peer` starts that subprocess and turns its JSON line into a
:class:`PeerResult`. Nothing from a peer library is imported into the calling process.

Workload, identical for both peers
----------------------------------
Every peer runs in its own fresh database, ``ms_bench_pgqueuer_<pid>`` /
``ms_bench_procrastinate_<pid>`` (the subprocess's pid, so concurrent runs never drop each
other's database), created through the ``postgres`` maintenance database with ``DROP DATABASE
IF EXISTS ... WITH (FORCE)`` before and after (databases left by killed runs, whose pid is gone,
are dropped too), and its schema is installed through the peer's own API
(PgQueuer: ``Queries.install()``, what ``pgq install`` runs; Procrastinate:
``app.schema_manager.apply_schema_async()``). Then, in order:

1. **enqueue single**: ``min(jobs, 2000)`` jobs, each awaited on its own through the library's
   normal async enqueue (PgQueuer ``Queries.enqueue("noop", None)``, Procrastinate
   ``task.defer_async()``). The queue is then emptied (TRUNCATE, not measured).
2. **enqueue batch**: ``jobs`` jobs in batches of 1000 through the library's bulk API
   (PgQueuer ``Queries.enqueue([...], [...], [...])``, Procrastinate
   ``task.batch_defer_async(*kwargs)``). ``ANALYZE`` runs afterwards (not measured) so the
   drain starts with fresh planner statistics and no autovacuum analyze is due mid-run.
3. **process (drain)**: one worker process with one event loop runs async no-op handlers
   until all ``jobs`` pre-enqueued jobs are done, emulating PgQueuer's own
   ``tools/benchmark.py --strategy drain``. The clock starts when the worker is started
   (connections and pools are opened beforehand, as in PgQueuer's benchmark) and stops when
   the last job's *done state is committed*: PgQueuer's buffered ``log_jobs`` (row deleted
   from ``pgqueuer`` and logged ``successful`` in ``pgqueuer_log``) and Procrastinate's
   ``finish_job`` (status ``succeeded``) are wrapped to count committed completions. The
   worker is then stopped cleanly and the result is checked in the database: the handler ran
   exactly ``jobs`` times and exactly ``jobs`` jobs are in the done state, or the run is
   reported as an error.

Configuration: fair and favourable to each peer
-----------------------------------------------
* Event loop: uvloop when it is importable (PgQueuer's benchmark uses it; the project does not
  depend on it), else the standard asyncio loop. The loop used is reported in ``config``.
* PgQueuer: asyncpg driver (its fastest, and its benchmark's default ``apg``); as in its
  drain benchmark, several ``QueueManager`` instances ("dequeue tasks"), each on its own
  asyncpg connection, share the one worker event loop. ``QueueManager`` is used directly
  rather than ``PgQueuer`` so no idle cron ``SchedulerManager`` polls alongside. Library
  defaults otherwise (unbounded per-worker concurrency, 30 s heartbeat timeout, buffered
  status log). On this 2-core machine a sweep of dequeue tasks {1, 2, 3, 5, 8} x batch size
  {10, 25, 50, 100} (20k jobs, repeated) found **2 dequeue tasks x batch size 100** best
  (~22k jobs/s on a quiet machine; 1 x 100 and 2 x 50 close behind), about 2.4x its
  benchmark default of 5 x 10 (~9k jobs/s). uvloop adds ~10% over the asyncio loop. That is
  the default.
* Procrastinate: its async ``PsycopgConnector`` (psycopg 3 + psycopg_pool), one worker
  (``run_worker_async(wait=False)``, which stops once the queue is drained), async no-op task,
  ``delete_jobs="never"`` (its default; jobs end in ``succeeded``), LISTEN/NOTIFY on (its
  default). A sweep of worker concurrency {1, 2, 5, 10, 20, 30, 50} x pool size {4 (the
  psycopg_pool default) .. concurrency + 2} found throughput flat, within run-to-run noise,
  for concurrency 2..20 and pools of 4..12 (~0.9-1.1k jobs/s on a quiet machine): the
  worker fetches one job per query, serially, so more concurrency does not help, and
  concurrency 1 (its default) is about half as fast. **Concurrency 10 with a pool of 6** was
  at the top of that range and is the default. ``delete_jobs="successful"`` and the asyncio
  loop were not faster.

The tuning knobs are command-line options (``--pgq-dequeue``, ``--pgq-batch-size``,
``--pq-concurrency``, ``--pq-pool-size``, ``--pq-delete-jobs``, ``--loop``) so the sweep can be
repeated on other hardware; :func:`run_peer` always uses the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

SYSTEMS: Final = ("pgqueuer", "procrastinate")
BATCH_SIZE: Final = 1000
SINGLE_MAX: Final = 2000
MAINTENANCE_DB: Final = "postgres"

PGQ_DEQUEUE: Final = 2
PGQ_BATCH_SIZE: Final = 100
PQ_CONCURRENCY: Final = 10
PQ_POOL_SIZE: Final = 6
PQ_DELETE_JOBS: Final = "never"

_ENTRYPOINT: Final = "noop"
# ms_bench_<system>_<pid of the peer subprocess>: concurrent runs never share a database.
_DB_PATTERN: Final = re.compile(r"ms_bench_(?:pgqueuer|procrastinate)_([0-9]+)")
# What the peer subprocess is doing, for timeout and error messages.
_PROGRESS: Final[dict[str, str]] = {"phase": "setup"}
_DROP_TIMEOUT: Final = 30.0


@dataclass
class PeerResult:
    """One peer's figures (jobs/s). ``config`` records how the peer was configured."""

    system: str  # "pgqueuer" | "procrastinate"
    jobs: int
    enqueue_batch_per_s: float  # batch enqueue rate (batches of 1000 / the bulk API)
    enqueue_single_per_s: float  # one-job-at-a-time enqueue rate, on min(jobs, 2000) jobs
    process_per_s: float  # drain rate of N pre-enqueued no-op jobs by one worker process
    error: str | None = None  # set instead of raising when the peer could not run
    config: dict[str, Any] = field(default_factory=dict)  # how the peer was configured


# --------------------------------------------------------------------------- parent side


def _src_root() -> Path:
    """The directory that holds the ``mainspring`` package (``src`` in a checkout)."""
    return Path(__file__).resolve().parents[2]


def _failed(system: str, jobs: int, error: str) -> PeerResult:
    return PeerResult(system, jobs, 0.0, 0.0, 0.0, error=error)


def _tail(text: str, limit: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _parse_result(system: str, jobs: int, stdout: str) -> PeerResult | None:
    """The last JSON object line the subprocess printed, as a PeerResult."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        try:
            config = data.get("config")
            return PeerResult(
                system=str(data.get("system", system)),
                jobs=int(data.get("jobs", jobs)),
                enqueue_batch_per_s=float(data.get("enqueue_batch_per_s") or 0.0),
                enqueue_single_per_s=float(data.get("enqueue_single_per_s") or 0.0),
                process_per_s=float(data.get("process_per_s") or 0.0),
                error=None if data.get("error") is None else str(data["error"]),
                config=config if isinstance(config, dict) else {},
            )
        except (TypeError, ValueError) as exc:
            return _failed(system, jobs, f"unreadable peer result {line!r}: {exc}")
    return None


def run_peer(system: str, dsn: str, jobs: int, timeout: float = 300) -> PeerResult:
    """Benchmark one peer (``"pgqueuer"`` or ``"procrastinate"``) in a subprocess.

    ``dsn`` is any ``postgresql://`` URL of the server; the peer gets its own database on it.
    Never raises for a peer failure or a timeout: those come back as ``PeerResult.error``.
    """
    if system not in SYSTEMS:
        return _failed(system, jobs, f"unknown peer system {system!r}; expected one of {SYSTEMS}")
    if jobs < 1:
        return _failed(system, jobs, "jobs must be at least 1")
    # Leave the child time to notice its own deadline, stop its worker and drop its database.
    child_timeout = max(1.0, timeout - min(15.0, timeout * 0.2))
    cmd = [
        sys.executable,
        "-m",
        "mainspring.bench.peers",
        system,
        "--dsn",
        dsn,
        "--jobs",
        str(jobs),
        "--timeout",
        f"{child_timeout:.1f}",
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_src_root()), env.get("PYTHONPATH", "")) if p
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    except OSError as exc:
        return _failed(system, jobs, f"could not start peer subprocess: {exc}")

    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.terminate()  # SIGTERM: the child cancels its run and drops its database
        try:
            stdout, stderr = proc.communicate(timeout=_DROP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    except BaseException:  # e.g. KeyboardInterrupt: let the child drop its database, then go
        proc.terminate()
        try:
            proc.wait(timeout=_DROP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise

    result = _parse_result(system, jobs, stdout or "")
    if timed_out:
        return _failed(system, jobs, f"peer {system} timed out after {timeout:g}s")
    if result is None:
        detail = _tail(stderr or "") or _tail(stdout or "") or "no output"
        return _failed(system, jobs, f"peer {system} exited with code {proc.returncode}: {detail}")
    return result


# --------------------------------------------------------------------------- child side


@dataclass
class _Options:
    system: str
    dsn: str
    jobs: int
    timeout: float
    loop: str
    pgq_dequeue: int
    pgq_batch_size: int
    pq_concurrency: int
    pq_pool_size: int
    pq_delete_jobs: str


@dataclass
class _Rates:
    enqueue_batch_per_s: float = 0.0
    enqueue_single_per_s: float = 0.0
    process_per_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


class _Completion:
    """Counts committed completions; records the moment the N-th one lands."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.handled = 0
        self.done = 0
        self.done_at: float | None = None
        self.all_done = asyncio.Event()

    def handle(self) -> None:
        self.handled += 1

    def completed(self, n: int) -> None:
        self.done += n
        if self.done >= self.target and self.done_at is None:
            self.done_at = time.perf_counter()
            self.all_done.set()


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"expected a postgresql:// URL, got {dsn!r}")
    return urlunsplit(parts._replace(path="/" + database))


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.inf


async def _admin(maintenance_dsn: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(maintenance_dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _recreate_database(maintenance_dsn: str, name: str) -> None:
    """Create ``name`` afresh, first dropping databases left behind by killed peer runs."""
    import asyncpg

    conn = await asyncpg.connect(maintenance_dsn)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname ~ $1", _DB_PATTERN.pattern
        )
        for row in rows:
            datname = str(row["datname"])
            match = _DB_PATTERN.fullmatch(datname)
            if datname == name or (match is not None and not _pid_alive(int(match[1]))):
                await conn.execute(f'DROP DATABASE IF EXISTS "{datname}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(maintenance_dsn: str, name: str) -> None:
    await _admin(maintenance_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _wait_for_completion(
    completion: _Completion, workers: Sequence[asyncio.Task[Any]]
) -> None:
    """Until all jobs are done; raises if every worker stopped (or one crashed) before that."""
    done_waiter = asyncio.create_task(completion.all_done.wait())
    try:
        pending: set[asyncio.Task[Any]] = set(workers)
        while not completion.all_done.is_set():
            finished, _ = await asyncio.wait(
                {done_waiter, *pending}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in finished - {done_waiter}:
                pending.discard(task)
                if not task.cancelled() and (exc := task.exception()) is not None:
                    raise RuntimeError(f"worker failed: {exc!r}") from exc
            if not pending and not completion.all_done.is_set():
                raise RuntimeError(
                    f"workers stopped with {completion.done}/{completion.target} jobs done "
                    f"({completion.handled} handled)"
                )
    finally:
        done_waiter.cancel()


def _check_counts(completion: _Completion, done_in_db: int, left_in_db: int) -> None:
    n = completion.target
    if completion.handled != n or done_in_db != n or left_in_db != 0:
        raise RuntimeError(
            f"inconsistent drain: handler ran {completion.handled}x, {done_in_db} jobs done "
            f"and {left_in_db} left in the database, expected {n} / {n} / 0"
        )


async def _bench_pgqueuer(opts: _Options, dsn: str) -> _Rates:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
    from pgqueuer.domain import models
    from pgqueuer.domain.types import JOB_STATUS, QueueExecutionMode

    jobs = opts.jobs
    rates = _Rates(
        config={
            "driver": "asyncpg (one connection per dequeue task)",
            "dequeue_tasks": opts.pgq_dequeue,
            "batch_size": opts.pgq_batch_size,
            "mode": "drain",
        }
    )
    completion = _Completion(jobs)

    class CountingQueries(Queries):
        async def log_jobs(
            self,
            job_status: list[tuple[models.Job, JOB_STATUS, models.TracebackRecord | None]],
        ) -> None:
            await super().log_jobs(job_status)
            completion.completed(sum(1 for _, status, _ in job_status if status == "successful"))

    conn = await asyncpg.connect(dsn)
    worker_conns: list[asyncpg.Connection] = []
    try:
        queries = Queries(AsyncpgDriver(conn))
        await queries.install()

        _PROGRESS["phase"] = "enqueue_single"
        single = min(jobs, SINGLE_MAX)
        started = time.perf_counter()
        for _ in range(single):
            await queries.enqueue(_ENTRYPOINT, None)
        rates.enqueue_single_per_s = _rate(single, time.perf_counter() - started)
        await queries.clear_queue()
        await queries.clear_queue_log()

        _PROGRESS["phase"] = "enqueue_batch"
        started = time.perf_counter()
        for offset in range(0, jobs, BATCH_SIZE):
            n = min(BATCH_SIZE, jobs - offset)
            await queries.enqueue([_ENTRYPOINT] * n, [None] * n, [0] * n)
        rates.enqueue_batch_per_s = _rate(jobs, time.perf_counter() - started)
        await conn.execute("ANALYZE")

        managers: list[QueueManager] = []
        for _ in range(opts.pgq_dequeue):
            wconn = await asyncpg.connect(dsn)
            worker_conns.append(wconn)
            qm = QueueManager(CountingQueries(AsyncpgDriver(wconn)))

            @qm.entrypoint(_ENTRYPOINT)
            async def noop(job: Job) -> None:
                completion.handle()

            managers.append(qm)

        _PROGRESS["phase"] = "process"
        started = time.perf_counter()
        workers = [
            asyncio.create_task(
                qm.run(
                    batch_size=opts.pgq_batch_size,
                    mode=QueueExecutionMode.drain,
                )
            )
            for qm in managers
        ]
        try:
            await _wait_for_completion(completion, workers)
        finally:
            for qm in managers:
                qm.shutdown.set()
            await asyncio.gather(*workers, return_exceptions=True)
        assert completion.done_at is not None
        rates.process_per_s = _rate(jobs, completion.done_at - started)

        left = await conn.fetchval("SELECT count(*) FROM pgqueuer")
        done = await conn.fetchval("SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'")
        _check_counts(completion, int(done), int(left))
    finally:
        for c in (conn, *worker_conns):
            with contextlib.suppress(Exception):
                await c.close(timeout=5)
    return rates


async def _bench_procrastinate(opts: _Options, dsn: str) -> _Rates:
    import procrastinate
    from procrastinate import jobs as pq_jobs
    from procrastinate import manager as pq_manager

    jobs = opts.jobs
    rates = _Rates(
        config={
            "connector": "PsycopgConnector (psycopg 3 async + psycopg_pool)",
            "concurrency": opts.pq_concurrency,
            "pool_size": opts.pq_pool_size,
            "delete_jobs": opts.pq_delete_jobs,
            "listen_notify": True,
            "wait": False,
        }
    )
    completion = _Completion(jobs)

    class CountingJobManager(pq_manager.JobManager):
        async def finish_job(
            self, job: pq_jobs.Job, status: pq_jobs.Status, delete_job: bool
        ) -> None:
            await super().finish_job(job=job, status=status, delete_job=delete_job)
            if status == pq_jobs.Status.SUCCEEDED:
                completion.completed(1)

    connector = procrastinate.PsycopgConnector(
        conninfo=dsn, min_size=opts.pq_pool_size, max_size=opts.pq_pool_size
    )
    app = procrastinate.App(connector=connector)
    app.job_manager = CountingJobManager(connector)

    @app.task(name=_ENTRYPOINT)
    async def noop() -> None:
        completion.handle()

    async with app.open_async():
        await app.schema_manager.apply_schema_async()

        _PROGRESS["phase"] = "enqueue_single"
        single = min(jobs, SINGLE_MAX)
        started = time.perf_counter()
        for _ in range(single):
            await noop.defer_async()
        rates.enqueue_single_per_s = _rate(single, time.perf_counter() - started)
        await connector.execute_query_async("TRUNCATE procrastinate_jobs CASCADE")

        _PROGRESS["phase"] = "enqueue_batch"
        started = time.perf_counter()
        for offset in range(0, jobs, BATCH_SIZE):
            n = min(BATCH_SIZE, jobs - offset)
            await noop.batch_defer_async(*({} for _ in range(n)))
        rates.enqueue_batch_per_s = _rate(jobs, time.perf_counter() - started)
        await connector.execute_query_async("ANALYZE")

        _PROGRESS["phase"] = "process"
        started = time.perf_counter()
        worker = asyncio.create_task(
            app.run_worker_async(
                concurrency=opts.pq_concurrency,
                wait=False,
                delete_jobs=opts.pq_delete_jobs,
                install_signal_handlers=False,
                listen_notify=True,
            )
        )
        try:
            await _wait_for_completion(completion, [worker])
            # wait=False: the worker stops on its own once its fetch finds the queue empty.
            await asyncio.wait_for(asyncio.shield(worker), timeout=_DROP_TIMEOUT)
        finally:
            if not worker.done():
                worker.cancel()  # graceful: Procrastinate turns the cancel into a stop
            await asyncio.gather(worker, return_exceptions=True)
        assert completion.done_at is not None
        rates.process_per_s = _rate(jobs, completion.done_at - started)

        rows = await connector.execute_query_all_async(
            "SELECT count(*) FILTER (WHERE status = 'succeeded') AS done, "
            "count(*) FILTER (WHERE status IN ('todo', 'doing')) AS left_ "
            "FROM procrastinate_jobs"
        )
        done = int(rows[0]["done"])
        if opts.pq_delete_jobs != "never":
            done = completion.done  # succeeded rows were deleted; trust the commit count
        _check_counts(completion, done, int(rows[0]["left_"]))
    return rates


_BENCHES: Final[dict[str, Callable[[_Options, str], Coroutine[Any, Any, _Rates]]]] = {
    "pgqueuer": _bench_pgqueuer,
    "procrastinate": _bench_procrastinate,
}


async def _run_child(opts: _Options, loop_name: str) -> _Rates:
    database = f"ms_bench_{opts.system}_{os.getpid()}"
    maintenance_dsn = _with_database(opts.dsn, MAINTENANCE_DB)
    peer_dsn = _with_database(opts.dsn, database)

    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, main.cancel)

    async def drop() -> None:
        # FORCE ends any session the peer left behind.
        await asyncio.wait_for(
            asyncio.shield(_drop_database(maintenance_dsn, database)), _DROP_TIMEOUT
        )

    await _recreate_database(maintenance_dsn, database)
    try:
        async with asyncio.timeout(opts.timeout):
            rates = await _BENCHES[opts.system](opts, peer_dsn)
    except BaseException:
        # After a timeout, SIGTERM or failure too, without hiding the original error;
        # a database that still cannot be dropped is swept up by the next run.
        with contextlib.suppress(Exception):
            await drop()
        raise
    await drop()
    rates.config["event_loop"] = loop_name
    rates.config["database"] = database
    return rates


def _loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.new_event_loop, f"uvloop {_library_version('uvloop')}"
    return None, "asyncio"


def _library_version(system: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(system)
    except PackageNotFoundError:
        return "not installed"


def _parse_args(argv: Sequence[str] | None) -> _Options:
    parser = argparse.ArgumentParser(
        prog="python -m mainspring.bench.peers",
        description="Run the no-op-job workload through a peer library; print one JSON line.",
    )
    parser.add_argument("system", choices=SYSTEMS)
    parser.add_argument("--dsn", required=True, help="postgresql:// URL of the server")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=300.0, help="hard limit, seconds")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--pgq-dequeue", type=int, default=PGQ_DEQUEUE)
    parser.add_argument("--pgq-batch-size", type=int, default=PGQ_BATCH_SIZE)
    parser.add_argument("--pq-concurrency", type=int, default=PQ_CONCURRENCY)
    parser.add_argument("--pq-pool-size", type=int, default=PQ_POOL_SIZE)
    parser.add_argument(
        "--pq-delete-jobs", choices=("never", "successful", "always"), default=PQ_DELETE_JOBS
    )
    ns = parser.parse_args(argv)
    if ns.jobs < 1:
        parser.error("--jobs must be at least 1")
    return _Options(
        system=ns.system,
        dsn=ns.dsn,
        jobs=ns.jobs,
        timeout=ns.timeout,
        loop=ns.loop,
        pgq_dequeue=max(1, ns.pgq_dequeue),
        pgq_batch_size=max(1, ns.pgq_batch_size),
        pq_concurrency=max(1, ns.pq_concurrency),
        pq_pool_size=max(2, ns.pq_pool_size),
        pq_delete_jobs=ns.pq_delete_jobs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = _parse_args(argv)
    out: dict[str, Any] = {
        "system": opts.system,
        "jobs": opts.jobs,
        "enqueue_batch_per_s": 0.0,
        "enqueue_single_per_s": 0.0,
        "process_per_s": 0.0,
        "error": None,
        "config": {"version": _library_version(opts.system)},
    }
    code = 0
    try:
        factory, loop_name = _loop_factory(opts.loop)
        with asyncio.Runner(loop_factory=factory) as runner:
            rates = runner.run(_run_child(opts, loop_name))
        out.update(
            enqueue_batch_per_s=rates.enqueue_batch_per_s,
            enqueue_single_per_s=rates.enqueue_single_per_s,
            process_per_s=rates.process_per_s,
        )
        out["config"].update(rates.config)
    except TimeoutError:
        out["error"] = f"timed out after {opts.timeout:g}s (during {_PROGRESS['phase']})"
        code = 1
    except (asyncio.CancelledError, KeyboardInterrupt):
        out["error"] = "interrupted"
        code = 1
    except Exception as exc:
        out["error"] = f"{type(exc).__name__} during {_PROGRESS['phase']}: {exc}"
        code = 1
    print(json.dumps(out), flush=True)
    return code


if __name__ == "__main__":
    # Run through the importable module, not ``__main__``, so the peer code lives in
    # ``mainspring.bench.peers`` (Procrastinate warns about apps defined in ``__main__``).
    from mainspring.bench import peers

    sys.exit(peers.main())

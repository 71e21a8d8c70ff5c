"""The workflow benchmark's peer: the same three-step workflow run by DBOS Transact.

``mainspring bench workflows --backend postgres`` runs this module in a *subprocess*
(``python -m mainspring.bench.dbos_peer --dsn ... --workflows N``, which prints one JSON line),
so DBOS's threads, event loop and connection pool stay out of the calling process. DBOS is
imported only here, and only when the subprocess runs: it is a ``bench`` extra.

Workload
--------
The database ``ms_bench_dbos_<pid>`` (the subprocess's pid) is created on the given server
through the ``postgres`` maintenance database and dropped afterwards; it is DBOS's system
database. The workflow is ``@DBOS.workflow(name="bench3")`` calling three async
``@DBOS.step()`` functions in sequence (each returns its input plus one), as
``mainspring.bench.workflows`` runs ``wf.activity`` three times. A step counter checks that
every step ran exactly once.

Two ways to run N workflows, both what a DBOS user would write for throughput:

* ``queue`` (the default): the workflows are enqueued beforehand (not measured) through a
  ``DBOSClient`` on a queue registered with ``worker_concurrency`` and
  ``polling_interval_sec``; then ONE DBOS process is launched (from inside the running event
  loop, so DBOS runs the dequeued async workflows on that loop) and drains the queue. This
  matches Mainspring's measurement: pre-inserted runs, one worker process.
* ``start``: a launched DBOS process calls ``DBOS.start_workflow_async`` and awaits each
  handle's result, keeping ``concurrency`` workflows in flight.

The rate is N over the time from the first workflow's start (``started_at_epoch_ms``, stamped
by the dequeue; the row's ``created_at`` for ``start``) to the last one's
``completed_at``, both read from ``dbos.workflow_status`` afterwards, so both are the
database's clock: first claim to last commit, as for Mainspring. Then every workflow must be
``SUCCESS`` with output ``i + 3`` and the steps must have run exactly ``3 * N`` times, or the
run is reported as an error.

Configuration (fair and favourable to DBOS)
-------------------------------------------
DBOS 3.4.0's defaults except: log level WARNING (no per-workflow log lines), the event loop
is uvloop when importable (as for the job peers; DBOS runs the async workflows on it), and
the queue and pool are tuned. On this 2-core machine with local PostgreSQL 15 (and other
load on it), a sweep of 1,000 workflows over ``queue`` with worker concurrency
{10, 50, 100, 200, 500, unbounded} x polling interval {0.01, 0.1, 1 (the default)} s found
0.01 s clearly best (at 1 s, small concurrencies fall to 10-65/s), concurrency 50-200 at
the top, and ``start`` with {20, 50, 200, 500} in flight slightly behind it, uvloop ahead of
the asyncio loop by ~5-15%. Three rounds of 2,000 workflows over the leaders (queue c=50 or
100, polling 0.01 or 0.001 s, pool 20 (the default) or 40; start c=20, pool 20 or 40) put all of
them at 110-121 workflows/s on average, within the run-to-run noise; **queue, worker
concurrency 50, polling 0.01 s, pool 40** was at the top and is the default. The DBOS
process is CPU-bound: it keeps one core busy throughout (about 8 ms of its CPU per workflow),
so more concurrency or connections cannot help. The knobs are command-line options so the
sweep can be repeated on other hardware; the benchmark runs the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from mainspring.bench.peers import (
    MAINTENANCE_DB,
    _drop_database,
    _library_version,
    _loop_factory,
    _recreate_database,
    _with_database,
)

APP_NAME: Final = "ms_bench"
WORKFLOW: Final = "bench3"
QUEUE: Final = "bench"
STEPS: Final = 3
MODES: Final = ("queue", "start")

MODE: Final = "queue"
CONCURRENCY: Final = 50
POLLING_INTERVAL: Final = 0.01
POOL_SIZE: Final = 40
_WAIT_POLL: Final = 0.05  # seconds between checks of the completed count


@dataclass
class _Options:
    dsn: str
    workflows: int
    timeout: float
    mode: str
    concurrency: int
    polling_interval: float
    pool_size: int
    loop: str


_STATUS: Final = (
    "SELECT count(*) FILTER (WHERE status = 'SUCCESS') AS done, "
    "count(*) FILTER (WHERE status IN ('ERROR', 'CANCELLED', 'MAX_RECOVERY_ATTEMPTS_EXCEEDED')) "
    "AS failed, min(coalesce(started_at_epoch_ms, created_at)) AS first, "
    "max(completed_at) AS last FROM dbos.workflow_status WHERE name = $1"
)


def _define(dbos_cls: Any, counter: list[int]) -> Any:
    """Register the three steps and the workflow with DBOS; the workflow function."""

    async def add_one(x: int) -> int:
        counter[0] += 1
        return x + 1

    step1, step2, step3 = (dbos_cls.step(name=f"step{k}")(add_one) for k in range(1, 4))

    async def three(x: int) -> int:
        a = await step1(x)
        b = await step2(a)
        return int(await step3(b))

    return dbos_cls.workflow(name=WORKFLOW)(three)


def _prefill(dbos: Any, url: str, opts: _Options) -> None:
    """Create DBOS's schema, register the queue and enqueue every workflow (a client's job)."""
    dbos.DBOS.migrate(url)
    client = dbos.DBOSClient(system_database_url=url, application_name=APP_NAME)
    try:
        client.register_queue(
            QUEUE, worker_concurrency=opts.concurrency,
            polling_interval_sec=opts.polling_interval, application_name=APP_NAME,
        )  # fmt: skip
        options = {"queue_name": QUEUE, "workflow_name": WORKFLOW, "application_name": APP_NAME}
        for i in range(opts.workflows):
            client.enqueue(options, i)
    finally:
        client.destroy()


async def _wait_done(conn: Any, n: int, timeout: float) -> None:
    """Until `n` workflows succeeded; raises as soon as one has failed."""
    async with asyncio.timeout(timeout):
        while True:
            row = await conn.fetchrow(_STATUS, WORKFLOW)
            if row["failed"]:
                raise RuntimeError(f"{row['failed']} workflows failed ({row['done']} succeeded)")
            if row["done"] >= n:
                return
            await asyncio.sleep(_WAIT_POLL)


async def _start_all(dbos_cls: Any, three: Any, opts: _Options) -> None:
    """`start` mode: DBOS.start_workflow_async with `concurrency` workflows in flight."""
    gate = asyncio.Semaphore(opts.concurrency)

    async def one(i: int) -> None:
        async with gate:
            handle = await dbos_cls.start_workflow_async(three, i)
            await handle.get_result()

    await asyncio.gather(*(one(i) for i in range(opts.workflows)))


async def _bench(opts: _Options, url: str) -> dict[str, Any]:
    import asyncpg

    dbos: Any = importlib.import_module("dbos")
    counter = [0]
    three = _define(dbos.DBOS, counter)
    n = opts.workflows
    config: dict[str, Any] = {
        "name": APP_NAME, "system_database_url": url, "sys_db_pool_size": opts.pool_size,
        "log_level": "WARNING",
    }  # fmt: skip
    if opts.mode == "queue":
        await asyncio.to_thread(_prefill, dbos, url, opts)
    conn = await asyncpg.connect(url)
    dbos.DBOS(config=config)
    try:
        dbos.DBOS.launch()  # inside the loop: DBOS runs async workflows on it
        if opts.mode == "queue":
            await _wait_done(conn, n, opts.timeout)
        else:
            await _start_all(dbos.DBOS, three, opts)
        row = await conn.fetchrow(_STATUS, WORKFLOW)
        statuses = await dbos.DBOS.list_workflows_async(name=WORKFLOW)
    finally:
        dbos.DBOS.destroy(destroy_registry=True)
        await conn.close()
    wrong = sum(
        1 for s in statuses if s.status != "SUCCESS" or s.output != s.input["args"][0] + STEPS
    )
    if row["done"] != n or len(statuses) != n or wrong or counter[0] != STEPS * n:
        raise RuntimeError(
            f"inconsistent run: {row['done']} of {n} workflows succeeded, {wrong} with a wrong "
            f"output, steps ran {counter[0]}x (expected {STEPS * n})"
        )
    elapsed = (row["last"] - row["first"]) / 1000
    return {"completed": int(row["done"]), "steps": counter[0], "elapsed": elapsed,
            "workflows_per_s": n / elapsed if elapsed > 0 else None}  # fmt: skip


async def _run(opts: _Options, loop_name: str) -> dict[str, Any]:
    database = f"ms_bench_dbos_{os.getpid()}"
    maintenance = _with_database(opts.dsn, MAINTENANCE_DB)
    main = asyncio.current_task()
    assert main is not None
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    await _recreate_database(maintenance, database)
    try:
        async with asyncio.timeout(opts.timeout):
            out = await _bench(opts, _with_database(opts.dsn, database))
    finally:
        with contextlib.suppress(Exception):  # never hide the run's own error
            await asyncio.wait_for(asyncio.shield(_drop_database(maintenance, database)), 30)
    out["config"] = {
        "version": _library_version("dbos"), "mode": opts.mode, "concurrency": opts.concurrency,
        "polling_interval_sec": opts.polling_interval if opts.mode == "queue" else None,
        "sys_db_pool_size": opts.pool_size, "event_loop": loop_name, "database": database,
    }  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The subprocess's entry point: one JSON line with the figures or an "error"."""
    parser = argparse.ArgumentParser(prog="python -m mainspring.bench.dbos_peer")
    parser.add_argument("--dsn", required=True, help="postgresql:// URL of the server")
    parser.add_argument("--workflows", type=int, default=2_000)
    parser.add_argument("--timeout", type=float, default=600.0, help="hard limit, seconds")
    parser.add_argument("--mode", choices=MODES, default=MODE)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--polling-interval", type=float, default=POLLING_INTERVAL)
    parser.add_argument("--pool-size", type=int, default=POOL_SIZE)
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    ns = parser.parse_args(argv)
    opts = _Options(
        ns.dsn, max(1, ns.workflows), ns.timeout, ns.mode, max(1, ns.concurrency),
        ns.polling_interval, max(2, ns.pool_size), ns.loop,
    )  # fmt: skip
    out: dict[str, Any] = {"system": "dbos", "workflows": opts.workflows, "error": None}
    try:
        factory, loop_name = _loop_factory(opts.loop)
        with asyncio.Runner(loop_factory=factory) as runner:
            out.update(runner.run(_run(opts, loop_name)))
    except TimeoutError:
        out["error"] = f"timed out after {opts.timeout:g} s"
    except (asyncio.CancelledError, KeyboardInterrupt):
        out["error"] = "interrupted"
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out), flush=True)
    return 0 if out["error"] is None else 1


if __name__ == "__main__":
    from mainspring.bench import dbos_peer

    sys.exit(dbos_peer.main())

"""The engine's guarantees under real process failures.

Every test runs real worker processes (`tests/crash_app.py`) against a real
database and then breaks them: SIGKILL mid-batch, SIGSTOP past the lease, a
PostgreSQL restart, SIGTERM with long handlers. The handlers append one JSON
line per start/finish (and per telemetry event of interest) to a shared file,
so a test can tell which process executed which attempt of which run.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

import mainspring as ms
from crash_app import build
from mainspring.store.sqlite import path_from_url
from processes import WorkerProcesses

pytestmark = pytest.mark.slow

CRASH_APP = Path(__file__).with_name("crash_app.py")
TTL = 2.0  # lease TTL of every node: the reaper runs every TTL / 2 s

T = TypeVar("T")


class Nodes(WorkerProcesses):
    """Crash-app worker processes of one test."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, CRASH_APP)

    def start(
        self,
        url: str,
        node: str,
        *,
        concurrency: int = 10,
        ttl: float = TTL,
        grace: float = 1.0,
        hold: float | None = None,
    ) -> subprocess.Popen[bytes]:
        env = dict(
            os.environ,
            CRASH_URL=url,
            CRASH_NODE=node,
            CRASH_TTL=str(ttl),
            CRASH_GRACE=str(grace),
            CRASH_CONCURRENCY=str(concurrency),
            CRASH_LOG=str(self.record_file),
        )
        env.pop("CRASH_HOLD", None)
        if hold is not None:
            env["CRASH_HOLD"] = str(hold)
        return self.spawn(node, env)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    with Nodes(tmp_path) as cluster:
        yield cluster


@pytest.fixture
def client(db_url: str) -> Iterator[ms.App]:
    """The test's own client App (it creates the schema on first use)."""
    app = build(db_url, lease_ttl=TTL)
    yield app
    app.close()


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    nodes: Nodes | None = None,
    interval: float = 0.05,
) -> T:
    """Poll `check` until it returns something truthy; fail with the workers' logs on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = f"\n{nodes.logs()}" if nodes else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{logs}")
        time.sleep(interval)


def runs_by_id(app: ms.App, limit: int) -> dict[str, ms.Run]:
    return {r.id: r for r in app.list_runs(limit=limit)}


def all_completed(app: ms.App, ids: set[str]) -> dict[str, ms.Run] | None:
    runs = runs_by_id(app, len(ids) + 10)
    if runs.keys() == ids and all(r.state == "completed" for r in runs.values()):
        return runs
    return None


# -- 1. SIGKILL ------------------------------------------------------------------------


def test_sigkill_mid_batch_loses_no_run(db_url: str, client: ms.App, nodes: Nodes) -> None:
    n = 300
    work = client.tasks["crash.work"]
    # Uneven durations keep A's slots out of step, so some run is always in flight.
    calls = (work.call(i, 0.02 + (i % 7) * 0.01) for i in range(n))
    ids = {h.id for h in client.enqueue_many(calls)}
    assert len(ids) == n

    a = nodes.start(db_url, "A", concurrency=8)

    def busy_after_60() -> bool:
        if len(nodes.records("done", node="A")) < 60:
            return False
        return any(r.state == "running" for r in client.list_runs(state="running", limit=1))

    wait_until(busy_after_60, 30, "A to finish 60 runs and hold more", nodes, interval=0.001)
    a.send_signal(signal.SIGKILL)
    assert a.wait(timeout=10) == -signal.SIGKILL

    at_kill = runs_by_id(client, n + 10)
    held = {i for i, r in at_kill.items() if r.state == "running"}
    done_by_a = {i for i, r in at_kill.items() if r.state == "completed"}
    waiting = {i for i, r in at_kill.items() if r.state == "available"}
    assert held, "A held no run when it was killed: the test proves nothing"
    assert waiting, "A finished everything before it was killed: the test proves nothing"
    assert held | done_by_a | waiting == ids
    assert {at_kill[i].lease_owner for i in held} == {"A"}

    nodes.start(db_url, "B", concurrency=8)
    final = wait_until(lambda: all_completed(client, ids), 40, "every run completed", nodes)

    a_starts = Counter(r["id"] for r in nodes.records("start", node="A"))
    b_starts = Counter(r["id"] for r in nodes.records("start", node="B"))
    done = {(r["id"], r["node"], r["attempt"]) for r in nodes.records("done")}
    assert max(a_starts.values()) == 1 and max(b_starts.values()) == 1

    for run_id, run in final.items():
        out = run.output
        # The committed output is the output of one execution that really happened.
        assert (run_id, out["node"], out["attempt"]) in done
        assert out["attempt"] == run.attempt
        assert run.lease_owner is None and run.finished_at is not None
    # Completed before the kill: committed once, never executed again.
    for run_id in done_by_a:
        assert final[run_id].attempt == 1 and final[run_id].output["node"] == "A"
        assert run_id not in b_starts
    # Held by A when it died: reclaimed after the lease and re-executed by B (at least once).
    for run_id in held:
        assert a_starts[run_id] <= 1  # 0 when A died between its claim and the handler's start
        assert final[run_id].attempt == 2 and final[run_id].output["node"] == "B"
        assert b_starts[run_id] == 1
    # Still waiting at the kill: B's first attempt.
    for run_id in waiting:
        assert run_id not in a_starts
        assert final[run_id].attempt == 1 and final[run_id].output["node"] == "B"
    assert set(b_starts) == held | waiting


# -- 2. SIGSTOP past the lease ----------------------------------------------------------------


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def _sqlite_writable(url: str) -> bool:
    con = sqlite3.connect(path_from_url(url), timeout=0.2, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        con.close()


def freeze(proc: subprocess.Popen[bytes], url: str) -> None:
    """SIGSTOP a worker, but never inside an SQLite write transaction.

    A process frozen while it holds SQLite's write lock blocks every other writer
    (for busy_timeout, 30 s): that is SQLite, not the fence this test is about.
    """
    for _ in range(50):
        os.kill(proc.pid, signal.SIGSTOP)
        wait_until(lambda: _stopped(proc.pid), 5, "the worker to stop")
        if not url.startswith("sqlite") or _sqlite_writable(url):
            return
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the worker always held the SQLite write lock when stopped")


def test_paused_worker_late_commit_is_fenced(db_url: str, client: ms.App, nodes: Nodes) -> None:
    stall = 3.0  # first attempt's handler time; A is frozen for longer than this
    handle = client.tasks["crash.stall_first"].enqueue(stall)
    a = nodes.start(db_url, "A")
    first = wait_until(
        lambda: nodes.records("start", id=handle.id, node="A"), 20, "A to start the run", nodes
    )
    started = time.monotonic()
    assert first[0]["attempt"] == 1
    freeze(a, db_url)
    try:
        nodes.start(db_url, "B")
        won = wait_until(
            lambda: (r := client.get_run(handle.id)).state == "completed" and r,
            15,
            "B to reclaim and complete the run",
            nodes,
        )
        assert won.output["node"] == "B" and won.attempt == 2
        # Keep A frozen until its handler's sleep is over, so on resume the handler returns
        # at once and its outcome races the lease loop: either way the fence must refuse it.
        time.sleep(max(0.0, stall + 0.5 - (time.monotonic() - started)))
    finally:
        os.kill(a.pid, signal.SIGCONT)

    lost = wait_until(
        lambda: nodes.records("run.lease_lost", id=handle.id, node="A"),
        10,
        "A to learn that it lost the run",
        nodes,
    )
    time.sleep(TTL + 1.0)  # room for a wrong commit, a reap or a third attempt to show up
    final = client.get_run(handle.id)
    assert final.state == "completed"
    assert final.output == won.output and final.output["node"] == "B"
    assert final.attempt == 2 and final.fence == won.fence
    assert final.finished_at == won.finished_at
    starts = [(r["node"], r["attempt"]) for r in nodes.records("start", id=handle.id)]
    assert starts == [("A", 1), ("B", 2)], "the run was executed a third time"
    assert a.poll() is None, f"A died after it was resumed\n{nodes.logs()}"
    path = "commit refused by the fence" if "state" in lost[0] else "lease loop noticed"
    print(f"A's late outcome was rejected: {path} ({lost[0]})")


# -- 3. PostgreSQL restart --------------------------------------------------------------------


def _pg_version() -> str:
    versions = sorted(glob.glob("/etc/postgresql/*"), key=lambda p: float(os.path.basename(p)))
    if not versions:
        pytest.skip("no local PostgreSQL cluster under /etc/postgresql to restart")
    return os.path.basename(versions[-1])


def _pg_ctl(version: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start `pg_ctlcluster VERSION main ARGS`; output goes to `log`, never to a pipe (the
    server it starts could inherit the pipe and keep it open)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _finish(ctl: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """Wait for pg_ctlcluster. Its readiness probe (three identical psql results in a row)
    can spin for minutes while other clients hammer the server; once the server is known
    to be up that probe no longer matters, so it is stopped."""
    try:
        return ctl.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        ctl.terminate()
        return ctl.wait(timeout=10)


async def _postmaster_start(url: str) -> Any:
    try:
        con = await asyncpg.connect(url, timeout=2)
    except Exception:
        return None
    try:
        return await con.fetchval("SELECT pg_postmaster_start_time()")
    finally:
        await con.close()


def restart_postgres(version: str, url: str, log: Path) -> subprocess.Popen[bytes]:
    """Restart the cluster (fast mode) and return once a new postmaster accepts connections."""
    before = asyncio.run(_postmaster_start(url))
    assert before is not None, "PostgreSQL is not up before the restart"
    ctl = _pg_ctl(version, log, "restart", "-m", "fast")
    deadline = time.monotonic() + 60
    while True:
        code = ctl.poll()
        if code not in (None, 0):
            raise AssertionError(f"pg_ctlcluster restart failed with exit code {code}")
        started = asyncio.run(_postmaster_start(url))
        if started is not None and started != before:
            return ctl
        if time.monotonic() > deadline:
            _finish(ctl, 0)
            raise AssertionError("PostgreSQL did not come back within 60 s of the restart")
        time.sleep(0.1)


def _fresh_poll(pg_url: str, check: Callable[[ms.App], T | None]) -> T | None:
    """`check` with a fresh client (old connections die in a restart); None while unreachable."""
    app = build(pg_url, lease_ttl=TTL)
    try:
        return check(app)
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            app.close()


def test_postgres_restart_mid_run_completes_everything(pg_url: str, nodes: Nodes) -> None:
    version = _pg_version()
    n = 200
    client = build(pg_url, lease_ttl=TTL)
    try:
        work = client.tasks["crash.work"]
        ids = {h.id for h in client.enqueue_many(work.call(i, 0.05) for i in range(n))}
    finally:
        client.close()

    a = nodes.start(pg_url, "A", concurrency=3)
    wait_until(lambda: len(nodes.records("done")) >= 30, 30, "A to finish 30 runs", nodes)
    ctl: subprocess.Popen[bytes] | None = None
    try:
        ctl = restart_postgres(version, pg_url, nodes.dir / "pg_ctlcluster.log")
        assert a.poll() is None, f"the worker died with the database\n{nodes.logs()}"
        committed = wait_until(
            lambda: _fresh_poll(
                pg_url, lambda app: (len(app.list_runs(state="completed", limit=n)),)
            ),
            30,
            "PostgreSQL to serve the test client",
            nodes,
            0.1,
        )
        assert committed[0] < n, "everything was committed before the restart: proves nothing"

        final = wait_until(
            lambda: _fresh_poll(pg_url, lambda app: all_completed(app, ids)),
            60,
            "every run completed",
            nodes,
            0.25,
        )
    finally:
        if ctl is not None:
            _finish(ctl)
        if asyncio.run(_postmaster_start(pg_url)) is None:
            _finish(_pg_ctl(version, nodes.dir / "pg_ctlcluster.log", "start"), 60)

    assert a.poll() is None, f"the worker did not survive the restart\n{nodes.logs()}"
    done = {(r["id"], r["attempt"]) for r in nodes.records("done")}
    for run_id, run in final.items():
        assert run.output["node"] == "A"
        assert (run_id, run.output["attempt"]) in done and run.output["attempt"] == run.attempt
    log = nodes.log("A")
    assert "WARNING" in log or "ERROR" in log, "the worker never noticed the database went away"


# -- 4. SIGTERM --------------------------------------------------------------------------------


@pytest.mark.parametrize("task_name", ["crash.hold", "crash.hold_async"])
def test_sigterm_drains_and_releases(
    db_url: str, client: ms.App, nodes: Nodes, task_name: str
) -> None:
    count = 4
    task = client.tasks[task_name]
    ids = {h.id for h in client.enqueue_many(task.call(30.0) for _ in range(count))}
    a = nodes.start(db_url, "A", concurrency=count, grace=1.0)
    wait_until(
        lambda: {r["id"] for r in nodes.records("start", node="A")} == ids,
        20,
        "A to start every run",
        nodes,
    )

    sent = time.monotonic()
    a.send_signal(signal.SIGTERM)
    try:
        code = a.wait(timeout=10)
    except subprocess.TimeoutExpired:
        a.kill()
        a.wait()
        pytest.fail(f"the worker was still alive 10 s after SIGTERM (grace 1 s)\n{nodes.logs()}")
    took = time.monotonic() - sent
    assert code == 0, f"exit code {code}\n{nodes.logs()}"
    assert took < 5.0, f"the worker took {took:.1f} s to exit after SIGTERM (grace 1 s)"

    released = runs_by_id(client, count + 10)
    assert released.keys() == ids
    for run in released.values():
        assert run.state == "available", f"{run.id} is {run.state} after the drain"
        assert run.attempt == 0, "the interrupted attempt was not refunded"
        assert run.lease_owner is None and run.lease_expires_at is None
    assert {r["id"] for r in nodes.records("run.released", node="A")} == ids

    # Released, not abandoned: another node takes them at once, without waiting out a lease.
    nodes.start(db_url, "B", concurrency=count, hold=0)
    final = wait_until(lambda: all_completed(client, ids), 10, "B to finish the runs", nodes)
    for run in final.values():
        assert run.output["node"] == "B" and run.attempt == 1

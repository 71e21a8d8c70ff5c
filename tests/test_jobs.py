"""The job engine's contract, on both backends."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

import mainspring as ms
from helpers import aio, eventually, running


@aio
async def test_async_and_sync_handlers_return_their_results(app: ms.App) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    def shout(word: str) -> str:
        return word.upper()

    h1 = await add.enqueue_async(2, b=3)
    h2 = await shout.enqueue_async("hi")
    assert (await h1.get_async()).state == "available"
    async with running(app):
        assert await h1.result_async(timeout=10) == 5
        assert await h2.result_async(timeout=10) == "HI"
    run = await h1.get_async()
    assert run.state == "completed" and run.attempt == 1 and run.output == 5
    assert run.started_at and run.finished_at and run.lease_owner is None


@aio
async def test_failed_attempts_retry_with_backoff_then_succeed(app: ms.App) -> None:
    attempts: list[int] = []

    @app.task(max_attempts=3, backoff=ms.Backoff.constant(0.2))
    async def flaky() -> str:
        attempts.append(ms.current_run().attempt)
        if len(attempts) < 3:
            raise RuntimeError(f"boom {len(attempts)}")
        return "ok"

    h = await flaky.enqueue_async()
    started = time.monotonic()
    async with running(app):
        assert await h.result_async(timeout=10) == "ok"
    assert attempts == [1, 2, 3]
    assert time.monotonic() - started >= 0.4  # two backoff waits
    run = await h.get_async()
    assert run.attempt == 3 and run.error and run.error["message"] == "boom 2"


@aio
async def test_last_error_is_kept_when_attempts_run_out(app: ms.App) -> None:
    @app.task(max_attempts=2, backoff=ms.Backoff.constant(0.01))
    def broken() -> None:
        raise ValueError("bad input")

    h = await broken.enqueue_async()
    async with running(app):
        with pytest.raises(ms.RunFailed) as info:
            await h.result_async(timeout=10)
    assert "ValueError: bad input" in str(info.value)
    run = await h.get_async()
    assert run.state == "failed" and run.attempt == 2
    assert run.error is not None
    assert run.error["type"] == "ValueError" and "Traceback" in run.error["traceback"]


@aio
async def test_timeout_cancels_handler_and_counts_as_failed_attempt(app: ms.App) -> None:
    @app.task(timeout=0.2, max_attempts=1)
    async def slow() -> None:
        await asyncio.sleep(5)

    h = await slow.enqueue_async()
    async with running(app):
        with pytest.raises(ms.RunFailed):
            await h.result_async(timeout=10)
    run = await h.get_async()
    assert run.error and run.error["type"] == "mainspring.errors.TaskTimeout"
    assert "timeout of 0.2 s" in run.error["message"]


@aio
async def test_higher_priority_runs_first_then_older_first(app: ms.App) -> None:
    order: list[str] = []

    @app.task
    async def record(label: str) -> None:
        order.append(label)

    await record.options(priority=0).enqueue_async("low-1")
    await record.options(priority=0).enqueue_async("low-2")
    await record.options(priority=5).enqueue_async("high")
    async with running(app, concurrency=1):
        await eventually(lambda: _true(len(order) == 3))
    assert order == ["high", "low-1", "low-2"]


async def _true(value: bool) -> bool:
    return value


@aio
async def test_delayed_run_waits_until_its_time(app: ms.App) -> None:
    started: list[float] = []

    @app.task
    async def later() -> None:
        started.append(time.time())

    t0 = time.time()
    h = await later.options(delay=0.6).enqueue_async()
    assert (await h.get_async()).state == "scheduled"
    at = datetime.now(UTC) + timedelta(seconds=0.3)
    h2 = await later.options(run_at=at).enqueue_async()
    async with running(app):
        await h.result_async(timeout=10)
        await h2.result_async(timeout=10)
    assert min(started) - t0 >= 0.29 and max(started) - t0 >= 0.59


@aio
async def test_correlation_key_returns_the_live_run(app: ms.App) -> None:
    @app.task
    async def sync_user(user: int) -> int:
        return user

    first = await sync_user.options(correlation_key="user-7").enqueue_async(7)
    again = await sync_user.options(correlation_key="user-7").enqueue_async(7)
    assert first.created and not again.created and again.id == first.id
    batch = await app.enqueue_many_async(
        [sync_user.options(correlation_key="user-8").call(8) for _ in range(3)]
    )
    assert len({h.id for h in batch}) == 1
    async with running(app):
        await first.result_async(timeout=10)
        await batch[0].result_async(timeout=10)
    after = await sync_user.options(correlation_key="user-7").enqueue_async(7)
    assert after.created and after.id != first.id


@aio
async def test_concurrency_key_allows_one_running_run_per_key(app: ms.App) -> None:
    active: dict[str, int] = {}
    peak: dict[str, int] = {}

    @app.task
    async def per_tenant(tenant: str) -> None:
        active[tenant] = active.get(tenant, 0) + 1
        peak[tenant] = max(peak.get(tenant, 0), active[tenant])
        await asyncio.sleep(0.02)
        active[tenant] -= 1

    calls = [per_tenant.options(concurrency_key=t).call(t) for t in ["a", "b"] * 6]
    handles = await app.enqueue_many_async(calls)
    async with running(app, concurrency=20, name="n1"), running(app, concurrency=20, name="n2"):
        for h in handles:
            await h.result_async(timeout=20)
    assert peak == {"a": 1, "b": 1}


@aio
async def test_queue_concurrency_per_node_and_global_limit(app: ms.App) -> None:
    app.queue("narrow", concurrency=2, global_limit=3)
    active = 0
    peak = 0

    @app.task(queue="narrow")
    async def work() -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        active -= 1

    handles = await app.enqueue_many_async([work.call() for _ in range(20)])
    async with running(app, name="n1") as w1, running(app, name="n2") as w2:
        for h in handles:
            await h.result_async(timeout=20)
        assert w1.claimed_total + w2.claimed_total == 20
    assert peak == 3  # two nodes of two each, capped at three cluster-wide


@aio
async def test_unencodable_argument_fails_at_enqueue_and_writes_nothing(app: ms.App) -> None:
    @app.task
    async def store_blob(blob: object, tag: str) -> None: ...

    with pytest.raises(ms.EncodeError, match="argument 'blob'"):
        await store_blob.enqueue_async(blob=object(), tag="x")
    with pytest.raises(ms.EncodeError, match="positional argument 0"):
        await app.enqueue_many_async([store_blob.call("ok", "t"), store_blob.call({1, 2}, "t")])
    assert await app.list_runs_async() == []


@aio
async def test_unencodable_result_fails_the_attempt_clearly(app: ms.App) -> None:
    @app.task(max_attempts=1)
    async def bad_result() -> object:
        return object()

    h = await bad_result.enqueue_async()
    async with running(app):
        with pytest.raises(ms.RunFailed, match="not JSON encodable"):
            await h.result_async(timeout=10)


@aio
async def test_unknown_task_fails_with_a_clear_error_and_worker_carries_on(app: ms.App) -> None:
    @app.task(name="known")
    async def known() -> str:
        return "fine"

    other = ms.App(app.url)

    @other.task(name="ghost")
    async def ghost() -> None: ...

    lost = await ghost.enqueue_async()
    ok = await known.enqueue_async()
    try:
        async with running(app):
            with pytest.raises(ms.RunFailed, match="no live node knows task 'ghost'"):
                await lost.result_async(timeout=10)
            assert await ok.result_async(timeout=10) == "fine"
    finally:
        await other.aclose()


@aio
async def test_enqueue_many_returns_handles_in_order(app: ms.App) -> None:
    @app.task
    async def echo(i: int) -> int:
        return i

    handles = await app.enqueue_many_async([echo.call(i) for i in range(500)])
    assert len({h.id for h in handles}) == 500
    assert [h.id for h in handles] == sorted(h.id for h in handles)  # UUIDv7: time ordered
    async with running(app, concurrency=100):
        results = [await h.result_async(timeout=20) for h in handles]
    assert results == list(range(500))


@aio
async def test_a_repeated_batch_insert_adds_nothing(app: ms.App) -> None:
    """An enqueue retried after its answer was lost (it had committed) writes no second copy."""

    @app.task
    async def echo(i: int) -> int:
        return i

    now = datetime.now(UTC)
    runs = [echo.call(i).to_new_run(now) for i in range(100)]
    store = await app.store()
    first = await store.insert_runs(runs)
    again = await store.insert_runs(runs)
    assert first == again == {r.id: r.id for r in runs}
    status = await store.queue_status("default")
    assert status.counts == {"available": 100}


@aio
async def test_cancel_stops_a_running_handler_and_retry_runs_it_again(app: ms.App) -> None:
    gate = asyncio.Event()
    calls = 0

    @app.task
    async def long() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            gate.set()
            await asyncio.sleep(30)
        return "second time"

    h = await long.enqueue_async()
    async with running(app) as worker:
        await asyncio.wait_for(gate.wait(), 10)
        run = await app.cancel_async(h.id)
        assert run.state == "cancelled"
        await eventually(lambda: _true(not worker._inflight))
        with pytest.raises(ms.RunFailed, match="cancelled"):
            await h.result_async(timeout=1)
        await app.retry_async(h.id)
        assert await h.result_async(timeout=10) == "second time"
    queued = await (await long.enqueue_async()).get_async()
    assert (await app.cancel_async(queued.id)).state == "cancelled"
    with pytest.raises(ms.RunNotFound):
        await app.cancel_async("no-such-run")


@aio
async def test_expired_lease_is_reclaimed_and_the_late_commit_is_fenced(app: ms.App) -> None:
    from mainspring.run import COMPLETED, Outcome
    from mainspring.store.base import QueueDemand

    @app.task
    async def job() -> str:
        return "from node B"

    h = await job.enqueue_async()
    store = await app.store()
    [claimed] = await store.claim_runs("node-A", [QueueDemand("default", 10)], 0.2)
    await asyncio.sleep(0.4)
    reaped = await store.reap_expired(100)
    assert reaped == [(h.id, "available")]
    async with running(app, name="node-B"):
        assert await h.result_async(timeout=10) == "from node B"
    late = Outcome(claimed.id, claimed.fence, COMPLETED, output='"from node A"')
    assert await store.commit_outcomes([late]) == set()
    run = await h.get_async()
    assert run.output == "from node B" and run.fence > claimed.fence


@aio
async def test_lease_extension_keeps_long_runs_owned(db_url: str) -> None:
    app = ms.App(db_url, lease_ttl=0.6)

    @app.task
    async def long() -> str:
        await asyncio.sleep(1.5)
        return "done"

    h = await long.enqueue_async()
    try:
        async with running(app):
            assert await h.result_async(timeout=10) == "done"
        assert (await h.get_async()).attempt == 1
    finally:
        await app.aclose()


@aio
async def test_drain_releases_unfinished_runs_without_using_an_attempt(db_url: str) -> None:
    app = ms.App(db_url, shutdown_grace=0.3)
    started = asyncio.Event()

    @app.task
    async def forever() -> None:
        started.set()
        await asyncio.sleep(60)

    h = await forever.enqueue_async()
    try:
        async with running(app):
            await asyncio.wait_for(started.wait(), 10)
        run = await h.get_async()
        assert run.state == "available" and run.attempt == 0 and run.lease_owner is None
    finally:
        await app.aclose()


@aio
async def test_burst_worker_returns_when_no_work_is_left(app: ms.App) -> None:
    @app.task
    async def noop() -> None: ...

    await app.enqueue_many_async([noop.call() for _ in range(50)])
    await asyncio.wait_for(app.run_worker_async(burst=True, install_signal_handlers=False), 20)
    runs = await app.list_runs_async(limit=100)
    assert len(runs) == 50 and {r.state for r in runs} == {"completed"}


@aio
async def test_gc_deletes_old_terminal_runs_in_batches(db_url: str) -> None:
    app = ms.App(db_url, retention=0.0)

    @app.task
    async def noop() -> None: ...

    await app.enqueue_many_async([noop.call() for _ in range(2500)])
    keep = await noop.options(delay=3600).enqueue_async()
    try:
        await app.run_worker_async(burst=True, install_signal_handlers=False, concurrency=200)
        store = await app.store()
        cutoff = datetime.now(UTC) + timedelta(seconds=1)
        assert await store.delete_terminal(cutoff, 1000) == 1000
        assert await store.delete_terminal(cutoff, 1000) == 1000
        assert await store.delete_terminal(cutoff, 1000) == 500
        remaining = await app.list_runs_async(limit=10)
        assert [r.id for r in remaining] == [keep.id]
    finally:
        await app.aclose()


@aio
async def test_nodes_register_heartbeat_and_leave(app: ms.App) -> None:
    @app.task(queue="mail")
    async def send() -> None: ...

    async with running(app, name="alpha"):
        nodes = await app.nodes_async()
        assert [(n.name, n.queues, n.alive) for n in nodes] == [("alpha", ["mail"], True)]
        assert nodes[0].tasks == [send.name]
    assert await app.nodes_async() == []


@aio
async def test_telemetry_reports_lifecycle_and_survives_broken_handlers(app: ms.App) -> None:
    seen: list[tuple[str, dict[str, object]]] = []
    app.telemetry.attach("*", lambda event, meta: seen.append((event, meta)))

    def broken(event: str, meta: dict[str, object]) -> None:
        raise RuntimeError("handler bug")

    app.telemetry.attach("run.completed", broken)

    @app.task(max_attempts=2, backoff=ms.Backoff.constant(0.01))
    async def once_flaky() -> str:
        if ms.current_run().attempt == 1:
            raise RuntimeError("first")
        return "ok"

    h = await once_flaky.enqueue_async()
    async with running(app):
        assert await h.result_async(timeout=10) == "ok"
    events = [e for e, _ in seen]
    for expected in ("run.enqueued", "node.up", "run.claimed", "run.retried", "run.completed"):
        assert expected in events
    completed = next(m for e, m in seen if e == "run.completed")
    assert completed["id"] == h.id and isinstance(completed["duration"], float)
    with pytest.raises(ValueError, match="unknown telemetry event"):
        app.telemetry.attach("run.finished", broken)


@aio
async def test_periodic_tick_is_scheduled_once_across_nodes(app: ms.App) -> None:
    @app.periodic("* * * * *")
    async def tick() -> None: ...

    async with running(app, name="n1"), running(app, name="n2"), running(app, name="n3"):
        await asyncio.sleep(0.3)
        runs = await app.list_runs_async(name=tick.name)
    assert len(runs) == 1
    run = runs[0]
    assert run.state == "scheduled" and run.run_at.second == 0
    assert run.run_at > datetime.now(UTC) - timedelta(seconds=1)


def test_sync_client_round_trip(app: ms.App) -> None:
    @app.task
    def double(x: int) -> int:
        return 2 * x

    h = double.enqueue(21)
    assert app.get_run(h.id).state == "available"
    app.run_worker(burst=True, install_signal_handlers=False)
    assert h.result(timeout=5) == 42
    assert app.result(h.id) == 42


def test_bad_configuration_is_rejected_clearly() -> None:
    with pytest.raises(ms.ConfigError, match="unsupported database URL"):
        ms.App("mysql://localhost/db")
    app = ms.App("sqlite:///unused.db")
    with pytest.raises(ms.ConfigError, match="max_attempts"):
        app.task(max_attempts=0)(lambda: None)
    with pytest.raises(ms.ConfigError, match="invalid cron"):
        app.periodic("61 * * * *")(lambda: None)
    with pytest.raises(ms.ConfigError, match="delay or run_at"):

        @app.task
        def f() -> None: ...

        f.options(delay=1, run_at=datetime.now(UTC))


@aio
async def test_process_executor_runs_cpu_work_and_survives_a_crash(
    db_url: str, tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import sys

    import jobs_targets

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    app = ms.App(db_url, process_pool_size=2)
    crunch = app.task(executor="process")(jobs_targets.crunch)
    crashy = app.task(executor="process", max_attempts=2, backoff=ms.Backoff.constant(0.01))(
        jobs_targets.crash_first_attempt
    )
    marker = str(tmp_path / "crashed-once")  # type: ignore[operator]
    try:
        h1 = await crunch.enqueue_async(1000)
        h2 = await crashy.enqueue_async(marker)
        async with running(app):
            assert await h1.result_async(timeout=30) == sum(i * i for i in range(1000))
            assert await h2.result_async(timeout=30) == "survived"
        run = await h2.get_async()
        assert run.attempt == 2 and run.error
        assert run.error["type"] == "mainspring.errors.HandlerCrashed"
    finally:
        await app.aclose()

"""Replay workflows on both backends, with paranoid replay checking every workflow task."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import mainspring as ms
from helpers import aio, eventually, running


@pytest.fixture(autouse=True)
def paranoid(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After every workflow task, replay the run from scratch and demand the same commands."""
    monkeypatch.setenv("MAINSPRING_PARANOID", "1")
    yield


@aio
async def test_activities_timers_signals_and_children(app: ms.App) -> None:
    calls: list[str] = []

    @app.task(name="fetch")
    async def fetch(invoice: int) -> dict[str, Any]:
        calls.append(f"fetch {invoice}")
        return {"id": invoice, "cards": [1, 2, 3]}

    @app.task(name="charge_card")
    def charge_card(card: int) -> str:  # a sync task: runs in the thread pool
        calls.append(f"charge {card}")
        return f"receipt-{card}"

    @app.workflow(name="receipt")
    async def receipt(wf: ms.Workflow, input: dict[str, Any]) -> str:
        return f"sent {input['id']}"

    @app.workflow(name="billing.charge")
    async def charge(wf: ms.Workflow, input: dict[str, Any]) -> dict[str, Any]:
        invoice = await wf.activity(fetch, input["id"], max_attempts=5, timeout=30)
        await wf.sleep(0.2)
        approval = await wf.wait_signal("approved", timeout=30)
        receipts = await asyncio.gather(*(wf.activity(charge_card, c) for c in invoice["cards"]))
        sent = await wf.child(receipt, {"id": input["id"]})
        return {"receipts": receipts, "approval": approval, "sent": sent}

    handle = await app.start_async(charge, {"id": 7})
    async with running(app, concurrency=10):

        async def waiting_for_approval() -> bool:
            run = await handle.get_async()
            return run.state == "waiting" and "approved" in (run.awaits or [])

        await eventually(waiting_for_approval)
        assert (
            await app.signal_async(handle.id, "approved", {"by": "ops"})
            is ms.SignalResult.DELIVERED
        )
        result = await handle.result_async(timeout=20)
    assert result == {
        "receipts": ["receipt-1", "receipt-2", "receipt-3"],
        "approval": {"by": "ops"},
        "sent": "sent 7",
    }
    # Every workflow task replayed the journal; no activity ran twice.
    assert sorted(calls) == ["charge 1", "charge 2", "charge 3", "fetch 7"]


@aio
async def test_signal_before_the_wait_and_timeouts(app: ms.App) -> None:
    @app.workflow(name="waits")
    async def waits(wf: ms.Workflow, input: None) -> list[Any]:
        first = await wf.wait_signal("early", timeout=30)
        missing = await wf.wait_signal("never", timeout=0.2)
        return [first, missing]

    handle = await app.start_async(waits)
    assert await app.signal_async(handle.id, "early", 1, dedup_key="d") is ms.SignalResult.DELIVERED
    assert await app.signal_async(handle.id, "early", 2, dedup_key="d") is ms.SignalResult.DUPLICATE
    async with running(app, concurrency=4):
        assert await handle.result_async(timeout=10) == [1, None]


@aio
async def test_recorded_values_and_patches_survive_replay(app: ms.App) -> None:
    seen: list[Any] = []

    @app.task(name="noop")
    async def noop() -> None: ...

    @app.workflow(name="values")
    async def values(wf: ms.Workflow, input: None) -> dict[str, Any]:
        now, number, ident = wf.now(), wf.random(), str(wf.uuid4())
        once = wf.side_effect(lambda: {"token": "abc"})
        seen.append((now, number, ident, once))
        await wf.activity(noop)  # a second workflow task replays everything above
        return {"now": now.isoformat(), "random": number, "uuid": ident, "once": once,
                "patched": wf.patched("v2")}  # fmt: skip

    handle = await app.start_async(values)
    async with running(app, concurrency=4):
        result = await handle.result_async(timeout=10)
    assert len(seen) >= 2 and all(s == seen[0] for s in seen)  # replay returned the same values
    assert result["once"] == {"token": "abc"} and result["patched"] is True
    assert result["now"] == seen[0][0].isoformat()


@aio
async def test_a_patch_is_false_for_history_recorded_before_it(app: ms.App) -> None:
    deployed = {"patch": False}

    @app.task(name="step")
    async def step(label: str) -> str:
        return label

    @app.workflow(name="patchy")
    async def patchy(wf: ms.Workflow, input: None) -> list[str]:
        first = await wf.activity(step, "first")
        if deployed["patch"] and wf.patched("extra-step"):
            return [first, await wf.activity(step, "new code")]
        got = await wf.wait_signal("go")
        return [first, got]

    old = await app.start_async(patchy)
    async with running(app, concurrency=4):

        async def parked() -> bool:
            return "go" in ((await old.get_async()).awaits or [])

        await eventually(parked)
    deployed["patch"] = True  # "deploy" the patched code: the old run keeps its path
    new = await app.start_async(patchy)
    await app.signal_async(old.id, "go", "old path")
    async with running(app, concurrency=4):
        assert await old.result_async(timeout=10) == ["first", "old path"]
        assert await new.result_async(timeout=10) == ["first", "new code"]


@aio
async def test_nondeterminism_keeps_the_run_recoverable(app: ms.App) -> None:
    code = {"version": 1}

    @app.task(name="a")
    async def a() -> str:
        return "a"

    @app.task(name="b")
    async def b() -> str:
        return "b"

    @app.workflow(name="drifting")
    async def drifting(wf: ms.Workflow, input: None) -> str:
        first = await wf.activity(a if code["version"] == 1 else b)
        await wf.wait_signal("go")
        return first

    handle = await app.start_async(drifting)
    async with running(app, concurrency=4):

        async def parked() -> bool:
            return "go" in ((await handle.get_async()).awaits or [])

        await eventually(parked)
        code["version"] = 2  # a bad deploy changes the command history
        await app.signal_async(handle.id, "go")

        async def refused() -> bool:
            run = await handle.get_async()
            return (
                run.state == "scheduled" and (run.error or {}).get("type") == "NondeterminismError"
            )

        await eventually(refused)
    run = await handle.get_async()
    assert "activity_scheduled 'a'" in run.error["message"] and run.state != "failed"
    code["version"] = 1  # the fix is deployed: the run continues
    async with running(app, concurrency=4):
        store = await app.store()
        await store.execute_script(
            f"UPDATE ms_runs SET run_at = created_at WHERE id = '{handle.id}'"
        )  # no need to wait out the retry delay
        assert await handle.result_async(timeout=15) == "a"


@aio
async def test_failures_continue_as_new_and_idempotent_start(app: ms.App) -> None:
    @app.task(name="explode", max_attempts=2, backoff=ms.Backoff.constant(0.01))
    async def explode() -> None:
        raise RuntimeError("boom")

    @app.workflow(name="careful")
    async def careful(wf: ms.Workflow, input: None) -> str:
        try:
            await wf.activity(explode)
        except ms.ActivityError as exc:
            return f"handled: {exc.error['message']}"
        return "unreachable"

    @app.workflow(name="broken")
    async def broken(wf: ms.Workflow, input: None) -> None:
        raise ValueError("bad input")

    @app.workflow(name="counter")
    async def counter(wf: ms.Workflow, n: int) -> int:
        if n < 3:
            wf.continue_as_new(n + 1)
        return n

    handled = await app.start_async(careful, id="careful-1")
    again = await app.start_async(careful, id="careful-1")
    assert again.id == handled.id and (handled.status, again.status) == ("started", "existing")
    keyed = await app.start_async(careful, idempotency_key="order-9")
    assert (await app.start_async(careful, idempotency_key="order-9")).id == keyed.id
    failing = await app.start_async(broken)
    chain = await app.start_async(counter, 0)
    later = await app.schedule_at_async(counter, 3, datetime.now(UTC) + timedelta(seconds=0.3))
    assert (await later.get_async()).state == "scheduled"
    async with running(app, concurrency=8):
        assert await handled.result_async(timeout=10) == "handled: boom"
        with pytest.raises(ms.RunFailed, match="bad input"):
            await failing.result_async(timeout=10)
        assert await chain.result_async(timeout=10) == 3  # followed along the chain
        first = await chain.get_async()
        assert list(first.output) == ["continued_as_new"]  # each run links to the next
        assert await later.result_async(timeout=10) == 3


def test_workflows_must_be_async() -> None:
    app = ms.App("sqlite:///:memory:")

    def not_async(wf: ms.Workflow, input: None) -> None: ...

    with pytest.raises(ms.ConfigError, match="async function"):
        app.workflow(not_async)


@aio
async def test_cancellation_reaches_the_code_and_sagas_compensate(app: ms.App) -> None:
    booked: list[str] = []

    @app.task(name="book")
    async def book(item: str) -> str:
        booked.append(item)
        return item

    @app.task(name="unbook")
    async def unbook(item: str) -> None:
        booked.remove(item)

    @app.workflow(name="trip")
    async def trip(wf: ms.Workflow, input: None) -> str:
        await wf.activity(book, "hotel", compensate=unbook)
        await wf.activity(book, "flight", compensate=unbook)
        try:
            await wf.wait_signal("confirm")
        except asyncio.CancelledError:
            await wf.compensate_all()
            raise
        return "booked"

    handle = await app.start_async(trip)
    async with running(app, concurrency=4):

        async def parked() -> bool:
            return "confirm" in ((await handle.get_async()).awaits or [])

        await eventually(parked)
        assert booked == ["hotel", "flight"]
        await app.cancel_async(handle.id)

        async def cancelled() -> bool:
            return (await handle.get_async()).state == "cancelled"

        await eventually(cancelled)
    assert booked == []  # compensated, newest first


@aio
async def test_signal_contracts_refuse_bad_signals(app: ms.App) -> None:
    @app.workflow(name="strict", signals={"approved": dict})
    async def strict(wf: ms.Workflow, input: None) -> Any:
        return await wf.wait_signal("approved")

    handle = await app.start_async(strict)
    with pytest.raises(ms.SignalRejected, match="not 'other'"):
        await app.signal_async(handle.id, "other", {})
    with pytest.raises(ms.SignalRejected, match="expected dict"):
        await app.signal_async(handle.id, "approved", "yes")
    sent = await app.signal_async(handle.id, "approved", {"by": "me"}, delivery_id="evt-1")
    again = await app.signal_async(handle.id, "approved", {"by": "me"}, delivery_id="evt-1")
    assert (sent, again) == (ms.SignalResult.DELIVERED, ms.SignalResult.DUPLICATE)
    async with running(app, concurrency=4):
        assert await handle.result_async(timeout=10) == {"by": "me"}


def test_drain_and_readiness_for_deploys(db_url: str) -> None:
    app = ms.App(db_url, shutdown_grace=5.0)

    @app.task(name="slow")
    async def slow() -> str:
        await asyncio.sleep(0.5)
        return "done"

    handles = app.enqueue_many([slow.call() for _ in range(3)])
    assert app.readiness() == "ready"
    worker = threading.Thread(
        target=app.run_worker, kwargs={"concurrency": 3, "install_signal_handlers": False}
    )
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while any(app.get_run(h.id).state != "running" for h in handles):
            assert time.monotonic() < deadline, "the worker never claimed the runs"
            time.sleep(0.02)
        assert app.readiness() == "ready"
        assert app.drain(timeout=5) == "drained"  # in-flight handlers finished first
        assert [app.get_run(h.id).state for h in handles] == ["completed"] * 3
    finally:
        worker.join(timeout=10)
        app.close()


@aio
async def test_search_attributes_and_queries_on_workflows(app: ms.App) -> None:
    @app.workflow(name="searchable")
    async def searchable(wf: ms.Workflow, input: None) -> None:
        await wf.wait_signal("never")

    pro = await app.start_async(searchable, namespace="billing", attributes={"plan": "pro"})
    free = await app.start_async(searchable, namespace="billing", attributes={"plan": "free"})
    await app.start_async(searchable, namespace="other", attributes={"plan": "pro"})
    page = await app.query_async(namespace="billing", where=[("eq", ["attributes", "plan"], "pro")])
    assert [r.id for r in page.items] == [pro.id] and page.next_cursor is None
    await app.set_attributes_async(free.id, {"plan": "pro", "tags": ["vip"]})
    page = await app.query_async(
        namespace="billing", where=[("contains", ["attributes", "tags"], "vip")]
    )
    assert [r.id for r in page.items] == [free.id]
    with pytest.raises(ms.QueryError, match="operator"):
        await app.query_async(where=[("like", ["state"], "x")])


@aio
async def test_runs_finish_on_the_version_they_started_on(db_url: str) -> None:
    def build(versions: list[str]) -> ms.App:
        app = ms.App(db_url, lease_ttl=5.0)
        for version in versions:

            @app.workflow(name="versioned", version=version)
            async def versioned(wf: ms.Workflow, input: None, version: str = version) -> str:
                await wf.wait_signal("go")
                return f"finished on v{version}"

        return app

    old_deploy, new_deploy, both = build(["1"]), build(["2"]), build(["1", "2"])
    unknown: list[dict[str, Any]] = []
    new_deploy.telemetry.attach("workflow.unknown_version", lambda _e, meta: unknown.append(meta))
    try:
        started = await old_deploy.start_async("versioned")
        async with running(old_deploy, concurrency=2):

            async def parked() -> bool:
                return "go" in ((await started.get_async()).awaits or [])

            await eventually(parked)
        await new_deploy.signal_async(started.id, "go")
        async with running(new_deploy, concurrency=2):

            async def suspended() -> bool:
                run = await started.get_async()
                return (run.error or {}).get("type") == "UnknownVersion"

            await eventually(suspended)
        run = await started.get_async()
        assert run.state == "scheduled" and unknown and unknown[0]["version"] == "1"
        fresh = await new_deploy.start_async("versioned")
        await new_deploy.signal_async(fresh.id, "go")
        store = await both.store()
        await store.execute_script(f"UPDATE ms_runs SET run_at = created_at WHERE id = '{run.id}'")
        async with running(both, concurrency=2):
            assert await both.result_async(started.id, timeout=10) == "finished on v1"
            assert await both.result_async(fresh.id, timeout=10) == "finished on v2"
    finally:
        for app in (old_deploy, new_deploy, both):
            await app.aclose()


def test_audit_reports_patches_and_stuck_runs(db_url: str, tmp_path: Any) -> None:
    import json
    import subprocess
    import sys

    (tmp_path / "audited.py").write_text(
        "import mainspring as ms\n"
        f"app = ms.App({db_url!r})\n"
        "@app.workflow(name='audited', version='2')\n"
        "async def audited(wf, input):\n"
        "    if wf.patched('fast-path'):\n"
        "        return 'new'\n"
        "    return await wf.wait_signal('go')\n"
    )
    app = ms.App(db_url)

    @app.workflow(name="audited", version="1")
    async def old_code(wf: ms.Workflow, input: None) -> Any:
        return await wf.wait_signal("go")

    app.start("audited")  # an active run on version 1, which the audited app no longer loads
    app.close()
    command = [sys.executable, "-m", "mainspring", "audit", "--app", "audited:app",
               "--format", "json"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["loaded"] == {"audited": ["2"]}
    assert [s["version"] for s in report["stuck"]] == ["1"]
    [patch] = report["patches"]
    assert (patch["patch"], patch["line"], patch["runs_before"]) == ("fast-path", 5, 1)
    strict = subprocess.run([*command, "--strict"], cwd=tmp_path, capture_output=True, text=True)
    assert strict.returncode == 1


@aio
async def test_reset_replays_a_prefix_and_continues_live(app: ms.App) -> None:
    calls: list[str] = []

    @app.task(name="reset_step")
    async def step(label: str) -> str:
        calls.append(label)
        return label

    @app.workflow(name="resettable")
    async def resettable(wf: ms.Workflow, input: None) -> list[str]:
        first = await wf.activity(step, "first")
        second = await wf.activity(step, "second")
        decision = await wf.wait_signal("go")
        return [first, second, decision]

    old = await app.start_async(resettable)
    async with running(app, concurrency=4):

        async def parked() -> bool:
            return "go" in ((await old.get_async()).awaits or [])

        await eventually(parked)
        journal = (await (await app.store()).load_step_data([old.id], events=True))[old.id].events
        first_done = next(e.seq for e in journal if e.kind == "activity_done")
        new = await app.reset_async(old.id, to_event=first_done)  # keep "first", redo the rest
        await app.signal_async(new.id, "go", "again")
        assert await new.result_async(timeout=10) == ["first", "second", "again"]
    assert (await old.get_async()).state == "cancelled"
    assert (await new.get_async()).attributes["reset_from"] == old.id
    assert calls == ["first", "second", "second"]  # "first" came from the copied journal


@aio
async def test_activities_heartbeat_progress_for_the_next_attempt(app: ms.App) -> None:
    seen: list[Any] = []

    @app.task(name="long_copy", max_attempts=2, backoff=ms.Backoff.constant(0.01))
    async def long_copy(total: int) -> int:
        ctx = ms.current_run()
        seen.append(ctx.heartbeat_details)
        start = (ctx.heartbeat_details or {}).get("done", 0)
        for done in range(start + 1, total + 1):
            assert await ctx.heartbeat({"done": done})
            if ctx.attempt == 1 and done == 3:
                raise RuntimeError("node lost")  # the next attempt resumes from 3
        return total

    @app.task(name="sync_beat")
    def sync_beat() -> bool:
        return ms.current_run().heartbeat_sync({"thread": True})

    @app.workflow(name="copier")
    async def copier(wf: ms.Workflow, input: None) -> list[Any]:
        return [await wf.activity(long_copy, 5), await wf.activity(sync_beat)]

    handle = await app.start_async(copier)
    async with running(app, concurrency=4):
        assert await handle.result_async(timeout=10) == [5, True]
    assert seen == [None, {"done": 3}]


@aio
async def test_an_activity_silent_past_its_heartbeat_timeout_is_failed_and_retried(
    app: ms.App,
) -> None:
    attempts: list[int] = []
    cancelled: list[int] = []

    @app.task(name="stalls_once", max_attempts=3, backoff=ms.Backoff.constant(0.01))
    async def stalls_once() -> int:
        ctx = ms.current_run()
        attempts.append(ctx.attempt)
        await ctx.heartbeat({"started": ctx.attempt})
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(60)  # alive, lease extended, but silent: a hung call
            except asyncio.CancelledError:
                cancelled.append(ctx.attempt)
                raise
        return ctx.attempt

    @app.task(name="beats_steadily")
    async def beats_steadily() -> str:
        for _ in range(8):  # 1.6 s in all, never 1 s without a heartbeat
            await ms.current_run().heartbeat()
            await asyncio.sleep(0.2)
        return "steady"

    @app.workflow(name="watched")
    async def watched(wf: ms.Workflow, input: None) -> list[Any]:
        first = await wf.activity(stalls_once, heartbeat_timeout=1.0)
        second = await wf.activity(beats_steadily, heartbeat_timeout=1.0)
        return [first, second]

    timeouts: list[dict[str, Any]] = []
    app.telemetry.attach("run.heartbeat_timeout", lambda _e, meta: timeouts.append(meta))
    handle = await app.start_async(watched)
    async with running(app, concurrency=4):
        assert await handle.result_async(timeout=20) == [2, "steady"]
    assert attempts == [1, 2] and cancelled == [1]  # the silent attempt's handler was cancelled
    assert [t["state"] for t in timeouts] == ["scheduled"]  # retried with its backoff


@aio
async def test_a_plain_task_heartbeat_timeout_fences_out_the_stalled_holder(app: ms.App) -> None:
    stale_returned = threading.Event()

    @app.task(name="stuck_thread", max_attempts=2, backoff=ms.Backoff.constant(0.01),
              heartbeat_timeout=1.0)  # fmt: skip
    def stuck_thread() -> str:
        if ms.current_run().attempt == 1:
            time.sleep(3.0)  # a thread cannot be cancelled: its result must never land
            stale_returned.set()
            return "stale"
        return "fresh"

    @app.task(name="never_beats")
    async def never_beats() -> None:
        await asyncio.sleep(60)

    fenced = await stuck_thread.enqueue_async()
    hopeless = await never_beats.options(heartbeat_timeout=0.3, max_attempts=2).enqueue_async()
    lost: list[dict[str, Any]] = []
    app.telemetry.attach("run.lease_lost", lambda _e, meta: lost.append(meta))
    async with running(app, concurrency=4):
        assert await fenced.result_async(timeout=20) == "fresh"
        with pytest.raises(ms.RunFailed, match="HeartbeatTimeout"):
            await hopeless.result_async(timeout=20)

        await asyncio.to_thread(stale_returned.wait, 10)
        await asyncio.sleep(0.2)  # time for a stale commit, were it sent
    # The stalled holder was told (its handler given up, its outcome refused by the fence).
    assert any(m["id"] == fenced.id and m.get("reason") == "heartbeat timeout" for m in lost)
    run = await fenced.get_async()
    assert (run.output, run.attempt, run.heartbeat_timeout) == ("fresh", 2, 1.0)
    assert (await hopeless.get_async()).attempt == 2  # both attempts used, then failed
    with pytest.raises(ms.ConfigError, match="process pool"):  # pool handlers cannot beat
        app.task(name="pooled", executor="process", heartbeat_timeout=1.0)(time.time)


@aio
async def test_an_idempotency_key_executes_once_and_later_runs_reuse_the_result(
    app: ms.App,
) -> None:
    calls: list[str] = []

    @app.task(name="charge_once", max_attempts=1)
    async def charge_once(amount: int) -> dict[str, Any]:
        calls.append(f"charge {amount}")
        await asyncio.sleep(0.3)
        if amount < 0:
            raise ValueError("declined")
        return {"charged": amount, "call": len(calls)}

    @app.workflow(name="pays")
    async def pays(wf: ms.Workflow, input: dict[str, Any]) -> Any:
        try:
            return await wf.activity(charge_once, input["amount"], idempotency_key=input["key"])
        except ms.ActivityError as exc:
            return exc.error["message"]

    reused: list[dict[str, Any]] = []
    app.telemetry.attach("run.reused", lambda _e, meta: reused.append(meta))
    async with running(app, concurrency=8):
        # concurrent workflows with one key share one execution
        together = [await app.start_async(pays, {"amount": 5, "key": "order-1"}) for _ in range(3)]
        results = [await h.result_async(timeout=15) for h in together]
        assert results == [{"charged": 5, "call": 1}] * 3
        # any later run with the key takes the completed run's output: the workflow...
        later = await app.start_async(pays, {"amount": 5, "key": "order-1"})
        assert await later.result_async(timeout=10) == {"charged": 5, "call": 1}
        # ...or a plain enqueue of the task
        direct = await charge_once.options(idempotency_key="order-1").enqueue_async(5)
        assert await direct.result_async(timeout=10) == {"charged": 5, "call": 1}
        assert calls == ["charge 5"] and len(reused) == 4
        # a failure is not shared: the next run with its key executes again
        failed = await app.start_async(pays, {"amount": -1, "key": "order-2"})
        assert await failed.result_async(timeout=10) == "declined"
        again = await app.start_async(pays, {"amount": -1, "key": "order-2"})
        assert await again.result_async(timeout=10) == "declined"
    assert calls == ["charge 5", "charge -1", "charge -1"]
    with pytest.raises(ms.ConfigError, match="concurrency_key"):
        charge_once.options(idempotency_key="k", concurrency_key="c")


def _cache_events(app: ms.App) -> list[tuple[str, dict[str, Any]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    for event in ("workflow.cache_hit", "workflow.cache_miss", "workflow.cache_evicted"):
        app.telemetry.attach(event, lambda e, meta: seen.append((e, meta)))
    return seen


@aio
async def test_a_parked_run_continues_its_live_coroutine_on_the_node_that_parked_it(
    app: ms.App,
) -> None:
    calls: list[int] = []

    @app.task(name="inc")
    async def inc(x: int) -> int:
        calls.append(x)
        return x + 1

    @app.workflow(name="cached")
    async def cached(wf: ms.Workflow, x: int) -> list[Any]:
        for _ in range(3):
            x = await wf.activity(inc, x)
        await wf.sleep(0.05)
        return [x, await wf.wait_signal("go")]

    seen = _cache_events(app)
    handle = await app.start_async(cached, 0)
    async with running(app, concurrency=4):

        async def parked() -> bool:
            return "go" in ((await handle.get_async()).awaits or [])

        await eventually(parked)
        await app.signal_async(handle.id, "go", "now")
        assert await handle.result_async(timeout=10) == [3, "now"]
    # Three activity results, the timer and the signal: five wake-ups, none replayed
    # (paranoid mode replayed each beside the cached run and found the same commands).
    assert [e for e, _ in seen] == ["workflow.cache_hit"] * 5
    assert calls == [0, 1, 2]


@aio
async def test_an_evicted_run_is_replayed(db_url: str) -> None:
    app = ms.App(db_url, lease_ttl=5.0, workflow_cache_size=1)

    @app.workflow(name="twice")
    async def twice(wf: ms.Workflow, name: str) -> list[Any]:
        return [name, await wf.wait_signal("a"), await wf.wait_signal("b")]

    seen = _cache_events(app)
    try:
        first, second = await app.start_async(twice, "x"), await app.start_async(twice, "y")
        async with running(app, concurrency=4):
            for signal in ("a", "b"):
                for handle in (first, second):

                    async def parked(h: ms.RunHandle = handle, s: str = signal) -> bool:
                        return s in ((await h.get_async()).awaits or [])

                    await eventually(parked)
                    await app.signal_async(handle.id, signal, f"{signal}!")
            assert await first.result_async(timeout=10) == ["x", "a!", "b!"]
            assert await second.result_async(timeout=10) == ["y", "a!", "b!"]
    finally:
        await app.aclose()
    events = [e for e, _ in seen]
    assert "workflow.cache_evicted" in events  # one slot for two parked runs
    assert ("workflow.cache_miss", "not cached") in [(e, m.get("reason")) for e, m in seen]


@aio
async def test_a_run_that_moved_to_another_node_and_back_is_replayed(db_url: str) -> None:
    app = ms.App(db_url, lease_ttl=5.0)
    gate = asyncio.Event()

    @app.task(name="blocker", queue="busy")
    async def blocker() -> None:
        await gate.wait()

    @app.workflow(name="hops", queue="flows")
    async def hops(wf: ms.Workflow, input: None) -> list[Any]:
        return [await wf.wait_signal("one"), await wf.wait_signal("two")]

    seen = _cache_events(app)
    handle = await app.start_async(hops)

    async def waits_for(name: str) -> bool:
        return name in ((await handle.get_async()).awaits or [])

    try:
        async with running(app, name="a", concurrency=2, queues=["flows", "busy"]) as a:
            await eventually(lambda: waits_for("one"))  # parked by a: its cache holds it
            blockers = [await blocker.enqueue_async() for _ in range(2)]

            async def a_is_full() -> bool:
                return [(await b.get_async()).state for b in blockers] == ["running"] * 2

            await eventually(a_is_full)
            async with running(app, name="b", concurrency=2, queues=["flows"]):
                # The wake-up goes to a (advisory); a has no free slot, so b takes the run.
                await app.signal_async(handle.id, "one", 1)
                await eventually(lambda: waits_for("two"))
            gate.set()
            await app.signal_async(handle.id, "two", 2)
            assert await handle.result_async(timeout=10) == [1, 2]
            assert a.name == "a"
    finally:
        await app.aclose()
    by_node = [(m["node"], e, m.get("reason")) for e, m in seen]
    assert ("b", "workflow.cache_miss", "not cached") in by_node
    assert by_node[-1] == ("a", "workflow.cache_miss", "moved")  # a's entry was stale


def test_wake_ups_of_a_parked_run_are_routed_to_the_node_that_parked_it(pg_url: str) -> None:
    import asyncpg

    from mainspring.store.postgres import node_channel

    app = ms.App(pg_url, lease_ttl=5.0)

    @app.workflow(name="routed")
    async def routed(wf: ms.Workflow, input: None) -> Any:
        return await wf.wait_signal("go")

    async def main() -> None:
        handle = await app.start_async(routed)
        listener = await asyncpg.connect(pg_url)
        heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for channel in ("mainspring", node_channel("owner")):
            await listener.add_listener(
                channel, lambda _c, _p, ch, text: heard.put_nowait((ch, text))
            )
        try:
            async with running(app, name="owner", concurrency=2):

                async def parked() -> bool:
                    return "go" in ((await handle.get_async()).awaits or [])

                await eventually(parked)
                store = await app.store()
                sticky = "SELECT sticky_node FROM ms_runs WHERE id = $1"
                assert await store.fetch_value(sticky, handle.id) == "owner"
                while not heard.empty():
                    heard.get_nowait()
                await app.signal_async(handle.id, "go", "ok")
                got = {await asyncio.wait_for(heard.get(), 5) for _ in range(2)}
                # The owner at once on its channel; every node of the queue a moment later.
                assert got == {(node_channel("owner"), "~claim"), ("mainspring", "~later:default")}
                assert await handle.result_async(timeout=10) == "ok"
        finally:
            await listener.close()
            await app.aclose()

    asyncio.run(main())


@aio
async def test_a_child_finishing_in_the_same_commit_as_its_parents_park_wakes_it(
    app: ms.App,
) -> None:
    from mainspring.run import COMPLETED, WAITING, NewRun, Outcome, StepCommit
    from mainspring.store.base import QueueDemand

    store = await app.store()
    now = datetime.now(UTC)
    parent = NewRun(id="parent", name="p", queue="q", input="{}", state="available", run_at=now,
                    kind="workflow")  # fmt: skip
    await store.insert_runs([parent])
    [p] = await store.claim_runs("node", [QueueDemand("q", 1)], 5.0)
    child = NewRun(id="child", name="c", queue="q", input="{}", state="available", run_at=now,
                   parent_id="parent")  # fmt: skip
    park = StepCommit("workflow", "null", awaits=["__cancel__"], children=[child])
    assert await store.commit_outcomes([Outcome(p.id, p.fence, WAITING, step=park)])
    [p] = await store.claim_runs("node", [QueueDemand("q", 1)], 5.0)  # claimed: the child
    assert p.id == "child"
    await store.execute_script("UPDATE ms_runs SET state = 'available' WHERE id = 'parent'")
    [q] = await store.claim_runs("node", [QueueDemand("q", 1)], 5.0)
    # The parent's next park and its child's completion reach the store in one batch.
    again = StepCommit("workflow", "null", awaits=["__cancel__"])
    done = Outcome(p.id, p.fence, COMPLETED, output="1", parent_id="parent")
    committed = await store.commit_outcomes(
        [Outcome(q.id, q.fence, WAITING, step=again, seen_seq=q.signal_seq), done]
    )
    assert committed == {"parent", "child"}
    assert (await store.get_run("parent")).state == "available"  # woken, not parked for good

"""Durable state machines: outcomes, signals, fan-out/fan-in, rate limits, on both backends."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import mainspring as ms
from helpers import aio, eventually, running


@aio
async def test_checkout_flows_through_await_signal_spawn_and_fan_in(app: ms.App) -> None:
    @app.machine(name="shipment")
    class Shipment(ms.Machine):
        initial = "ship"

        async def ship(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Done({"item": state["item"]})

    @app.machine(name="checkout")
    class Checkout(ms.Machine):
        initial = "reserve"

        async def reserve(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Next("charge", {**state, "reserved": True})

        async def charge(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Await("paid", "declined", then="settle", state=state, timeout=60)

        async def settle(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            if "declined" in ctx.awaited:
                return ms.Stop("declined")
            state["amount"] = ctx.awaited.payload("paid")["amount"]
            children = [Shipment.spec({"item": i}) for i in state["items"]]
            return ms.Spawn(children, then="finish", state=state)

        async def finish(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Done({"amount": state["amount"], "shipped": [c.output for c in ctx.children]})

    handle = await Checkout.start_async({"items": [1, 2, 3]}, correlation_key="order-42")
    async with running(app, concurrency=10):

        async def parked() -> bool:
            return (await handle.get_async()).state == "waiting"

        await eventually(parked)
        run = await handle.get_async()
        assert (run.step, run.awaits) == ("settle", ["paid", "declined"])
        assert run.state_data == {"items": [1, 2, 3], "reserved": True}
        sent = await app.signal_async(
            correlation_key="order-42", name="paid", payload={"amount": 9}
        )
        assert sent is ms.SignalResult.DELIVERED
        result = await handle.result_async(timeout=20)
    assert result == {"amount": 9, "shipped": [{"item": 1}, {"item": 2}, {"item": 3}]}
    assert await app.signal_async(handle.id, "paid") is ms.SignalResult.TERMINAL


@aio
async def test_signal_results_dedup_and_early_signals(app: ms.App) -> None:
    @app.machine(name="waiter")
    class Waiter(ms.Machine):
        initial = "first"

        async def first(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Next("wait", state)

        async def wait(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Await("go", then="end", state=state)

        async def end(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Done({"go": [s.payload for s in ctx.awaited], "inbox": ctx.inbox.names})

    handle = await Waiter.start_async({})
    # Sent before the machine runs at all: kept in the inbox until the Await is reached.
    assert await app.signal_async(handle.id, "note", 1) is ms.SignalResult.DELIVERED
    assert await app.signal_async(handle.id, "go", 2, dedup_key="k") is ms.SignalResult.DELIVERED
    assert await app.signal_async(handle.id, "go", 3, dedup_key="k") is ms.SignalResult.DUPLICATE
    assert await app.signal_async("no-such-run", "go") is ms.SignalResult.NOT_FOUND
    assert await app.signal_async(correlation_key="nobody", name="go") is ms.SignalResult.NOT_FOUND
    async with running(app, concurrency=4):
        result = await handle.result_async(timeout=20)
    # The awaited signal was consumed by the step that saw it; the other stayed in the inbox.
    assert result == {"go": [2], "inbox": ["note", "go"]}


@aio
async def test_await_timeout_runs_the_timeout_step(app: ms.App) -> None:
    @app.machine(name="timer")
    class Timer(ms.Machine):
        initial = "wait"

        async def wait(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Await("never", then="got", state=state, timeout=0.3, on_timeout="late")

        async def got(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Done("signal")

        async def late(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Done("timed out")

    handle = await Timer.start_async({})
    started = time.monotonic()
    async with running(app, concurrency=4):
        assert await handle.result_async(timeout=10) == "timed out"
    assert time.monotonic() - started >= 0.3


@aio
async def test_a_signal_during_the_step_that_parks_is_not_lost(app: ms.App) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    @app.machine(name="racer")
    class Racer(ms.Machine):
        initial = "park"

        async def park(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            entered.set()
            await release.wait()  # the signal arrives while this step runs
            return ms.Await("go", then="end", state=state)

        async def end(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Done(ctx.awaited.payload("go"))

    handle = await Racer.start_async({})
    async with running(app, concurrency=4):
        await asyncio.wait_for(entered.wait(), 10)
        assert await app.signal_async(handle.id, "go", "ok") is ms.SignalResult.DELIVERED
        release.set()
        assert await handle.result_async(timeout=10) == "ok"


@aio
async def test_step_exception_retries_from_the_committed_state(app: ms.App) -> None:
    calls: list[tuple[str, int, dict[str, Any]]] = []

    @app.machine(name="flaky", max_attempts=3, backoff=ms.Backoff.constant(0.01))
    class Flaky(ms.Machine):
        initial = "one"

        async def one(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            calls.append(("one", ctx.attempt, dict(state)))
            return ms.Next("two", {"n": state["n"] + 1})

        async def two(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            calls.append(("two", ctx.attempt, dict(state)))
            state["n"] += 100  # lost: an exception commits nothing
            if ctx.attempt < 3:
                raise RuntimeError("flaky")
            return ms.Done(state["n"])

    handle = await Flaky.start_async({"n": 1})
    async with running(app, concurrency=4):
        assert await handle.result_async(timeout=10) == 102
    assert calls == [
        ("one", 1, {"n": 1}),
        ("two", 1, {"n": 2}),
        ("two", 2, {"n": 2}),
        ("two", 3, {"n": 2}),
    ]


@aio
async def test_retry_stop_and_bad_outcomes(app: ms.App) -> None:
    @app.machine(name="retrier", max_attempts=3)
    class Retrier(ms.Machine):
        initial = "again"

        async def again(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Retry(delay=0.01, state={"seen": ctx.attempt})

    @app.machine(name="stopper")
    class Stopper(ms.Machine):
        initial = "stop"

        async def stop(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Stop("out of stock")

    @app.machine(name="confused", max_attempts=5)
    class Confused(ms.Machine):
        initial = "wrong"

        async def wrong(self, ctx: ms.StepContext, state: dict[str, Any]) -> Any:
            if state.get("missing_step"):
                return ms.Next("nowhere", state)
            return {"not": "an outcome"}

    retried = await Retrier.start_async({})
    stopped = await Stopper.start_async({})
    bad = await Confused.start_async({})
    missing = await Confused.start_async({"missing_step": True})
    async with running(app, concurrency=4):
        with pytest.raises(ms.RunFailed, match="RetriesExhausted"):
            await retried.result_async(timeout=10)
        with pytest.raises(ms.RunFailed, match="out of stock"):
            await stopped.result_async(timeout=10)
        with pytest.raises(ms.RunFailed, match=r"returns ms\.Next"):
            await bad.result_async(timeout=10)
        with pytest.raises(ms.RunFailed, match="no step 'nowhere'"):
            await missing.result_async(timeout=10)
    assert (await retried.get_async()).state_data == {"seen": 2}
    assert (await stopped.get_async()).attempt == 1  # stopped by design: never retried
    assert (await bad.get_async()).attempt == 1  # a bad outcome is a bug: not retried


@aio
async def test_typed_state_and_start_dedup(app: ms.App) -> None:
    @dataclass
    class Counter:
        n: int
        label: str = "c"

    @app.machine(name="typed")
    class Typed(ms.Machine):
        initial = "bump"
        State = Counter

        async def bump(self, ctx: ms.StepContext, state: Counter) -> ms.Outcome:
            assert isinstance(state, Counter)
            if state.n >= 3:
                return ms.Done(state.n)
            return ms.Next("bump", Counter(state.n + 1, state.label))

    with pytest.raises(TypeError):
        await Typed.start_async({"wrong": 1})
    first = await Typed.start_async(Counter(0), correlation_key="typed-1")
    again = await Typed.start_async(Counter(5), correlation_key="typed-1")
    assert again.id == first.id and not again.created
    async with running(app, concurrency=4):
        assert await first.result_async(timeout=10) == 3


@aio
async def test_cancelling_a_parent_cancels_its_children(app: ms.App) -> None:
    @app.machine(name="sleeper")
    class Sleeper(ms.Machine):
        initial = "nap"

        async def nap(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Await("never", then="nap", state=state)

    @app.machine(name="tree")
    class Tree(ms.Machine):
        initial = "grow"

        async def grow(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Spawn([Sleeper.spec({}) for _ in range(3)], then="end", state=state)

        async def end(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Done()

    handle = await Tree.start_async({})
    async with running(app, concurrency=8):

        async def children_parked() -> bool:
            runs = await app.list_runs_async(name="sleeper")
            return len(runs) == 3 and all(r.state == "waiting" for r in runs)

        await eventually(children_parked)
        assert (await app.cancel_async(handle.id)).state == "cancelled"
    children = await app.list_runs_async(name="sleeper")
    assert sorted(c.state for c in children) == ["cancelled"] * 3
    assert {c.parent_id for c in children} == {handle.id}


@aio
async def test_children_can_be_jobs_and_fan_in_wakes_the_parent_once(app: ms.App) -> None:
    @app.task(name="square")
    async def square(x: int) -> int:
        await asyncio.sleep(0.01)
        return x * x

    woken: list[int] = []

    @app.machine(name="mapper")
    class Mapper(ms.Machine):
        initial = "scatter"

        async def scatter(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Spawn([square.call(i) for i in range(30)], then="gather", state=state)

        async def gather(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            woken.append(len(ctx.children))
            return ms.Done(sorted(c.output for c in ctx.children))

    handle = await Mapper.start_async({})
    async with running(app, concurrency=50):
        assert await handle.result_async(timeout=20) == sorted(i * i for i in range(30))
    assert woken == [30]


@aio
async def test_rate_limited_steps_wait_for_tokens(app: ms.App) -> None:
    app.rate_limits.configure("api", allowed=20, period=1.0, burst=5)
    granted: list[float] = []
    throttled: list[dict[str, Any]] = []
    app.telemetry.attach("rate_limit.throttled", lambda _e, meta: throttled.append(meta))

    @app.machine(name="caller")
    class Caller(ms.Machine):
        initial = "queue"

        async def queue(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Next("call", state, rate_limit=("api", "tenant-1"))

        async def call(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            granted.append(time.monotonic())
            return ms.Done()

    handles = [await Caller.start_async({}) for _ in range(25)]
    async with running(app, concurrency=50):
        for h in handles:
            await h.result_async(timeout=20)
    span = max(granted) - min(granted)
    assert span >= (25 - 5) / 20 * 0.8  # 5 at once (the burst), then 20 per second
    assert throttled and throttled[0]["key"] == "api:tenant-1"
    status = await app.rate_limits.status_async("api")
    assert [b.key for b in status.buckets] == ["api:tenant-1"] and status.waiting == 0


@aio
async def test_unknown_and_impossible_rate_limits(app: ms.App) -> None:
    app.rate_limits.configure("small", allowed=1, period=1.0, burst=2)
    unknown: list[dict[str, Any]] = []
    app.telemetry.attach("rate_limit.unknown", lambda _e, meta: unknown.append(meta))

    @app.machine(name="limited")
    class Limited(ms.Machine):
        initial = "go"

        async def go(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Next("end", state, rate_limit=state["limit"], weight=state["weight"])

        async def end(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Done("granted")

    held = await Limited.start_async({"limit": "nobody-configured-this", "weight": 1})
    heavy = await Limited.start_async({"limit": "small", "weight": 3})
    async with running(app, concurrency=4):
        with pytest.raises(ms.RunFailed, match="can never be granted"):
            await heavy.result_async(timeout=10)

        async def held_back() -> bool:
            run = await held.get_async()
            return run.state == "available" and run.step == "end"

        await eventually(held_back)
        await asyncio.sleep(0.3)
        assert (await held.get_async()).state == "available"  # held, not run
        assert unknown and unknown[0]["name"] == "nobody-configured-this"
        app.rate_limits.configure("nobody-configured-this", allowed=10, period=1.0)
        await app.store()  # writes the new configuration
        assert await held.result_async(timeout=15) == "granted"


@aio
async def test_jobs_can_carry_a_rate_limit(app: ms.App) -> None:
    app.rate_limits.configure("mail", allowed=10, period=1.0, burst=2)
    starts: list[float] = []

    @app.task(name="send")
    async def send(i: int) -> int:
        starts.append(time.monotonic())
        return i

    handles = await app.enqueue_many_async(
        [send.options(rate_limit="mail").call(i) for i in range(8)]
    )
    async with running(app, concurrency=20):
        assert [await h.result_async(timeout=20) for h in handles] == list(range(8))
    assert max(starts) - min(starts) >= (8 - 2) / 10 * 0.8


def test_machine_registration_is_checked() -> None:
    app = ms.App("sqlite:///:memory:")

    class NotAMachine:
        pass

    with pytest.raises(ms.ConfigError, match=r"subclass of ms\.Machine"):
        app.machine()(NotAMachine)  # type: ignore[type-var]

    class NoInitial(ms.Machine):
        initial = "begin"

        async def other(self, ctx: ms.StepContext, state: Any) -> ms.Outcome:
            return ms.Done()

    with pytest.raises(ms.ConfigError, match="initial step 'begin'"):
        app.machine()(NoInitial)
    with pytest.raises(ms.ConfigError, match="rate limit name"):
        app.rate_limits.configure("a:b", allowed=1, period=1)
    with pytest.raises(ms.ConfigError, match="exactly one"):
        app.signal(name="x")


@aio
async def test_gc_keeps_children_of_live_parents_and_prunes_idle_buckets(db_url: str) -> None:
    app = ms.App(db_url, retention=3600.0)
    app.rate_limits.configure("fast", allowed=1000, period=1.0)

    @app.task(name="quick")
    async def quick() -> str:
        return "done"

    @app.machine(name="forever")
    class Forever(ms.Machine):
        initial = "wait"

        async def wait(self, ctx: ms.StepContext, state: Any) -> ms.Outcome:
            return ms.Await("never", then="wait", state=state)

    @app.machine(name="holder")
    class Holder(ms.Machine):
        initial = "spawn"

        async def spawn(self, ctx: ms.StepContext, state: Any) -> ms.Outcome:
            return ms.Spawn([quick.call(), Forever.spec({})], then="end", state=state)

        async def end(self, ctx: ms.StepContext, state: Any) -> ms.Outcome:
            return ms.Done()

    try:
        parent = await Holder.start_async({})
        limited = await quick.options(rate_limit=("fast", "t1")).enqueue_async()
        async with running(app, concurrency=8):
            await limited.result_async(timeout=10)

            async def quick_child_done() -> bool:
                runs = await app.list_runs_async(name="quick", state="completed")
                return any(r.parent_id == parent.id for r in runs)

            await eventually(quick_child_done)
            store = await app.store()
            later = datetime.now(UTC) + timedelta(seconds=60)
            assert await store.delete_terminal(later, 100) == 1  # the unparented job only
            await app.cancel_async(parent.id)  # cancels the waiting child too
            assert await store.delete_terminal(later, 100) == 3
            assert await app.list_runs_async() == []
            await asyncio.sleep(0.05)  # the bucket refills to its burst
            assert await store.prune_rate_buckets() == 1
            assert (await app.rate_limits.status_async("fast")).buckets == []
    finally:
        await app.aclose()


@aio
async def test_fast_steps_under_short_leases_never_lose_a_handler(db_url: str) -> None:
    """A machine's next step may be claimed before its previous commit is acknowledged.

    Neither that commit nor a lease check sent before the re-claim may touch the
    new claim (max_attempts=1: a cancelled or dropped step fails its run).
    """
    app = ms.App(db_url, lease_ttl=0.6, shutdown_grace=2.0)
    lost: list[dict[str, Any]] = []
    app.telemetry.attach("run.lease_lost", lambda _e, meta: lost.append(meta))

    @app.machine(name="hopper", max_attempts=1)
    class Hopper(ms.Machine):
        initial = "hop"

        async def hop(self, ctx: ms.StepContext, state: dict[str, int]) -> ms.Outcome:
            await asyncio.sleep(0.001)
            if state["left"] == 0:
                return ms.Done(state["hops"])
            return ms.Next("hop", {"left": state["left"] - 1, "hops": state["hops"] + 1})

    try:
        handles = [await Hopper.start_async({"left": 8, "hops": 0}) for _ in range(150)]
        async with running(app, concurrency=60):
            results = [await h.result_async(timeout=60) for h in handles]
        assert results == [8] * 150
        assert lost == []
    finally:
        await app.aclose()


@aio
async def test_a_worker_serves_machine_queues_and_first_calls_share_one_store(db_url: str) -> None:
    app = ms.App(db_url)
    opened = 0
    open_store = app.open_store

    async def counting_open() -> Any:
        nonlocal opened
        opened += 1
        return await open_store()

    app.open_store = counting_open  # type: ignore[method-assign]

    @app.machine(name="orders_machine", queue="orders")
    class Orders(ms.Machine):
        initial = "go"

        async def go(self, ctx: ms.StepContext, state: int) -> ms.Outcome:
            return ms.Done(state * 2)

    try:
        handles = await asyncio.gather(*(Orders.start_async(i) for i in range(20)))
        assert opened == 1  # twenty concurrent first calls, one pool
        async with running(app, concurrency=8) as worker:
            assert "orders" in worker.queues
            assert [await h.result_async(timeout=10) for h in handles] == [i * 2 for i in range(20)]
    finally:
        await app.aclose()

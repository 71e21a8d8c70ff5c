"""The global limiter: token buckets shared with rate-limited runs, semaphore slots with leases."""

from __future__ import annotations

import asyncio
import time

import pytest

import mainspring as ms
from helpers import aio


@aio
async def test_check_takes_tokens_until_the_bucket_is_empty(app: ms.App) -> None:
    app.rate_limits.configure("geo", allowed=10, period=1, burst=3)
    checks = [await app.limiter.check_async("geo") for _ in range(4)]
    assert [c.allowed for c in checks] == [True, True, True, False]
    allowed, retry_after = checks[-1]
    assert not allowed and 0 < retry_after <= 0.11
    await asyncio.sleep(0.25)
    assert (await app.limiter.check_async("geo", cost=2)).allowed  # refilled lazily
    assert (await app.limiter.check_async(("geo", "tenant-2"))).allowed  # one bucket per partition
    with pytest.raises(ms.ConfigError, match="never be granted"):
        await app.limiter.check_async("geo", cost=4)
    with pytest.raises(ms.ConfigError, match="'nope' is not configured"):
        await app.limiter.check_async("nope")


@aio
async def test_limit_waits_for_tokens_and_status_and_reset_show_the_bucket(app: ms.App) -> None:
    app.rate_limits.configure("api", allowed=20, period=1, burst=2)
    waits: list[str] = []
    app.telemetry.attach("rate_limit.wait", lambda name, meta: waits.append(meta["key"]))
    began = time.monotonic()
    for _ in range(6):
        async with app.limiter.limit("api"):
            pass
    elapsed = time.monotonic() - began
    assert elapsed >= 0.15  # 2 at once, then 4 more at 20/s
    assert waits
    status = await app.limiter.status_async("api")
    assert status.rate_limit is not None and status.rate_limit.buckets[0].key == "api"
    await app.limiter.reset_async("api")
    assert (await app.limiter.check_async("api", cost=2)).allowed
    with pytest.raises(TimeoutError):
        await app.limiter.wait_async("api", cost=2, timeout=0.01)


@aio
async def test_rate_limited_runs_and_limiter_checks_share_one_bucket(app: ms.App) -> None:
    app.rate_limits.configure("shared", allowed=1, period=60, burst=2)
    assert (await app.limiter.check_async("shared", cost=2)).allowed
    status = await app.rate_limits.status_async("shared")
    assert status.buckets[0].tokens < 0.1  # the engine's bucket, emptied by the check


@aio
async def test_semaphore_slots_are_exclusive_and_lapse_with_their_lease(app: ms.App) -> None:
    app.limiter.semaphore("browser", slots=2, lease=0.3)
    a = await app.limiter.acquire_slot_async("browser")
    b = await app.limiter.acquire_slot_async("browser")
    assert {a.slot, b.slot} == {0, 1}
    assert await app.limiter.try_acquire_slot_async("browser") is None
    assert await app.limiter.release_slot_async("browser", a)
    c = await app.limiter.acquire_slot_async("browser", timeout=1)
    assert c.slot == a.slot
    # b's holder "dies" (never renews): its slot is free once the lease lapses
    await asyncio.sleep(0.2)
    assert await app.limiter.renew_slot_async(c)
    await asyncio.sleep(0.15)
    d = await app.limiter.acquire_slot_async("browser", timeout=1)
    assert d.slot == b.slot
    assert not await app.limiter.release_slot_async("browser", b)  # b lost it
    assert len((await app.limiter.status_async("browser")).held) >= 1
    await app.limiter.reset_async("browser")
    assert (await app.limiter.status_async("browser")).held == []


@aio
async def test_slot_context_renews_its_lease_while_held(app: ms.App) -> None:
    app.limiter.semaphore("one", slots=1, lease=0.2)
    async with app.limiter.slot("one") as held:
        await asyncio.sleep(0.5)  # longer than the lease: renewed meanwhile
        assert await app.limiter.try_acquire_slot_async("one") is None
        assert held.slot == 0
    assert await app.limiter.try_acquire_slot_async("one") is not None
    with pytest.raises(ms.ConfigError, match="no semaphore 'other'"):
        await app.limiter.acquire_slot_async("other")

"""The global rate limiter, usable from any code: token buckets and semaphores in the database.

    app.rate_limits.configure("geo_api", allowed=10, period=1)
    check = await app.limiter.check_async("geo_api")       # -> allowed, retry_after
    async with app.limiter.limit("geo_api", cost=2): ...     # waits for the tokens
    app.limiter.semaphore("browser", slots=4, lease=30)
    async with app.limiter.slot("browser") as slot: ...      # at most 4 holders, cluster-wide

Buckets are the engine's own (ms_rate_buckets, refilled lazily from
ms_rate_limits): a check spends the same tokens rate-limited runs are
claimed with, so code and runs share one limit. A slot is a row with a
lease: held until released, or until its lease lapses when its holder died
(`slot()` renews the lease while the block runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from mainspring.errors import ConfigError
from mainspring.ids import uuid7
from mainspring.ratelimits import RateLimitRef, RateLimitStatus, bucket_key, limit_name

if TYPE_CHECKING:
    from mainspring.app import App


@dataclass(frozen=True, slots=True)
class Check:
    """A bucket check: whether the tokens were taken, else how long until they are there."""

    allowed: bool
    retry_after: float

    def __bool__(self) -> bool:
        return self.allowed

    def __iter__(self) -> Iterator[bool | float]:  # allowed, retry_after = check
        return iter((self.allowed, self.retry_after))


@dataclass(frozen=True, slots=True)
class Slot:
    """A held semaphore slot; pass it to `release_slot`."""

    name: str
    slot: int
    holder: str


@dataclass(frozen=True, slots=True)
class SemaphoreConfig:
    name: str
    slots: int
    lease: float


@dataclass(frozen=True, slots=True)
class LimiterStatus:
    """A name's state: its bucket(s) when it is a rate limit, its held slots when a semaphore."""

    name: str
    rate_limit: RateLimitStatus | None
    slots: int | None
    held: list[tuple[int, str, datetime]]


class Limiter:
    """Cluster-wide rate limits and semaphores for any code (`app.limiter`)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.semaphores: dict[str, SemaphoreConfig] = {}

    # -- token buckets ---------------------------------------------------------------

    async def check_async(self, bucket: RateLimitRef, cost: float = 1) -> Check:
        """Take `cost` tokens from a configured bucket now if it holds them (never waits)."""
        key = bucket_key(bucket)
        if cost <= 0:
            raise ConfigError(f"cost must be > 0, got {cost}")
        name = limit_name(key)
        config = self.app.rate_limits.configs.get(name)
        if config is not None and cost > config.burst:
            raise ConfigError(
                f"a cost of {cost} can never be granted: rate limit {name!r} holds at most "
                f"{config.burst} tokens (its burst)"
            )
        store = await self.app.store()
        found = await store.take_tokens(key, cost)
        if found is None:
            raise ConfigError(
                f"rate limit {name!r} is not configured: app.rate_limits.configure({name!r}, "
                "allowed=..., period=...)"
            )
        check = Check(*found)
        self.app.telemetry.emit("rate_limit.check", key=key, cost=cost, allowed=check.allowed,
                                retry_after=check.retry_after)  # fmt: skip
        return check

    def check(self, bucket: RateLimitRef, cost: float = 1) -> Check:
        """Take tokens now if the bucket holds them (sync client); see `check_async`."""
        return self.app._sync(self.check_async(bucket, cost))

    async def wait_async(
        self, bucket: RateLimitRef, cost: float = 1, timeout: float | None = None
    ) -> float:
        """Wait until `cost` tokens are taken; returns the seconds waited (TimeoutError after
        `timeout`)."""
        began = time.monotonic()
        while True:
            check = await self.check_async(bucket, cost)
            if check.allowed:
                return time.monotonic() - began
            pause = max(0.005, check.retry_after) * random.uniform(1.0, 1.2)
            if timeout is not None and time.monotonic() - began + pause > timeout:
                raise TimeoutError(f"rate limit {bucket!r}: no {cost} tokens within {timeout} s")
            self.app.telemetry.emit("rate_limit.wait", key=bucket_key(bucket), cost=cost,
                                    seconds=pause)  # fmt: skip
            await asyncio.sleep(pause)

    def wait(self, bucket: RateLimitRef, cost: float = 1, timeout: float | None = None) -> float:
        """Wait for tokens (sync client); see `wait_async`."""
        return self.app._sync(self.wait_async(bucket, cost, timeout))

    @contextlib.asynccontextmanager
    async def limit(
        self, bucket: RateLimitRef, cost: float = 1, timeout: float | None = None
    ) -> AsyncIterator[None]:
        """`async with app.limiter.limit("api"):` runs the block once the tokens are taken."""
        await self.wait_async(bucket, cost, timeout)
        yield

    # -- semaphores --------------------------------------------------------------------

    def semaphore(self, name: str, *, slots: int, lease: float = 30.0) -> SemaphoreConfig:
        """Declare a semaphore of `slots` slots; a holder that dies loses its slot after `lease` s.

        Every process using it declares the same slots (the count travels with
        each acquisition, not in the database).
        """
        if not name or not isinstance(name, str):
            raise ConfigError(f"a semaphore name is a non-empty string, got {name!r}")
        if slots < 1:
            raise ConfigError(f"semaphore {name!r}: slots must be >= 1, got {slots}")
        if lease <= 0:
            raise ConfigError(f"semaphore {name!r}: lease must be > 0 seconds, got {lease}")
        config = SemaphoreConfig(name, slots, float(lease))
        self.semaphores[name] = config
        return config

    def _semaphore(self, name: str) -> SemaphoreConfig:
        try:
            return self.semaphores[name]
        except KeyError:
            raise ConfigError(
                f"no semaphore {name!r}: declare it with app.limiter.semaphore({name!r}, slots=N)"
            ) from None

    async def try_acquire_slot_async(self, name: str) -> Slot | None:
        """A free slot now, or None when every slot is held."""
        config = self._semaphore(name)
        holder = uuid7()
        store = await self.app.store()
        slot = await store.acquire_slot(name, config.slots, holder, config.lease)
        if slot is None:
            return None
        self.app.telemetry.emit("rate_limit.slot_acquired", name=name, slot=slot, holder=holder)
        return Slot(name, slot, holder)

    async def acquire_slot_async(self, name: str, timeout: float | None = None) -> Slot:
        """Wait for a slot (TimeoutError after `timeout`); release it with `release_slot`."""
        began = time.monotonic()
        pause = 0.005
        while True:
            slot = await self.try_acquire_slot_async(name)
            if slot is not None:
                return slot
            if timeout is not None and time.monotonic() - began + pause > timeout:
                raise TimeoutError(f"semaphore {name!r}: no free slot within {timeout} s")
            await asyncio.sleep(pause * random.uniform(1.0, 1.5))
            pause = min(pause * 1.5, 0.2)

    def acquire_slot(self, name: str, timeout: float | None = None) -> Slot:
        """Wait for a slot (sync client); see `acquire_slot_async`."""
        return self.app._sync(self.acquire_slot_async(name, timeout))

    async def renew_slot_async(self, slot: Slot) -> bool:
        """Extend a held slot's lease; False when it lapsed (another holder may have it)."""
        store = await self.app.store()
        return await store.renew_slot(slot.name, slot.slot, slot.holder,
                                      self._semaphore(slot.name).lease)  # fmt: skip

    def renew_slot(self, slot: Slot) -> bool:
        return self.app._sync(self.renew_slot_async(slot))

    async def release_slot_async(self, name: str, slot: Slot) -> bool:
        """Give a slot back; False when its lease had lapsed already."""
        if slot.name != name:
            raise ConfigError(f"slot {slot.slot} belongs to semaphore {slot.name!r}, not {name!r}")
        released = await (await self.app.store()).release_slot(name, slot.slot, slot.holder)
        self.app.telemetry.emit("rate_limit.slot_released", name=name, slot=slot.slot,
                                holder=slot.holder, held=released)  # fmt: skip
        return released

    def release_slot(self, name: str, slot: Slot) -> bool:
        """Give a slot back (sync client); see `release_slot_async`."""
        return self.app._sync(self.release_slot_async(name, slot))

    @contextlib.asynccontextmanager
    async def slot(self, name: str, timeout: float | None = None) -> AsyncIterator[Slot]:
        """Hold a slot for the block, renewing its lease every third of it; released after."""
        held = await self.acquire_slot_async(name, timeout)
        lease = self._semaphore(name).lease

        async def renew() -> None:
            while True:
                await asyncio.sleep(lease / 3)
                await self.renew_slot_async(held)

        renewer = asyncio.create_task(renew())
        try:
            yield held
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renewer
            await self.release_slot_async(name, held)

    # -- both ----------------------------------------------------------------------------

    async def status_async(self, name: str) -> LimiterStatus:
        store = await self.app.store()
        configs = await store.rate_limit_configs()
        rate = await self.app.rate_limits.status_async(name) if name in configs else None
        semaphore = self.semaphores.get(name)
        held = await store.list_slots(name)
        return LimiterStatus(name, rate, semaphore.slots if semaphore else None, held)

    def status(self, name: str) -> LimiterStatus:
        """A bucket's tokens and waiting runs, or a semaphore's held slots."""
        return self.app._sync(self.status_async(name))

    async def reset_async(self, name: str) -> None:
        store = await self.app.store()
        await store.reset_rate_buckets(name)
        await store.reset_slots(name)

    def reset(self, name: str) -> None:
        """Refill a rate limit's buckets and release every slot of a semaphore of this name."""
        self.app._sync(self.reset_async(name))

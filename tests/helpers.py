"""Test helpers: run async test bodies, and run worker nodes inside a test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import mainspring as ms
from mainspring.engine.worker import Worker


def aio(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop; close the apps it used on that loop."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            try:
                await fn(*args, **kwargs)
            finally:
                for value in kwargs.values():
                    if isinstance(value, ms.App):
                        await value.aclose()

        asyncio.run(main())

    return wrapper


@contextlib.asynccontextmanager
async def running(app: ms.App, **options: Any) -> AsyncIterator[Worker]:
    """A worker node running in the background for the duration of the block."""
    options.setdefault("install_signal_handlers", False)
    worker = Worker(app, **options)
    task = asyncio.create_task(worker.run())
    started = asyncio.create_task(worker.started.wait())
    await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if task.done():
        task.result()  # startup failed: raise its error
    try:
        yield worker
    finally:
        worker.stop()
        await task


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until an async check passes."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)

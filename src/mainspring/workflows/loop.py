"""A deterministic event loop for replaying workflow code.

Workflow code awaits only futures the workflow context makes, so running it
needs no clock and no I/O: just ready callbacks, run in order until none are
left. The loop is installed as the running loop only while it runs
(synchronously, inside the worker's own loop), so `asyncio.gather` and
friends inside workflow code bind to it.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("mainspring.workflows")


class ReplayLoop(asyncio.AbstractEventLoop):
    """Runs callbacks in FIFO order; `run_ready` returns when every task is blocked."""

    def __init__(self) -> None:
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self.errors: list[BaseException] = []

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(  # type: ignore[override]
        self,
        coro: Coroutine[Any, Any, Any],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[Any]:
        return asyncio.Task(coro, loop=self, name=name, context=context)

    def get_debug(self) -> bool:
        return False

    def is_closed(self) -> bool:
        return False

    def is_running(self) -> bool:
        return True

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, BaseException):
            self.errors.append(exc)
        log.debug("workflow loop: %s", context.get("message"))

    def time(self) -> float:
        raise RuntimeError("workflow code has no clock: use wf.now() or wf.sleep()")

    def call_later(self, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:  # type: ignore[override]
        raise RuntimeError("workflow code cannot use loop timers: use wf.sleep()")

    def call_at(self, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:  # type: ignore[override]
        raise RuntimeError("workflow code cannot use loop timers: use wf.sleep()")

    def run_ready(self) -> None:
        """Run callbacks until none is ready (every workflow task waits on a future)."""
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        try:
            while self._ready:
                handle = self._ready.popleft()
                if not handle.cancelled():
                    handle._run()
        finally:
            asyncio.events._set_running_loop(previous)

"""What a running handler can know about its own run."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from mainspring.errors import MainspringError


@dataclass(frozen=True, slots=True)
class RunContext:
    """The run a handler is executing: its id, attempt and the node running it.

    A long handler calls `await heartbeat(details)` (`heartbeat_sync` from a
    sync handler): its lease is pushed out now, and `details` (JSON) is kept on
    the run, so the next attempt after a crash reads it as `heartbeat_details`
    and can resume where the last one got to. A run with a `heartbeat_timeout`
    must heartbeat at least that often (from its claim on), or any node fails
    the attempt and its commit is refused.
    """

    id: str
    name: str
    queue: str
    attempt: int
    max_attempts: int
    node: str
    heartbeat_details: Any = None
    _beat: Callable[[Any], Coroutine[Any, Any, bool]] | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    async def heartbeat(self, details: Any = None) -> bool:
        """Record progress and extend the lease; False when the run is no longer this node's."""
        if self._beat is None:
            raise MainspringError("heartbeats are for task handlers (jobs and activities)")
        return await self._beat(details)

    def heartbeat_sync(self, details: Any = None) -> bool:
        """`heartbeat` from a sync handler (it runs in a worker thread)."""
        if self._beat is None or self._loop is None:
            raise MainspringError("heartbeats are for task handlers (jobs and activities)")
        future = asyncio.run_coroutine_threadsafe(self._beat(details), self._loop)
        return bool(future.result(timeout=30))


# A RunContext, or (make, arg) that makes it on first use: most handlers never ask.
_current: contextvars.ContextVar[RunContext | tuple[Callable[[Any], RunContext], Any]] = (
    contextvars.ContextVar("mainspring_run")
)


def current_run() -> RunContext:
    """The run being executed; raises outside a handler."""
    try:
        value = _current.get()
    except LookupError:
        raise MainspringError("current_run() is only available inside a running task") from None
    if isinstance(value, tuple):
        value = value[0](value[1])
        _current.set(value)
    return value

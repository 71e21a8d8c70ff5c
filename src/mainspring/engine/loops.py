"""The node's event loop and the supervision of its background loops (a crash is logged,
reported and retried)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from mainspring.telemetry import Telemetry

LoopKind = Literal["auto", "asyncio", "uvloop"]

log = logging.getLogger("mainspring.worker")


def event_loop_factory(kind: LoopKind = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a worker runs on: uvloop when installed ("auto"; it is a dependency
    where it builds: Linux and macOS), else asyncio's own (None). "uvloop" insists on it."""
    if kind not in ("auto", "asyncio", "uvloop"):
        raise ValueError(f"loop must be 'auto', 'asyncio' or 'uvloop', got {kind!r}")
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


async def supervise(
    name: str,
    loop_fn: Callable[[], Awaitable[None]],
    telemetry: Telemetry,
    on_crash: Callable[[str, BaseException], None],
    *,
    max_backoff: float = 10.0,
) -> None:
    """Run `loop_fn` for as long as the owner wants; restart it with backoff when it raises.

    A loop that keeps failing (the database is down, say) is retried forever,
    and every failure is visible: logged, emitted as `node.loop_crashed`, and
    passed to `on_crash` so the node can mark itself degraded.
    """
    backoff = 0.1
    while True:
        started = time.monotonic()
        try:
            await loop_fn()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if time.monotonic() - started > 30:
                backoff = 0.1  # it ran well for a while: this is a new failure, not the same one
            log.warning(
                "loop %s failed (%s: %s); retrying in %.1fs", name, type(exc).__name__, exc, backoff
            )
            telemetry.emit("node.loop_crashed", loop=name, error=repr(exc))
            on_crash(name, exc)
            await asyncio.sleep(backoff)
            backoff = min(max_backoff, backoff * 2)


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for the event up to `timeout` seconds; True when it was set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True

"""The sync client's event loop: one background thread that runs async store calls.

Sync methods (`task.enqueue`, `handle.result`, `app.get_run`) submit a coroutine
here and wait for it, so a sync program never needs its own event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Portal:
    """A daemon thread running an event loop until `stop()`."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="mainspring-portal", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the portal loop and return its result (re-raising its error)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a sync Mainspring call cannot run on the portal thread itself")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()

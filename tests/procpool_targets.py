"""Handlers run by `tests/test_procpool.py` inside ProcessPool worker processes.

Kept in its own module (not the test module) so spawned children can import it cheaply.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any


def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


def pid() -> int:
    return os.getpid()


def boom(message: str) -> None:
    raise ValueError(message)


def exit_hard(code: int) -> None:
    os._exit(code)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_for(seconds: float) -> tuple[int, float, float]:
    start = time.monotonic()
    time.sleep(seconds)
    return os.getpid(), start, time.monotonic()


async def async_add(a: int, b: int) -> tuple[int, bool]:
    await asyncio.sleep(0.01)
    return a + b, asyncio.get_running_loop().is_running()


def unpicklable() -> Any:
    return threading.Lock()


def sigint_status() -> str:
    return repr(signal.getsignal(signal.SIGINT))


class Task:
    """Mimics the app's Task wrapper: calling it directly must never happen in a worker."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.__wrapped__ = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the pool must call __wrapped__, not the Task object")


@Task
def wrapped_double(x: int) -> int:
    return 2 * x


class Namespace:
    @staticmethod
    def triple(x: int) -> int:
        return 3 * x

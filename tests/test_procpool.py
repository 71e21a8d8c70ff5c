"""Specification of `mainspring.engine.procpool.ProcessPool` with real worker processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from mainspring.engine.procpool import PoolClosed, ProcessPool, RemoteError
from mainspring.errors import ConfigError, HandlerCrashed, MainspringError, TaskTimeout

# Spawned children must be able to import `procpool_targets` (and `mainspring`).
TESTS_DIR = str(Path(__file__).resolve().parent)
SRC_DIR = str(Path(__file__).resolve().parents[1] / "src")
for _path in (SRC_DIR, TESTS_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [TESTS_DIR, SRC_DIR, *filter(None, [os.environ.get("PYTHONPATH")])]
)

T = "procpool_targets:"
R = TypeVar("R")


def run(main: Callable[[], Awaitable[R]]) -> R:
    async def wrapper() -> R:
        return await main()

    return asyncio.run(wrapper())


def alive(pid: int) -> bool:
    """True while `pid` is a running (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_gone(pid: int, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} is still alive"
        await asyncio.sleep(0.02)


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mainspring-procpool")]


def test_returns_results_of_sync_async_and_wrapped_targets() -> None:
    async def main() -> None:
        async with ProcessPool(1) as pool:
            assert await pool.run(T + "add", (2, 3), {"scale": 10}, None) == 50
            assert await pool.run(T + "wrapped_double", (4,), {}, None) == 8
            assert await pool.run(T + "Namespace.triple", (4,), {}, 5.0) == 12
            assert await pool.run(T + "async_add", (1, 2), {}, None) == (3, True)
            ignored = await pool.run(T + "sigint_status", (), {}, None)
            assert ignored == repr(signal.SIG_IGN)

    run(main)


def test_handler_exception_becomes_remote_error_and_worker_survives() -> None:
    async def main() -> None:
        async with ProcessPool(1) as pool:
            worker = await pool.run(T + "pid", (), {}, None)
            with pytest.raises(RemoteError) as info:
                await pool.run(T + "boom", ("kaput",), {}, None)
            error = info.value
            assert isinstance(error, MainspringError)
            assert (error.type_name, error.message) == ("ValueError", "kaput")
            assert str(error) == "ValueError: kaput"
            assert "in boom" in error.traceback
            assert "raise ValueError(message)" in error.traceback
            copy = pickle.loads(pickle.dumps(error))
            assert (copy.type_name, copy.message, copy.traceback) == (
                error.type_name,
                error.message,
                error.traceback,
            )

            with pytest.raises(RemoteError, match="could not be pickled"):
                await pool.run(T + "unpicklable", (), {}, None)
            with pytest.raises(RemoteError, match=r"^ModuleNotFoundError"):
                await pool.run("no_such_module_for_procpool:f", (), {}, None)
            with pytest.raises(RemoteError, match=r"^AttributeError"):
                await pool.run(T + "missing", (), {}, None)
            with pytest.raises(ConfigError):
                await pool.run("no colon here", (), {}, None)
            with pytest.raises((TypeError, pickle.PicklingError)):
                await pool.run(T + "add", (threading.Lock(), 1), {}, None)

            assert await pool.run(T + "pid", (), {}, None) == worker
            assert pool.pids == [worker]

    run(main)


def test_crash_fails_the_call_and_the_worker_is_replaced() -> None:
    async def main() -> None:
        async with ProcessPool(2) as pool:
            original = pool.pids
            with pytest.raises(HandlerCrashed, match="exit code 3"):
                await pool.run(T + "exit_hard", (3,), {}, None)
            with pytest.raises(HandlerCrashed, match="SIGKILL"):
                await pool.run(T + "kill_self", (), {}, None)
            for pid in original:
                await wait_gone(pid)

            # Capacity is back to 2: two calls run at the same time in two new processes.
            results = await asyncio.gather(
                *(pool.run(T + "sleep_for", (0.5,), {}, None) for _ in range(2))
            )
            pids = {pid for pid, _, _ in results}
            assert len(pids) == 2
            assert not pids & set(original)
            assert max_overlap([(s, e) for _, s, e in results]) == 2
            assert sorted(pids) == pool.pids

    run(main)


def test_worker_dying_while_idle_is_replaced_without_failing_a_call() -> None:
    async def main() -> None:
        async with ProcessPool(1) as pool:
            [victim] = pool.pids
            os.kill(victim, signal.SIGKILL)
            await wait_gone(victim)
            # A killed process shows as a zombie while its other threads still exit,
            # before waitpid can report it; give the kernel that moment.
            await asyncio.sleep(0.2)
            pid = await pool.run(T + "pid", (), {}, None)
            assert pid != victim
            assert pool.pids == [pid]

    run(main)


def test_timeout_kills_and_replaces_the_worker() -> None:
    async def main() -> None:
        async with ProcessPool(1) as pool:
            victim = await pool.run(T + "pid", (), {}, None)
            started = time.monotonic()
            with pytest.raises(TaskTimeout, match=r"timeout of 0\.3s") as info:
                await pool.run(T + "sleep_for", (30,), {}, 0.3)
            assert isinstance(info.value, TimeoutError)
            assert time.monotonic() - started < 3
            await wait_gone(victim)
            assert await pool.run(T + "pid", (), {}, None) != victim

    run(main)


def test_cancelling_a_running_call_kills_its_worker() -> None:
    async def main() -> None:
        async with ProcessPool(1) as pool:
            victim = await pool.run(T + "pid", (), {}, None)
            call = asyncio.create_task(pool.run(T + "sleep_for", (30,), {}, None))
            await asyncio.sleep(0.2)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await wait_gone(victim)
            assert await pool.run(T + "pid", (), {}, None) != victim

    run(main)


def test_cancelling_a_queued_call_leaves_workers_alone() -> None:
    async def main() -> None:
        async with ProcessPool(1) as pool:
            [worker] = pool.pids
            busy = asyncio.create_task(pool.run(T + "sleep_for", (0.3,), {}, None))
            queued = asyncio.create_task(pool.run(T + "pid", (), {}, None))
            await asyncio.sleep(0.1)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert (await busy)[0] == worker
            assert await pool.run(T + "pid", (), {}, None) == worker

    run(main)


def test_never_more_calls_in_flight_than_size_and_callers_served_in_order() -> None:
    async def main() -> None:
        async with ProcessPool(2) as pool:
            started = time.monotonic()
            calls = []
            for _ in range(4):
                calls.append(asyncio.create_task(pool.run(T + "sleep_for", (0.4,), {}, None)))
                await asyncio.sleep(0)  # submit in a known order
            results = await asyncio.gather(*calls)
            elapsed = time.monotonic() - started
            assert 0.8 <= elapsed < 1.6
            assert max_overlap([(s, e) for _, s, e in results]) == 2
            starts = [s for _, s, _ in results]
            assert max(starts[:2]) < min(starts[2:])  # first come, first served

    run(main)


def test_close_stops_every_process_and_thread() -> None:
    async def main() -> None:
        pool = ProcessPool(3)
        await pool.start()
        pids = pool.pids
        assert len(pids) == 3
        assert all(alive(pid) for pid in pids)
        assert await pool.run(T + "add", (1, 1), {}, None) == 2
        await pool.close()
        assert not [p for p in multiprocessing.active_children() if p.pid in pids]
        assert not [pid for pid in pids if alive(pid)]
        assert pool_threads() == []
        assert pool.pids == []
        with pytest.raises(PoolClosed):
            await pool.run(T + "add", (1, 1), {}, None)
        await pool.close()  # idempotent

    run(main)


def test_close_kills_running_calls_after_grace_and_fails_waiters() -> None:
    async def main() -> None:
        pool = ProcessPool(1)
        await pool.start()
        [worker] = pool.pids
        running = asyncio.create_task(pool.run(T + "sleep_for", (30,), {}, None))
        waiting = asyncio.create_task(pool.run(T + "pid", (), {}, None))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await pool.close(grace=0.2)
        assert time.monotonic() - started < 3
        with pytest.raises(HandlerCrashed, match="closing"):
            await running
        with pytest.raises(PoolClosed):
            await waiting
        assert not alive(worker)
        assert pool_threads() == []

    run(main)


def test_close_lets_a_short_running_call_finish() -> None:
    async def main() -> None:
        pool = ProcessPool(1)
        await pool.start()
        running = asyncio.create_task(pool.run(T + "sleep_for", (0.3,), {}, None))
        await asyncio.sleep(0.1)
        await pool.close(grace=5)
        assert (await running)[2] > 0
        assert multiprocessing.active_children() == []

    run(main)


def test_children_exit_when_the_parent_dies() -> None:
    script = (
        "import asyncio, os\n"
        "from mainspring.engine.procpool import ProcessPool\n"
        "async def main():\n"
        "    pool = ProcessPool(2)\n"
        "    await pool.start()\n"
        "    print(*pool.pids, flush=True)\n"
        "    os._exit(0)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2

    async def main() -> None:
        for pid in pids:
            await wait_gone(pid)

    run(main)


def test_invalid_configuration() -> None:
    with pytest.raises(ConfigError):
        ProcessPool(0)
    with pytest.raises(ConfigError):
        ProcessPool(1, start_method="teleport")

    async def main() -> None:
        pool = ProcessPool(1)
        with pytest.raises(PoolClosed):
            await pool.run(T + "pid", (), {}, None)
        await pool.close()
        with pytest.raises(PoolClosed):
            await pool.start()

    run(main)

"""A pool of pre-started worker processes for CPU-bound task handlers.

`ProcessPool` runs handlers of tasks declared with ``executor="process"``. Unlike
`concurrent.futures.ProcessPoolExecutor`, one dying worker never breaks the pool:

* Each worker process runs one call at a time; at most `size` calls are in flight, and callers
  waiting for a free worker are served first come, first served.
* A handler that raises becomes `RemoteError` (type name, message and the child's traceback);
  the worker survives and serves the next call.
* A worker that dies mid-call (``os._exit``, segfault, SIGKILL, out-of-memory killer) makes that
  call raise `HandlerCrashed` with the exit code; the worker is replaced at once, so capacity
  stays at `size`. A worker that dies while idle is replaced too, without failing any call.
* A call that outlives its timeout raises `TaskTimeout`; a call whose caller is cancelled
  re-raises `CancelledError`. In both cases the worker running it is killed (it never keeps
  running an abandoned call) and replaced.
* Arguments and results cross the process boundary by pickle. A result that cannot be pickled
  becomes `RemoteError`; arguments that cannot be pickled raise the pickling error in the caller
  before any worker is used.
* Workers ignore SIGINT (the parent owns shutdown) and exit by themselves when the parent dies.
* `close` asks every worker to exit, kills those still running after a grace period, reaps them
  and joins the pool's threads: nothing is left behind.

Workers are started as daemonic `multiprocessing` processes, so handlers cannot themselves start
`multiprocessing` children.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from types import TracebackType
from typing import Any, Final, Literal, Self

from mainspring.errors import ConfigError, HandlerCrashed, MainspringError, TaskTimeout

__all__ = ["PoolClosed", "ProcessPool", "RemoteError"]

_log = logging.getLogger(__name__)

# Messages between parent and child. Requests are pickled ``(target, args, kwargs)`` tuples, or
# `_STOP`. Replies are pickled tuples whose first item is one of the tags below.
_STOP: Final = b""
_READY: Final = "ready"  # ("ready", pid): the child is ready for requests
_OK: Final = "ok"  # ("ok", result)
_ERR: Final = "err"  # ("err", type_name, message, traceback)
_EXIT: Final = "exit"  # ("exit", exitcode): posted by the parent's reader thread, never sent

_PARENT_POLL_SECONDS: Final = 1.0  # how often a child double-checks that its parent is alive
_ORPHAN_EXIT_CODE: Final = 70  # exit status of a child whose parent died
_KILL_WAIT_SECONDS: Final = 10.0  # how long to wait for a SIGKILLed process to be reaped

_Message = tuple[Any, ...]


class RemoteError(MainspringError):
    """The handler raised an exception in the worker process.

    `type_name` is the exception's class name, `message` its ``str()`` and `traceback` the
    traceback formatted in the child. ``str(error)`` is ``"{type_name}: {message}"``.
    """

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.message, self.traceback))


class PoolClosed(MainspringError, RuntimeError):
    """The pool is not running: it was never started, or it has been closed."""


def _split_target(target: str) -> tuple[str, str]:
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name or not qualname:
        raise ConfigError(
            f"process task target {target!r} must look like 'package.module:function'"
        )
    return module_name, qualname


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"exit code {exitcode}, killed by {name}"
    return f"exit code {exitcode}"


# --------------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------------


def _child_main(conn: Connection) -> None:
    """Entry point of a worker process: serve requests until told to stop or the parent goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _start_parent_watchdog()
    cache: dict[str, Callable[..., Any]] = {}
    try:
        conn.send_bytes(pickle.dumps((_READY, os.getpid())))
        while True:
            try:
                request = conn.recv_bytes()
            except EOFError:
                return  # the parent closed its end (or died)
            if request == _STOP:
                return
            conn.send_bytes(_execute(request, cache))
    except OSError:
        return  # the pipe broke: the parent is gone
    finally:
        conn.close()


def _start_parent_watchdog() -> None:
    """Exit this process as soon as the parent dies, even in the middle of a handler."""
    parent = multiprocessing.parent_process()
    sentinel = parent.sentinel if parent is not None else None
    parent_pid = os.getppid()

    def watch() -> None:
        nonlocal sentinel
        while True:
            parent_gone = False
            if sentinel is not None:
                try:
                    parent_gone = bool(mp_connection.wait([sentinel], _PARENT_POLL_SECONDS))
                except OSError:
                    sentinel = None
            else:
                time.sleep(_PARENT_POLL_SECONDS)
            if parent_gone or os.getppid() != parent_pid:
                os._exit(_ORPHAN_EXIT_CODE)

    threading.Thread(target=watch, name="mainspring-procpool-watchdog", daemon=True).start()


def _resolve_target(target: str, cache: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    func = cache.get(target)
    if func is not None:
        return func
    module_name, qualname = _split_target(target)
    obj: Any = importlib.import_module(module_name)
    for attr in qualname.split("."):
        obj = getattr(obj, attr)
    # Task objects set `__wrapped__` to the user's function; unwrap exactly one level.
    obj = getattr(obj, "__wrapped__", obj)
    if not callable(obj):
        raise TypeError(f"process task target {target!r} resolved to {obj!r}, not a callable")
    resolved: Callable[..., Any] = obj
    cache[target] = resolved
    return resolved


def _execute(request: bytes, cache: dict[str, Callable[..., Any]]) -> bytes:
    """Run one request and return the pickled reply; never raises."""
    target = "<unknown>"
    try:
        target, args, kwargs = pickle.loads(request)
        func = _resolve_target(target, cache)
        result = func(*args, **kwargs)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
    except BaseException as exc:
        return _error_reply(exc)
    try:
        return pickle.dumps((_OK, result), protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:
        return _error_reply(exc, f"the result of {target} could not be pickled: ")


def _error_reply(exc: BaseException, prefix: str = "") -> bytes:
    type_name = type(exc).__qualname__
    try:
        message = str(exc)
    except BaseException:
        message = f"<unprintable {type_name}>"
    try:
        formatted = "".join(traceback.format_exception(exc))
    except BaseException:
        formatted = f"{type_name}: {message}\n"
    return pickle.dumps((_ERR, type_name, prefix + message, formatted))


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def _decode_reply(data: bytes) -> _Message:
    try:
        message = pickle.loads(data)
    except BaseException as exc:
        return (
            _ERR,
            type(exc).__qualname__,
            f"the reply of the worker process could not be unpickled: {exc}",
            "".join(traceback.format_exception(exc)),
        )
    if not isinstance(message, tuple) or not message:
        return (_ERR, "ProtocolError", f"unexpected message from worker: {message!r}", "")
    return message


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


_WorkerState = Literal["idle", "busy", "retired"]


class _Worker:
    """One worker process, its pipe, and the parent thread that reads the pipe.

    The reader thread is the only reader of the pipe; it posts every message to the event loop
    and, when the pipe reaches EOF, reaps the process and posts ``("exit", exitcode)`` as its
    last act. Everything else (sending, closing the pipe, state) happens on the event loop.
    """

    def __init__(
        self,
        ctx: BaseContext,
        loop: asyncio.AbstractEventLoop,
        name: str,
        grace: float,
        on_exit: Callable[[_Worker], None],
    ) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        process = ctx.Process(  # type: ignore[attr-defined]
            target=_child_main, args=(child_conn,), name=name, daemon=True
        )
        try:
            process.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        self.process: multiprocessing.process.BaseProcess = process
        self.pid: int = process.pid
        self.conn = parent_conn
        self.state: _WorkerState = "idle"
        self.dead = False
        self.exitcode: int | None = None
        self.successor: _Worker | None = None  # started when this worker died while idle
        self.ready: asyncio.Future[bool] = loop.create_future()
        self.exited: asyncio.Future[int | None] = loop.create_future()
        self._reply: asyncio.Future[_Message] | None = None
        self._loop = loop
        self._grace = grace
        self._on_exit = on_exit
        self._thread = threading.Thread(target=self._read_loop, name=f"{name}-reader", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            process.kill()
            process.join(_KILL_WAIT_SECONDS)
            parent_conn.close()
            raise

    # -- reader thread ---------------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while True:
                try:
                    data = self.conn.recv_bytes()
                except (EOFError, OSError):
                    break
                if not self._post(_decode_reply(data)):
                    self.process.kill()  # the event loop is gone: nobody will use this worker
        finally:
            self._post((_EXIT, self._reap()))

    def _reap(self) -> int | None:
        # EOF means the child closed its end, which it only does when exiting.
        self.process.join(self._grace)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(_KILL_WAIT_SECONDS)
        return self.process.exitcode

    def _post(self, message: _Message) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._on_message, message)
        except RuntimeError:  # the event loop is closed
            return False
        return True

    # -- event loop --------------------------------------------------------------------------

    def _on_message(self, message: _Message) -> None:
        tag = message[0]
        if tag == _READY:
            _settle(self.ready, True)
        elif tag == _EXIT:
            self.dead = True
            self.exitcode = message[1]
            self.conn.close()  # safe: the reader thread has stopped reading
            _settle(self.ready, False)
            if self._reply is not None:
                _settle(self._reply, message)
            _settle(self.exited, self.exitcode)
            self._on_exit(self)
        elif self._reply is not None:
            _settle(self._reply, message)

    def submit(self, payload: bytes) -> asyncio.Future[_Message]:
        """Send one request; the future resolves to its reply or to ``("exit", code)``."""
        reply: asyncio.Future[_Message] = self._loop.create_future()
        self._reply = reply
        if self.dead:
            reply.set_result((_EXIT, self.exitcode))
            return reply
        # A ready, idle child is blocked reading, so this only blocks for the copy.
        with contextlib.suppress(OSError):  # the child is gone; the reader thread reports it
            self.conn.send_bytes(payload)
        return reply

    def request_stop(self) -> None:
        """Ask the child to exit once it has finished its current call, if any."""
        if not self.dead:
            with contextlib.suppress(OSError):
                self.conn.send_bytes(_STOP)

    def kill(self) -> None:
        if not self.dead:
            with contextlib.suppress(OSError, ValueError):
                self.process.kill()

    def has_exited(self) -> bool:
        """True if the process has exited, even if the reader thread has not reported it yet."""
        if self.dead or mp_connection.wait([self.process.sentinel], 0):
            return True
        # The sentinel can lag a SIGKILL; waitpid (through is_alive) does not.
        return not self.process.is_alive()

    def join_thread(self, timeout: float) -> None:
        self._thread.join(timeout)

    def thread_alive(self) -> bool:
        return self._thread.is_alive()


_PoolState = Literal["new", "starting", "running", "closed"]


class ProcessPool:
    """A fixed-size pool of pre-started worker processes; see the module docstring.

    Use from a single event loop: ``await pool.start()``, any number of concurrent
    ``await pool.run(...)``, then ``await pool.close()`` (or ``async with pool:``).
    """

    def __init__(
        self, size: int, *, start_method: str = "spawn", shutdown_grace: float = 2.0
    ) -> None:
        if size < 1:
            raise ConfigError(f"process pool size must be at least 1, got {size}")
        if shutdown_grace < 0:
            raise ConfigError(f"shutdown_grace must not be negative, got {shutdown_grace}")
        try:
            self._ctx: BaseContext = multiprocessing.get_context(start_method)
        except ValueError as exc:
            raise ConfigError(f"unknown process start method {start_method!r}") from exc
        self.size = size
        self._grace = shutdown_grace
        self._state: _PoolState = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        # One item per unit of capacity: a worker, or None for a slot that needs a new process.
        self._slots: asyncio.Queue[_Worker | None] = asyncio.Queue()
        self._workers: set[_Worker] = set()  # started and not yet reaped
        self._graveyard: list[_Worker] = []  # reaped, reader thread possibly still finishing
        self._spawned = 0
        self._close_done: asyncio.Event | None = None

    @property
    def pids(self) -> list[int]:
        """Process ids of the worker processes currently alive (as far as the pool knows)."""
        return sorted(w.pid for w in self._workers if not w.dead)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start `size` worker processes and return once every one of them is ready.

        If a worker dies before it is ready, every worker is stopped and `HandlerCrashed` is
        raised; if `start` is cancelled, every worker is stopped too.
        """
        if self._state != "new":
            raise PoolClosed(f"process pool cannot be started twice (it is {self._state})")
        self._loop = asyncio.get_running_loop()
        self._state = "starting"
        try:
            workers = [self._spawn() for _ in range(self.size)]
            await asyncio.wait([w.ready for w in workers])
            for worker in workers:
                if not worker.ready.result():
                    raise HandlerCrashed(
                        f"worker process {worker.pid} exited before it was ready "
                        f"({_describe_exit(worker.exitcode)})"
                    )
        except BaseException:
            await self.close()
            raise
        if self._state != "starting":  # closed concurrently
            raise PoolClosed("process pool was closed while starting")
        self._state = "running"
        for worker in workers:
            self._slots.put_nowait(worker)

    async def run(
        self,
        target: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        """Call ``target(*args, **kwargs)`` in a worker process and return its result.

        `target` is ``"module:qualname"``; an object with ``__wrapped__`` is unwrapped once and a
        coroutine function is run with `asyncio.run` in the child. Waits for a free worker
        (first come, first served); `timeout` counts from when the call is handed to a worker.

        Raises `RemoteError` if the handler raised or its result cannot be pickled,
        `HandlerCrashed` if the worker died (or could not be started), `TaskTimeout` if
        `timeout` elapsed, and `PoolClosed` if the pool is not running. After
        `HandlerCrashed`, `TaskTimeout` or cancellation the worker is killed and replaced.
        """
        _split_target(target)
        payload = pickle.dumps((target, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        worker = await self._acquire()
        healthy = False
        try:
            pending = worker.submit(payload)
            try:
                async with asyncio.timeout(timeout):
                    reply = await pending
            except TimeoutError:
                raise TaskTimeout(
                    f"{target} ran longer than its timeout of {timeout}s; "
                    f"worker process {worker.pid} was killed"
                ) from None
            tag = reply[0]
            if tag == _EXIT:
                closing = " while the pool was closing" if self._state == "closed" else ""
                raise HandlerCrashed(
                    f"worker process {worker.pid} died while running {target}{closing} "
                    f"({_describe_exit(reply[1])})"
                )
            healthy = True
            if tag == _OK:
                return reply[1]
            raise RemoteError(str(reply[1]), str(reply[2]), str(reply[3]))
        finally:
            self._release(worker, healthy)

    async def close(self, grace: float | None = None) -> None:
        """Stop every worker process and reap it; idempotent.

        Workers are asked to exit once their current call (if any) is done; those still alive
        after `grace` seconds (default: the pool's ``shutdown_grace``) are killed. Calls still
        waiting for a worker raise `PoolClosed`; calls whose worker is killed raise
        `HandlerCrashed`. On return no worker process or pool thread is left.
        """
        if self._close_done is not None:
            await self._close_done.wait()
            return
        self._close_done = done = asyncio.Event()
        self._state = "closed"
        try:
            self._slots.put_nowait(None)  # wakes waiters, which see the pool is closed
            workers = list(self._workers)
            for worker in workers:
                worker.request_stop()
            await self._wait_exited(workers, self._grace if grace is None else grace)
            for worker in workers:
                worker.kill()
            await self._wait_exited(workers, _KILL_WAIT_SECONDS)
        finally:
            for worker in list(self._workers):
                worker.kill()
            for worker in [*self._workers, *self._graveyard]:
                if worker.exited.done():
                    worker.join_thread(_KILL_WAIT_SECONDS)
            if self._workers:
                _log.warning(
                    "process pool closed but worker processes %s could not be reaped",
                    sorted(w.pid for w in self._workers),
                )
            self._graveyard.clear()
            done.set()

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    async def _wait_exited(workers: list[_Worker], limit: float) -> None:
        pending = [w.exited for w in workers if not w.exited.done()]
        if pending:
            await asyncio.wait(pending, timeout=limit)

    def _spawn(self) -> _Worker:
        assert self._loop is not None
        self._spawned += 1
        worker = _Worker(
            self._ctx,
            self._loop,
            f"mainspring-procpool-{self._spawned}",
            self._grace,
            self._worker_exited,
        )
        self._workers.add(worker)
        return worker

    def _try_spawn(self) -> _Worker | None:
        try:
            return self._spawn()
        except Exception:
            _log.warning(
                "could not start a replacement worker process; will retry on next use",
                exc_info=True,
            )
            return None

    def _worker_exited(self, worker: _Worker) -> None:
        self._workers.discard(worker)
        self._graveyard = [w for w in self._graveyard if w.thread_alive()]
        self._graveyard.append(worker)
        if self._state == "running" and worker.state == "idle" and worker.successor is None:
            _log.warning(
                "idle worker process %d died (%s); starting a replacement",
                worker.pid,
                _describe_exit(worker.exitcode),
            )
            worker.successor = self._try_spawn()

    async def _acquire(self) -> _Worker:
        if self._state != "running":
            raise PoolClosed(f"process pool is not running (it is {self._state})")
        worker = await self._slots.get()
        try:
            if self._state != "running":
                raise PoolClosed("process pool was closed")
            while worker is not None and (worker.dead or worker.has_exited()):
                # It died while idle: wait until the loop has handled its exit (which
                # starts its successor) rather than failing a call on a dead process.
                if not worker.exited.done():
                    await asyncio.wait([worker.exited])
                if self._state != "running":
                    raise PoolClosed("process pool was closed")
                worker = worker.successor
            if worker is None:
                try:
                    worker = self._spawn()
                except Exception as exc:
                    raise HandlerCrashed(f"could not start a worker process: {exc}") from exc
            worker.state = "busy"
            if not worker.ready.done():
                await asyncio.wait([worker.ready])
            if self._state != "running":
                raise PoolClosed("process pool was closed")
            if not worker.ready.result():
                failed, worker = worker, None
                raise HandlerCrashed(
                    f"worker process {failed.pid} exited before it was ready "
                    f"({_describe_exit(failed.exitcode)})"
                )
        except BaseException:
            if worker is not None:
                worker.state = "idle"
            self._slots.put_nowait(worker)
            raise
        return worker

    def _release(self, worker: _Worker, healthy: bool) -> None:
        if healthy:
            worker.state = "idle"
            if self._state == "running":
                self._slots.put_nowait(worker)
            return
        worker.state = "retired"
        worker.kill()
        if self._state == "running":
            self._slots.put_nowait(self._try_spawn())

"""A worker node: claims runs, executes handlers, commits outcomes, and keeps the cluster healthy.

One Worker is one node (a `ms_nodes` row). Its loops are owned by `run()`:
claim and commit are the hot path; leases, timers, the reaper, heartbeat, gc,
periodic ticks and the listener are small supervised loops beside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import signal
import socket
import time
import traceback
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from mainspring import payload
from mainspring.context import RunContext, _current
from mainspring.engine.loops import supervise, wait_event
from mainspring.engine.threads import DaemonThreadPool
from mainspring.errors import EncodeError, HeartbeatTimeout, TaskTimeout
from mainspring.ids import uuid7_for
from mainspring.run import (
    AVAILABLE,
    CANCELLED,
    COMPLETED,
    FAILED,
    SCHEDULED,
    WAITING,
    Claimed,
    NewRun,
    Outcome,
)
from mainspring.store.base import QueueDemand, Store

if TYPE_CHECKING:
    from mainspring.app import App, Task
    from mainspring.engine.procpool import ProcessPool
    from mainspring.machines.runner import MachineRunner
    from mainspring.workflows.runner import WorkflowRunner

log = logging.getLogger("mainspring.worker")

_MAX_BATCH = 1000
_SILENCE_CHECK = 1.0  # seconds between two checks for attempts past their heartbeat timeout
_ROUTED_HEAD_START = 0.05  # seconds a routed wake-up leaves the run to its owner node


@dataclass(slots=True)
class InFlight:
    """A run this node holds: executing until its outcome is queued, then committing."""

    run: Claimed
    task: asyncio.Task[None] | None = None
    executing: bool = True
    lost: bool = False
    release: bool = False
    started: float = 0.0


def default_node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def error_info(exc: BaseException, attempt: int) -> dict[str, Any]:
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    tb = getattr(exc, "traceback", None) or "".join(
        traceback.format_exception(kind, exc, exc.__traceback__)
    )
    return {"type": name, "message": str(exc), "traceback": tb, "attempt": attempt}


class Worker:
    """One node: runs handlers for its queues until stopped (or idle, with burst)."""

    def __init__(
        self,
        app: App,
        *,
        queues: Iterable[str] | None = None,
        concurrency: int = 50,
        burst: bool = False,
        batch_size: int = 200,
        install_signal_handlers: bool = True,
        poll_interval: float = 0.05,
        name: str | None = None,
        claimers: int | None = None,
        committers: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.app = app
        self.name = name or app.node_name or default_node_name()
        served = (
            list(queues)
            if queues
            else sorted(
                {t.queue for t in app.tasks.values()}
                | {m.queue for m in app.machines.values()}
                | {w.queue for w in app.workflows.values()}
                | set(app.queues)
            )
        )
        self.queues: list[str] = served or ["default"]
        self.concurrency = concurrency
        self.burst = burst
        self.batch_size = batch_size
        self.claimers = claimers
        self.committers = committers
        self.install_signal_handlers = install_signal_handlers
        self.poll_interval = poll_interval
        self.lease_ttl = app.lease_ttl
        self.telemetry = app.telemetry
        self.status = "up"
        self._store: Store | None = None
        # Keyed by (run id, fence): a machine's next step can be claimed here
        # while the commit of its previous step is still being acknowledged.
        self._inflight: dict[tuple[str, int], InFlight] = {}
        self._running: Counter[str] = Counter()
        self._reserved: Counter[str] = Counter()
        self._outcomes: list[Outcome] = []
        self._outcome_ready = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._work = asyncio.Event()
        self._timer_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()
        self._closing = False
        self.started = asyncio.Event()
        self._push = False
        self._threads: DaemonThreadPool | None = None
        self._procpool: ProcessPool | None = None
        self._rotate = 0
        self._notifications: set[asyncio.Future[None]] = set()
        self._known_elsewhere: tuple[float, set[str]] = (0.0, set())
        self._later: asyncio.TimerHandle | None = None
        self._limited = {q for q, c in app.queues.items() if c.global_limit}  # cluster-wide caps
        self._machines: MachineRunner | None = None
        self._workflows: WorkflowRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.claimed_total = 0
        self.completed_total = 0

    @property
    def store(self) -> Store:
        assert self._store is not None, "worker not started"
        return self._store

    # -- lifecycle -------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once the node was asked to stop (it drains, then returns)."""
        return self._stopping.is_set()

    def stop_threadsafe(self) -> None:
        """`stop()` from any thread (a deploy hook, the sync client)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.stop()
        else:
            loop.call_soon_threadsafe(self.stop)

    def stop(self) -> None:
        """Begin a graceful drain: stop claiming, let in-flight runs finish, release the rest.

        A second call releases in-flight runs at once.
        """
        if self._stopping.is_set():
            self._forced.set()
        self._stopping.set()
        self._work.set()
        self._slot_freed.set()

    async def run(self) -> None:
        """Run the node until stopped; every loop it starts is finished before it returns."""
        self._loop = asyncio.get_running_loop()
        await self._start()
        try:
            async with asyncio.TaskGroup() as tg:
                background = [
                    tg.create_task(self._supervised(name, fn))
                    for name, fn in (
                        ("heartbeat", self._heartbeat_loop),
                        ("leases", self._lease_loop),
                        ("timers", self._timer_loop),
                        ("reaper", self._reaper_loop),
                        ("gc", self._gc_loop),
                        ("periodic", self._periodic_loop),
                        ("listener", self._listener_loop),
                        *self._model_loops(),
                    )
                ]
                # On Postgres two claims and two commits may be in flight at once, so
                # the database always has the next batch while the worker handles one.
                parallel = 2 if self.store.backend == "postgres" else 1
                committers = [
                    tg.create_task(self._commit_loop()) for _ in range(self.committers or parallel)
                ]
                claimers = self.claimers or parallel
                await asyncio.gather(
                    *(self._supervised(f"claim-{i}", self._claim_loop) for i in range(claimers))
                )
                await self._drain()
                self._closing = True
                self._outcome_ready.set()
                await asyncio.gather(*committers)
                await asyncio.gather(*self._notifications, return_exceptions=True)
                for task in background:
                    task.cancel()
        finally:
            await self._shutdown()

    async def _start(self) -> None:
        self._store = await self.app.open_store()
        limits = {q: c.global_limit for q, c in self.app.queues.items() if c.global_limit}
        if limits:
            await self.store.set_queue_limits(limits)
        if self.app.rate_limits.configs:
            await self.store.set_rate_limits(list(self.app.rate_limits.configs.values()))
        self._threads = DaemonThreadPool(self.concurrency)
        if any(t.executor == "process" for t in self.app.tasks.values()):
            from mainspring.engine.procpool import ProcessPool

            self._procpool = ProcessPool(self.app.process_pool_size)
            await self._procpool.start()
        await self._heartbeat()
        if self.install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self.stop)
        log.info("node %s up: queues %s, concurrency %d", self.name, self.queues, self.concurrency)
        self.telemetry.emit("node.up", node=self.name, queues=self.queues)
        self.started.set()

    async def _shutdown(self) -> None:
        if self.install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
        if self._procpool is not None:
            await self._procpool.close()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        if self._store is not None:
            try:
                await asyncio.wait_for(self.store.remove_node(self.name), timeout=5)
            except Exception as exc:  # the database may be gone; the row ages out
                log.warning("could not remove node row %s: %s", self.name, exc)
            self.telemetry.emit("node.down", node=self.name, reason="shutdown")
            await self.store.close()
            self._store = None
        log.info("node %s down", self.name)

    def _model_loops(self) -> list[tuple[str, Any]]:
        """Loops a model adds to the node: the cluster loop, once the app uses the cluster."""
        cluster = self.app._cluster
        return [("cluster", functools.partial(cluster.serve, self))] if cluster else []

    async def _supervised(self, name: str, fn: Any) -> None:
        await supervise(name, fn, self.telemetry, self._degraded)

    def _degraded(self, loop_name: str, exc: BaseException) -> None:
        self.status = "degraded"

    # -- claim -------------------------------------------------------------------------

    def _demand(self) -> list[QueueDemand]:
        # A slot is held from the claim until the outcome is committed, so claiming
        # never runs ahead of committing (no backlog of uncommitted leases); slots
        # asked for by a claim still in flight are reserved.
        free = self.concurrency - len(self._inflight) - self._reserved.total()
        if free <= 0:
            return []
        free = min(free, self.batch_size)
        queues = self.queues[self._rotate :] + self.queues[: self._rotate]
        self._rotate = (self._rotate + 1) % len(self.queues)
        share = max(1, -(-free // len(queues)))
        demand = []
        for queue in queues:
            if free <= 0:
                break
            config = self.app.queues.get(queue)
            room = (
                free
                if config is None or config.concurrency is None
                else min(free, config.concurrency - self._running[queue] - self._reserved[queue])
            )
            n = min(room, share if len(queues) > 1 else free)
            if n > 0:
                demand.append(QueueDemand(queue, n))
                free -= n
        return demand

    async def _claim_loop(self) -> None:
        idle = self.poll_interval
        while not self._stopping.is_set():
            demand = self._demand()
            if not demand:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                # Let a few more handlers finish so claims stay batched at saturation.
                if self.concurrency - len(self._inflight) < max(1, self.concurrency // 4):
                    await asyncio.sleep(0.002)
                continue
            self._work.clear()
            for d in demand:
                self._reserved[d.queue] += d.limit
            try:
                claimed = await self.store.claim_runs(self.name, demand, self.lease_ttl)
            finally:
                for d in demand:
                    self._reserved[d.queue] -= d.limit
                self._slot_freed.set()  # unclaimed reservations are free again
            for run in claimed:
                self._start_run(run)
            throttled = self.store.take_throttled()
            for throttle in throttled:
                self.telemetry.emit(
                    "rate_limit.throttled", key=throttle.key, granted=throttle.granted,
                    wanted=throttle.wanted, node=self.name,
                )  # fmt: skip
            got = Counter(c.queue for c in claimed)
            if any(got[d.queue] >= d.limit for d in demand):
                idle = self.poll_interval
                continue  # a queue gave all we asked for: there may be more
            if self.burst and await self._burst_done():
                self._stopping.set()  # every claim loop ends, and the node drains
                self._slot_freed.set()
                self._work.set()
                return
            if throttled:
                # Runs wait on a bucket that refills with time, not with a wake-up.
                await wait_event(self._work, self.poll_interval)
                continue
            idle = await self._wait_for_work(idle if not claimed else self.poll_interval / 10)

    async def _wait_for_work(self, idle: float) -> float:
        """Sleep until work may be there: a wake-up, a change seen by polling, or a timeout."""
        if self._push:
            await wait_event(self._work, 2.0)
            return idle
        # Polling backend: a cheap change check at a short adaptive interval.
        deadline = time.monotonic() + 1.0
        while not self._stopping.is_set() and time.monotonic() < deadline:
            if await wait_event(self._work, idle):
                return self.poll_interval / 10
            if await self.store.changed():
                return self.poll_interval / 10
            idle = min(idle * 1.5, self.poll_interval)
        return idle

    async def _burst_done(self) -> bool:
        if self._inflight or self._outcomes:
            return False
        horizon = datetime.now(UTC) + timedelta(seconds=1)
        return await self.store.pending_before(self.queues, horizon) == 0

    def _start_run(self, run: Claimed) -> None:
        flight = InFlight(run, started=time.monotonic())
        self._inflight[run.id, run.fence] = flight
        self._running[run.queue] += 1
        self.claimed_total += 1
        flight.task = asyncio.create_task(self._execute(flight))
        flight.task.add_done_callback(functools.partial(self._finished, flight))
        if self.telemetry.listening("run.claimed"):
            self.telemetry.emit(
                "run.claimed", id=run.id, name=run.name, queue=run.queue, attempt=run.attempt,
                node=self.name,
                queued_for=time.time() - run.created,
            )  # fmt: skip

    # -- execute -----------------------------------------------------------------------

    async def _execute(self, flight: InFlight) -> None:
        run = flight.run
        task = self.app.tasks.get(run.name) if run.kind == "job" else None
        key = run.input.get("idempotency_key") if task is not None else None
        outcome: Outcome | None
        try:
            if task is not None and key is not None:
                outcome = await self._idempotent(task, run, key)
            elif task is not None:
                result = await self._invoke(task, run)
                outcome = Outcome(run.id, run.fence, COMPLETED, output=payload.dumps(result))
            elif run.kind == "machine" and run.name in self.app.machines:
                outcome = await self._step(run)
            elif run.kind == "workflow" and run.name in self.app.workflows:
                outcome = await self._workflow_task(run)
            else:
                outcome = await self._unknown_task(run)
        except asyncio.CancelledError:
            outcome = None
            if flight.release and not flight.lost:
                outcome = Outcome(run.id, run.fence, AVAILABLE, refund_attempt=True)
        except Exception as exc:
            outcome = self._failure(run, task, exc)
        finally:
            flight.executing = False
        if outcome is None:
            self._forget(run.id, run.fence)
            return
        if key is not None:
            outcome.extra["released"] = run.queue  # the next run of the key may go
        self._queue_outcome(run, outcome)

    async def _idempotent(self, task: Task[..., Any], run: Claimed, key: str) -> Outcome:
        """A run with an idempotency key: a completed run of the key gives its output, else
        it executes. Runs of one key hold one concurrency slot, so none executes while
        another does, and each finds the output of the one that completed before it."""
        output = await self.store.completed_output(run.name, key)
        if output is None:
            output = payload.dumps(await self._invoke(task, run))
        elif self.telemetry.listening("run.reused"):
            self.telemetry.emit("run.reused", id=run.id, name=run.name, key=key, node=self.name)
        return Outcome(run.id, run.fence, COMPLETED, output=output)

    def _queue_outcome(self, run: Claimed, outcome: Outcome) -> None:
        outcome.parent_id = run.parent_id
        self._outcomes.append(outcome)
        self._outcome_ready.set()

    def _finished(self, flight: InFlight, _task: asyncio.Task[None]) -> None:
        """A handler task cancelled before its coroutine ever ran still gives its slot back."""
        if not flight.executing:
            return
        flight.executing = False
        run = flight.run
        if flight.release and not flight.lost:
            self._queue_outcome(run, Outcome(run.id, run.fence, AVAILABLE, refund_attempt=True))
        else:
            self._forget(run.id, run.fence)

    async def _step(self, run: Claimed) -> Outcome:
        if self._machines is None:
            from mainspring.machines.runner import MachineRunner

            self._machines = MachineRunner(self)
        token = _current.set(
            RunContext(run.id, run.name, run.queue, run.attempt, run.max_attempts, self.name)
        )
        try:
            return await self._machines.execute(run)
        finally:
            _current.reset(token)

    async def _heartbeat_run(self, run: Claimed, details: Any) -> bool:
        """A handler's heartbeat: keep its progress on the run and push out its lease."""
        held = await self.store.heartbeat_run(
            run.id, run.fence, payload.dumps(details), self.lease_ttl
        )
        if not held:
            self._lose(run.id, "heartbeat", run.fence)
        return held

    async def _workflow_task(self, run: Claimed) -> Outcome:
        if self._workflows is None:
            from mainspring.workflows.runner import WorkflowRunner

            self._workflows = WorkflowRunner(self)
        return await self._workflows.execute(run)

    def _run_context(self, run: Claimed) -> RunContext:
        details = payload.loads(run.state_data) if run.state_data else None
        return RunContext(
            run.id, run.name, run.queue, run.attempt, run.max_attempts, self.name, details,
            functools.partial(self._heartbeat_run, run), self._loop,
        )  # fmt: skip

    async def _invoke(self, task: Task[..., Any], run: Claimed) -> Any:
        args = run.input.get("args", ())
        kwargs = run.input.get("kwargs", {})
        timeout = run.timeout
        token = _current.set((self._run_context, run))
        try:
            if task.executor == "process":
                assert self._procpool is not None
                return await self._procpool.run(task.target, tuple(args), kwargs, timeout)
            if task.executor == "async":
                call = task.fn(*args, **kwargs)
            else:
                context = contextvars.copy_context()
                fn = functools.partial(context.run, task.fn, *args, **kwargs)
                call = asyncio.get_running_loop().run_in_executor(self._threads, fn)
            if timeout is None:
                return await call
            scope = asyncio.timeout(timeout)
            try:
                async with scope:
                    return await call
            except TimeoutError as exc:
                if scope.expired():
                    raise TaskTimeout(
                        f"task {run.name} exceeded its timeout of {timeout:g} s "
                        f"(attempt {run.attempt})"
                    ) from exc
                raise
        finally:
            _current.reset(token)

    def _failure(self, run: Claimed, task: Task[..., Any] | None, exc: BaseException) -> Outcome:
        info = error_info(exc, run.attempt)
        if isinstance(exc, EncodeError):
            info["message"] = f"the return value of task {run.name} is not JSON encodable: {exc}"
        error = payload.dumps(info)
        if run.attempt >= run.max_attempts or not getattr(exc, "retryable", True):
            return Outcome(run.id, run.fence, FAILED, error=error, extra={"exc": exc})
        backoff = task.backoff if task else None
        if backoff is None and run.kind == "machine" and run.name in self.app.machines:
            backoff = self.app.machines[run.name].backoff
        delay = backoff.delay(run.attempt) if backoff else 1.0
        at = datetime.now(UTC) + timedelta(seconds=delay)
        return Outcome(run.id, run.fence, SCHEDULED, error=error, run_at=at, extra={"exc": exc})

    async def _unknown_task(self, run: Claimed) -> Outcome:
        """A run no handler here knows: wait for a node that knows it, or fail when none does."""
        checked_at, known = self._known_elsewhere
        if time.monotonic() - checked_at > 5.0:
            nodes = await self.store.list_nodes(self.lease_ttl)
            known = {t for n in nodes if n.alive and n.name != self.name for t in n.tasks}
            self._known_elsewhere = (time.monotonic(), known)
        if run.name in known:
            at = datetime.now(UTC) + timedelta(seconds=5)
            return Outcome(run.id, run.fence, SCHEDULED, run_at=at, refund_attempt=True)
        message = (
            f"no live node knows task {run.name!r}: register it with @app.task on the workers "
            f"of queue {run.queue!r} (this node, {self.name}, knows {len(self.app.tasks)} tasks)"
        )
        info = {
            "type": "UnknownTask",
            "message": message,
            "traceback": None,
            "attempt": run.attempt,
        }
        log.error(message)
        return Outcome(run.id, run.fence, FAILED, error=payload.dumps(info))

    # -- commit ------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        backoff = 0.05
        give_up_at: float | None = None
        refusals = 0
        while True:
            if not self._outcomes:
                if self._closing:
                    return
                self._outcome_ready.clear()
                await self._outcome_ready.wait()
                continue
            batch = self._outcomes[:_MAX_BATCH]
            del self._outcomes[: len(batch)]
            try:
                committed = await self.store.commit_outcomes(batch)
            except Exception as exc:
                if not self.store.is_transient(exc):
                    refusals += 1
                    if refusals >= 3:
                        self._abandon(batch, exc)
                        refusals = 0
                        continue
                self._outcomes[:0] = batch
                if self._closing:
                    give_up_at = give_up_at or time.monotonic() + self.app.shutdown_grace
                    if time.monotonic() > give_up_at:
                        log.error(
                            "giving up on %d outcomes at shutdown (%s); their leases will "
                            "expire and the runs will be retried", len(self._outcomes), exc,
                        )  # fmt: skip
                        return
                log.warning("commit of %d outcomes failed (%s); retrying", len(batch), exc)
                self.status = "degraded"
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            backoff = 0.05
            refusals = 0
            self._committed(batch, committed)
            if self.burst and not self._inflight:
                self._work.set()  # let the claim loop see whether anything is left

    def _abandon(self, batch: list[Outcome], exc: BaseException) -> None:
        """The database keeps refusing these outcomes: stop holding the runs.

        Their leases lapse and the reaper hands them out again, so nothing is
        lost; the refusal is logged and reported, never retried forever.
        """
        log.error(
            "the database refused to commit %d outcomes three times (%s: %s); releasing the "
            "runs to lease expiry", len(batch), type(exc).__name__, exc,
        )  # fmt: skip
        self.telemetry.emit("node.loop_crashed", loop="commit", error=repr(exc))
        self.status = "degraded"
        for outcome in batch:
            self._forget(outcome.id, outcome.fence)

    def _committed(self, batch: list[Outcome], committed: set[str]) -> None:
        telemetry = self.telemetry
        released: set[str] = set()
        for outcome in batch:
            flight = self._forget(outcome.id, outcome.fence)
            run = flight.run if flight else None
            if outcome.id not in committed:
                telemetry.emit("run.lease_lost", id=outcome.id, node=self.name, state=outcome.state)
                continue
            if outcome.state == COMPLETED:
                self.completed_total += 1
            if outcome.state == SCHEDULED or (outcome.step and outcome.step.deadline):
                self._timer_wake.set()  # a retry or an await timeout to schedule
            if outcome.state == AVAILABLE and run and outcome.step is None:
                released.add(run.queue)
            elif run and run.queue in self._limited:
                released.add(run.queue)  # a slot of a globally limited queue is free: wake claims
            if outcome.extra:
                if "released" in outcome.extra:
                    released.add(outcome.extra["released"])
                if "live" in outcome.extra and self._workflows is not None:
                    self._workflows.committed(outcome)
            event = "run.step" if outcome.step is not None else _EVENTS[outcome.state]
            if not telemetry.listening(event):
                continue
            meta: dict[str, Any] = {"id": outcome.id, "node": self.name}
            if run and flight:
                meta.update(
                    name=run.name, queue=run.queue, attempt=run.attempt,
                    duration=time.monotonic() - flight.started,
                )  # fmt: skip
            if "exc" in outcome.extra:
                meta["error"] = outcome.extra["exc"]
            if outcome.run_at:
                meta["retry_at"] = outcome.run_at
            if outcome.step is not None:
                meta.update(step=outcome.step.step, state=outcome.state)
            telemetry.emit(event, **meta)
        if released:
            for queue in released:
                self._notify_soon(queue)

    def _forget(self, run_id: str, fence: int) -> InFlight | None:
        """The run (under this fence) is no longer this node's: free its slot."""
        flight = self._inflight.pop((run_id, fence), None)
        if flight is not None:
            self._running[flight.run.queue] -= 1
            self._slot_freed.set()
        return flight

    def _notify_soon(self, text: str) -> None:
        async def send() -> None:
            with contextlib.suppress(Exception):
                await self.store.notify(text)

        self._notifications.add(task := asyncio.ensure_future(send()))
        task.add_done_callback(self._notifications.discard)

    # -- drain -------------------------------------------------------------------------

    async def _drain(self) -> None:
        executing = [f.task for f in self._inflight.values() if f.executing and f.task]
        if executing:
            grace = self.app.shutdown_grace
            log.info("draining %d in-flight runs (grace %.0f s)", len(executing), grace)
            finished = asyncio.ensure_future(asyncio.wait(executing))
            forced = asyncio.ensure_future(self._forced.wait())
            try:
                await asyncio.wait(
                    [finished, forced], timeout=grace, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                finished.cancel()
                forced.cancel()
        leftovers = [f for f in self._inflight.values() if f.executing and f.task]
        for flight in leftovers:
            flight.release = True
            assert flight.task is not None
            flight.task.cancel()
        if leftovers:
            await asyncio.gather(*(f.task for f in leftovers if f.task), return_exceptions=True)
            log.info("releasing %d runs to other nodes", len(leftovers))

    # -- leases --------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        while True:
            # Polling backends learn of cancellations here, so look more often.
            await asyncio.sleep(self.lease_ttl / 3 if self._push else min(1.0, self.lease_ttl / 3))
            held = [(f.run.id, f.run.fence) for f in self._inflight.values()]
            if not held:
                continue
            kept = await self.store.extend_leases(self.name, held, self.lease_ttl)
            for run_id, fence in held:
                if run_id not in kept:
                    self._lose(run_id, "lease", fence)

    def _lose(self, run_id: str, reason: str, fence: int | None = None) -> None:
        """This node no longer owns the run: stop its handler; its outcome will be refused.

        With a fence, only the handler of that claim (the run may have been
        claimed again since the lease check was sent).
        """
        flights = [
            f
            for (rid, f_fence), f in self._inflight.items()
            if rid == run_id and (fence is None or f_fence == fence)
        ]
        for flight in flights:
            if not flight.executing or flight.lost:
                continue
            flight.lost = True
            if flight.task is not None:
                flight.task.cancel()
            self.telemetry.emit("run.lease_lost", id=run_id, node=self.name, reason=reason)
            log.warning("run %s: %s lost; handler cancelled", run_id, reason)

    # -- background loops -------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        await self.store.heartbeat_node(
            self.name,
            self.queues,
            sorted([*self.app.tasks, *self.app.machines, *self.app.workflows]),
            self.concurrency,
            self.status,
        )

    async def _heartbeat_loop(self) -> None:
        interval = min(5.0, self.lease_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            await self._heartbeat()
            for name in await self.store.prune_nodes(self.lease_ttl * 3):
                log.warning("node %s stopped heartbeating; removed", name)
                self.telemetry.emit("node.down", node=name, reason="heartbeat lost")

    async def _timer_loop(self) -> None:
        while True:
            queues, nxt = await self.store.promote_due(_MAX_BATCH)
            if set(queues) & set(self.queues):
                self._work.set()
            if queues and nxt and nxt <= datetime.now(UTC):
                continue  # more are due than one batch held
            delay = 1.0 if nxt is None else (nxt - datetime.now(UTC)).total_seconds()
            self._timer_wake.clear()
            await wait_event(self._timer_wake, min(1.0, max(0.001, delay)))

    async def _reaper_loop(self) -> None:
        interval = min(self.lease_ttl / 2, 5.0)
        reaped_at = time.monotonic()
        while True:
            # Heartbeat timeouts are checked every second (an empty partial index when
            # no run uses them); expired leases every half lease.
            await asyncio.sleep(min(interval, _SILENCE_CHECK))
            while len(await self._fail_silent(500)) == 500:
                pass
            if time.monotonic() - reaped_at < interval:
                continue
            reaped_at = time.monotonic()
            while True:
                reaped = await self.store.reap_expired(500)
                for run_id, state in reaped:
                    log.warning("run %s: lease expired; now %s", run_id, state)
                    self.telemetry.emit(
                        "run.lease_lost", id=run_id, node=None, reclaimed_by=self.name, state=state
                    )
                if len(reaped) < 500:
                    break

    async def _fail_silent(self, limit: int) -> list[Claimed]:
        """Fail the attempts that outlived their heartbeat timeout, wherever they run.

        Each is committed as a failed attempt under the fence it holds (retried
        with its task's backoff, failed on its last attempt): an owner whose
        commit got there first keeps its outcome; otherwise the owner's commit
        is refused by the new fence, and its node is told to cancel the handler.
        """
        silent = await self.store.silent_runs(limit)
        if not silent:
            return silent
        outcomes = []
        for run in silent:
            exc = HeartbeatTimeout(
                f"task {run.name} went longer than its heartbeat_timeout without a heartbeat "
                f"(attempt {run.attempt}); failed by node {self.name}: call "
                "ms.current_run().heartbeat() more often, or raise the timeout"
            )
            outcome = self._failure(run, self.app.tasks.get(run.name), exc)
            outcome.parent_id = run.parent_id
            outcomes.append(outcome)
        committed = await self.store.commit_outcomes(outcomes)
        for outcome in outcomes:
            if outcome.id not in committed:
                continue
            log.warning("run %s: heartbeat timeout; now %s", outcome.id, outcome.state)
            self.telemetry.emit(
                "run.heartbeat_timeout", id=outcome.id, reclaimed_by=self.name, state=outcome.state
            )
            self._notify_soon(f"lost:{outcome.id}:{outcome.fence}")
        self._timer_wake.set()
        return silent

    async def _gc_loop(self) -> None:
        interval = min(60.0, max(1.0, self.app.retention / 10))
        while True:
            await asyncio.sleep(interval)
            cutoff = datetime.now(UTC) - timedelta(seconds=self.app.retention)
            while await self.store.delete_terminal(cutoff, 1000) == 1000:
                await asyncio.sleep(0.05)  # leave room for the hot path between batches
            await self.store.prune_rate_buckets()

    async def _periodic_loop(self) -> None:
        periodics = [p for p in self.app.periodics if p.task.queue in self.queues]
        if not periodics:
            return
        while True:
            now = datetime.now(UTC)
            ticks = [(p, p.cron.next_after(now)) for p in periodics]
            runs = [
                NewRun(
                    id=uuid7_for(tick.timestamp(), "periodic", p.task.name),
                    name=p.task.name,
                    queue=p.task.queue,
                    input=payload.encode_call(p.task.name, p.args, p.kwargs),
                    state=SCHEDULED,
                    run_at=tick,
                    priority=p.task.priority,
                    max_attempts=p.task.max_attempts,
                    timeout=p.task.timeout,
                )
                for p, tick in ticks
            ]
            await self.store.insert_runs(runs)
            self._timer_wake.set()
            soonest = min(tick for _, tick in ticks)
            await asyncio.sleep(max(0.0, (soonest - datetime.now(UTC)).total_seconds()) + 0.001)

    async def _listener_loop(self) -> None:
        loop = asyncio.get_running_loop()
        served = set(self.queues)

        def on_message(text: str) -> None:
            loop.call_soon_threadsafe(self._on_notification, text, served)

        while True:
            self._push = await self.store.listen(on_message, node=self.name)
            if not self._push:
                return  # polling backend: in-process wake-ups only
            while self.store.listening():
                await asyncio.sleep(1.0)
            self._push = False
            log.warning("notification connection lost; polling until it is back")
            self._work.set()

    def _on_notification(self, text: str, served: set[str]) -> None:
        if text.startswith("cancel:"):
            self._lose(text[7:], "cancellation")
            return
        if text.startswith("lost:"):  # lost:<id>:<fence>: that claim's attempt was failed
            run_id, _, fence = text[5:].rpartition(":")
            self._lose(run_id, "heartbeat timeout", int(fence))
            return
        for part in text.split(","):
            if part == "~timer":
                self._timer_wake.set()
            elif part in served or part == "~claim":  # ~claim: routed to this node
                self._work.set()
            elif part.startswith("~later:") and part[7:] in served:
                self._claim_later()

    def _claim_later(self) -> None:
        """Wake the claim loop in a moment: a run whose owner node was woken first (it
        holds the run's live coroutine) is left to it, unless it is busy or gone."""
        if self._later is None or self._later.when() <= asyncio.get_running_loop().time():
            loop = asyncio.get_running_loop()
            self._later = loop.call_later(_ROUTED_HEAD_START, self._work.set)


_EVENTS = {
    COMPLETED: "run.completed",
    FAILED: "run.failed",
    SCHEDULED: "run.retried",
    CANCELLED: "run.cancelled",
    AVAILABLE: "run.released",
    WAITING: "run.waiting",
}

"""One machine step on a worker: read the inbox, call the step, turn its outcome into a commit."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from mainspring import payload
from mainspring.app import Call
from mainspring.errors import MainspringError
from mainspring.machines.machine import ChildSpec, MachineDef, StepContext
from mainspring.machines.outcomes import Await, Done, Next, Retry, Spawn, Stop
from mainspring.ratelimits import bucket_key, limit_name
from mainspring.run import (
    AVAILABLE,
    COMPLETED,
    FAILED,
    SCHEDULED,
    WAITING,
    Claimed,
    Outcome,
    StepCommit,
)
from mainspring.signals import Signal, Signals
from mainspring.store.base import RateLimitConfig, StepData, Store

if TYPE_CHECKING:
    from mainspring.engine.worker import Worker

log = logging.getLogger("mainspring.machines")


class StepError(MainspringError):
    """A step returned something the engine cannot commit; the run fails without retry."""

    retryable = False


class StepLoader:
    """Reads the inbox and children of the steps started in one loop tick with one query."""

    def __init__(self, store: Store, *, events: bool = False) -> None:
        self.store = store
        self.events = events
        self._pending: dict[str, asyncio.Future[StepData]] = {}
        self._wanted: dict[str, tuple[int, list[str] | None]] = {}
        self._scheduled = False

    async def load(
        self, run_id: str, after: int = 0, children: list[str] | None = None
    ) -> StepData:
        """The run's step data; with `events`, its journal entries after seq `after`; only
        the `children` with these ids when given."""
        future = self._pending.get(run_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[run_id] = future
            self._wanted[run_id] = (after, children)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._pending, self._scheduled = self._pending, {}, False
        wanted, self._wanted = self._wanted, {}
        task = asyncio.ensure_future(self._fetch(batch, wanted))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _fetch(
        self,
        batch: dict[str, asyncio.Future[StepData]],
        limits: dict[str, tuple[int, list[str] | None]],
    ) -> None:
        try:
            wanted = [limits[run_id] for run_id in batch]
            narrowed = any(a or c is not None for a, c in wanted)
            found = await self.store.load_step_data(
                list(batch), events=self.events,
                after=[a for a, _ in wanted] if narrowed else [],
                children=[c for _, c in wanted] if narrowed else [],
            )  # fmt: skip
        except Exception as exc:
            for future in batch.values():
                if not future.done():
                    future.set_exception(exc)
            return
        empty = StepData([], [])
        for run_id, future in batch.items():
            if not future.done():
                future.set_result(found.get(run_id, empty))


class MachineRunner:
    """Executes claimed machine runs for one worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.app = worker.app
        self.loader = StepLoader(worker.store)
        self._db_limits: dict[str, RateLimitConfig] = {}
        self._db_limits_at = -1e9

    async def execute(self, run: Claimed) -> Outcome:
        definition = self.app.machines[run.name]
        try:
            data = await self.loader.load(run.id)
        except Exception as exc:
            if not self.worker.store.is_transient(exc):
                raise
            log.warning("run %s: could not read its inbox (%s); releasing it", run.id, exc)
            return Outcome(run.id, run.fence, AVAILABLE, refund_attempt=True)
        step = run.step or definition.initial
        inbox = Signals(Signal(s.id, s.name, s.payload, s.sent_at) for s in data.inbox)
        awaited = Signals()
        if run.awaits is not None:  # resolving an Await: woken by a signal, or a re-check
            awaited = Signals(s for s in inbox if s.name in run.awaits)
            if not awaited:  # nothing for it yet: park again, as it was
                return Outcome(
                    run.id, run.fence, WAITING, refund_attempt=True, seen_seq=run.signal_seq
                )
        if step not in definition.steps:
            raise StepError(f"machine {definition.name} has no step {step!r} (its steps: "
                            f"{', '.join(sorted(definition.steps))})")  # fmt: skip
        ctx = StepContext(
            run_id=run.id, machine=definition.name, step=step, attempt=run.attempt,
            max_attempts=run.max_attempts, node=self.worker.name, awaited=awaited, inbox=inbox,
            children=list(data.children),
        )  # fmt: skip
        state = definition.decode_state(payload.loads(run.state_data))
        result = await self._call(definition, step, ctx, state)
        return await self._outcome(definition, run, ctx, state, result)

    async def _call(self, definition: MachineDef, step: str, ctx: StepContext, state: Any) -> Any:
        fn = definition.steps[step]
        instance = definition.cls()
        if asyncio.iscoroutinefunction(fn):
            return await fn(instance, ctx, state)
        context = contextvars.copy_context()
        call = functools.partial(context.run, fn, instance, ctx, state)
        return await asyncio.get_running_loop().run_in_executor(self.worker._threads, call)

    async def _outcome(
        self, definition: MachineDef, run: Claimed, ctx: StepContext, state: Any, result: Any
    ) -> Outcome:
        consumed = [s.id for s in ctx.awaited]
        now = datetime.now(UTC)
        if isinstance(result, Next):
            self._check_step(definition, result.step, "Next")
            key, weight = await self._rate_limit(definition, result)
            commit = StepCommit(
                result.step, definition.encode_state(result.state), reset_attempt=True,
                consume=consumed, rate_limit=key, weight=weight,
            )  # fmt: skip
            return Outcome(run.id, run.fence, AVAILABLE, step=commit)
        if isinstance(result, Retry):
            if run.attempt >= run.max_attempts:
                message = (
                    f"step {ctx.step} asked to retry after its last attempt "
                    f"({run.attempt} of {run.max_attempts})"
                )
                return _failed(run, "RetriesExhausted", message)
            delay = result.delay
            if delay is None:
                delay = definition.backoff.delay(run.attempt)
            at = now + timedelta(seconds=max(0.0, delay))
            if result.state is None:
                return Outcome(run.id, run.fence, SCHEDULED, run_at=at)
            commit = StepCommit(
                ctx.step, definition.encode_state(result.state), awaits=run.awaits,
                rate_limit=run.rate_limit, weight=run.weight,
            )  # fmt: skip
            return Outcome(run.id, run.fence, SCHEDULED, run_at=at, step=commit)
        if isinstance(result, Await):
            if not result.signals:
                raise StepError(f"step {ctx.step} returned Await() without signal names")
            self._check_step(definition, result.then, "Await then")
            if result.on_timeout is not None:
                self._check_step(definition, result.on_timeout, "Await on_timeout")
            if result.timeout is not None and result.timeout < 0:
                raise StepError(f"step {ctx.step} returned Await(timeout={result.timeout})")
            deadline = (
                now + timedelta(seconds=result.timeout) if result.timeout is not None else None
            )
            commit = StepCommit(
                result.then, definition.encode_state(result.state), reset_attempt=True,
                awaits=list(result.signals), wake_step=result.on_timeout, deadline=deadline,
                consume=consumed,
            )  # fmt: skip
            # A signal already in the inbox (not consumed by this step) satisfies it now.
            ready = any(s.name in result.signals and s.id not in consumed for s in ctx.inbox)
            state = AVAILABLE if ready else WAITING
            return Outcome(run.id, run.fence, state, step=commit, seen_seq=run.signal_seq)
        if isinstance(result, Spawn):
            self._check_step(definition, result.then, "Spawn then")
            children = [self._child(c, run.id, now) for c in result.children]
            commit = StepCommit(
                result.then, definition.encode_state(result.state), reset_attempt=True,
                consume=consumed, children=children,
            )  # fmt: skip
            return Outcome(run.id, run.fence, WAITING if children else AVAILABLE, step=commit)
        if isinstance(result, Done):
            return Outcome(run.id, run.fence, COMPLETED, output=payload.dumps(result.result))
        if isinstance(result, Stop):
            info = {"type": "Stopped", "message": result.reason, "details": result.details,
                    "traceback": None, "attempt": run.attempt, "step": ctx.step}  # fmt: skip
            return Outcome(run.id, run.fence, FAILED, error=payload.dumps(info))
        raise StepError(
            f"step {ctx.step} of machine {definition.name} returned {result!r}; a step returns "
            "ms.Next, ms.Retry, ms.Await, ms.Spawn, ms.Done or ms.Stop"
        )

    def _check_step(self, definition: MachineDef, step: str, where: str) -> None:
        if step not in definition.steps:
            raise StepError(f"{where}: machine {definition.name} has no step {step!r} "
                            f"(its steps: {', '.join(sorted(definition.steps))})")  # fmt: skip

    def _child(self, child: ChildSpec | Call, parent_id: str, now: datetime) -> Any:
        if isinstance(child, ChildSpec):
            return child.to_new_run(parent_id, now)
        if isinstance(child, Call):
            if child.options.correlation_key is not None:
                # A child skipped as a duplicate would leave its parent waiting forever.
                raise StepError("Spawn children cannot carry a correlation_key")
            return dataclasses.replace(child.to_new_run(now), parent_id=parent_id)
        raise StepError(f"Spawn children are Machine.spec(...) or task.call(...), got {child!r}")

    async def _rate_limit(self, definition: MachineDef, result: Next) -> tuple[str | None, int]:
        if result.rate_limit is None:
            return None, 1
        key = bucket_key(result.rate_limit)
        if result.weight < 1:
            raise StepError(f"Next(..., weight={result.weight}): weight must be >= 1")
        name = limit_name(key)
        config = self.app.rate_limits.configs.get(name) or (await self._limits()).get(name)
        if config is None:
            self.worker.telemetry.emit("rate_limit.unknown", name=name, key=key,
                                       machine=definition.name, step=result.step)  # fmt: skip
            log.warning("rate limit %r is not configured: runs of step %s wait until it is",
                        name, result.step)  # fmt: skip
        elif result.weight > config.burst:
            raise StepError(
                f"Next({result.step!r}, weight={result.weight}) can never be granted: rate "
                f"limit {name!r} holds at most {config.burst} tokens (its burst)"
            )
        return key, result.weight

    async def _limits(self) -> dict[str, RateLimitConfig]:
        now = asyncio.get_running_loop().time()
        if now - self._db_limits_at > 5.0:
            self._db_limits = await self.worker.store.rate_limit_configs()
            self._db_limits_at = now
        return self._db_limits


def _failed(run: Claimed, kind: str, message: str) -> Outcome:
    info = {"type": kind, "message": message, "traceback": None, "attempt": run.attempt}
    return Outcome(run.id, run.fence, FAILED, error=payload.dumps(info))

"""Workflows: deterministic async functions whose every effect is journaled and replayed."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

from mainspring import payload
from mainspring.errors import ConfigError
from mainspring.ids import uuid7
from mainspring.run import AVAILABLE, SCHEDULED, NewRun
from mainspring.workflows.replay import ContinueAsNew, Replayer

if TYPE_CHECKING:
    from mainspring.app import App, Task

KIND = "workflow"
WorkflowFn = Callable[["Workflow", Any], Coroutine[Any, Any, Any]]


class Workflow:
    """What workflow code sees: every effect goes through here and is journaled.

    Activities, timers, signals, child workflows, time, randomness and ids
    are all recorded, so replaying the code against the journal takes the
    same path without running any effect twice.
    """

    def __init__(self, replayer: Replayer, run_id: str, name: str, attempt: int) -> None:
        self._r = replayer
        self.run_id = run_id
        self.name = name
        self.attempt = attempt
        self._compensations: list[tuple[Task[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    @property
    def replaying(self) -> bool:
        """True while the code catches up with its journal (effects are not re-run)."""
        return self._r.replaying

    async def activity(
        self,
        task: Task[..., Any],
        *args: Any,
        max_attempts: int | None = None,
        timeout: float | None = None,
        queue: str | None = None,
        priority: int | None = None,
        compensate: Task[..., Any] | None = None,
        heartbeat_timeout: float | None = None,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run a task (at least once, with its own retries) and return its result.

        Raises ms.ActivityError when it fails for good. The result is journaled:
        replay never calls the task again. With `compensate=`, once it succeeds
        that task (called with the same arguments) is registered for
        `compensate_all()`.

        `heartbeat_timeout=S`: an attempt that goes S seconds without a
        heartbeat (from its claim) is failed and retried, even on a live node.
        `idempotency_key=k`: if a run of this task with key k completed (in any
        workflow, or enqueued directly), its output is the result and the task
        is not called; concurrent activities with k execute once between them.
        Reused while that run is kept (`App(retention=)`); see `Task.options`.
        """
        given = {"max_attempts": max_attempts, "timeout": timeout, "queue": queue,
                 "priority": priority, "heartbeat_timeout": heartbeat_timeout,
                 "idempotency_key": idempotency_key}  # fmt: skip
        options = {k: v for k, v in given.items() if v is not None}
        result = await self._r.activity(task, args, kwargs, options)
        if compensate is not None:
            self._compensations.append((compensate, args, kwargs))
        return result

    async def compensate_all(self, *, parallel: bool = False) -> list[Any]:
        """Run the registered compensations: newest first, or all at once with `parallel`.

        Each runs once as an activity; the list is emptied, so a second call
        does nothing.
        """
        todo, self._compensations = list(reversed(self._compensations)), []
        if parallel:
            return list(await asyncio.gather(*(self.activity(t, *a, **k) for t, a, k in todo)))
        return [await self.activity(t, *a, **k) for t, a, k in todo]

    async def child(self, workflow: Any, input: Any = None, *, queue: str | None = None) -> Any:
        """Run a child workflow and return its result (ms.ActivityError when it fails)."""
        definition = _definition_of(self._r.app, workflow)
        return await self._r.child(definition, input, {"queue": queue} if queue else {})

    async def sleep(self, seconds: float) -> None:
        """A durable timer: the run sleeps in the database, not in a process."""
        if seconds < 0:
            raise ValueError(f"sleep needs seconds >= 0, got {seconds}")
        await self._r.timer(seconds)

    async def wait_signal(self, name: str, timeout: float | None = None) -> Any:
        """The payload of the next signal `name` (oldest first), or None after `timeout` s."""
        return await self._r.wait_signal(name, timeout)

    def now(self) -> datetime:
        """The current time, recorded: replay returns the same moment."""
        value = self._r.value("now", lambda: datetime.now(UTC).timestamp())
        return datetime.fromtimestamp(value, UTC)

    def random(self) -> float:
        """A random float in [0, 1), recorded."""
        return float(self._r.value("random", random.random))

    def uuid4(self) -> uuid.UUID:
        """A random UUID, recorded."""
        return uuid.UUID(self._r.value("uuid4", lambda: str(uuid.uuid4())))

    def side_effect(self, fn: Callable[[], Any]) -> Any:
        """Call fn once and record its (JSON) result; replay returns the recorded value."""
        return self._r.value("side_effect", lambda: payload.loads(payload.dumps(fn())))

    def patched(self, patch: str) -> bool:
        """True for runs that reach this point with the patch deployed; False when replaying
        history recorded before it. Guard the new code path with it."""
        return self._r.patched(patch)

    def log(self, message: str) -> None:
        """Journal a message; it is printed once, at the live tail, never again on replay."""
        self._r.log(message)

    def continue_as_new(self, input: Any) -> NoReturn:
        """End this run and start a fresh one of this workflow with `input` (bounded journals)."""
        raise ContinueAsNew(input)


@dataclass(slots=True)
class WorkflowDef:
    """A registered workflow function and its options."""

    app: App
    fn: WorkflowFn
    name: str
    queue: str
    version: str  # runs finish on the version they started on
    signals: dict[str, Any] | None = None  # name -> payload type: the signal contract
    code: str = ""  # a fingerprint of the source, recorded for audits

    def new_run(
        self,
        input: Any,
        now: datetime,
        *,
        id: str | None = None,
        queue: str | None = None,
        namespace: str | None = None,
        attributes: dict[str, Any] | None = None,
        parent_id: str | None = None,
        run_at: datetime | None = None,
        correlation_key: str | None = None,
    ) -> NewRun:
        later = run_at is not None and run_at > now
        if run_at is not None and run_at.tzinfo is None:
            raise ConfigError("run_at must be timezone-aware (for example datetime.now(UTC))")
        return NewRun(
            id=id or uuid7(),
            kind=KIND,
            name=self.name,
            namespace=namespace or "default",
            queue=queue or self.queue,
            input=payload.dumps({"input": input, "version": self.version, "code": self.code}),
            state=SCHEDULED if later else AVAILABLE,
            run_at=run_at if later and run_at else now,
            max_attempts=1_000_000,  # a workflow task is retried until it succeeds
            correlation_key=correlation_key,
            attributes=payload.dumps(attributes) if attributes else "{}",
            parent_id=parent_id,
        )


def _definition_of(app: App, workflow: Any) -> WorkflowDef:
    name = workflow if isinstance(workflow, str) else getattr(workflow, "workflow_name", None)
    definition = app.workflows.get(name) if isinstance(name, str) else None
    if definition is None:
        raise ConfigError(
            f"{workflow!r} is not a registered workflow (decorate it with @app.workflow)"
        )
    return definition


def run_task(
    replayer: Replayer, definition: WorkflowDef, ctx: Workflow, input: Any
) -> Callable[[], Coroutine[Any, Any, Any]]:
    """The coroutine factory a Replayer runs: the workflow function with its context."""

    async def main() -> Any:
        return await definition.fn(ctx, input)

    return main


def fingerprint(fn: Callable[..., Any]) -> str:
    """The workflow's code version: a hash of its source (or of its name when there is none)."""
    import hashlib
    import inspect

    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = f"{fn.__module__}.{fn.__qualname__}"
    return hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


def check_signal(definition: WorkflowDef, name: str, payload: Any) -> None:
    """Refuse a signal the workflow's contract does not declare, or whose payload is invalid."""
    from mainspring.errors import SignalRejected

    contract = definition.signals
    if contract is None:
        return
    if name not in contract:
        raise SignalRejected(
            f"workflow {definition.name} accepts the signals {sorted(contract)}, not {name!r}"
        )
    kind = contract[name]
    try:
        if kind is None or kind is Any:
            return
        if hasattr(kind, "model_validate"):
            kind.model_validate(payload)
        elif dataclasses.is_dataclass(kind) and isinstance(kind, type):
            kind(**payload)
        elif isinstance(kind, type) and not isinstance(payload, kind):
            raise TypeError(f"expected {kind.__name__}, got {type(payload).__name__}")
    except Exception as exc:
        raise SignalRejected(
            f"signal {name!r} to workflow {definition.name}: invalid payload: {exc}"
        ) from None

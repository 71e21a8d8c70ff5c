"""Machines: classes of steps whose state is committed before each next step runs."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from mainspring import payload
from mainspring.backoff import Backoff
from mainspring.errors import ConfigError
from mainspring.ids import uuid7
from mainspring.run import AVAILABLE, SCHEDULED, NewRun
from mainspring.signals import Signals
from mainspring.store.base import ChildRow

if TYPE_CHECKING:
    from mainspring.app import App, RunHandle

KIND = "machine"


# A child as its parent sees it after a Spawn: id, kind, name, state, output, error.
ChildRun = ChildRow


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a step knows besides its state."""

    run_id: str
    machine: str
    step: str
    attempt: int
    max_attempts: int
    node: str
    awaited: Signals = field(default_factory=Signals)  # the signals that resolved an Await
    inbox: Signals = field(default_factory=Signals)  # every unconsumed signal
    children: list[ChildRun] = field(default_factory=list)  # all children, oldest first
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """A child machine to start from a Spawn (see `Machine.spec`)."""

    machine: MachineDef
    state: Any
    queue: str | None = None
    priority: int | None = None

    def to_new_run(self, parent_id: str, now: datetime) -> NewRun:
        return self.machine.new_run(self.state, now, queue=self.queue, priority=self.priority,
                                    parent_id=parent_id)  # fmt: skip


@dataclass(slots=True)
class MachineDef:
    """A registered machine class and its options."""

    app: App
    cls: type[Machine]
    name: str
    queue: str
    max_attempts: int
    priority: int
    backoff: Backoff
    steps: dict[str, Callable[..., Any]]

    @property
    def initial(self) -> str:
        return self.cls.initial

    def encode_state(self, state: Any) -> str:
        """State as JSON text; a `State` dataclass or pydantic model is dumped first."""
        if dataclasses.is_dataclass(state) and not isinstance(state, type):
            state = dataclasses.asdict(state)
        elif hasattr(state, "model_dump"):
            state = state.model_dump(mode="json")
        return payload.dumps(state)

    def decode_state(self, data: Any) -> Any:
        """Loaded state, validated into the class's `State` when it declares one."""
        kind = self.cls.State
        if kind is None or data is None:
            return data
        if hasattr(kind, "model_validate"):
            return kind.model_validate(data)
        if dataclasses.is_dataclass(kind):
            return kind(**data)
        raise ConfigError(f"machine {self.name}: State must be a dataclass or a pydantic model")

    def new_run(
        self,
        state: Any,
        now: datetime,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        correlation_key: str | None = None,
        max_attempts: int | None = None,
        attributes: dict[str, Any] | None = None,
        parent_id: str | None = None,
    ) -> NewRun:
        self.decode_state(payload.loads(self.encode_state(state)))  # validate now, not in a step
        if delay is not None:
            if delay < 0:
                raise ConfigError(f"delay must be >= 0 seconds, got {delay}")
            run_at = now + timedelta(seconds=delay)
        if run_at is not None and run_at.tzinfo is None:
            raise ConfigError("run_at must be timezone-aware (for example datetime.now(UTC))")
        attempts = max_attempts if max_attempts is not None else self.max_attempts
        if attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {attempts}")
        later = run_at is not None and run_at > now
        return NewRun(
            id=uuid7(),
            kind=KIND,
            name=self.name,
            queue=queue or self.queue,
            input=None,  # type: ignore[arg-type]
            state=SCHEDULED if later else AVAILABLE,
            run_at=run_at if later and run_at else now,
            priority=priority if priority is not None else self.priority,
            max_attempts=attempts,
            correlation_key=correlation_key,
            attributes=payload.dumps(attributes or {}),
            parent_id=parent_id,
            step=self.initial,
            state_data=self.encode_state(state),
            version=self.cls.version,
        )


class Machine:
    """Base class of durable state machines (register with `@app.machine`).

    Each public method is a step: `async def step(self, ctx, state) -> ms.Outcome`
    (plain `def` steps run in the worker's thread pool). A new instance serves
    each step; everything that must survive lives in `state`.
    """

    initial: ClassVar[str] = "start"
    State: ClassVar[type | None] = None
    version: ClassVar[int] = 1
    _definition: ClassVar[MachineDef]

    @classmethod
    def _def(cls) -> MachineDef:
        try:
            return cls.__dict__["_definition"]  # type: ignore[no-any-return]
        except KeyError:
            raise ConfigError(
                f"{cls.__qualname__} is not registered: decorate it with @app.machine"
            ) from None

    @classmethod
    async def start_async(
        cls,
        state: Any = None,
        *,
        correlation_key: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> RunHandle:
        """Start a run of this machine at its initial step; returns its handle.

        With a `correlation_key` held by a live run, that run's handle is
        returned instead (`handle.created` is False).
        """
        definition = cls._def()
        run = definition.new_run(
            state, datetime.now(UTC), queue=queue, priority=priority, delay=delay, run_at=run_at,
            correlation_key=correlation_key, max_attempts=max_attempts, attributes=attributes,
        )  # fmt: skip
        return await definition.app.insert_async(run)

    @classmethod
    def start(cls, state: Any = None, **options: Any) -> RunHandle:
        """Start a run (sync client); see `start_async`."""
        return cls._def().app._sync(cls.start_async(state, **options))

    @classmethod
    def spec(
        cls, state: Any = None, *, queue: str | None = None, priority: int | None = None
    ) -> ChildSpec:
        """A child of this machine, for `ms.Spawn`."""
        return ChildSpec(cls._def(), state, queue, priority)


def steps_of(cls: type[Machine]) -> dict[str, Callable[..., Any]]:
    """The step methods a machine class defines (public methods, own or inherited)."""
    found: dict[str, Callable[..., Any]] = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") or name in _NOT_STEPS:
            continue
        if inspect.isfunction(member):
            found[name] = member
    return found


_NOT_STEPS = frozenset({"start", "start_async", "spec"})

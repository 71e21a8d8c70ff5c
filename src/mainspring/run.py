"""What a run is: the row every programming model shares, and the values the engine moves around."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

SCHEDULED: Final = "scheduled"
AVAILABLE: Final = "available"
RUNNING: Final = "running"
WAITING: Final = "waiting"
COMPLETED: Final = "completed"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"

STATES: Final = (SCHEDULED, AVAILABLE, RUNNING, WAITING, COMPLETED, FAILED, CANCELLED)
TERMINAL: Final = frozenset({COMPLETED, FAILED, CANCELLED})


@dataclass(frozen=True, slots=True)
class Run:
    """A snapshot of one run's row."""

    id: str
    kind: str
    name: str
    namespace: str
    queue: str
    state: str
    priority: int
    attempt: int
    max_attempts: int
    run_at: datetime
    input: Any
    output: Any
    error: dict[str, Any] | None
    correlation_key: str | None
    concurrency_key: str | None
    attributes: dict[str, Any]
    lease_owner: str | None
    lease_expires_at: datetime | None
    fence: int
    parent_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    # machines: the step to run next, its committed state, what a waiting run waits for
    step: str | None = None
    state_data: Any = None
    rate_limit: str | None = None
    weight: int = 1
    awaits: list[str] | None = None
    deadline: datetime | None = None
    children_pending: int = 0
    version: int = 1
    heartbeat_timeout: float | None = None
    idempotency_key: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(slots=True)
class NewRun:
    """A run about to be inserted; the client has already made its id and encoded its input."""

    id: str
    name: str
    queue: str
    input: str
    state: str
    run_at: datetime
    priority: int = 0
    max_attempts: int = 20
    kind: str = "job"
    namespace: str = "default"
    correlation_key: str | None = None
    concurrency_key: str | None = None
    attributes: str = "{}"
    timeout: float | None = None
    parent_id: str | None = None
    step: str | None = None
    state_data: str | None = None
    rate_limit: str | None = None
    weight: int = 1
    version: int = 1
    # seconds a running attempt may go without a heartbeat before it is failed
    heartbeat_timeout: float | None = None
    # runs of this task with this key execute one at a time; once one completed,
    # the others take its output (see App.task options)
    idempotency_key: str | None = None

    @property
    def plain(self) -> bool:
        """True when every optional column has its default (the store's fast insert path)."""
        return (
            self.kind == "job"
            and self.namespace == "default"
            and self.correlation_key is None
            and self.concurrency_key is None
            and self.attributes == "{}"
            and self.timeout is None
            and self.parent_id is None
            and self.rate_limit is None
            and self.heartbeat_timeout is None
            and self.idempotency_key is None
        )


@dataclass(slots=True)
class Claimed:
    """A run this node has just claimed: it holds the lease under `fence`."""

    id: str
    kind: str
    name: str
    queue: str
    input: Any
    attempt: int
    max_attempts: int
    fence: int
    timeout: float | None
    created: float  # when it was enqueued, epoch seconds (cheap to decode)
    parent_id: str | None = None
    step: str | None = None
    state_data: str | None = None  # JSON text, decoded by the model that runs the step
    signal_seq: int = 0
    awaits: list[str] | None = None
    version: int = 1
    rate_limit: str | None = None
    weight: int = 1


@dataclass(slots=True)
class StepCommit:
    """What a machine step commits beside the run's next state (see Outcome.step).

    Every field is written: `awaits`, `wake_step`, `deadline` and `rate_limit`
    are cleared when None. With Outcome.state `waiting`, the run parks for the
    signals named in `awaits` (until `deadline`, then `wake_step` runs), or for
    `children` to finish. A park whose run received a signal after the claim
    (its signal_seq moved past `seen_seq`) is made available instead, so the
    step that resolves the await re-reads the inbox: no wake-up is ever lost.
    """

    step: str
    state_data: str
    reset_attempt: bool = False
    awaits: list[str] | None = None
    wake_step: str | None = None
    deadline: datetime | None = None
    consume: Sequence[str] = ()
    children: Sequence[NewRun] = ()
    rate_limit: str | None = None
    weight: int = 1
    events: Sequence[tuple[int, str, str]] = ()  # journal entries to append: (seq, kind, JSON)


@dataclass(slots=True)
class Outcome:
    """The result of one attempt, committed only if the run still carries `fence`.

    `state` is the run's next state: completed, failed, cancelled, scheduled (a
    retry at `run_at`) or available (released without using up the attempt).
    """

    id: str
    fence: int
    state: str
    output: str | None = None
    error: str | None = None
    run_at: datetime | None = None
    refund_attempt: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    parent_id: str | None = None  # the run's parent: a terminal outcome counts toward its fan-in
    step: StepCommit | None = None
    # With state waiting for signals: the run's signal_seq when it was claimed. A
    # signal delivered since then makes the park available instead.
    seen_seq: int = 0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One worker node as the nodes table sees it."""

    name: str
    started_at: datetime
    heartbeat_at: datetime
    queues: list[str]
    tasks: list[str]
    concurrency: int
    status: str
    alive: bool

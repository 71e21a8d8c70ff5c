"""Mainspring: durable execution for Python on one database (SQLite or PostgreSQL)."""

from mainspring.app import App, Call, QueueConfig, RunHandle, Task
from mainspring.backoff import Backoff
from mainspring.context import RunContext, current_run
from mainspring.cron import Cron
from mainspring.errors import (
    BackendUnavailable,
    ConfigError,
    EncodeError,
    HandlerCrashed,
    HeartbeatTimeout,
    MainspringError,
    RunFailed,
    RunNotFound,
    SignalRejected,
    TaskTimeout,
)
from mainspring.machines import (
    Await,
    ChildRun,
    ChildSpec,
    Done,
    Machine,
    Next,
    Outcome,
    Retry,
    Spawn,
    StepContext,
    Stop,
)
from mainspring.ratelimits import RateLimitStatus
from mainspring.run import Run
from mainspring.search import Page, QueryError
from mainspring.signals import Signal, SignalResult, Signals
from mainspring.workflows import ActivityError, NondeterminismError, Workflow

__all__ = [
    "ActivityError",
    "App",
    "Await",
    "BackendUnavailable",
    "Backoff",
    "Call",
    "ChildRun",
    "ChildSpec",
    "ConfigError",
    "Cron",
    "Done",
    "EncodeError",
    "HandlerCrashed",
    "HeartbeatTimeout",
    "Machine",
    "MainspringError",
    "Next",
    "NondeterminismError",
    "Outcome",
    "Page",
    "QueryError",
    "QueueConfig",
    "RateLimitStatus",
    "Retry",
    "Run",
    "RunContext",
    "RunFailed",
    "RunHandle",
    "RunNotFound",
    "Signal",
    "SignalRejected",
    "SignalResult",
    "Signals",
    "Spawn",
    "StepContext",
    "Stop",
    "Task",
    "TaskTimeout",
    "Workflow",
    "current_run",
]
__version__ = "0.1.0"

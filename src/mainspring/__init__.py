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
    MainspringError,
    RunFailed,
    RunNotFound,
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
from mainspring.signals import Signal, SignalResult, Signals

__all__ = [
    "App",
    "Await",
    "ChildRun",
    "ChildSpec",
    "Done",
    "Machine",
    "Next",
    "Outcome",
    "RateLimitStatus",
    "Retry",
    "Signal",
    "SignalResult",
    "Signals",
    "Spawn",
    "StepContext",
    "Stop",
    "BackendUnavailable",
    "Backoff",
    "Call",
    "ConfigError",
    "Cron",
    "EncodeError",
    "HandlerCrashed",
    "MainspringError",
    "QueueConfig",
    "Run",
    "RunContext",
    "RunFailed",
    "RunHandle",
    "RunNotFound",
    "Task",
    "TaskTimeout",
    "current_run",
]
__version__ = "0.1.0"

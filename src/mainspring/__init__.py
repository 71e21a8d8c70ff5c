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
from mainspring.run import Run

__all__ = [
    "App",
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

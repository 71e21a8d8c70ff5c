"""Mainspring: durable execution for Python on one database (SQLite or PostgreSQL)."""

from mainspring.app import App, Call, QueueConfig, RunHandle, Task
from mainspring.backoff import Backoff
from mainspring.cluster import (
    ChildSpec,
    ColdSwap,
    ConsistentHashing,
    Guided,
    HotSwap,
    KVChange,
    KVOverflow,
    MajorityQuorum,
    Pid,
    Process,
    Replication,
    StaticQuorum,
)
from mainspring.context import RunContext, current_run
from mainspring.cron import Cron
from mainspring.errors import (
    BackendUnavailable,
    ConfigError,
    EncodeError,
    HandlerCrashed,
    MainspringError,
    NameTaken,
    ProcessError,
    RunFailed,
    RunNotFound,
    SignalRejected,
    TaskTimeout,
)
from mainspring.machines import (
    Await,
    ChildRun,
    Done,
    Machine,
    Next,
    Outcome,
    Retry,
    Spawn,
    StepContext,
    Stop,
)
from mainspring.machines import ChildSpec as MachineChildSpec
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
    "ColdSwap",
    "ConfigError",
    "ConsistentHashing",
    "Cron",
    "Done",
    "EncodeError",
    "Guided",
    "HandlerCrashed",
    "HotSwap",
    "KVChange",
    "KVOverflow",
    "Machine",
    "MachineChildSpec",
    "MainspringError",
    "MajorityQuorum",
    "NameTaken",
    "Next",
    "NondeterminismError",
    "Outcome",
    "Page",
    "Pid",
    "Process",
    "ProcessError",
    "QueryError",
    "QueueConfig",
    "RateLimitStatus",
    "Replication",
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
    "StaticQuorum",
    "StepContext",
    "Stop",
    "Task",
    "TaskTimeout",
    "Workflow",
    "current_run",
]
__version__ = "0.1.0"

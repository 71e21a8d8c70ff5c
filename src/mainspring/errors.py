"""Every error Mainspring raises, under one root so callers can catch them all.

Each message says what went wrong and what to do about it.
"""

from __future__ import annotations

from typing import Any


class MainspringError(Exception):
    """Root of every error raised by Mainspring."""


class ConfigError(MainspringError):
    """The application or a task was declared with invalid options."""


class EncodeError(MainspringError, TypeError):
    """A payload could not be encoded as JSON; nothing was written."""


class RunNotFound(MainspringError, LookupError):
    """No run has the given id (it may have been garbage-collected)."""


class RunFailed(MainspringError):
    """The run ended in `failed` or `cancelled`; `error` holds what was recorded."""

    def __init__(self, run_id: str, state: str, error: dict[str, Any] | None) -> None:
        self.run_id = run_id
        self.state = state
        self.error = error or {}
        detail = self.error.get("message") or ""
        kind = self.error.get("type") or state
        super().__init__(f"run {run_id} {state}: {kind}: {detail}".rstrip(": "))


class TaskTimeout(MainspringError, TimeoutError):
    """A handler ran longer than its task's `timeout`; the attempt counts as failed."""


class HeartbeatTimeout(MainspringError, TimeoutError):
    """A running attempt went longer than its `heartbeat_timeout` without a heartbeat.

    Any node's reaper fails the attempt (retried with the task's backoff), even
    while the owner's node is alive: the owner's commit is refused and its
    handler cancelled.
    """


class HandlerCrashed(MainspringError):
    """The process running a handler died (for example killed or segfaulted)."""


class BackendUnavailable(MainspringError, ConnectionError):
    """The database could not be reached."""


class SignalRejected(MainspringError):
    """A signal the target workflow's contract refuses (name or payload); nothing is written."""


class NameTaken(MainspringError):
    """A registry name is held by another live process; `holder` is its pid."""

    def __init__(self, name: str, holder: str) -> None:
        self.name = name
        self.holder = holder
        super().__init__(
            f"name {name!r} is registered to {holder}: unregister it there, or pick another name"
        )


class ProcessError(MainspringError):
    """A process could not be started, reached or answered (the message says which)."""

"""What a running handler can know about its own run."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from mainspring.errors import MainspringError


@dataclass(frozen=True, slots=True)
class RunContext:
    """The run a handler is executing: its id, attempt and the node running it."""

    id: str
    name: str
    queue: str
    attempt: int
    max_attempts: int
    node: str


_current: contextvars.ContextVar[RunContext] = contextvars.ContextVar("mainspring_run")


def current_run() -> RunContext:
    """The run being executed; raises outside a handler."""
    try:
        return _current.get()
    except LookupError:
        raise MainspringError("current_run() is only available inside a running task") from None

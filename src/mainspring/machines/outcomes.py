"""What a machine step returns: the outcome the engine commits before anything proceeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mainspring.ratelimits import RateLimitRef

if TYPE_CHECKING:
    from mainspring.app import Call
    from mainspring.machines.machine import ChildSpec


@dataclass(frozen=True, slots=True)
class Next:
    """Run `step` next with `state` (committed first); optionally through a rate limit."""

    step: str
    state: Any
    rate_limit: RateLimitRef | None = None
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Retry:
    """Run this step again (attempt + 1) after `delay` seconds, or the machine's backoff."""

    delay: float | None = None
    state: Any = None


@dataclass(frozen=True, slots=True, init=False)
class Await:
    """Wait for any of the named signals, then run `then`; after `timeout` s run `on_timeout`."""

    signals: tuple[str, ...]
    then: str
    state: Any
    timeout: float | None
    on_timeout: str | None

    def __init__(
        self,
        *signals: str,
        then: str,
        state: Any,
        timeout: float | None = None,
        on_timeout: str | None = None,
    ) -> None:
        object.__setattr__(self, "signals", tuple(signals))
        object.__setattr__(self, "then", then)
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "timeout", timeout)
        object.__setattr__(self, "on_timeout", on_timeout)


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start children (machines or task calls) and run `then` once every one is terminal."""

    children: Sequence[ChildSpec | Call]
    then: str
    state: Any = None


@dataclass(frozen=True, slots=True)
class Done:
    """Finish the run: state completed, output = result."""

    result: Any = None


@dataclass(frozen=True, slots=True)
class Stop:
    """End the run as failed, by design: the reason is its error, and it is not retried."""

    reason: str = "stopped"
    details: dict[str, Any] = field(default_factory=dict)


Outcome = Next | Retry | Await | Spawn | Done | Stop

"""Signals: durable messages to a run's inbox, by run id or by business key."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class SignalResult(enum.StrEnum):
    """What `app.signal` did."""

    DELIVERED = "delivered"  # in the run's inbox (and the run woken if it waited for it)
    DUPLICATE = "duplicate"  # the run already has a signal with this dedup_key: nothing written
    NOT_FOUND = "not_found"  # no such run (or no live run holds the correlation key)
    TERMINAL = "terminal"  # the run has finished: signals are no longer accepted


@dataclass(frozen=True, slots=True)
class Signal:
    """One signal as a step sees it."""

    id: str
    name: str
    payload: Any
    sent_at: datetime


class Signals(list[Signal]):
    """Signals in arrival order; `"paid" in signals` asks by name."""

    def __init__(self, items: Iterable[Signal] = ()) -> None:
        super().__init__(items)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return any(s.name == item for s in self)
        return super().__contains__(item)

    def named(self, name: str) -> list[Signal]:
        """The signals with this name, oldest first."""
        return [s for s in self if s.name == name]

    def get(self, name: str) -> Signal | None:
        """The oldest signal with this name, or None."""
        return next((s for s in self if s.name == name), None)

    def payload(self, name: str, default: Any = None) -> Any:
        """The payload of the oldest signal with this name (default when there is none)."""
        found = self.get(name)
        return default if found is None else found.payload

    @property
    def names(self) -> list[str]:
        return [s.name for s in self]

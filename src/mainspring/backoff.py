"""Retry delays: how long a failed attempt waits before the next one."""

from __future__ import annotations

import random
from dataclasses import dataclass

from mainspring.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Backoff:
    """A retry delay policy: `delay(attempt)` seconds after failed attempt number `attempt`.

    The delay is `base * factor ** (attempt - 1)` capped at `max`, then spread by
    +/- `jitter` (a fraction) so that runs failing together do not retry together.
    """

    base: float = 1.0
    factor: float = 2.0
    max: float = 300.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.base < 0 or self.max < 0 or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ConfigError(
                f"invalid backoff {self!r}: need base >= 0, max >= 0, factor >= 1, 0 <= jitter <= 1"
            )

    @classmethod
    def exponential(
        cls, base: float = 1.0, factor: float = 2.0, max: float = 300.0, jitter: float = 0.1
    ) -> Backoff:
        """Delays that grow by `factor` with each attempt."""
        return cls(base, factor, max, jitter)

    @classmethod
    def constant(cls, delay: float, jitter: float = 0.0) -> Backoff:
        """The same delay before every retry."""
        return cls(delay, 1.0, delay, jitter)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based)."""
        raw = min(self.max, self.base * self.factor ** max(0, attempt - 1))
        if self.jitter:
            raw *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, raw)

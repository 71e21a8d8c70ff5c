"""Token-bucket rate limits, enforced inside the claim so they hold across nodes.

`app.rate_limits.configure("stripe", allowed=100, period=60)` defines a
bucket that refills `allowed` tokens per `period` seconds and holds at most
`burst`. A step (or a run) that names the limit, `rate_limit="stripe"` or
`rate_limit=("stripe", tenant)` for one bucket per partition, is claimed only
when its bucket holds `weight` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mainspring.errors import ConfigError
from mainspring.store.base import BucketStatus, RateLimitConfig

if TYPE_CHECKING:
    from mainspring.app import App

RateLimitRef = str | tuple[str, object]


def bucket_key(ref: RateLimitRef) -> str:
    """The bucket key of a rate-limit reference: "name" or "name:partition"."""
    if isinstance(ref, tuple):
        if len(ref) != 2:
            raise ConfigError(f"rate_limit must be a name or (name, partition), got {ref!r}")
        name, partition = ref
        _check_name(name)
        return f"{name}:{partition}"
    _check_name(ref)
    return ref


def limit_name(key: str) -> str:
    return key.split(":", 1)[0]


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name or ":" in name:
        raise ConfigError(f"a rate limit name is a non-empty string without ':', got {name!r}")


@dataclass(frozen=True, slots=True)
class RateLimitStatus:
    """A rate limit's configuration and its buckets (tokens now, runs waiting)."""

    name: str
    config: RateLimitConfig | None
    buckets: list[BucketStatus]

    @property
    def waiting(self) -> int:
        return sum(b.waiting for b in self.buckets)


class RateLimits:
    """The app's rate limits: configured here, stored in the database when a store opens."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.configs: dict[str, RateLimitConfig] = {}

    def configure(
        self, name: str, *, allowed: int, period: float, burst: int | None = None
    ) -> RateLimitConfig:
        """Define (or redefine) a token bucket; stored cluster-wide when this app next connects."""
        _check_name(name)
        if allowed < 1:
            raise ConfigError(f"rate limit {name!r}: allowed must be >= 1, got {allowed}")
        if period <= 0:
            raise ConfigError(f"rate limit {name!r}: period must be > 0 seconds, got {period}")
        if burst is not None and burst < 1:
            raise ConfigError(f"rate limit {name!r}: burst must be >= 1, got {burst}")
        config = RateLimitConfig(name, allowed, float(period), burst or allowed)
        self.configs[name] = config
        self.app._rate_limits_dirty = True
        return config

    async def status_async(self, name: str) -> RateLimitStatus:
        store = await self.app.store()
        configs = await store.rate_limit_configs()
        return RateLimitStatus(name, configs.get(name), await store.rate_limit_status(name))

    def status(self, name: str) -> RateLimitStatus:
        """Tokens and waiting runs of each bucket of a rate limit."""
        return self.app._sync(self.status_async(name))

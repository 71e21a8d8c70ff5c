"""Partitions: the slices of an asset materialized (and stale) independently.

`DailyPartitions(start="2026-01-01")` has one key per day ("2026-01-01", ...)
up to today; `.range(a, b)` lists the keys between two of them (inclusive),
for backfills. An asset without partitions has the one partition "".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from mainspring.errors import ConfigError


class Partitions:
    """A set of partition keys; subclasses say which keys exist."""

    def keys(self) -> list[str]:
        """Every key that exists now, in order."""
        raise NotImplementedError

    def validate(self, key: str) -> str:
        """The key when it belongs to this set; ConfigError naming the set otherwise."""
        raise NotImplementedError

    def range(self, first: str, last: str) -> list[str]:
        """The keys from `first` to `last`, both included, in order."""
        self.validate(first)
        self.validate(last)
        keys = self.keys_between(first, last)
        if not keys:
            raise ConfigError(f"{self!r}: the range {first!r}..{last!r} is empty")
        return keys

    def keys_between(self, first: str, last: str) -> list[str]:
        keys = self.keys()
        return [k for k in keys if keys.index(first) <= keys.index(k) <= keys.index(last)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


@dataclass(frozen=True)
class StaticPartitions(Partitions):
    """A fixed list of keys (regions, tenants, ...)."""

    names: Sequence[str]

    def __post_init__(self) -> None:
        if not self.names or len(set(self.names)) != len(self.names):
            raise ConfigError("StaticPartitions needs distinct, non-empty keys")
        for name in self.names:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"a partition key is a non-empty string, got {name!r}")

    def keys(self) -> list[str]:
        return list(self.names)

    def validate(self, key: str) -> str:
        if key not in self.names:
            raise ConfigError(f"{key!r} is not a partition of {self!r}")
        return key


@dataclass(frozen=True)
class TimePartitions(Partitions):
    """One key per period from `start` (inclusive) to `end` (exclusive; default: now)."""

    start: str
    end: str | None = None
    fmt: str = "%Y-%m-%d"
    step: timedelta = timedelta(days=1)

    def __post_init__(self) -> None:
        self._parse(self.start)
        if self.end is not None:
            self._parse(self.end)

    def _parse(self, key: str) -> datetime:
        try:
            return datetime.strptime(key, self.fmt).replace(tzinfo=UTC)
        except (TypeError, ValueError):
            raise ConfigError(
                f"partition key {key!r} does not match the format {self.fmt!r} of {self!r}"
            ) from None

    def _next(self, moment: datetime) -> datetime:
        return moment + self.step

    def _limit(self) -> datetime:
        return self._parse(self.end) if self.end is not None else datetime.now(UTC)

    def keys(self) -> list[str]:
        return self._between(self._parse(self.start), self._limit(), inclusive=False)

    def _between(self, first: datetime, last: datetime, *, inclusive: bool) -> list[str]:
        keys, moment = [], first
        while moment < last or (inclusive and moment == last):
            keys.append(moment.strftime(self.fmt))
            moment = self._next(moment)
        return keys

    def validate(self, key: str) -> str:
        moment = self._parse(key)
        if moment < self._parse(self.start) or moment.strftime(self.fmt) != key:
            raise ConfigError(f"{key!r} is not a partition of {self!r}")
        if self.end is not None and moment >= self._parse(self.end):
            raise ConfigError(f"{key!r} is not a partition of {self!r} (its end is {self.end})")
        return key

    def keys_between(self, first: str, last: str) -> list[str]:
        return self._between(self._parse(first), self._parse(last), inclusive=True)


@dataclass(frozen=True)
class DailyPartitions(TimePartitions):
    """One key per UTC day: "2026-11-01"."""


@dataclass(frozen=True)
class HourlyPartitions(TimePartitions):
    """One key per UTC hour: "2026-11-01-13:00"."""

    fmt: str = "%Y-%m-%d-%H:%M"
    step: timedelta = timedelta(hours=1)


@dataclass(frozen=True)
class WeeklyPartitions(TimePartitions):
    """One key per week, from a start day (its weekday starts each week)."""

    step: timedelta = timedelta(weeks=1)

    def validate(self, key: str) -> str:
        super().validate(key)
        if (self._parse(key) - self._parse(self.start)).days % 7:
            raise ConfigError(f"{key!r} is not a week start of {self!r}")
        return key


@dataclass(frozen=True)
class MonthlyPartitions(TimePartitions):
    """One key per calendar month: "2026-11"."""

    fmt: str = "%Y-%m"

    def _next(self, moment: datetime) -> datetime:
        first = date(moment.year + moment.month // 12, moment.month % 12 + 1, 1)
        return datetime(first.year, first.month, 1, tzinfo=UTC)

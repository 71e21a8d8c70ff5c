"""Cron expressions for periodic tasks: parse once, then ask for the next tick.

`Cron.parse` accepts the standard five fields (minute, hour, day-of-month, month,
day-of-week) with `*`, numbers, ranges `a-b`, lists `a,b`, steps `*/n`, `a-b/n` and `a/n`,
three-letter month and weekday names (case-insensitive), day-of-week `0`-`7` (both `0` and
`7` are Sunday), and the aliases `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`,
`@midnight` and `@hourly`.

Day-of-month and day-of-week combine as in Vixie cron: a field counts as unrestricted when it
starts with `*` (so `*/2` counts too). If either is unrestricted a day must satisfy both; if
both are restricted a day matches when it satisfies either one.

All times are UTC. Every problem with an expression is reported as a `ConfigError` naming
the expression and the offending field.
"""

from __future__ import annotations

import calendar
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mainspring.errors import ConfigError

__all__ = ["Cron"]

_ALIASES: dict[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_MONTH_NAMES = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}
_WEEKDAY_NAMES = {
    name: number for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
}

# The longest each month can ever be (February counts its leap day).
_MAX_MONTH_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

# The Gregorian calendar repeats (dates and weekdays alike) every 400 years, so an expression
# that has not fired within that span never will.
_SEARCH_YEARS = 400


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int] | None = None
    names_hint: str = ""


_MINUTE = _Field("minute", 0, 59)
_HOUR = _Field("hour", 0, 23)
_DAY = _Field("day-of-month", 1, 31)
_MONTH = _Field("month", 1, 12, _MONTH_NAMES, "jan-dec")
_WEEKDAY = _Field("day-of-week", 0, 7, _WEEKDAY_NAMES, "sun-sat")
_FIELDS = (_MINUTE, _HOUR, _DAY, _MONTH, _WEEKDAY)


class _FieldError(Exception):
    """Raised inside field parsing; `Cron.parse` turns it into a `ConfigError`."""


@dataclass(frozen=True, slots=True, repr=False)
class Cron:
    """A parsed cron schedule; immutable, hashable, and safe to share between threads.

    Build one with `Cron.parse`. The value fields hold the allowed values of each field,
    sorted and de-duplicated; `weekdays` uses 0 for Sunday through 6 for Saturday.
    `either_day_matches` is true when day-of-month and day-of-week are both restricted, so a
    day matching either one is enough. `str(cron)` is the expression it was parsed from.
    """

    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days_of_month: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]
    either_day_matches: bool

    @classmethod
    def parse(cls, expr: str) -> Cron:
        """Parse a five-field expression or an `@` alias.

        Raises `ConfigError` naming the expression and the bad field if it is malformed or a
        value is out of range. An expression that is well-formed but can never fire (such as
        `0 0 31 2 *`) parses; `next_after` reports it.
        """
        text = expr.strip()
        if text.startswith("@"):
            alias = _ALIASES.get(text.lower())
            if alias is None:
                known = ", ".join(_ALIASES)
                raise ConfigError(
                    f"invalid cron expression {expr!r}: unknown alias {text!r} "
                    f"(expected one of {known})"
                )
            text = alias
        parts = text.split()
        if len(parts) != len(_FIELDS):
            raise ConfigError(
                f"invalid cron expression {expr!r}: expected 5 fields "
                f"(minute hour day-of-month month day-of-week), got {len(parts)}"
            )
        values: list[tuple[int, ...]] = []
        for spec, part in zip(_FIELDS, parts, strict=True):
            try:
                values.append(_parse_field(spec, part))
            except _FieldError as exc:
                raise ConfigError(f"invalid cron expression {expr!r}: {exc}") from None
        minutes, hours, days, months, raw_weekdays = values
        weekdays = tuple(sorted({day % 7 for day in raw_weekdays}))  # 7 is Sunday too
        day_star = parts[2].startswith("*")
        weekday_star = parts[4].startswith("*")
        return cls(
            expression=expr,
            minutes=minutes,
            hours=hours,
            days_of_month=days,
            months=months,
            weekdays=weekdays,
            either_day_matches=not (day_star or weekday_star),
        )

    def __str__(self) -> str:
        return self.expression

    def __repr__(self) -> str:
        return f"Cron({self.expression!r})"

    def matches(self, moment: datetime) -> bool:
        """Whether the minute containing `moment` (naive means UTC) is a tick."""
        utc = _to_utc(moment)
        return (
            utc.minute in self.minutes
            and utc.hour in self.hours
            and utc.month in self.months
            and self._day_matches(utc.year, utc.month, utc.day)
        )

    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after `moment`, as an aware UTC datetime on a whole minute.

        `moment` may be in any timezone; a naive datetime is taken to be UTC. Runs in time
        proportional to the number of candidate months and days, never minute by minute.
        Raises `ConfigError` if the expression can never fire (for example `0 0 31 2 *`) or
        its next tick would fall after year 9999.
        """
        if not self._can_ever_fire():
            raise ConfigError(
                f"invalid cron expression {self.expression!r}: day-of-month never falls in "
                "an allowed month, so it can never fire"
            )
        try:
            start = _to_utc(moment).replace(second=0, microsecond=0) + timedelta(minutes=1)
        except OverflowError:
            raise self._too_late(moment) from None
        year, month, day = start.year, start.month, start.day
        hour, minute = start.hour, start.minute
        last_year = min(start.year + _SEARCH_YEARS, datetime.max.year)
        while year <= last_year:
            if month not in self.months:
                next_month = _next_at_least(self.months, month)
                if next_month is None:
                    year, month = year + 1, self.months[0]
                else:
                    month = next_month
                day, hour, minute = 1, 0, 0
                continue
            found_day = self._first_day_from(year, month, day)
            if found_day is None:
                year, month = (year + 1, 1) if month == 12 else (year, month + 1)
                day, hour, minute = 1, 0, 0
                continue
            if found_day != day:
                day, hour, minute = found_day, 0, 0
            found_hour = _next_at_least(self.hours, hour)
            if found_hour is None:
                day, hour, minute = day + 1, 0, 0
                continue
            if found_hour != hour:
                hour, minute = found_hour, 0
            found_minute = _next_at_least(self.minutes, minute)
            if found_minute is None:
                hour, minute = hour + 1, 0
                continue
            return datetime(year, month, day, hour, found_minute, tzinfo=UTC)
        raise self._too_late(moment)

    def _too_late(self, moment: datetime) -> ConfigError:
        return ConfigError(
            f"cron expression {self.expression!r} has no tick after {moment.isoformat()} "
            f"that falls within {_SEARCH_YEARS} years and before year {datetime.max.year} ends"
        )

    def _can_ever_fire(self) -> bool:
        # Every weekday has a date in every month, and every valid (month, day) pair falls on
        # every weekday in some year, so only the day-of-month/month pairing can be impossible.
        if self.either_day_matches:
            return True
        return any(
            day <= _MAX_MONTH_DAYS[month] for month in self.months for day in self.days_of_month
        )

    def _day_matches(self, year: int, month: int, day: int) -> bool:
        in_month = day in self.days_of_month
        in_week = _weekday(year, month, day) in self.weekdays
        return (in_month or in_week) if self.either_day_matches else (in_month and in_week)

    def _first_day_from(self, year: int, month: int, day: int) -> int | None:
        last_day = calendar.monthrange(year, month)[1]
        if self.either_day_matches:
            candidates: Sequence[int] = range(day, last_day + 1)
        else:
            candidates = self.days_of_month[bisect_left(self.days_of_month, day) :]
        for candidate in candidates:
            if candidate > last_day:
                return None
            if self._day_matches(year, month, candidate):
                return candidate
        return None


def _to_utc(moment: datetime) -> datetime:
    if moment.utcoffset() is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _weekday(year: int, month: int, day: int) -> int:
    """Cron weekday number: 0 is Sunday through 6 is Saturday."""
    return (calendar.weekday(year, month, day) + 1) % 7


def _next_at_least(values: tuple[int, ...], value: int) -> int | None:
    index = bisect_left(values, value)
    return values[index] if index < len(values) else None


def _parse_field(spec: _Field, text: str) -> tuple[int, ...]:
    values: set[int] = set()
    for term in text.split(","):
        if not term:
            raise _FieldError(f"{spec.name} field {text!r} has an empty list item")
        values.update(_parse_term(spec, term))
    return tuple(sorted(values))


def _parse_term(spec: _Field, term: str) -> range:
    base, slash, step_text = term.partition("/")
    step = 1
    if slash:
        if not (step_text.isascii() and step_text.isdigit()) or int(step_text) == 0:
            raise _FieldError(f"{spec.name} step {step_text!r} must be a positive integer")
        step = int(step_text)
    if base == "*":
        return range(spec.low, spec.high + 1, step)
    first_text, dash, last_text = base.partition("-")
    first = _parse_value(spec, first_text)
    if dash:
        last = _parse_value(spec, last_text)
        if first > last:
            raise _FieldError(f"{spec.name} range {base!r} runs backwards ({first} > {last})")
    elif slash:
        last = spec.high
    else:
        last = first
    return range(first, last + 1, step)


def _parse_value(spec: _Field, text: str) -> int:
    if text.isascii() and text.isdigit():
        value = int(text)
        if not spec.low <= value <= spec.high:
            raise _FieldError(f"{spec.name} value {value} out of range {spec.low}-{spec.high}")
        return value
    if spec.names is not None and text.lower() in spec.names:
        return spec.names[text.lower()]
    expected = "a number"
    if spec.names is not None:
        expected += f" or a name ({spec.names_hint})"
    raise _FieldError(f"{spec.name} value {text!r} is not {expected}")

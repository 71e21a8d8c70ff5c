"""Specification of `mainspring.cron.Cron`: parsing, matching, and finding the next tick."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mainspring.cron import Cron
from mainspring.errors import ConfigError


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def ticks(expr: str, start: datetime, count: int) -> list[datetime]:
    cron = Cron.parse(expr)
    found: list[datetime] = []
    moment = start
    for _ in range(count):
        moment = cron.next_after(moment)
        found.append(moment)
    return found


# --- syntax forms -------------------------------------------------------------------------


def test_every_minute_fires_on_the_next_whole_minute() -> None:
    assert Cron.parse("* * * * *").next_after(utc(2024, 3, 5, 10, 7)) == utc(2024, 3, 5, 10, 8)


def test_next_after_is_strictly_after_and_drops_seconds() -> None:
    cron = Cron.parse("* * * * *")
    moment = datetime(2024, 3, 5, 10, 7, 59, 999_999, tzinfo=UTC)
    result = cron.next_after(moment)
    assert result == utc(2024, 3, 5, 10, 8)
    assert result.second == 0 and result.microsecond == 0
    assert result.tzinfo is UTC


def test_single_number_fires_once_an_hour_at_that_minute() -> None:
    assert ticks("15 * * * *", utc(2024, 1, 1, 0, 15), 3) == [
        utc(2024, 1, 1, 1, 15),
        utc(2024, 1, 1, 2, 15),
        utc(2024, 1, 1, 3, 15),
    ]


def test_every_five_minutes_fires_on_multiples_of_five() -> None:
    found = ticks("*/5 * * * *", utc(2024, 1, 1, 0, 2), 4)
    assert found == [utc(2024, 1, 1, 0, m) for m in (5, 10, 15, 20)]


def test_range_fires_only_inside_the_range() -> None:
    found = ticks("0 9-11 * * *", utc(2024, 1, 1, 8, 30), 4)
    assert found == [
        utc(2024, 1, 1, 9),
        utc(2024, 1, 1, 10),
        utc(2024, 1, 1, 11),
        utc(2024, 1, 2, 9),
    ]


def test_list_fires_on_each_listed_value() -> None:
    found = ticks("0,20,40 * * * *", utc(2024, 1, 1, 0, 0), 4)
    assert found == [
        utc(2024, 1, 1, 0, 20),
        utc(2024, 1, 1, 0, 40),
        utc(2024, 1, 1, 1, 0),
        utc(2024, 1, 1, 1, 20),
    ]


def test_stepped_range_fires_every_nth_value_inside_the_range() -> None:
    cron = Cron.parse("10-30/10 * * * *")
    assert cron.minutes == (10, 20, 30)


def test_start_with_step_runs_to_the_end_of_the_field() -> None:
    assert Cron.parse("50/3 * * * *").minutes == (50, 53, 56, 59)
    assert Cron.parse("0 2/6 * * *").hours == (2, 8, 14, 20)


def test_lists_may_mix_ranges_steps_and_numbers() -> None:
    cron = Cron.parse("1,5-7,50/5 * * * *")
    assert cron.minutes == (1, 5, 6, 7, 50, 55)


def test_month_names_are_accepted_case_insensitively() -> None:
    assert Cron.parse("0 0 1 jan,Mar,JUN-aug *").months == (1, 3, 6, 7, 8)


def test_weekday_names_are_accepted_case_insensitively() -> None:
    assert Cron.parse("0 0 * * Mon-fri").weekdays == (1, 2, 3, 4, 5)
    assert Cron.parse("0 0 * * SUN,sat").weekdays == (0, 6)


def test_weekday_seven_and_zero_both_mean_sunday() -> None:
    assert Cron.parse("0 0 * * 7").weekdays == (0,)
    assert Cron.parse("0 0 * * 0").weekdays == (0,)
    assert Cron.parse("0 0 * * 5-7").weekdays == (0, 5, 6)
    # 2024-03-10 is a Sunday.
    assert Cron.parse("0 12 * * 7").next_after(utc(2024, 3, 6)) == utc(2024, 3, 10, 12)


def test_weekday_restriction_fires_only_on_those_weekdays() -> None:
    # 2024-01-01 is a Monday.
    found = ticks("30 8 * * mon-fri", utc(2024, 1, 5, 9), 2)
    assert found == [utc(2024, 1, 8, 8, 30), utc(2024, 1, 9, 8, 30)]


def test_fields_may_be_separated_by_any_whitespace() -> None:
    cron = Cron.parse("  5\t4  * *   * ")
    assert cron.minutes == (5,) and cron.hours == (4,)


def test_str_returns_the_original_expression() -> None:
    assert str(Cron.parse("*/5 * * * *")) == "*/5 * * * *"
    assert str(Cron.parse("@daily")) == "@daily"
    assert repr(Cron.parse("@daily")) == "Cron('@daily')"


def test_equal_expressions_parse_to_equal_hashable_values() -> None:
    assert Cron.parse("0 * * * *") == Cron.parse("0 * * * *")
    assert len({Cron.parse("0 * * * *"), Cron.parse("0 * * * *")}) == 1


# --- aliases --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "equivalent"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
    ],
)
def test_alias_fires_like_its_five_field_equivalent(alias: str, equivalent: str) -> None:
    start = utc(2023, 6, 15, 13, 37)
    assert ticks(alias, start, 3) == ticks(equivalent, start, 3)


def test_yearly_fires_at_midnight_on_new_year() -> None:
    assert Cron.parse("@yearly").next_after(utc(2024, 1, 1)) == utc(2025, 1, 1)


def test_weekly_fires_at_midnight_on_sunday() -> None:
    # 2024-03-06 is a Wednesday.
    assert Cron.parse("@weekly").next_after(utc(2024, 3, 6, 12)) == utc(2024, 3, 10)


# --- day-of-month / day-of-week rule ------------------------------------------------------


def test_restricted_day_of_month_and_weekday_fire_when_either_matches() -> None:
    # The 13th, or any Friday. 2024-09-01 is a Sunday; Fridays are 6, 13, 20, 27.
    found = ticks("0 0 13 * fri", utc(2024, 9, 1), 5)
    assert found == [
        utc(2024, 9, 6),
        utc(2024, 9, 13),
        utc(2024, 9, 20),
        utc(2024, 9, 27),
        utc(2024, 10, 4),
    ]
    assert Cron.parse("0 0 13 * fri").either_day_matches


def test_star_weekday_leaves_only_day_of_month_in_force() -> None:
    assert ticks("0 0 13 * *", utc(2024, 9, 1), 2) == [utc(2024, 9, 13), utc(2024, 10, 13)]


def test_star_day_of_month_leaves_only_weekday_in_force() -> None:
    assert ticks("0 0 * * fri", utc(2024, 9, 1), 2) == [utc(2024, 9, 6), utc(2024, 9, 13)]


def test_stepped_star_counts_as_unrestricted_so_both_must_match() -> None:
    # Vixie cron: `*/2` starts with `*`, so odd days that are also Mondays.
    cron = Cron.parse("0 0 */2 * mon")
    assert not cron.either_day_matches
    # 2024-01-01 (Mon, odd), 2024-01-15 (Mon, odd), 2024-01-29 (Mon, odd).
    assert ticks("0 0 */2 * mon", utc(2023, 12, 31), 3) == [
        utc(2024, 1, 1),
        utc(2024, 1, 15),
        utc(2024, 1, 29),
    ]


# --- rollover ------------------------------------------------------------------------------


def test_last_minute_of_the_hour_rolls_into_the_next_hour() -> None:
    assert Cron.parse("0 * * * *").next_after(utc(2024, 1, 1, 10, 59)) == utc(2024, 1, 1, 11)


def test_last_minute_of_the_day_rolls_into_the_next_day() -> None:
    moment = utc(2024, 1, 1, 23, 59)
    assert Cron.parse("* * * * *").next_after(moment) == utc(2024, 1, 2)


def test_end_of_month_rolls_into_the_next_month() -> None:
    assert Cron.parse("0 0 1 * *").next_after(utc(2024, 4, 30, 12)) == utc(2024, 5, 1)


def test_end_of_year_rolls_into_the_next_year() -> None:
    assert Cron.parse("30 23 31 12 *").next_after(utc(2024, 12, 31, 23, 30)) == utc(
        2025, 12, 31, 23, 30
    )
    assert Cron.parse("* * * * *").next_after(utc(2024, 12, 31, 23, 59)) == utc(2025, 1, 1)


def test_day_31_skips_months_without_it() -> None:
    assert ticks("0 0 31 * *", utc(2024, 1, 31), 3) == [
        utc(2024, 3, 31),
        utc(2024, 5, 31),
        utc(2024, 7, 31),
    ]


def test_leap_day_fires_only_in_leap_years() -> None:
    assert ticks("0 0 29 2 *", utc(2023, 1, 1), 3) == [
        utc(2024, 2, 29),
        utc(2028, 2, 29),
        utc(2032, 2, 29),
    ]


def test_leap_day_skips_century_years_that_are_not_leap_years() -> None:
    # 2100 is not a leap year, so the gap after 2096 is eight years.
    assert Cron.parse("0 0 29 2 *").next_after(utc(2096, 3, 1)) == utc(2104, 2, 29)


def test_rare_leap_day_weekday_is_found_decades_ahead() -> None:
    # Feb 29 on a Sunday (`*/7` is Sunday only, and unrestricted so both must match).
    assert Cron.parse("0 0 29 2 */7").next_after(utc(2004, 3, 1)) == utc(2032, 2, 29)


# --- timezones ------------------------------------------------------------------------------


def test_naive_moment_is_treated_as_utc() -> None:
    naive = datetime(2024, 1, 1, 10, 7)
    assert Cron.parse("0 * * * *").next_after(naive) == utc(2024, 1, 1, 11)


def test_aware_moment_in_another_timezone_is_converted_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    moment = datetime(2024, 1, 1, 1, 30, tzinfo=plus_two)  # 2023-12-31 23:30 UTC
    result = Cron.parse("0 0 * * *").next_after(moment)
    assert result == utc(2024, 1, 1)
    assert result.tzinfo is UTC


def test_matches_reports_whether_a_minute_is_a_tick() -> None:
    cron = Cron.parse("*/15 9 * * mon")
    assert cron.matches(datetime(2024, 1, 1, 9, 30, 45, tzinfo=UTC))  # a Monday
    assert not cron.matches(utc(2024, 1, 1, 9, 31))
    assert not cron.matches(utc(2024, 1, 2, 9, 30))


# --- invalid and impossible expressions ------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "detail"),
    [
        ("61 * * * *", "minute value 61 out of range 0-59"),
        ("* 24 * * *", "hour value 24 out of range 0-23"),
        ("* * 0 * *", "day-of-month value 0 out of range 1-31"),
        ("* * 32 * *", "day-of-month value 32 out of range 1-31"),
        ("* * * 13 *", "month value 13 out of range 1-12"),
        ("* * * * 8", "day-of-week value 8 out of range 0-7"),
        ("* * * foo *", "month value 'foo' is not a number or a name (jan-dec)"),
        ("* * * * funday", "day-of-week value 'funday' is not a number or a name (sun-sat)"),
        ("jan * * * *", "minute value 'jan' is not a number"),
        ("*/0 * * * *", "minute step '0' must be a positive integer"),
        ("*/x * * * *", "minute step 'x' must be a positive integer"),
        ("*/ * * * *", "minute step '' must be a positive integer"),
        ("5-1 * * * *", "minute range '5-1' runs backwards"),
        ("1,,2 * * * *", "minute field '1,,2' has an empty list item"),
        ("1- * * * *", "minute value '' is not a number"),
        ("-1 * * * *", "minute value '' is not a number"),
        ("* * * * *", None),
    ],
)
def test_invalid_field_names_the_expression_and_field(expr: str, detail: str | None) -> None:
    if detail is None:
        Cron.parse(expr)  # control case: valid
        return
    with pytest.raises(ConfigError) as info:
        Cron.parse(expr)
    message = str(info.value)
    assert message.startswith(f"invalid cron expression {expr!r}: ")
    assert detail in message


def test_error_message_matches_the_documented_example() -> None:
    with pytest.raises(ConfigError) as info:
        Cron.parse("61 * * * *")
    assert str(info.value) == (
        "invalid cron expression '61 * * * *': minute value 61 out of range 0-59"
    )


@pytest.mark.parametrize("expr", ["", "   ", "* * * *", "* * * * * *", "0 0 1 1 * 2024"])
def test_wrong_number_of_fields_is_rejected(expr: str) -> None:
    with pytest.raises(ConfigError, match="expected 5 fields"):
        Cron.parse(expr)


@pytest.mark.parametrize("expr", ["@reboot", "@every_minute", "@"])
def test_unknown_alias_is_rejected(expr: str) -> None:
    with pytest.raises(ConfigError, match="unknown alias"):
        Cron.parse(expr)


def test_non_ascii_digits_are_rejected() -> None:
    with pytest.raises(ConfigError, match="minute value"):
        Cron.parse("\u0663 * * * *")  # ARABIC-INDIC DIGIT THREE


@pytest.mark.parametrize(
    "expr", ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 4,6,9,11 *", "* * 31 feb */2"]
)
def test_impossible_expression_raises_instead_of_searching_forever(expr: str) -> None:
    cron = Cron.parse(expr)
    with pytest.raises(ConfigError, match="can never fire"):
        cron.next_after(utc(2024, 1, 1))


def test_impossible_day_of_month_is_possible_when_weekday_is_restricted_too() -> None:
    # Both restricted: any Monday in February counts, so `31 2 mon` does fire.
    assert Cron.parse("0 0 31 2 mon").next_after(utc(2024, 1, 1)) == utc(2024, 2, 5)


def test_tick_after_the_last_representable_year_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no tick after"):
        Cron.parse("0 0 1 1 *").next_after(utc(9999, 6, 1))
    with pytest.raises(ConfigError, match="no tick after"):
        Cron.parse("* * * * *").next_after(datetime.max.replace(tzinfo=UTC))


# --- property: next_after agrees with an independent brute-force matcher -------------------


@dataclass(frozen=True)
class Spec:
    """A generated expression together with the values each field should allow."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    either_day: bool

    def matches(self, t: datetime) -> bool:
        in_month = t.day in self.days
        in_week = t.isoweekday() % 7 in self.weekdays
        day_ok = (in_month or in_week) if self.either_day else (in_month and in_week)
        return (
            t.minute in self.minutes and t.hour in self.hours and t.month in self.months and day_ok
        )

    def can_fire(self) -> bool:
        if self.either_day:
            return True
        longest = {2: 29, 4: 30, 6: 30, 9: 30, 11: 30}
        return any(d <= longest.get(m, 31) for m in self.months for d in self.days)


MONTH_NAMES = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
WEEKDAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


def render(value: int, names: list[str] | None, low: int, use_name: bool) -> str:
    if names is not None and use_name and 0 <= value - low < len(names):
        return names[value - low]
    return str(value)


@st.composite
def field_terms(
    draw: st.DrawFn, low: int, high: int, names: list[str] | None
) -> tuple[str, set[int]]:
    """One comma-separated field and the set of values it allows."""
    if draw(st.integers(0, 2)) == 0:
        return "*", set(range(low, high + 1))
    texts: list[str] = []
    values: set[int] = set()
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "range", "star_step", "range_step", "start_step"]))
        a = draw(st.integers(low, high))
        b = draw(st.integers(a, high))
        step = draw(st.integers(1, high - low + 2))
        name = draw(st.booleans())
        if kind == "value":
            texts.append(render(a, names, low, name))
            values.add(a)
        elif kind == "range":
            texts.append(f"{render(a, names, low, name)}-{render(b, names, low, name)}")
            values.update(range(a, b + 1))
        elif kind == "star_step":
            texts.append(f"*/{step}")
            values.update(range(low, high + 1, step))
        elif kind == "range_step":
            texts.append(f"{a}-{b}/{step}")
            values.update(range(a, b + 1, step))
        else:
            texts.append(f"{a}/{step}")
            values.update(range(a, high + 1, step))
    return ",".join(texts), values


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    minute, minutes = draw(field_terms(0, 59, None))
    hour, hours = draw(field_terms(0, 23, None))
    day, days = draw(field_terms(1, 31, None))
    month, months = draw(field_terms(1, 12, MONTH_NAMES))
    weekday, weekdays = draw(field_terms(0, 7, WEEKDAY_NAMES))
    return Spec(
        expression=f"{minute} {hour} {day} {month} {weekday}",
        minutes=frozenset(minutes),
        hours=frozenset(hours),
        days=frozenset(days),
        months=frozenset(months),
        weekdays=frozenset(d % 7 for d in weekdays),
        either_day=not (day.startswith("*") or weekday.startswith("*")),
    )


moments = st.datetimes(
    min_value=datetime(1990, 1, 1),
    max_value=datetime(2200, 12, 31),
    timezones=st.just(UTC),
)


@settings(max_examples=300, deadline=None)
@given(spec=specs(), moment=moments)
def test_next_after_is_the_first_matching_minute_after_the_moment(
    spec: Spec, moment: datetime
) -> None:
    cron = Cron.parse(spec.expression)
    if not spec.can_fire():
        event("expression can never fire")
        with pytest.raises(ConfigError):
            cron.next_after(moment)
        return
    result = cron.next_after(moment)
    assert result > moment
    assert result.tzinfo is UTC and result.second == 0 and result.microsecond == 0
    assert spec.matches(result)
    assert cron.matches(result)
    first = moment.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if result - first < timedelta(days=3):
        event("gap checked minute by minute")
        t = first
        while t < result:
            assert not spec.matches(t), f"{spec.expression!r} matched {t} before {result}"
            t += timedelta(minutes=1)


@settings(max_examples=200, deadline=None)
@given(spec=specs(), moment=moments)
def test_parsed_fields_equal_the_values_the_expression_allows(spec: Spec, moment: datetime) -> None:
    cron = Cron.parse(spec.expression)
    assert set(cron.minutes) == spec.minutes
    assert set(cron.hours) == spec.hours
    assert set(cron.days_of_month) == spec.days
    assert set(cron.months) == spec.months
    assert set(cron.weekdays) == spec.weekdays
    assert cron.either_day_matches == spec.either_day
    assert cron.matches(moment) == spec.matches(moment)

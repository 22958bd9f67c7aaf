"""Tests of the cron expression engine: parse, matches and next_after."""

from __future__ import annotations

import calendar
import pickle
from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from stagehand.cron import MAX_EXPRESSION_LENGTH, CronExpression, parse
from stagehand.exceptions import InvalidCronExpression

NY = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")
MINUTE = timedelta(minutes=1)


def firings(
    expression: str, start: datetime, count: int, tz: object = None
) -> list[str]:
    """The next *count* firings after *start*, as ISO strings in the entry's zone."""
    cron = parse(expression, tz)  # type: ignore[arg-type]
    out = []
    for _ in range(count):
        start = cron.next_after(start)
        out.append(start.isoformat())
    return out


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# -- syntax -----------------------------------------------------------------

SYNTAX_CASES = [
    # lists, ranges, steps (from the right base)
    (
        "0,15,45 * * * *",
        utc(2026, 6, 1, 10, 0),
        4,
        ["10:15", "10:45", "11:00", "11:15"],
    ),
    ("10-12 * * * *", utc(2026, 6, 1, 10, 11), 3, ["10:12", "11:10", "11:11"]),
    (
        "5/15 * * * *",
        utc(2026, 6, 1, 10, 0),
        5,
        ["10:05", "10:20", "10:35", "10:50", "11:05"],
    ),
    ("*/7 * * * *", utc(2026, 6, 1, 10, 50), 3, ["10:56", "11:00", "11:07"]),
    (
        "10-30/10 * * * *",
        utc(2026, 6, 1, 10, 0),
        4,
        ["10:10", "10:20", "10:30", "11:10"],
    ),
    ("0 */6 * * *", utc(2026, 6, 1, 10, 0), 3, ["12:00", "18:00", "00:00"]),
    ("0 20/2 * * *", utc(2026, 6, 1, 10, 0), 3, ["20:00", "22:00", "20:00"]),
    (
        "0 22-23,0-2 * * *",
        utc(2026, 6, 1, 21, 0),
        5,
        ["22:00", "23:00", "00:00", "01:00", "02:00"],
    ),
    ("1,*/20 * * * *", utc(2026, 6, 1, 10, 0), 4, ["10:01", "10:20", "10:40", "11:00"]),
]


@pytest.mark.parametrize(("expression", "start", "count", "expected"), SYNTAX_CASES)
def test_minute_and_hour_syntax(
    expression: str, start: datetime, count: int, expected: list[str]
) -> None:
    assert [s[11:16] for s in firings(expression, start, count)] == expected


DAY_CASES = [
    (
        "0 0 */10 * *",
        date(2026, 1, 1),
        5,
        ["2026-01-11", "2026-01-21", "2026-01-31", "2026-02-01", "2026-02-11"],
    ),
    ("0 0 1 */4 *", date(2026, 1, 1), 3, ["2026-05-01", "2026-09-01", "2027-01-01"]),
    # month names in any case, ranges of names, a name with a step
    ("0 0 1 JAN,jul *", date(2026, 1, 1), 2, ["2026-07-01", "2027-01-01"]),
    (
        "0 0 1 Feb-apr *",
        date(2026, 1, 1),
        4,
        ["2026-02-01", "2026-03-01", "2026-04-01", "2027-02-01"],
    ),
    (
        "0 0 1 mar/3 *",
        date(2026, 1, 1),
        4,
        ["2026-03-01", "2026-06-01", "2026-09-01", "2026-12-01"],
    ),
    # weekday names in any case (2026-06-01 is a Monday)
    (
        "0 0 * * Mon-FRI",
        date(2026, 6, 4),
        3,
        ["2026-06-05", "2026-06-08", "2026-06-09"],
    ),
    (
        "0 0 * * sat,SUN",
        date(2026, 6, 1),
        3,
        ["2026-06-06", "2026-06-07", "2026-06-13"],
    ),
    # Sunday is 0 or 7, also inside ranges; 'fri-sun' reads sun as 7
    ("0 0 * * 0", date(2026, 6, 1), 2, ["2026-06-07", "2026-06-14"]),
    ("0 0 * * 7", date(2026, 6, 1), 2, ["2026-06-07", "2026-06-14"]),
    (
        "0 0 * * 5-7",
        date(2026, 6, 1),
        4,
        ["2026-06-05", "2026-06-06", "2026-06-07", "2026-06-12"],
    ),
    (
        "0 0 * * fri-sun",
        date(2026, 6, 1),
        4,
        ["2026-06-05", "2026-06-06", "2026-06-07", "2026-06-12"],
    ),
    # 'a/n' runs to the field's maximum, which is 7 (Sunday) for day-of-week
    (
        "0 0 * * 1/2",
        date(2026, 6, 1),
        5,
        ["2026-06-03", "2026-06-05", "2026-06-07", "2026-06-08", "2026-06-10"],
    ),
    # both day fields restricted: a day matches if EITHER matches (13th OR Friday)
    (
        "0 0 13 * 5",
        date(2026, 6, 1),
        4,
        ["2026-06-05", "2026-06-12", "2026-06-13", "2026-06-19"],
    ),
    (
        "0 0 1,15 * sun",
        date(2026, 6, 1),
        4,
        ["2026-06-07", "2026-06-14", "2026-06-15", "2026-06-21"],
    ),
    # a day field starting with '*' is 'unrestricted' for the rule: AND
    (
        "0 0 */2 * 1",
        date(2026, 6, 1),
        4,
        ["2026-06-15", "2026-06-29", "2026-07-13", "2026-07-27"],
    ),
    (
        "0 0 1-7 * */7",
        date(2026, 1, 1),
        4,  # the first Sunday of each month
        ["2026-01-04", "2026-02-01", "2026-03-01", "2026-04-05"],
    ),
    ("0 0 * * 1", date(2026, 6, 1), 2, ["2026-06-08", "2026-06-15"]),
    ("0 0 1 * *", date(2026, 6, 1), 2, ["2026-07-01", "2026-08-01"]),
    # February 30th never comes, but Mondays in February do (OR rule)
    ("0 0 30 2 1", date(2026, 1, 1), 3, ["2026-02-02", "2026-02-09", "2026-02-16"]),
    # leap days
    ("0 0 29 2 *", date(2026, 1, 1), 3, ["2028-02-29", "2032-02-29", "2036-02-29"]),
    ("0 12 29 feb *", date(2028, 2, 28), 1, ["2028-02-29"]),
    # end of month and end of year
    ("0 0 31 * *", date(2026, 1, 31), 3, ["2026-03-31", "2026-05-31", "2026-07-31"]),
    ("59 23 31 12 *", date(2026, 1, 1), 2, ["2026-12-31", "2027-12-31"]),
]


@pytest.mark.parametrize(("expression", "start", "count", "expected"), DAY_CASES)
def test_day_fields(
    expression: str, start: date, count: int, expected: list[str]
) -> None:
    begin = datetime(start.year, start.month, start.day, tzinfo=UTC)
    assert [s[:10] for s in firings(expression, begin, count)] == expected


def test_end_of_year_rollover() -> None:
    assert firings("* * * * *", utc(2026, 12, 31, 23, 59), 2) == [
        "2027-01-01T00:00:00+00:00",
        "2027-01-01T00:01:00+00:00",
    ]
    assert firings("0 0 1 1 *", utc(2026, 12, 31, 23, 59), 1) == [
        "2027-01-01T00:00:00+00:00"
    ]


def test_feb_29_on_a_sunday_crosses_the_2100_gap() -> None:
    """The rarest date (AND rule): 40 years apart around 2100, found quickly."""
    expected = [
        y
        for y in range(2026, 2200)
        if calendar.isleap(y) and date(y, 2, 29).isoweekday() == 7
    ][:4]
    assert expected == [2032, 2060, 2088, 2128]
    got = firings("0 0 29 2 */7", utc(2026, 1, 1), 4)
    assert [int(s[:4]) for s in got] == expected


NICKNAME_CASES = [
    ("@yearly", ["2027-01-01T00:00:00+00:00", "2028-01-01T00:00:00+00:00"]),
    ("@annually", ["2027-01-01T00:00:00+00:00", "2028-01-01T00:00:00+00:00"]),
    ("@monthly", ["2026-07-01T00:00:00+00:00", "2026-08-01T00:00:00+00:00"]),
    ("@weekly", ["2026-06-07T00:00:00+00:00", "2026-06-14T00:00:00+00:00"]),
    ("@daily", ["2026-06-02T00:00:00+00:00", "2026-06-03T00:00:00+00:00"]),
    ("@midnight", ["2026-06-02T00:00:00+00:00", "2026-06-03T00:00:00+00:00"]),
    ("@hourly", ["2026-06-01T11:00:00+00:00", "2026-06-01T12:00:00+00:00"]),
    ("@DAILY", ["2026-06-02T00:00:00+00:00", "2026-06-03T00:00:00+00:00"]),
    ("  @Hourly ", ["2026-06-01T11:00:00+00:00", "2026-06-01T12:00:00+00:00"]),
]


@pytest.mark.parametrize(("expression", "expected"), NICKNAME_CASES)
def test_nicknames(expression: str, expected: list[str]) -> None:
    assert firings(expression, utc(2026, 6, 1, 10, 30), 2) == expected


# -- daylight saving time ---------------------------------------------------

DST_CASES = [
    # New York, spring forward 2026-03-08 02:00 EST -> 03:00 EDT
    (
        "30 2 * * *",
        NY,
        datetime(2026, 3, 7, 12, tzinfo=NY),
        3,
        [
            "2026-03-08T03:00:00-04:00",
            "2026-03-09T02:30:00-04:00",
            "2026-03-10T02:30:00-04:00",
        ],
    ),
    (
        "0,30 2 * * *",
        NY,
        datetime(2026, 3, 7, 12, tzinfo=NY),
        3,  # collapse to one
        [
            "2026-03-08T03:00:00-04:00",
            "2026-03-09T02:00:00-04:00",
            "2026-03-09T02:30:00-04:00",
        ],
    ),
    (
        "0 1-3 * * *",
        NY,
        datetime(2026, 3, 8, tzinfo=NY),
        3,  # 02:00 and 03:00 -> one run
        [
            "2026-03-08T01:00:00-05:00",
            "2026-03-08T03:00:00-04:00",
            "2026-03-09T01:00:00-04:00",
        ],
    ),
    (
        "*/30 * * * *",
        NY,
        datetime(2026, 3, 8, 1, tzinfo=NY),
        3,
        [
            "2026-03-08T01:30:00-05:00",
            "2026-03-08T03:00:00-04:00",
            "2026-03-08T03:30:00-04:00",
        ],
    ),
    (
        "*/15 2 * * *",
        NY,
        datetime(2026, 3, 7, 12, tzinfo=NY),
        2,  # wildcard: none in the gap
        ["2026-03-09T02:00:00-04:00", "2026-03-09T02:15:00-04:00"],
    ),
    # New York, fall back 2026-11-01 02:00 EDT -> 01:00 EST
    (
        "30 1 * * *",
        NY,
        datetime(2026, 10, 31, 12, tzinfo=NY),
        2,
        ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
    ),
    (
        "0 1-3 * * *",
        NY,
        datetime(2026, 11, 1, tzinfo=NY),
        4,
        [
            "2026-11-01T01:00:00-04:00",
            "2026-11-01T02:00:00-05:00",
            "2026-11-01T03:00:00-05:00",
            "2026-11-02T01:00:00-05:00",
        ],
    ),
    (
        "*/15 * * * *",
        NY,
        datetime(2026, 11, 1, 0, 50, tzinfo=NY),
        9,
        [
            "2026-11-01T01:00:00-04:00",
            "2026-11-01T01:15:00-04:00",
            "2026-11-01T01:30:00-04:00",
            "2026-11-01T01:45:00-04:00",
            "2026-11-01T01:00:00-05:00",
            "2026-11-01T01:15:00-05:00",
            "2026-11-01T01:30:00-05:00",
            "2026-11-01T01:45:00-05:00",
            "2026-11-01T02:00:00-05:00",
        ],
    ),
    (
        "@hourly",
        NY,
        datetime(2026, 11, 1, 0, 30, tzinfo=NY),
        3,  # '0 * * * *': wildcard
        [
            "2026-11-01T01:00:00-04:00",
            "2026-11-01T01:00:00-05:00",
            "2026-11-01T02:00:00-05:00",
        ],
    ),
    # London, spring forward 2026-03-29 01:00 GMT -> 02:00 BST
    (
        "30 1 * * *",
        LONDON,
        datetime(2026, 3, 28, 12, tzinfo=LONDON),
        2,
        ["2026-03-29T02:00:00+01:00", "2026-03-30T01:30:00+01:00"],
    ),
    (
        "0 2 * * *",
        LONDON,
        datetime(2026, 3, 28, 12, tzinfo=LONDON),
        2,
        ["2026-03-29T02:00:00+01:00", "2026-03-30T02:00:00+01:00"],
    ),
    (
        "*/30 * * * *",
        LONDON,
        datetime(2026, 3, 29, 0, 15, tzinfo=LONDON),
        3,
        [
            "2026-03-29T00:30:00+00:00",
            "2026-03-29T02:00:00+01:00",
            "2026-03-29T02:30:00+01:00",
        ],
    ),
    # London, fall back 2026-10-25 02:00 BST -> 01:00 GMT
    (
        "30 1 * * *",
        LONDON,
        datetime(2026, 10, 24, 12, tzinfo=LONDON),
        2,
        ["2026-10-25T01:30:00+01:00", "2026-10-26T01:30:00+00:00"],
    ),
    (
        "*/30 1 * * *",
        LONDON,
        datetime(2026, 10, 24, 12, tzinfo=LONDON),
        5,
        [
            "2026-10-25T01:00:00+01:00",
            "2026-10-25T01:30:00+01:00",
            "2026-10-25T01:00:00+00:00",
            "2026-10-25T01:30:00+00:00",
            "2026-10-26T01:00:00+00:00",
        ],
    ),
    (
        "@daily",
        LONDON,
        datetime(2026, 10, 24, 12, tzinfo=LONDON),
        2,
        ["2026-10-25T00:00:00+01:00", "2026-10-26T00:00:00+00:00"],
    ),
]


@pytest.mark.parametrize(("expression", "tz", "start", "count", "expected"), DST_CASES)
def test_dst(
    expression: str, tz: ZoneInfo, start: datetime, count: int, expected: list[str]
) -> None:
    assert firings(expression, start, count, tz) == expected


def test_dst_matches_each_occurrence() -> None:
    first = datetime(2026, 11, 1, 1, 30, tzinfo=NY)  # 01:30 EDT
    second = datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=NY)  # 01:30 EST
    assert first.utcoffset() != second.utcoffset()
    fixed, wildcard = parse("30 1 * * *", NY), parse("*/30 1 * * *", NY)
    assert fixed.matches(first)
    assert not fixed.matches(second)
    assert wildcard.matches(first)
    assert wildcard.matches(second)
    gap_end = datetime(2026, 3, 8, 3, 0, tzinfo=NY)
    assert parse("30 2 * * *", NY).matches(gap_end)
    assert not parse("30 2 * * *", NY).matches(gap_end + MINUTE)
    assert not parse("*/30 2 * * *", NY).matches(gap_end)


def test_results_are_in_the_entry_zone_whatever_the_input_zone() -> None:
    cron = parse("0 9 * * *", "Europe/London")
    got = cron.next_after(datetime(2026, 6, 1, 12, tzinfo=NY))  # 17:00 in London
    assert got.tzinfo is LONDON
    assert got.isoformat() == "2026-06-02T09:00:00+01:00"


# -- matches ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "when", "expected"),
    [
        ("0 10 * * *", utc(2026, 6, 1, 10, 0), True),
        ("0 10 * * *", datetime(2026, 6, 1, 10, 0, 59, 999999, tzinfo=UTC), True),
        ("0 10 * * *", utc(2026, 6, 1, 10, 1), False),
        ("0 10 * * *", datetime(2026, 6, 1, 6, 0, tzinfo=NY), True),  # 10:00 UTC
        ("0 0 13 * 5", utc(2026, 6, 5), True),  # a Friday
        ("0 0 13 * 5", utc(2026, 6, 13), True),  # the 13th
        ("0 0 13 * 5", utc(2026, 6, 14), False),
        ("0 0 */2 * 1", utc(2026, 6, 1), True),  # an odd day AND a Monday
        ("0 0 */2 * 1", utc(2026, 6, 3), False),  # odd, but a Wednesday
        ("0 0 */2 * 1", utc(2026, 6, 8), False),  # Monday the 8th: even
        ("* * * * *", utc(2026, 6, 1, 10, 7), True),
        ("0 0 29 2 *", utc(2028, 2, 29), True),
    ],
)
def test_matches(expression: str, when: datetime, expected: bool) -> None:
    assert parse(expression).matches(when) is expected


def test_next_after_is_strictly_after_and_minute_aligned() -> None:
    cron = parse("0 10 * * *")
    assert cron.next_after(utc(2026, 6, 1, 10, 0)) == utc(2026, 6, 2, 10, 0)
    late = datetime(2026, 6, 1, 9, 59, 30, 5, tzinfo=UTC)
    assert cron.next_after(late) == utc(2026, 6, 1, 10, 0)
    assert cron.next_after(datetime(2026, 6, 1, 10, 0, 1, tzinfo=UTC)) == utc(
        2026, 6, 2, 10
    )


CONSISTENCY_EXPRESSIONS = [
    "30 2 * * *",
    "0,30 2 * * *",
    "30 1 * * *",
    "0 1-3 * * *",
    "*/15 * * * *",
    "* 2 * * *",
    "*/20 1 * * *",
    "0 0 * * *",
    "@hourly",
    "15 3 * * 0",
]
TRANSITIONS = [
    (NY, datetime(2026, 3, 8, 7, tzinfo=UTC)),
    (NY, datetime(2026, 11, 1, 6, tzinfo=UTC)),
    (LONDON, datetime(2026, 3, 29, 1, tzinfo=UTC)),
    (LONDON, datetime(2026, 10, 25, 1, tzinfo=UTC)),
]


def reference_matches(cron: CronExpression, t: datetime, wall_ok) -> bool:  # type: ignore[no-untyped-def]
    """The DST rules written per instant, independently of the implementation."""
    wall = t.astimezone(cron.tz)
    naive = wall.replace(tzinfo=None)
    before = (t - MINUTE).astimezone(cron.tz).replace(tzinfo=None)
    expression = " ".join(cron.expression.split()[:2])
    if "*" in expression or cron.expression == "@hourly":
        return bool(wall_ok(naive))  # wildcard: every real instant that matches
    repeat = wall.fold == 1 and wall.replace(fold=0).utcoffset() != wall.utcoffset()
    if wall_ok(naive) and not repeat:
        return True
    skipped = int((naive - before) / MINUTE) - 1  # wall minutes that never happened
    return any(wall_ok(before + k * MINUTE) for k in range(1, skipped + 1))


WALL = {
    "30 2 * * *": lambda w: (w.hour, w.minute) == (2, 30),
    "0,30 2 * * *": lambda w: w.hour == 2 and w.minute in (0, 30),
    "30 1 * * *": lambda w: (w.hour, w.minute) == (1, 30),
    "0 1-3 * * *": lambda w: w.minute == 0 and 1 <= w.hour <= 3,
    "*/15 * * * *": lambda w: w.minute % 15 == 0,
    "* 2 * * *": lambda w: w.hour == 2,
    "*/20 1 * * *": lambda w: w.hour == 1 and w.minute % 20 == 0,
    "0 0 * * *": lambda w: (w.hour, w.minute) == (0, 0),
    "@hourly": lambda w: w.minute == 0,
    "15 3 * * 0": lambda w: (w.hour, w.minute) == (3, 15) and w.isoweekday() == 7,
}


@pytest.mark.parametrize("expression", CONSISTENCY_EXPRESSIONS)
@pytest.mark.parametrize(("tz", "transition"), TRANSITIONS)
def test_matches_agrees_with_next_after_around_dst(
    expression: str, tz: ZoneInfo, transition: datetime
) -> None:
    cron = parse(expression, tz)
    start, stop = transition - timedelta(hours=26), transition + timedelta(hours=26)
    minutes = [start + k * MINUTE for k in range(1, int((stop - start) / MINUTE))]
    by_matches = [t for t in minutes if cron.matches(t)]
    by_next, t = [], start
    while (t := cron.next_after(t)) < stop:
        by_next.append(t.astimezone(UTC))
    assert by_next == by_matches
    assert by_matches == [
        t for t in minutes if reference_matches(cron, t, WALL[expression])
    ]
    assert by_matches  # every window has some firings


# -- errors -----------------------------------------------------------------

INVALID_CASES = [
    ("61 * * * *", ["minute", "61", "0-59"]),
    ("* 24 * * *", ["hour", "24", "0-23"]),
    ("* * 0 * *", ["day-of-month", "0", "1-31"]),
    ("* * 32 * *", ["day-of-month", "32"]),
    ("* * * 13 *", ["month", "13", "1-12"]),
    ("* * * * 8", ["day-of-week", "8", "0-7"]),
    ("5-1 * * * *", ["minute", "5-1", "reversed"]),
    ("0 22-2 * * *", ["hour", "22-2", "reversed", "22-23,0-2"]),
    ("0 0 * * fri-mon", ["day-of-week", "fri-mon", "reversed"]),
    ("*/0 * * * *", ["minute", "*/0", "step 0"]),
    ("0 0 1-10/0 * *", ["day-of-month", "1-10/0", "step 0"]),
    ("*/61 * * * *", ["minute", "step 61", "1-60"]),
    ("0 0 * * * *", ["6", "seconds"]),
    ("0 0 0 * * * 2026", ["7", "seconds"]),
    ("0 0 * *", ["expected 5 fields", "got 4"]),
    ("* * * foo *", ["month", "foo", "jan"]),
    ("* * * january *", ["month", "january"]),
    ("* * * * funday", ["day-of-week", "funday", "sun"]),
    ("mon * * * *", ["minute", "mon"]),
    ("0 0 * jan-foo *", ["month", "foo"]),
    ("1,,2 * * * *", ["minute", "empty list item", "comma"]),
    ("1, * * * *", ["minute", "empty list item"]),
    (",1 * * * *", ["minute", "empty list item"]),
    ("1-2-3 * * * *", ["minute", "1-2-3"]),
    ("*-5 * * * *", ["minute", "*-5"]),
    ("-5 * * * *", ["minute", "-5"]),
    ("5/ * * * *", ["minute", "5/"]),
    ("*/5/2 * * * *", ["minute", "*/5/2"]),
    ("0 0 ? * *", ["day-of-month", "?"]),
    ("0 0 L * *", ["day-of-month", "L"]),
    ("0 0 30 2 *", ["day-of-month", "30", "feb", "29"]),
    ("0 0 31 4,6,9,11 *", ["day-of-month", "31", "apr,jun,sep,nov", "30"]),
    ("0 0 30,31 feb */2", ["day-of-month", "30,31", "feb"]),
    ("@reboot", ["@reboot", "not supported"]),
    ("@REBOOT", ["@reboot"]),
    ("@fortnightly", ["@fortnightly", "@daily"]),
    ("@", ["nickname", "'@'"]),
    ("@daily echo hi", ["nickname", "echo hi"]),
    ("", ["empty"]),
    ("   ", ["empty"]),
    ("0-99999999 * * * *", ["minute", "99999999"]),
    ("*/99999999 * * * *", ["minute", "99999999"]),
    ("0 0 " + "9" * 900 + " * *", ["day-of-month", "out of range"]),
    ("１ * * * *", ["minute", "１"]),  # a full-width digit
]


@pytest.mark.parametrize(("expression", "fragments"), INVALID_CASES)
def test_invalid_expressions(expression: str, fragments: list[str]) -> None:
    with pytest.raises(InvalidCronExpression) as info:
        parse(expression)
    message = str(info.value)
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "expression",
    [
        "* " * 50_000,
        "1," * 50_000 + "2 * * * *",
        "0-" + "9" * 99_990 + " * * * *",
        ",".join(["*/1"] * 240) + " * * * *",  # long but under the cap: expands fine
    ],
)
def test_hostile_input_is_answered_quickly(expression: str) -> None:
    if len(expression) <= MAX_EXPRESSION_LENGTH:
        assert parse(expression).next_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 0, 1)
        return
    with pytest.raises(InvalidCronExpression, match=f"{len(expression)} characters"):
        parse(expression)


def test_leap_day_is_valid() -> None:
    assert parse("0 0 29 2 *").expression == "0 0 29 2 *"


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "", "../etc/passwd", "America"])
def test_unknown_time_zone(zone: str) -> None:
    with pytest.raises(InvalidCronExpression, match="unknown time zone") as info:
        parse("* * * * *", zone)
    assert repr(zone) in str(info.value)


@pytest.mark.parametrize("method", ["matches", "next_after"])
def test_naive_datetimes_are_refused(method: str) -> None:
    naive = datetime(2026, 3, 8, 2, 30)
    with pytest.raises(
        ValueError, match=r"naive datetime\.datetime\(2026, 3, 8, 2, 30\)"
    ):
        getattr(parse("* * * * *", NY), method)(naive)


def test_wrong_types() -> None:
    with pytest.raises(TypeError):
        parse(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse("* * * * *", 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse("* * * * *").next_after(date(2026, 1, 1))  # type: ignore[arg-type]


# -- the object ---------------------------------------------------------------


def test_attributes_repr_equality_hash_pickle() -> None:
    cron = parse("  30   2 * *\tmon ", "America/New_York")
    assert cron.expression == "30 2 * * mon"
    assert cron.tz is NY
    assert str(cron) == "30 2 * * mon"
    assert repr(cron) == "CronExpression('30 2 * * mon', tz='America/New_York')"
    assert cron == parse("30 2 * * mon", NY)
    assert hash(cron) == hash(parse("30 2 * * mon", NY))
    assert cron != parse("30 2 * * mon", LONDON)
    assert cron != parse("30 2 * * 1", NY)
    assert cron != "30 2 * * mon"
    assert len({cron, parse("30 2 * * mon", NY), parse("@daily")}) == 2
    assert pickle.loads(pickle.dumps(cron)) == cron
    assert isinstance(cron, CronExpression)


def test_names_equal_in_any_case() -> None:
    assert parse("@DAILY") == parse("@daily")
    assert parse("0 9 * JAN Mon").expression == "0 9 * jan mon"
    assert hash(parse("0 9 * JAN Mon")) == hash(parse("0 9 * jan mon"))


def test_attributes_are_read_only() -> None:
    cron = parse("0 0 * * *")
    with pytest.raises(AttributeError):
        cron.expression = "1 1 * * *"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cron.tz = NY  # type: ignore[misc]


def test_nothing_left_before_the_end_of_the_calendar() -> None:
    cron = parse("0 0 29 2 *")
    assert cron.next_after(utc(9995, 1, 1)).isoformat() == "9996-02-29T00:00:00+00:00"
    with pytest.raises(InvalidCronExpression, match="does not fire"):
        cron.next_after(utc(9996, 3, 1))


def test_default_time_zone_is_utc() -> None:
    cron = parse("0 0 * * *")
    assert cron.tz is UTC
    assert repr(cron) == "CronExpression('0 0 * * *', tz='UTC')"
    assert cron == parse("0 0 * * *", "UTC") == parse("0 0 * * *", UTC)
    assert hash(cron) == hash(parse("0 0 * * *", "UTC"))
    assert (
        cron.next_after(utc(2026, 1, 1, 12)).isoformat() == "2026-01-02T00:00:00+00:00"
    )


def test_fixed_offset_tzinfo() -> None:
    plus_five = timezone(timedelta(hours=5, minutes=30))
    got = parse("0 9 * * *", plus_five).next_after(utc(2026, 1, 1))
    assert got.isoformat() == "2026-01-01T09:00:00+05:30"


# -- croniter: the behaviour this engine avoids ---------------------------------
# Stagehand evaluates cron itself (see docs/cron.md).  These tests pin what the
# declared dependency croniter 7.0.0 does, next to what Stagehand does instead.


@pytest.fixture
def croniter():  # type: ignore[no-untyped-def]
    module = pytest.importorskip("croniter")
    return module.croniter


def test_croniter_runs_a_fixed_entry_twice_on_fall_back_night(croniter) -> None:  # type: ignore[no-untyped-def]
    it = croniter("30 1 * * *", datetime(2026, 10, 31, 12, tzinfo=NY))
    got = [it.get_next(datetime).isoformat() for _ in range(2)]
    assert got == ["2026-11-01T01:30:00-04:00", "2026-11-01T01:30:00-05:00"]
    assert firings("30 1 * * *", datetime(2026, 10, 31, 12, tzinfo=NY), 2, NY) == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-02T01:30:00-05:00",
    ]


def test_croniter_ors_a_star_prefixed_day_field(croniter) -> None:  # type: ignore[no-untyped-def]
    it = croniter("0 0 */2 * 1", datetime(2026, 6, 1, tzinfo=UTC))
    got = [it.get_next(datetime).strftime("%a %d") for _ in range(3)]
    assert got == ["Wed 03", "Fri 05", "Sun 07"]  # odd days OR Mondays
    assert [s[:10] for s in firings("0 0 */2 * 1", utc(2026, 6, 1), 2)] == [
        "2026-06-15",
        "2026-06-29",  # odd days AND Mondays, as Vixie cron
    ]


def test_croniter_accepts_six_fields(croniter) -> None:  # type: ignore[no-untyped-def]
    assert croniter.is_valid("0 0 * * * 30")
    it = croniter("0 0 * * * 30", datetime(2026, 1, 1, tzinfo=UTC))
    assert it.get_next(datetime).isoformat() == "2026-01-01T00:00:30+00:00"
    with pytest.raises(InvalidCronExpression, match="seconds"):
        parse("0 0 * * * 30")


def test_croniter_accepts_impossible_dates_unless_strict(croniter) -> None:  # type: ignore[no-untyped-def]
    for expression in ("0 0 30 2 *", "0 0 31 4,6,9,11 *"):
        assert croniter.is_valid(expression)
        assert not croniter.is_valid(expression, strict=True)
        with pytest.raises(InvalidCronExpression, match="never occurs"):
            parse(expression)

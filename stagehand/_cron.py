"""Cron expression parser and evaluator (Vixie cron semantics).

Times are handled as UTC instants internally.  A cron entry matches *wall
times* (local date, hour, minute) in its time zone; each matching wall time
is mapped to real instants like this (see docs/cron.md):

* a wall time that occurs once maps to that instant;
* a wall time that occurs twice (fall-back overlap) maps to its first
  occurrence for a *fixed* entry, and to both occurrences for a *wildcard*
  entry (one with ``*`` in its minute or hour field);
* a wall time that never occurs (spring-forward gap) maps to the first
  instant after the gap for a fixed entry, and to nothing for a wildcard
  entry.

`CronExpression.matches` and `CronExpression.next_after` both work from that
one mapping, so they always agree.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from stagehand.exceptions import InvalidCronExpression

__all__ = [
    "MAX_EXPRESSION_LENGTH",
    "NICKNAMES",
    "SEARCH_YEARS",
    "CronExpression",
    "parse",
]

#: Longest expression accepted; a real one is under 400 characters even with
#: every value of every field listed one by one.
MAX_EXPRESSION_LENGTH = 1000

#: How far `next_after` looks.  The rarest date a valid expression can ask
#: for is Feb 29 on one given weekday (AND rule), and consecutive ones can be
#: 40 years apart because 2100, 2200 and 2300 are not leap years (for
#: example Monday 2072-02-29, next Monday Feb 29 is 2112).  Every other
#: (month, day, weekday) combination recurs within 12 years.
SEARCH_YEARS = 41

NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_MONTHS = (
    "jan",
    "feb",
    "mar",
    "apr",
    "may",
    "jun",
    "jul",
    "aug",
    "sep",
    "oct",
    "nov",
    "dec",
)
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")

# name, lowest, highest, names (value of the first name), largest step
_FIELDS = (
    ("minute", 0, 59, None, 60),
    ("hour", 0, 23, None, 24),
    ("day-of-month", 1, 31, None, 31),
    ("month", 1, 12, _MONTHS, 12),
    ("day-of-week", 0, 7, _DAYS, 7),
)
_ITEM = re.compile(
    r"(\*|[0-9]+|[a-z]+)(?:-([0-9]+|[a-z]+))?(?:/([0-9]+))?", re.IGNORECASE | re.ASCII
)
_LONGEST_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MINUTE = timedelta(minutes=1)
_DAY = timedelta(days=1)
_SECOND = timedelta(seconds=1)


def _shift(day: date, days: int) -> date:
    """Return *day* moved by *days*, held within date.min and date.max."""
    ordinal = day.toordinal() + days
    return date.fromordinal(min(max(ordinal, 1), date.max.toordinal()))


def parse(expression: str, tz: str | tzinfo | None = None) -> CronExpression:
    """Parse a five-field cron expression or nickname, evaluated in *tz*.

    *tz* is a zoneinfo name (``"Europe/London"``), a `tzinfo`, or None for
    UTC.  Raises `InvalidCronExpression` (a ValueError) for anything invalid.
    """
    return CronExpression(expression, tz)


def _fail(expression: str, message: str) -> InvalidCronExpression:
    return InvalidCronExpression(f"invalid cron expression {expression!r}: {message}")


def _resolve_tz(tz: str | tzinfo | None, expression: str) -> tzinfo:
    if tz is None:
        return UTC
    if isinstance(tz, tzinfo):
        zone = getattr(tz, "zone", None)
        if not (hasattr(tz, "localize") and isinstance(zone, str)):
            return tz
        tz = zone  # a pytz zone: its offsets are only right through localize()
    if isinstance(tz, str):
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise _fail(
                expression,
                f"unknown time zone {tz!r}; use an IANA name such as "
                "'Europe/London' or 'America/New_York', or a tzinfo object",
            ) from None
    raise TypeError(
        f"tz must be a zone name, a tzinfo or None, not {type(tz).__name__}"
    )


def _parse_field(text: str, index: int, expression: str) -> frozenset[int]:
    field, lo, hi, names, max_step = _FIELDS[index]

    def fail(message: str) -> InvalidCronExpression:
        return _fail(expression, f"{field} field {text!r}: {message}")

    def number(token: str, item: str, range_end: bool) -> int:
        if token.isdigit():
            value = int(token)
        elif names is not None and token.lower() in names:
            value = names.index(token.lower()) + lo
            if range_end and field == "day-of-week" and value == 0:
                value = 7  # 'fri-sun' means 5-7
        else:
            hint = f"use {'/'.join(names)} or numbers" if names else "use numbers"
            raise fail(f"unknown name {token!r} in {item!r}; {hint} {lo}-{hi}")
        if not lo <= value <= hi:
            raise fail(f"value {token} in {item!r} is out of range; use {lo}-{hi}")
        return value

    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise fail("empty list item; remove the extra comma")
        match = _ITEM.fullmatch(item)
        if match is None or (match[1] == "*" and match[2] is not None):
            raise fail(
                f"cannot read {item!r}; write a value, a range a-b, *, "
                "or add a step such as */5, a-b/5 or a/5"
            )
        start, end, step_text = match.groups()
        if start == "*":
            first, last = lo, hi
        else:
            first = number(start, item, range_end=False)
            last = first
            if end is not None:
                last = number(end, item, range_end=True)
                if field == "day-of-week" and first == 0 and not end.isdigit():
                    last = 0  # 'sun-sun' and '0-sun' mean Sunday; '0-7' is every day
                if first > last:
                    raise fail(
                        f"range {item!r} is reversed; ranges do not wrap around, "
                        f"write {end}-{start} or a list such as {start}-{hi},{lo}-{end}"
                    )
            elif step_text is not None:
                last = hi  # 'a/n' means a-hi/n
        step = 1
        if step_text is not None:
            step = int(step_text)
            if not 1 <= step <= max_step:
                raise fail(
                    f"step {step_text} in {item!r} is out of range; use 1-{max_step}"
                )
        values.update(range(first, last + 1, step))
    if field == "day-of-week" and 7 in values:
        values.discard(7)
        values.add(0)  # Sunday is 0 or 7
    return frozenset(values)


class CronExpression:
    """A parsed cron entry bound to a time zone.  Immutable and hashable.

    Equal (and equally hashed) when the normalised expression and the time
    zone are equal; zoneinfo zones compare by key, and UTC by any spelling
    (None, `datetime.timezone.utc`, ``"UTC"``) compares equal.
    """

    __slots__ = (
        "_and_days",
        "_cache",
        "_dom",
        "_dow",
        "_expression",
        "_fixed",
        "_hours",
        "_minutes",
        "_months",
        "_tz",
        "_tz_key",
    )

    def __init__(self, expression: str, tz: str | tzinfo | None = None) -> None:
        if not isinstance(expression, str):
            raise TypeError(
                f"a cron expression must be a str, not {type(expression).__name__}"
            )
        if len(expression) > MAX_EXPRESSION_LENGTH:
            raise InvalidCronExpression(
                f"invalid cron expression: {len(expression)} characters is longer "
                f"than the {MAX_EXPRESSION_LENGTH} allowed; a cron expression has "
                "five short fields such as '*/15 9-17 * * mon-fri'"
            )
        normalised = " ".join(expression.split())
        if not normalised:
            raise _fail(
                expression,
                "it is empty; write five fields such as '0 3 * * *' or @daily",
            )
        # Names and nicknames are read in any case, so "@DAILY" equals "@daily".
        self._expression = normalised.lower()
        self._tz = _resolve_tz(tz, normalised)
        key = getattr(self._tz, "key", None)
        self._tz_key: object = "UTC" if self._tz is UTC else (key or self._tz)

        fields = normalised.split(" ")
        if normalised.startswith("@"):
            nickname = fields[0].lower()
            if nickname == "@reboot":
                raise _fail(
                    normalised,
                    "@reboot is not supported: Stagehand has no "
                    "'at start-up' schedule; use a time such as @daily",
                )
            if nickname not in NICKNAMES:
                raise _fail(
                    normalised,
                    f"unknown nickname {fields[0]!r}; use one of "
                    + ", ".join(NICKNAMES),
                )
            if len(fields) > 1:
                raise _fail(
                    normalised,
                    f"a nickname stands alone; remove {' '.join(fields[1:])!r}",
                )
            fields = NICKNAMES[nickname].split(" ")
        if len(fields) != 5:
            extra = ""
            if len(fields) in (6, 7):
                extra = (
                    "; seconds (and years) are not supported: cron here has minute "
                    "resolution, so drop the seconds or year field"
                )
            raise _fail(
                normalised,
                f"expected 5 fields (minute hour day-of-month month day-of-week), "
                f"got {len(fields)}{extra}",
            )

        minutes, hours, dom, months, dow = (
            _parse_field(text, i, normalised) for i, text in enumerate(fields)
        )
        self._minutes = tuple(sorted(minutes))
        self._hours = tuple(sorted(hours))
        self._months = tuple(sorted(months))
        self._dom = frozenset(dom)
        self._dow = frozenset(dow)
        # Vixie: a day field starting with '*' makes the day rule AND, else OR.
        self._and_days = fields[2].startswith("*") or fields[4].startswith("*")
        # 'Fixed' entries (no '*' in minute or hour) run once across DST changes.
        self._fixed = "*" not in fields[0] and "*" not in fields[1]
        self._cache: dict[date, tuple[datetime, ...]] = {}

        # With the AND rule, a day-of-month that no listed month has never comes.
        possible = any(d <= _LONGEST_MONTH[m - 1] for m in months for d in dom)
        if self._and_days and not possible:
            names = ",".join(_MONTHS[m - 1] for m in sorted(months))
            raise _fail(
                normalised,
                f"day-of-month {fields[2]!r} never occurs in month {fields[3]!r} "
                f"({names}); the longest of those months has "
                f"{max(_LONGEST_MONTH[m - 1] for m in months)} days",
            )

    # -- public API -------------------------------------------------------

    @property
    def expression(self) -> str:
        """The expression as given, with runs of whitespace made one space."""
        return self._expression

    @property
    def tz(self) -> tzinfo:
        """The time zone the fields are matched in."""
        return self._tz

    def matches(self, dt: datetime) -> bool:
        """True if the entry fires at the minute containing *dt* (aware)."""
        u = self._floor(dt, "matches")
        try:
            return self._matches(u)
        except OverflowError:
            # The wall time is outside datetime's range: no entry fires then.
            return False

    def _matches(self, u: datetime) -> bool:
        day = u.astimezone(self.tz).date()
        for earlier in {_shift(day, -2), _shift(day, -1)} - {day}:
            # only a transition day can fire on a later date (after a gap)
            if not self._plain(earlier) and u in self._instants(earlier):
                return True
        if not self._day_matches(day):
            return False
        if self._plain(day):
            wall = u.astimezone(self.tz)
            return wall.hour in self._hours and wall.minute in self._minutes
        return u in self._instants(day)

    def next_after(self, dt: datetime) -> datetime:
        """Return the first firing instant strictly after *dt* (aware), in `tz`."""
        u = self._floor(dt, "next_after")
        best: datetime | None = None
        try:
            try:
                local = u.astimezone(self.tz).date()
            except OverflowError:
                # Before year 1 or after year 9999 in this zone.
                local = date.min if u.year < 5000 else date.max
            day = _shift(local, -2)
            limit = _shift(day, 366 * SEARCH_YEARS)
            stop = limit
            while (found := self._next_day(day, stop)) is not None:
                candidate = self._first_after(found, u)
                if candidate is not None and (best is None or candidate < best):
                    best = candidate
                if best is not None and stop == limit:
                    # around a DST change a later date can still fire earlier
                    stop = min(_shift(found, 2), limit)
                if found == date.max:
                    break
                day = found + _DAY
        except OverflowError:
            # A wall time of the zone that falls outside datetime's range.
            pass
        if best is None:
            raise InvalidCronExpression(
                f"cron expression {self.expression!r} does not fire in the "
                f"{SEARCH_YEARS} years after {dt.isoformat()} (nor after year 9999)"
            )
        return best.astimezone(self.tz)

    def __repr__(self) -> str:
        tz = self._tz_key if isinstance(self._tz_key, str) else self.tz
        return f"CronExpression({self.expression!r}, tz={tz!r})"

    def __str__(self) -> str:
        return self.expression

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CronExpression):
            return NotImplemented
        return (self.expression, self._tz_key) == (other.expression, other._tz_key)

    def __hash__(self) -> int:
        return hash((self.expression, self._tz_key))

    def __reduce__(self) -> tuple[Any, ...]:
        return (CronExpression, (self.expression, self.tz))

    # -- evaluation -------------------------------------------------------

    def _floor(self, dt: datetime, caller: str) -> datetime:
        # Returns the UTC instant at which the wall minute containing dt
        # began. Truncating in UTC would be wrong in zones whose offset has
        # seconds, such as Amsterdam's +00:19:32 before 1937.
        if not isinstance(dt, datetime):
            raise TypeError(f"{caller}() needs a datetime, not {type(dt).__name__}")
        if dt.utcoffset() is None:
            raise ValueError(
                f"{caller}() needs a timezone-aware datetime, got naive {dt!r}; "
                "attach a zone, e.g. dt.replace(tzinfo=ZoneInfo('Europe/London'))"
            )
        try:
            wall = dt.astimezone(self.tz).replace(second=0, microsecond=0)
            return wall.astimezone(UTC)
        except OverflowError:
            # The wall time is outside datetime's range (year 1 or 9999).
            return dt.astimezone(UTC).replace(second=0, microsecond=0)

    def _day_matches(self, day: date) -> bool:
        if day.month not in self._months:
            return False
        in_dom = day.day in self._dom
        in_dow = day.isoweekday() % 7 in self._dow
        if self._and_days:
            return in_dom and in_dow
        return in_dom or in_dow

    def _next_day(self, day: date, limit: date) -> date | None:
        """Return the first date >= *day* and <= *limit* whose date fields match."""
        while day <= limit:
            if day.month not in self._months:
                i = bisect_right(self._months, day.month)
                if i < len(self._months):
                    day = date(day.year, self._months[i], 1)
                elif day.year < limit.year:
                    day = date(day.year + 1, self._months[0], 1)
                else:
                    return None
                continue
            if self._day_matches(day):
                return day
            if day == limit:
                return None
            day += _DAY
        return None

    def _plain(self, day: date) -> bool:
        """True if *day* has one UTC offset from midnight to midnight."""
        start = datetime.combine(day, time(), tzinfo=self.tz)
        if day == date.max:
            end = datetime.combine(day, time.max, tzinfo=self.tz)
        else:
            end = datetime.combine(day + _DAY, time(), tzinfo=self.tz)
        offset = start.utcoffset()
        return (
            offset
            == start.replace(fold=1).utcoffset()
            == end.utcoffset()
            == end.replace(fold=1).utcoffset()
        )

    def _first_after(self, day: date, u: datetime) -> datetime | None:
        """Return the first instant > *u* at which the wall times of *day* fire."""
        if not self._plain(day):
            return next((i for i in self._instants(day) if i > u), None)
        start = datetime.combine(day, time(), tzinfo=self.tz)
        hour, minute = self._hours[0], self._minutes[0]
        if u >= start:
            wall = u.astimezone(self.tz)
            if wall.date() != day:
                return None
            hour = wall.hour
            i = bisect_right(self._minutes, wall.minute)
            if hour in self._hours and i < len(self._minutes):
                minute = self._minutes[i]
            else:
                j = bisect_right(self._hours, hour)
                if j == len(self._hours):
                    return None
                hour, minute = self._hours[j], self._minutes[0]
        return datetime.combine(day, time(hour, minute), tzinfo=self.tz).astimezone(UTC)

    def _instants(self, day: date) -> tuple[datetime, ...]:
        """Sorted UTC instants at which the wall times of *day* fire.

        Used for days with a UTC offset change; see the module docstring.
        """
        cached = self._cache.get(day)
        if cached is not None:
            return cached
        found: set[datetime] = set()
        if self._day_matches(day):
            for hour in self._hours:
                for minute in self._minutes:
                    first = datetime.combine(day, time(hour, minute), tzinfo=self.tz)
                    second = first.replace(fold=1)
                    before, after = first.utcoffset(), second.utcoffset()
                    if before == after:  # occurs once
                        found.add(first.astimezone(UTC))
                    elif before > after:  # type: ignore[operator]  # occurs twice
                        found.add(first.astimezone(UTC))
                        if not self._fixed:
                            found.add(second.astimezone(UTC))
                    elif self._fixed:  # skipped: run when the gap ends
                        found.add(
                            self._gap_end(second.astimezone(UTC), first.astimezone(UTC))
                        )
        result = tuple(sorted(found))
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[day] = result
        return result

    def _gap_end(self, lo: datetime, hi: datetime) -> datetime:
        """Return the first wall-minute start at or after the gap in (lo, hi].

        The change of offset is found to the second, since some zones moved
        by a fraction of a minute (Monrovia by 44 min 30 s in 1972).
        """
        offset = hi.astimezone(self.tz).utcoffset()
        while hi - lo > _SECOND:
            mid = lo + (hi - lo) // 2
            if mid.astimezone(self.tz).utcoffset() == offset:
                hi = mid
            else:
                lo = mid
        wall = hi.astimezone(self.tz)
        start = wall.replace(second=0, microsecond=0)
        if start != wall:
            start += _MINUTE
        return start.astimezone(UTC)

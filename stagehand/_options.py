"""Validation of job options, shared by `Worker` attributes and `Worker.new`.

Each check raises at the call that received the bad value, naming the value
and the fix, before anything is enqueued.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from stagehand._job import MAX_DELAY, JobState
from stagehand.exceptions import InvalidOption

__all__ = [
    "JOB_OPTIONS",
    "check_max_attempts",
    "check_priority",
    "check_queue_name",
    "check_scheduled_at",
    "check_tags",
    "normalize_json_dict",
    "normalize_schedule_in",
    "normalize_unique",
]

JOB_OPTIONS = frozenset(
    {
        "queue",
        "max_attempts",
        "priority",
        "unique",
        "schedule_in",
        "scheduled_at",
        "tags",
        "meta",
    }
)

_UNITS = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}
_UNIQUE_KEYS = frozenset({"period", "fields", "keys", "states"})
_UNIQUE_FIELDS = ("worker", "queue", "args", "meta")
_DEFAULT_UNIQUE_FIELDS = ["worker", "queue", "args"]
_DEFAULT_UNIQUE_STATES = ["available", "scheduled", "executing", "retryable"]
_STATE_NAMES = [state.value for state in JobState]
_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})
_encoder = json.JSONEncoder(allow_nan=False)
_decoder = json.JSONDecoder()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_QUEUE_NAME = re.compile(r"[\w.:-]+")


def check_queue_name(value: object, name: str = "queue") -> str:
    # Letters, digits and _ . : - only: queue names end up in thread names
    # and in the columns of manage.py stagehand_status.
    if not isinstance(value, str) or not _QUEUE_NAME.fullmatch(value):
        raise InvalidOption(
            f"{name} must be a non-empty string of letters, digits, '_', '.', "
            f"':' and '-', such as 'mailers'; got {value!r}"
        )
    return value


def check_priority(value: object, name: str = "priority") -> int:
    if not _is_int(value) or not 0 <= value <= 9:  # type: ignore[operator]
        raise InvalidOption(
            f"{name} must be an int from 0 (runs first) to 9; got {value!r}"
        )
    return value  # type: ignore[return-value]


# The maximum of max_attempts. JSON carries it to other peers, and each
# snooze adds one, so it stays well inside a 64-bit int.
MAX_ATTEMPTS = 2**62


def check_max_attempts(value: object, name: str = "max_attempts") -> int:
    if not _is_int(value) or not 1 <= value <= MAX_ATTEMPTS:  # type: ignore[operator]
        raise InvalidOption(
            f"{name} must be an int from 1 to 2**62; got {short_repr(value)}"
        )
    return value  # type: ignore[return-value]


def check_tags(
    value: object, name: str = "tags", example: str = 'tags=["billing"]'
) -> tuple[str, ...]:
    # A dict would pass as the list of its keys, which is rarely meant.
    if isinstance(value, (str, Mapping)) or not isinstance(value, Iterable):
        raise InvalidOption(
            f"{name} must be a list or tuple of strings; got {value!r}. "
            f"Write a list, such as {example}."
        )
    tags = tuple(value)
    for tag in tags:
        if not isinstance(tag, str) or not tag:
            raise InvalidOption(
                f"{name} must contain only non-empty strings; got {tag!r} in {value!r}"
            )
    return tags


def normalize_schedule_in(value: object) -> float:
    """Return `schedule_in` in seconds.

    Accepts a number of seconds or an ``(amount, unit)`` pair with unit one
    of "seconds", "minutes", "hours", "days".
    """
    amount: object = value
    unit = "seconds"
    if isinstance(value, timedelta):
        amount = value.total_seconds()
    elif isinstance(value, tuple):
        if len(value) != 2 or not isinstance(value[1], str):
            raise InvalidOption(
                f"schedule_in must be seconds or (amount, unit); got {value!r}. "
                'Write for example schedule_in=(5, "minutes").'
            )
        amount, unit = value
        if unit not in _UNITS:
            raise InvalidOption(
                f"schedule_in unit must be one of {', '.join(_UNITS)}; "
                f"got {unit!r} in {value!r}"
            )
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise InvalidOption(
            f"schedule_in must be a number of seconds or (amount, unit); got {value!r}"
        )
    try:
        seconds = float(amount) * _UNITS[unit]
    except OverflowError:
        seconds = math.inf
    if not 0 <= seconds <= MAX_DELAY:
        raise InvalidOption(
            f"schedule_in must be from 0 to 100 years; got {value!r}. "
            "To run a job now, leave schedule_in out."
        )
    return seconds


def check_scheduled_at(value: object) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidOption(f"scheduled_at must be an aware datetime; got {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidOption(
            f"scheduled_at must be an aware datetime; got the naive {value!r}. "
            "Build it with a time zone, for example datetime.now(timezone.utc) "
            "+ timedelta(hours=1), or call value.astimezone() on a local time."
        )
    # Every time on a job reads in UTC, whatever zone the caller used.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise InvalidOption(
            f"scheduled_at {value.isoformat()} is outside the years 1 to 9999 "
            "in UTC; pass a time within that range"
        ) from None


# json cannot write an int with more digits than Python's limit for int to
# str conversion (4,300 by default). So a large int takes the slow path,
# which reports it.
_MAX_DIGITS = sys.get_int_max_str_digits()
_INT_LIMIT: float = 10 ** (_MAX_DIGITS - 1) if _MAX_DIGITS else math.inf


def normalize_json_dict(value: object, name: str) -> dict[str, Any]:
    """Return a copy of `value` as a worker will see it after JSON.

    Raises:
        InvalidOption: `value` is not a dict with string keys whose values
            JSON can encode (no NaN, no sets, no objects).
    """
    if type(value) is dict:
        # Fast path: a flat dict of string keys and plain scalars is its own
        # JSON round trip, so a shallow copy is enough.
        for key, item in value.items():
            item_type = type(item)
            if type(key) is not str or item_type not in _JSON_SCALARS:
                break
            if item_type is float and not math.isfinite(item):
                break
            if item_type is int and not -_INT_LIMIT < item < _INT_LIMIT:
                # Too many digits for json to write: the slow path raises.
                break
        else:
            return dict(value)
    elif not isinstance(value, dict):
        raise InvalidOption(
            f"{name} must be a dict with string keys; got {type(value).__name__} "
            f"{value!r}"
        )
    try:
        decoded = _decoder.decode(_encoder.encode(value))
    except RecursionError:
        raise InvalidOption(
            f"{name} is nested too deeply to encode as JSON; flatten it"
        ) from None
    except (TypeError, ValueError) as error:
        raise InvalidOption(
            f"{name} must be JSON-serialisable; {error}. Convert the value to "
            f"str, int, float, bool, None, list or dict first: {short_repr(value)}"
        ) from None
    if decoded != value:
        _check_string_keys(value, name)
    return decoded  # type: ignore[no-any-return]


def as_float(value: float) -> float:
    """Return `value` as a float, or infinity for an int too large for one."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def short_repr(value: object) -> str:
    """Return a repr cut to a readable length, even for an int too long to print."""
    try:
        return reprlib.repr(value)
    except ValueError:
        # repr() itself refuses an int of more digits than Python prints.
        if isinstance(value, int):
            return f"an int of more than {_MAX_DIGITS:,} digits"
        return f"a {type(value).__name__} that holds an int too long to print"


def _check_string_keys(value: object, name: str) -> None:
    # JSON turns int keys into strings without complaint; a worker would
    # then read args["1"] where the caller wrote args[1], so reject them.
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidOption(
                    f"{name} must have string keys at every level; got the key "
                    f"{key!r} ({type(key).__name__}). Use str({key!r}) instead."
                )
            _check_string_keys(item, name)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_string_keys(item, name)


def normalize_unique(value: object) -> dict[str, Any] | None:
    """Return the unique settings with defaults filled in, or None."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise InvalidOption(
            f"unique must be None, False, True or a dict; got {value!r}"
        )
    unknown = set(value) - _UNIQUE_KEYS
    if unknown:
        raise InvalidOption(
            f"unknown unique keys {sorted(unknown)}; valid keys are "
            f"{sorted(_UNIQUE_KEYS)}"
        )
    period = value.get("period", 60)
    if period is not None:
        if isinstance(period, bool) or not isinstance(period, (int, float)):
            raise InvalidOption(
                f"unique period must be seconds > 0 or None; got {period!r}"
            )
        seconds = as_float(period)
        if not math.isfinite(seconds) or seconds <= 0:
            raise InvalidOption(
                f"unique period must be a finite number of seconds > 0, or None "
                f"for no expiry; got {short_repr(period)}"
            )
        period = seconds
    fields = _check_choices("unique fields", value.get("fields"), _UNIQUE_FIELDS)
    keys = value.get("keys")
    if keys is not None:
        keys = sorted(check_tags(keys, "unique keys", 'unique={"keys": ["account"]}'))
        if not keys:
            # No key would make every job of the worker a duplicate of every
            # other, whatever its args.
            raise InvalidOption(
                "unique keys must name at least one key of args or meta, or be "
                'None for all of them; got []. Write unique={"keys": ["account"]}'
            )
    states = _check_choices("unique states", value.get("states"), _STATE_NAMES)
    return {
        "period": period,
        "fields": fields or list(_DEFAULT_UNIQUE_FIELDS),
        "keys": keys,
        "states": states or list(_DEFAULT_UNIQUE_STATES),
    }


def _check_choices(
    name: str, value: object, choices: Iterable[str]
) -> list[str] | None:
    if value is None:
        return None
    allowed = list(choices)
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidOption(
            f"{name} must be a list drawn from {allowed}; got {value!r}"
        )
    items = [str(item) if isinstance(item, JobState) else item for item in value]
    if not items:
        raise InvalidOption(f"{name} must not be empty; choose from {allowed}")
    for item in items:
        if item not in allowed:
            raise InvalidOption(f"{name} must be drawn from {allowed}; got {item!r}")
    return sorted(set(items), key=allowed.index)

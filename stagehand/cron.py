"""Cron expressions: ``parse("*/15 9-17 * * mon-fri", tz="Europe/London")``.

`parse` returns a `CronExpression` with ``matches(dt)`` and
``next_after(dt)``.  The syntax, the day-of-month/day-of-week rule and the
daylight-saving rules follow Vixie cron; docs/cron.md describes them.
"""

from __future__ import annotations

from stagehand._cron import (
    MAX_EXPRESSION_LENGTH,
    NICKNAMES,
    SEARCH_YEARS,
    CronExpression,
    parse,
)
from stagehand.exceptions import InvalidCronExpression

__all__ = [
    "MAX_EXPRESSION_LENGTH",
    "NICKNAMES",
    "SEARCH_YEARS",
    "CronExpression",
    "InvalidCronExpression",
    "parse",
]

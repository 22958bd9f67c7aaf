"""Clocks: the real one, and a fake one that tests move by hand.

Every delay in Stagehand (scheduled jobs, retry backoff, snoozes, job
timeouts and cron ticks) is measured on an instance's clock, so a test that
injects a `FakeClock` makes all of them due at once with `advance()`.
"""

from __future__ import annotations

import functools
import math
import threading
import time
import weakref
from datetime import UTC, datetime, timedelta

__all__ = ["Clock", "FakeClock", "SystemClock"]

_MAX_FAKE_SECONDS = 1000 * 365 * 86_400.0


class Clock:
    """Source of time for one instance.

    `monotonic()` measures delays in seconds. `now()` returns the aware UTC
    wall-clock time, used for timestamps and cron. `wait()` blocks on a
    condition whose lock the caller holds, until notified or until
    `timeout` seconds of this clock have passed.
    """

    def monotonic(self) -> float:
        raise NotImplementedError

    def now(self) -> datetime:
        raise NotImplementedError

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        raise NotImplementedError

    def due(self, when: object, monotonic: float, delay: float) -> float:
        """Return the `monotonic()` reading at which the time `when` comes.

        `when` is `delay` seconds after the moment that read `monotonic`.
        The wall clock and the monotonic one are separate, so the result is
        ``monotonic + delay``; `FakeClock` ties the two together.
        """
        return monotonic + delay


class SystemClock(Clock):
    """The real clock: `time.monotonic()` and `datetime.now(UTC)`."""

    # Builtins rather than methods: every job reads the clock twice, and a
    # C call skips a Python frame each time.
    monotonic = staticmethod(time.monotonic)
    now = staticmethod(functools.partial(datetime.now, UTC))

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        if timeout is None:
            condition.wait()
        else:
            # Far-future due times (months ahead) exceed what a lock wait
            # accepts, so the wait is clamped and the caller loops.
            condition.wait(min(max(timeout, 0.0), threading.TIMEOUT_MAX))

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock(Clock):
    """A clock that stands still until a test calls `advance()`.

    Threads that wait on it sleep until `advance()` or `set()` moves the time
    past their deadline, so scheduled jobs, retries, snoozes, timeouts and
    cron ticks become due deterministically, without real waiting.

    Args:
        start: The initial wall-clock time, an aware datetime. Defaults to
            2026-01-01 00:00 UTC so that tests see the same dates every run.
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is None:
            start = datetime(2026, 1, 1, tzinfo=UTC)
        if not isinstance(start, datetime):
            raise TypeError(
                f"FakeClock start must be an aware datetime; got "
                f"{type(start).__name__} {start!r}. Pass for example "
                "datetime(2026, 1, 1, tzinfo=UTC)."
            )
        if start.tzinfo is None or start.utcoffset() is None:
            raise ValueError(
                f"FakeClock start must be an aware datetime; got {start!r}. "
                "Pass for example datetime(2026, 1, 1, tzinfo=UTC)."
            )
        self._lock = threading.Lock()
        self._start = start.astimezone(UTC)
        self._elapsed = 0.0
        self._waiting: weakref.WeakSet[threading.Condition] = weakref.WeakSet()
        # The time each thread last read, so wait() can tell whether an
        # advance() happened after the caller computed its deadline.
        self._seen = threading.local()

    def monotonic(self) -> float:
        elapsed = self._elapsed
        self._seen.elapsed = elapsed
        return elapsed

    def now(self) -> datetime:
        elapsed = self._elapsed
        self._seen.elapsed = elapsed
        return self._start + timedelta(seconds=elapsed)

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        # An advance() after the condition is registered notifies it under the
        # condition's lock, which the caller holds until it waits, so that
        # wake-up cannot be lost. An advance() before registration changed the
        # time the caller read, so the wait returns at once and the caller,
        # which loops, reads the new time.
        with self._lock:
            self._waiting.add(condition)
            moved = self._elapsed != getattr(self._seen, "elapsed", None)
            self._seen.elapsed = self._elapsed
        if not moved:
            condition.wait()

    def advance(self, seconds: float) -> datetime:
        """Move time forward by `seconds` and wake every waiting thread.

        Returns:
            The new wall-clock time.
        """
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
            raise TypeError(f"seconds must be a number; got {seconds!r}")
        if seconds < 0:
            raise ValueError(f"a clock cannot go back; got seconds={seconds!r}")
        if not math.isfinite(seconds) or self._elapsed + seconds > _MAX_FAKE_SECONDS:
            raise ValueError(
                f"seconds must be finite and keep the clock within 1,000 years of "
                f"its start; got {seconds!r}"
            )
        return self._move_to(self._elapsed + float(seconds))

    def _move_to(self, elapsed: float) -> datetime:
        # Sets the seconds since the start, never backwards, and wakes every
        # waiting thread.
        with self._lock:
            self._elapsed = max(self._elapsed, elapsed)
            waiting = list(self._waiting)
        for condition in waiting:
            with condition:
                condition.notify_all()
        return self.now()

    def set(self, when: datetime) -> datetime:
        """Move time forward to the aware datetime `when`."""
        if (
            not isinstance(when, datetime)
            or when.tzinfo is None
            or when.utcoffset() is None
        ):
            raise ValueError(f"when must be an aware datetime; got {when!r}")
        if when < self.now():
            raise ValueError(
                f"a clock cannot go back; {when.isoformat()} is before "
                f"{self.now().isoformat()}"
            )
        # Exactly the reading that due() gives for `when`, so that a job
        # due then is due now: advancing by the difference could land a
        # fraction of a microsecond short.
        target = (when - self._start).total_seconds()
        if target > _MAX_FAKE_SECONDS:
            raise ValueError(
                f"when must keep the clock within 1,000 years of its start; got "
                f"{when.isoformat()}"
            )
        return self._move_to(target)

    def due(self, when: object, monotonic: float, delay: float) -> float:
        """Return the reading of `monotonic()` at which `when` comes.

        `when` is cut to the microsecond and the delay is not, so the two
        can differ by less than a microsecond. The earlier one counts, so
        that the job is due both after ``set(when)`` and after
        ``advance(delay)``.
        """
        if isinstance(when, datetime):
            return min((when - self._start).total_seconds(), monotonic + delay)
        return monotonic + delay

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now().isoformat()})"

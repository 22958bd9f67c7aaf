"""Completion tracking shared by every system under test.

Every system's job body calls :func:`perform`, so each job is counted the same
way: its start time is stored by index, a lock-guarded counter is incremented,
and an event is set when the expected number of jobs has finished.
"""

from __future__ import annotations

import threading
from time import perf_counter
from typing import Any


def spin(iterations: int) -> int:
    """Run a pure-Python loop of ``iterations`` additions and return the sum."""
    total = 0
    for k in range(iterations):
        total += k
    return total


class Tracker:
    """Counter, start times and completion events for one benchmark phase."""

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, expected: int, cpu_iterations: int = 0) -> None:
        """Prepare for a phase of ``expected`` jobs with ids ``0..expected-1``.

        Args:
            expected: number of jobs that complete the phase.
            cpu_iterations: iterations of :func:`spin` that each job runs, or
                0 for a no-op job.
        """
        self._lock = threading.Lock()
        self.expected = expected
        self.cpu_iterations = cpu_iterations
        self.count = 0
        self.starts = [0.0] * expected
        self.finished_at = 0.0
        self.first_started = threading.Event()
        self.finished = threading.Event()

    def record(self, args: dict[str, Any]) -> None:
        """Record the start of job ``args["i"]``, run its work, count it."""
        started = perf_counter()
        if self.cpu_iterations:
            spin(self.cpu_iterations)
        with self._lock:
            self.starts[args["i"]] = started
            self.count += 1
            if self.count == 1:
                self.first_started.set()
            if self.count == self.expected:
                self.finished_at = perf_counter()
                self.finished.set()

    def wait(self, timeout: float) -> None:
        """Block until every expected job has finished.

        Raises:
            TimeoutError: fewer than ``expected`` jobs finished in ``timeout``
                seconds.
        """
        if not self.finished.wait(timeout):
            raise TimeoutError(
                f"timed out after {timeout:.0f} s with "
                f"{self.count}/{self.expected} jobs finished"
            )


TRACKER = Tracker()


def perform(args: dict[str, Any]) -> None:
    """Job body used by every system: record the job in :data:`TRACKER`."""
    TRACKER.record(args)

"""Stagehand: in-memory, thread-based background jobs for Python and Django.

Importing this package starts no thread, opens no socket and reads no
settings; `start()` does that.
"""

from __future__ import annotations

from typing import Any

from stagehand import events, plugins
from stagehand._clock import Clock, FakeClock, SystemClock
from stagehand._instance import Stagehand
from stagehand._job import Cancel, Error, Job, JobState, Snooze
from stagehand._registry import default_instance, get_instance
from stagehand._worker import Worker, resolve_worker
from stagehand.exceptions import (
    InvalidCronExpression,
    InvalidOption,
    JobNotFound,
    JobTimeout,
    NotRunning,
    QueueNotConfigured,
    ShuttingDown,
    StagehandError,
    UnknownWorker,
)

__version__ = "0.1.0.dev0"

__all__ = [
    # Workers and jobs
    "Cancel",
    "Error",
    "Job",
    "JobState",
    "Snooze",
    "Worker",
    "resolve_worker",
    # Instances
    "Stagehand",
    "default_instance",
    "get_instance",
    "insert",
    "insert_all",
    "start",
    "stop",
    # Time
    "Clock",
    "FakeClock",
    "SystemClock",
    # Errors
    "InvalidCronExpression",
    "InvalidOption",
    "JobNotFound",
    "JobTimeout",
    "NotRunning",
    "QueueNotConfigured",
    "ShuttingDown",
    "StagehandError",
    "UnknownWorker",
    # Modules
    "events",
    "plugins",
    "__version__",
]


def start(**config: Any) -> Stagehand:
    """Build the default instance from `config`, start it and return it.

    Takes the keyword arguments of `Stagehand`. The instance is named
    "default" unless `config` names it otherwise.
    """
    return Stagehand(**config).start()


def stop() -> None:
    """Stop the default instance, if one is running."""
    instance = default_instance()
    if instance is not None:
        instance.stop()


def _require_default() -> Stagehand:
    instance = default_instance()
    if instance is None:
        raise NotRunning(
            "no default Stagehand instance is running; call stagehand.start(...) first"
        )
    return instance


def insert(job: Job) -> Job:
    """Insert `job` into the default instance; see `Stagehand.insert`."""
    return _require_default().insert(job)


def insert_all(jobs: Any) -> list[Job]:
    """Insert `jobs` into the default instance; see `Stagehand.insert_all`."""
    return _require_default().insert_all(jobs)

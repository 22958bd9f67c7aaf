"""Exceptions raised by Stagehand.

The hierarchy::

    StagehandError
    ├── InvalidOption (also a ValueError)
    │   ├── InvalidCronExpression
    │   ├── QueueNotConfigured
    │   └── UnknownWorker
    ├── NotRunning
    ├── ShuttingDown
    └── JobNotFound (also a LookupError)

`JobTimeout` is a `BaseException`, like `KeyboardInterrupt`, so that a
worker's ``except Exception`` cannot swallow it by accident.
"""

from __future__ import annotations

__all__ = [
    "InvalidCronExpression",
    "InvalidOption",
    "JobNotFound",
    "JobTimeout",
    "NotRunning",
    "QueueNotConfigured",
    "ShuttingDown",
    "StagehandError",
    "UnknownWorker",
]


class StagehandError(Exception):
    """Base class of every error that Stagehand raises on purpose."""


class InvalidOption(StagehandError, ValueError):
    """An option, setting or argument has an invalid value."""


class InvalidCronExpression(InvalidOption):
    """A cron expression cannot be parsed or can never match."""


class QueueNotConfigured(InvalidOption):
    """A job names a queue that the instance does not run."""


class UnknownWorker(InvalidOption):
    """A worker path does not name an importable `Worker` subclass."""


class NotRunning(StagehandError):
    """The instance has not been started, or no default instance exists."""


class ShuttingDown(StagehandError):
    """The instance is stopping and accepts no new jobs."""


class JobNotFound(StagehandError, LookupError):
    """No live or retained job has the given id."""


class JobTimeout(BaseException):
    """Raised inside `Worker.perform` when the job's timeout has passed."""

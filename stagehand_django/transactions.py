"""Inserting jobs when the current database transaction commits.

``job.insert(on_commit=True)`` validates the job at once, then inserts it
when the outermost `transaction.atomic` block of the default database
commits; on rollback the job is dropped. Outside an atomic block it is
inserted at once. ``STAGEHAND_INSERT_ON_COMMIT = True`` makes this the
behaviour of a plain ``job.insert()``.

Transactions managed by hand with ``set_autocommit(False)`` are not
tracked: the job is inserted at once.
"""

from __future__ import annotations

import logging

from django.db import DEFAULT_DB_ALIAS, connections, transaction

from stagehand import Job, Stagehand, _job
from stagehand_django import conf

__all__ = ["install", "insert_hook"]

logger = logging.getLogger(__name__)


def insert_hook(job: Job, instance: Stagehand, on_commit: bool | None) -> Job:
    """Insert `job` now, or register its insert with the open transaction.

    Called by `Job.insert` with a job already validated against `instance`.

    Returns:
        The inserted job, or `job` itself, unsaved (``id`` None), when its
        insert waits for the commit.
    """
    if on_commit is None:
        on_commit = conf.insert_on_commit()
    # in_atomic_block is a plain attribute: reading it opens no connection,
    # so threads without a transaction (cron, worker threads) stay
    # connection-free.
    if not on_commit or not connections[DEFAULT_DB_ALIAS].in_atomic_block:
        return instance.insert(job)

    def insert_now() -> None:
        try:
            instance.insert(job)
        except Exception:
            logger.exception(
                "job for %s was not inserted after its transaction committed",
                job.worker,
            )

    transaction.on_commit(insert_now, using=DEFAULT_DB_ALIAS)
    logger.debug("job for %s waits for the transaction to commit", job.worker)
    return job


def install() -> None:
    """Register `insert_hook` with the core; called by the app's ready()."""
    _job.on_commit_hook = insert_hook

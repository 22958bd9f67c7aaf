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
from django.db.backends.base.base import BaseDatabaseWrapper

from stagehand import InvalidOption, Job, Stagehand, _job
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
    connection = connections[DEFAULT_DB_ALIAS]
    # NOTE: only job.insert() comes here; instance.insert(job) of a job that
    # waits for the commit is accepted, and the insert at commit then fails.
    if connection.in_atomic_block and _waits_for_commit(connection, job):
        raise InvalidOption(
            f"job for {job.worker} was already inserted: it waits for the "
            "transaction to commit; build a new job with Worker.new(...) for "
            "each insert"
        )
    if not on_commit or not connection.in_atomic_block:
        return instance.insert(job)
    transaction.on_commit(_InsertOnCommit(job, instance), using=DEFAULT_DB_ALIAS)
    logger.debug("job for %s waits for the transaction to commit", job.worker)
    return job


class _InsertOnCommit:
    """The callback that inserts a deferred job when its transaction commits."""

    __slots__ = ("instance", "job")

    def __init__(self, job: Job, instance: Stagehand) -> None:
        self.job = job
        self.instance = instance

    def __call__(self) -> None:
        job = self.job
        try:
            inserted = self.instance.insert(job)
        except Exception:
            logger.exception(
                "job for %s was not inserted after its transaction committed",
                job.worker,
            )
            return
        if inserted is not job:
            # A unique job that has a duplicate: the caller's job becomes
            # the copy of the duplicate, with conflict=True, as insert()
            # returns it outside a transaction.
            for name in Job.__slots__:
                setattr(job, name, getattr(inserted, name))
            logger.info(
                "job for %s was not inserted after its transaction committed: "
                "unique job %s exists already",
                job.worker,
                job.id,
            )


def _waits_for_commit(connection: BaseDatabaseWrapper, job: Job) -> bool:
    # A rolled-back savepoint removes its callbacks from run_on_commit, so a
    # job found here will be inserted at the commit.
    return any(
        isinstance(entry[1], _InsertOnCommit) and entry[1].job is job
        for entry in connection.run_on_commit
    )


def install() -> None:
    """Register `insert_hook` with the core; called by the app's ready()."""
    _job.on_commit_hook = insert_hook

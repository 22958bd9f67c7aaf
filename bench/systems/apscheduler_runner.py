"""APScheduler 3: ``BackgroundScheduler``, memory job store, 8-thread pool.

Jobs are one-off ``date`` jobs. ``misfire_grace_time`` is None because with
the default of 1 s a backlog older than a second would be skipped instead of
run, and the benchmark would never see its last completion.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.systems.base import System
from bench.track import perform


class APSchedulerSystem(System):
    """Each insert is one ``add_job`` call. APScheduler has no bulk API."""

    name = "apscheduler"
    distributions = ("apscheduler",)
    modules = ("apscheduler.schedulers.background",)

    def __init__(self, workers: int, options: dict[str, Any]) -> None:
        super().__init__(workers, options)
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.jobstores.memory import MemoryJobStore
        from apscheduler.schedulers.background import BackgroundScheduler

        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        self._scheduler = BackgroundScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(workers)},
            job_defaults={"misfire_grace_time": None, "coalesce": False},
            timezone=UTC,
        )

    def start(self) -> None:
        self._scheduler.start()

    def start_paused(self) -> None:
        self._scheduler.start(paused=True)

    def insert(self, args: dict[str, Any]) -> None:
        self._scheduler.add_job(perform, args=(args,))

    def insert_in(self, args: dict[str, Any], seconds: float) -> None:
        run_date = datetime.now(UTC) + timedelta(seconds=seconds)
        self._scheduler.add_job(perform, "date", run_date=run_date, args=(args,))

    def stop(self) -> None:
        self._scheduler.shutdown(wait=False)

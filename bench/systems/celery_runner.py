"""Celery: a Redis broker and an embedded worker with the ``threads`` pool.

The worker is started with ``celery.contrib.testing.worker.start_worker``,
which runs a full worker in a thread of this process but turns off its
heartbeat, mingle and gossip. Results are not stored. Jobs with a countdown
are held in the worker's memory until due, as Celery always does.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from bench.systems.base import System
from bench.track import perform


class CelerySystem(System):
    """One task, sent with ``apply_async``. Celery has no bulk send API."""

    name = "celery"
    distributions = ("celery", "redis")
    modules = ("celery", "celery.contrib.testing.worker", "kombu.transport.redis")
    needs_redis = True

    def __init__(self, workers: int, options: dict[str, Any]) -> None:
        super().__init__(workers, options)
        from celery import Celery
        from redis import Redis

        logging.getLogger("celery").setLevel(logging.WARNING)
        self._redis = Redis.from_url(options["redis_url"])
        self._redis.flushall()
        self._app = Celery("bench", broker=options["redis_url"])
        self._app.conf.update(
            task_ignore_result=True,
            worker_hijack_root_logger=False,
            broker_connection_retry_on_startup=True,
        )
        self._task = self._app.task(name="noop")(perform)
        self._stack = contextlib.ExitStack()

    def start(self) -> None:
        from celery.contrib.testing.worker import start_worker

        worker = start_worker(
            self._app,
            concurrency=self.workers,
            pool="threads",
            loglevel="WARNING",
            perform_ping_check=False,
            shutdown_timeout=10.0,
        )
        self._stack.enter_context(worker)

    def start_paused(self) -> None:
        """Start no worker, so sent messages stay in Redis."""

    def insert(self, args: dict[str, Any]) -> None:
        self._task.apply_async((args,))

    def insert_in(self, args: dict[str, Any], seconds: float) -> None:
        self._task.apply_async((args,), countdown=seconds)

    def queued_bytes(self) -> int | None:
        return int(self._redis.info("memory")["used_memory"])

    def stop(self) -> None:
        self._stack.close()

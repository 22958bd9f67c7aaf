"""RQ: a Redis queue, consumed by ``SimpleWorker`` threads in this process.

RQ's own workers fork a process per job. Here each of the W threads runs a
``SimpleWorker`` loop instead, so jobs run in the benchmark process and are
counted like every other system's. Jobs are enqueued with ``job_timeout=-1``
so that no per-job timer is armed, because RQ's signal-based timer works only
in the main thread. An ``RQScheduler`` loop in another thread moves due jobs
to the queue, polling once a second (RQ's default).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

from bench.systems.base import System
from bench.track import perform


class RQSystem(System):
    """RQ with W worker threads on one queue, bulk inserts by ``enqueue_many``."""

    name = "rq"
    distributions = ("rq", "redis")
    modules = ("rq", "redis")
    needs_redis = True

    def __init__(self, workers: int, options: dict[str, Any]) -> None:
        super().__init__(workers, options)
        from redis import Redis
        from rq import Queue

        logging.getLogger("rq").setLevel(logging.WARNING)
        self._url = options["redis_url"]
        self._redis = Redis.from_url(self._url)
        self._redis.flushall()
        self._queue = Queue("default", connection=self._redis)
        self._workers: list[Any] = []

    def start(self) -> None:
        for n in range(self.workers):
            worker = _make_worker(self._url)
            self._workers.append(worker)
            thread = threading.Thread(
                target=worker.work,
                kwargs={"logging_level": "WARNING"},
                name=f"rq-worker-{n}",
                daemon=True,
            )
            thread.start()
        scheduler = threading.Thread(
            target=self._run_scheduler, name="rq-scheduler", daemon=True
        )
        scheduler.start()

    def start_paused(self) -> None:
        """Start no worker, so enqueued jobs stay in Redis."""

    def insert(self, args: dict[str, Any]) -> None:
        self._queue.enqueue(perform, args, job_timeout=-1)

    def insert_all(self, batch: list[dict[str, Any]]) -> None:
        prepared = [
            self._queue.prepare_data(perform, args=(args,), timeout=-1)
            for args in batch
        ]
        self._queue.enqueue_many(prepared)

    def insert_in(self, args: dict[str, Any], seconds: float) -> None:
        delay = timedelta(seconds=seconds)
        self._queue.enqueue_in(delay, perform, args, job_timeout=-1)

    def queued_bytes(self) -> int | None:
        return int(self._redis.info("memory")["used_memory"])

    def stop(self) -> None:
        for worker in self._workers:
            worker._stop_requested = True

    def _run_scheduler(self) -> None:
        from redis import Redis
        from rq.scheduler import RQScheduler

        class ThreadScheduler(RQScheduler):
            def _install_signal_handlers(self) -> None:
                """Skip signal handlers, which only the main thread may set."""

        scheduler: Any = ThreadScheduler(
            ["default"], connection=Redis.from_url(self._url), logging_level="WARNING"
        )
        scheduler.work()


def _make_worker(url: str) -> Any:
    from redis import Redis
    from rq import SimpleWorker
    from rq.timeouts import TimerDeathPenalty

    class ThreadWorker(SimpleWorker):
        death_penalty_class = TimerDeathPenalty

        def _install_signal_handlers(self) -> None:
            """Skip signal handlers, which only the main thread may set."""

    return ThreadWorker(["default"], connection=Redis.from_url(url))

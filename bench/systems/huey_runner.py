"""Huey: ``MemoryHuey`` with its thread consumer.

Huey's workers poll an in-memory queue. By default an idle worker sleeps
0.1 s, and each empty poll multiplies the sleep by 1.15 up to 10 s, so two
variants run: ``huey`` with those defaults and ``huey-1ms`` that polls every
millisecond. Huey's scheduler wakes once a second at most (1 s is the
smallest interval it accepts), which bounds its lateness on scheduled jobs.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from bench.systems.base import System
from bench.track import perform


class HueySystem(System):
    """Huey with the consumer's default polling settings."""

    name = "huey"
    distributions = ("huey",)
    modules = ("huey",)
    consumer_options: ClassVar[dict[str, float]] = {}

    def __init__(self, workers: int, options: dict[str, Any]) -> None:
        super().__init__(workers, options)
        from huey import MemoryHuey

        logging.getLogger("huey").setLevel(logging.WARNING)
        self._huey = MemoryHuey("bench", utc=True)
        self._task = self._huey.task(name="noop")(perform)
        self._consumer: Any = None

    def start(self) -> None:
        self._consumer = self._huey.create_consumer(
            workers=self.workers,
            worker_type="thread",
            periodic=False,
            **self.consumer_options,
        )
        self._consumer.start()

    def start_paused(self) -> None:
        """Leave the consumer unstarted, so enqueued tasks stay queued."""

    def insert(self, args: dict[str, Any]) -> None:
        self._task(args)

    def insert_in(self, args: dict[str, Any], seconds: float) -> None:
        self._task.schedule(args=(args,), delay=seconds)

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.stop(graceful=True)


class HueyFastSystem(HueySystem):
    """Huey with workers that poll every millisecond, with no backoff."""

    name = "huey-1ms"
    consumer_options: ClassVar[dict[str, float]] = {
        "initial_delay": 0.001,
        "backoff": 1.0,
        "max_delay": 0.001,
    }

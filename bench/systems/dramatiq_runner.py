"""Dramatiq: ``StubBroker`` with an in-process ``dramatiq.Worker``.

The actor keeps Dramatiq's default middleware (age limit, time limit,
retries and the rest). Delayed messages wait in the worker's consumer thread,
which checks their due time after each message or each ``worker_timeout``
(1000 ms by default), so that timeout bounds their lateness.
"""

from __future__ import annotations

import logging
from typing import Any

from bench.systems.base import System
from bench.track import perform


class DramatiqSystem(System):
    """One actor on a stub broker. Dramatiq has no bulk enqueue API."""

    name = "dramatiq"
    distributions = ("dramatiq",)
    modules = ("dramatiq", "dramatiq.brokers.stub")

    def __init__(self, workers: int, options: dict[str, Any]) -> None:
        super().__init__(workers, options)
        import dramatiq
        from dramatiq.brokers.stub import StubBroker

        logging.getLogger("dramatiq").setLevel(logging.WARNING)
        self._broker = StubBroker()
        dramatiq.set_broker(self._broker)
        declare = dramatiq.actor(actor_name="noop", broker=self._broker)
        self._actor = declare(perform)
        self._worker: Any = None

    def start(self) -> None:
        import dramatiq

        self._worker = dramatiq.Worker(self._broker, worker_threads=self.workers)
        self._worker.start()

    def start_paused(self) -> None:
        """Start no worker, so sent messages stay in the broker's queue."""

    def insert(self, args: dict[str, Any]) -> None:
        self._actor.send(args)

    def insert_in(self, args: dict[str, Any], seconds: float) -> None:
        self._actor.send_with_options(args=(args,), delay=int(seconds * 1000))

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.stop(timeout=10_000)
        self._broker.close()

"""``manage.py stagehand_worker``: a process that only runs jobs."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from stagehand.exceptions import StagehandError
from stagehand_django import conf, lifecycle

logger = logging.getLogger(__name__)

# Exit status after a second signal cuts the graceful stop short.
FORCED_EXIT = 1


class Command(BaseCommand):
    help = (
        "Run the default Stagehand instance (queues, scheduler, cron) until "
        "SIGTERM or Ctrl-C. The first signal stops gracefully, waiting up to "
        "shutdown_grace_period seconds for executing jobs; a second one exits "
        "at once."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        if conf.testing_mode() != "disabled":
            raise CommandError(
                f"STAGEHAND['testing'] is {conf.testing_mode()!r}, which runs no "
                "worker threads; set it to 'disabled' to run jobs here"
            )
        stop_requested = threading.Event()
        previous = self._install_handlers(stop_requested)
        try:
            instance = lifecycle.start()
        except (ImproperlyConfigured, StagehandError) as error:
            # StagehandError: for example another instance named "default"
            # already runs in this process.
            self._restore_handlers(previous)
            raise CommandError(str(error)) from error
        queues = ", ".join(instance.queues)
        logger.info("stagehand worker %d started (queues %s)", os.getpid(), queues)
        self.stdout.write(
            f"Stagehand worker {os.getpid()} running queues {queues}. "
            "Press Ctrl-C to stop."
        )
        self.stdout.flush()
        try:
            stop_requested.wait()
            self.stdout.write("Stopping gracefully; a second signal exits at once.")
            self.stdout.flush()
            lifecycle.stop()
        finally:
            self._restore_handlers(previous)
        logger.info("stagehand worker %d stopped", os.getpid())
        self.stdout.write(f"Stagehand worker {os.getpid()} stopped.")

    def _install_handlers(self, stop_requested: threading.Event) -> dict[int, Any]:
        def on_signal(number: int, frame: FrameType | None) -> None:
            name = signal.Signals(number).name
            if not stop_requested.is_set():
                logger.info("received %s, stopping gracefully", name)
                stop_requested.set()
                return
            logger.warning("received %s again, exiting without waiting for jobs", name)
            os._exit(FORCED_EXIT)

        previous: dict[int, Any] = {}
        for number in (signal.SIGTERM, signal.SIGINT):
            previous[number] = signal.signal(number, on_signal)
        return previous

    def _restore_handlers(self, previous: dict[int, Any]) -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

"""Database hygiene for jobs that run in worker threads.

Django opens one connection per thread and alias. A worker thread calls
`django.db.close_old_connections()` right before and right after each
attempt, as Django does around each request, so a connection past
``CONN_MAX_AGE`` or left in a broken state is never carried into the next
job. Connections of a worker thread that has exited are closed on the next
attempt in any thread and when the instance stops.

Jobs run inline (``testing="inline"``) run in the caller's thread, inside
its transaction, and are left alone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from django.db import close_old_connections, connections
from django.db.backends.base.base import BaseDatabaseWrapper

import stagehand
from stagehand import events

__all__ = ["ConnectionKeeper", "keeper"]

logger = logging.getLogger(__name__)

HANDLER_ID = "stagehand_django.db"


class ConnectionKeeper:
    """Closes stale connections around attempts and those of exited threads.

    Event handlers run in worker threads; `close_exited` runs in the thread
    that stops the instance.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[threading.Thread, list[BaseDatabaseWrapper]] = {}
        self._active = 0
        # The instance whose worker threads are looked after, set by
        # `stagehand_django.lifecycle.start`; jobs of other instances are
        # left alone.
        self.instance: stagehand.Stagehand | None = None

    def attach(self) -> None:
        """Attach the job event handlers, once per process."""
        if HANDLER_ID not in events.handlers():
            events.attach(HANDLER_ID, ["job.start", "job.stop"], self._on_event)

    def _on_event(
        self, event: str, measurements: Mapping[str, Any], metadata: Mapping[str, Any]
    ) -> None:
        instance = self.instance
        if instance is None or instance.testing != "disabled":
            return
        if metadata["instance"] != instance.name:
            return
        current = threading.current_thread()
        if not current.name.startswith("stagehand-"):
            return
        if event == "job.start":
            self._remember(current)
            active = threading.active_count()
            if active < self._active:
                self.close_exited()
            self._active = active
        try:
            close_old_connections()
        except Exception:
            # Raising would detach this handler (events detaches a handler
            # that raises), and every later job would run without the
            # clean-up. The next job's start tries again.
            logger.exception(
                "closing stale database connections around job %s failed",
                metadata["job"].id,
            )

    def _remember(self, thread: threading.Thread) -> None:
        # The wrappers are this thread's own (connections are thread-local);
        # creating them opens no connection.
        if thread not in self._threads:
            wrappers = list(connections.all())
            with self._lock:
                self._threads[thread] = wrappers

    def close_exited(self, deadline: float | None = None) -> None:
        """Close the connections of worker threads that have exited.

        Args:
            deadline: A `time.monotonic()` value; threads still alive are
                waited for until then. None waits for none.
        """
        with self._lock:
            threads = list(self._threads.items())
        for thread, wrappers in threads:
            if deadline is not None:
                thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                continue
            with self._lock:
                self._threads.pop(thread, None)
            for wrapper in wrappers:
                _close_for_exited_thread(wrapper)


def _close_for_exited_thread(wrapper: BaseDatabaseWrapper) -> None:
    if wrapper.connection is None:
        return
    # The owning thread has exited, so no other thread can be using it.
    wrapper.inc_thread_sharing()
    try:
        wrapper.close()
    except Exception:
        logger.exception("closing database connection %r failed", wrapper.alias)
    finally:
        wrapper.dec_thread_sharing()


keeper = ConnectionKeeper()


def _forget_after_fork() -> None:
    # The child must not close the parent's connections: with a network
    # database they share the socket, and closing would end the parent's
    # session too.
    keeper._lock = threading.Lock()
    keeper._threads = {}
    keeper._active = 0
    keeper.instance = None


os.register_at_fork(after_in_child=_forget_after_fork)

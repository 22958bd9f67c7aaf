"""Leadership: which peer runs the cluster-wide singletons, such as cron."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Leadership", "SoloLeadership"]

logger = logging.getLogger(__name__)

Listener = Callable[[bool], None]


class Leadership:
    """Tells whether this peer leads, and calls listeners when that changes.

    A single process is always its own leader (`SoloLeadership`). A cluster
    supplies an elected implementation with the same interface, so plugins
    such as cron never need to know which one they run under.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._leader = False

    @property
    def is_leader(self) -> bool:
        return self._leader

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(is_leader)` now and after every change.

        Listeners run in the thread that changes leadership and must return
        quickly.
        """
        with self._lock:
            self._listeners.append(listener)
            leader = self._leader
        listener(leader)

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def set_leader(self, leader: bool) -> None:
        """Record a change of leadership and notify the listeners."""
        with self._lock:
            if leader == self._leader:
                return
            self._leader = leader
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(leader)
            except Exception:
                logger.exception("leadership listener %r failed", listener)


class SoloLeadership(Leadership):
    """Leadership of a process without a cluster: it always leads."""

    def __init__(self) -> None:
        super().__init__()
        self._leader = True

"""Leadership: which peer runs the cluster-wide singletons, such as cron."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["FileLockLeadership", "Leadership", "SoloLeadership"]

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

    def load_state(self, key: str) -> Any:
        """Return what a leader saved under `key`, or None.

        Leaders of one group share this state, so a new leader can go on
        where the old one stopped. A solo process has no one to share with.
        """
        return None

    def save_state(self, key: str, value: Any) -> None:
        """Save a JSON-serialisable `value` under `key` for later leaders."""

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


class FileLockLeadership(Leadership):
    """Leadership among the processes of one host that share a lock file.

    The leader is the process holding an exclusive `fcntl.flock` on `path`.
    Each other process keeps one thread blocked in `flock` inside the
    kernel, so it takes over the moment the leader releases the lock or
    dies, without polling. Processes on other hosts are not coordinated:
    that needs a cluster.

    Args:
        path: The lock file; created with mode 0600 if missing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self._fd: int | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self, name: str = "default") -> None:
        """Start campaigning for leadership in a daemon thread."""
        self._thread = threading.Thread(
            target=self._campaign, name=f"stagehand-leadership-{name}", daemon=True
        )
        self._thread.start()

    def _campaign(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            logger.exception("cannot open the leader lock file %r", self.path)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            logger.exception("cannot lock the leader lock file %r", self.path)
            os.close(fd)
            return
        with self._lock:
            if self._closed:
                os.close(fd)
                return
            self._fd = fd
        logger.info("this process is the leader: it locked %r", self.path)
        self.set_leader(True)

    def load_state(self, key: str) -> Any:
        # The state is JSON in the lock file, read and written only by the
        # process holding the lock.
        with self._lock:
            if self._fd is None:
                return None
            return self._read_state().get(key)

    def save_state(self, key: str, value: Any) -> None:
        with self._lock:
            if self._fd is None:
                return
            state = self._read_state()
            state[key] = value
            data = json.dumps(state).encode()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)

    def _read_state(self) -> dict[str, Any]:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        raw = os.pread(self._fd, size, 0) if size else b""
        try:
            state = json.loads(raw) if raw else {}
        except ValueError:
            logger.warning("ignoring unreadable leader state in %r", self.path)
            return {}
        return state if isinstance(state, dict) else {}

    def stop(self) -> None:
        """Give up leadership, or stop campaigning for it."""
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
        if fd is not None:
            self.set_leader(False)
            os.close(fd)  # releases the lock for the next process

    def forget_after_fork(self) -> None:
        """Close this process's copy of the lock in a forked child.

        A forked child shares the parent's open lock, so it must close its
        copy without unlocking: flock locks belong to the open file, and
        the parent's copy keeps it locked.
        """
        self._closed = True
        fd, self._fd = self._fd, None
        self._leader = False
        if fd is not None:
            os.close(fd)

"""The adapter interface that every system under test implements."""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from importlib.metadata import version
from typing import Any, ClassVar


class Unsupported(Exception):
    """Raised when a system cannot run a benchmark, with the reason."""


class System(ABC):
    """One job system, driven by the benchmarks through a small common API.

    Every job body must call :func:`bench.track.perform` with the args it was
    inserted with, so that all systems are tracked the same way.

    Args:
        workers: number of worker threads that run jobs.
        options: extra settings from the command line (``redis_url``).
    """

    name: ClassVar[str]
    #: Distribution names whose versions are reported.
    distributions: ClassVar[tuple[str, ...]] = ()
    #: Modules that the probe imports to check the system can run.
    modules: ClassVar[tuple[str, ...]] = ()
    #: True when the system needs the suite's redis-server.
    needs_redis: ClassVar[bool] = False

    def __init__(self, workers: int, options: dict[str, Any]) -> None:
        self.workers = workers
        self.options = options

    @classmethod
    def probe(cls) -> str:
        """Import the system and return its version string.

        Raises:
            Exception: the system cannot be imported. The message gives the
                reason.
        """
        for module in cls.modules:
            importlib.import_module(module)
        parts = [f"{dist} {version(dist)}" for dist in cls.distributions]
        return ", ".join(parts)

    @abstractmethod
    def start(self) -> None:
        """Start consuming jobs with ``self.workers`` threads."""

    def start_paused(self) -> None:
        """Prepare a queue that accepts jobs but does not run them."""
        raise Unsupported("no way to hold a queue without consuming it")

    @abstractmethod
    def insert(self, args: dict[str, Any]) -> None:
        """Insert one job that runs as soon as a worker is free."""

    def insert_all(self, batch: list[dict[str, Any]]) -> None:
        """Insert many jobs; systems with a bulk API override this loop."""
        for args in batch:
            self.insert(args)

    def insert_in(self, args: dict[str, Any], seconds: float) -> None:
        """Insert one job due ``seconds`` from now."""
        raise Unsupported("no scheduled jobs")

    def cluster(self, routed: int, handed: int, timeout: float) -> dict[str, Any]:
        """Measure routed unique inserts and the hand-off of queued jobs (B9)."""
        raise Unsupported("no cluster of processes")

    def queued_bytes(self) -> int | None:
        """Return bytes held outside this process for queued jobs, or None.

        None means queued jobs live in this process, so the benchmark measures
        the process's resident memory instead.
        """
        return None

    @abstractmethod
    def stop(self) -> None:
        """Stop the workers; jobs still queued may be dropped."""


class Gate:
    """Worker-blocking jobs that emulate a paused queue for plain pools.

    Each of the pool's threads runs one :meth:`hold` call, so jobs submitted
    afterwards stay queued until :meth:`release`.
    """

    def __init__(self, workers: int) -> None:
        self._entered = threading.Semaphore(0)
        self._open = threading.Event()
        self.workers = workers

    def hold(self) -> None:
        """Occupy the calling worker thread until the gate opens."""
        self._entered.release()
        self._open.wait()

    def wait_held(self, timeout: float = 10.0) -> None:
        """Block until every worker thread is inside :meth:`hold`."""
        for _ in range(self.workers):
            if not self._entered.acquire(timeout=timeout):
                raise TimeoutError("worker threads did not pick up the gate")

    def release(self) -> None:
        """Let the held worker threads go back to the queue."""
        self._open.set()

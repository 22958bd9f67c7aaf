"""Baseline: a bare ``concurrent.futures.ThreadPoolExecutor``."""

from __future__ import annotations

import platform
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.systems.base import Gate, System
from bench.track import perform


class ThreadPoolSystem(System):
    """Jobs are ``submit(perform, args)`` calls. The executor has no bulk API."""

    name = "threadpool"

    @classmethod
    def probe(cls) -> str:
        return f"stdlib (Python {platform.python_version()})"

    def start(self) -> None:
        self._gate: Gate | None = None
        self._pool = ThreadPoolExecutor(max_workers=self.workers)

    def start_paused(self) -> None:
        self.start()
        self._gate = Gate(self.workers)
        for _ in range(self.workers):
            self._pool.submit(self._gate.hold)
        self._gate.wait_held()

    def insert(self, args: dict[str, Any]) -> None:
        self._pool.submit(perform, args)

    def stop(self) -> None:
        if self._gate is not None:
            self._gate.release()
        self._pool.shutdown(wait=False, cancel_futures=True)

"""Baseline: the smallest useful pool, a heap and a condition variable.

It has no features beyond scheduled calls (no retries, results or shutdown
grace) and so marks the limit that a pure-Python thread pool can reach on
this interpreter. Scheduled calls wait in a second heap, ordered by due
time; an idle thread waits on the condition until the earliest is due.
"""

from __future__ import annotations

import heapq
import itertools
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.systems.base import Gate, System
from bench.track import perform

Job = Callable[[dict[str, Any]], None]


class HeapPool:
    """``workers`` threads that pop ``(priority, seq, fn, args)`` from a heap."""

    def __init__(self, workers: int) -> None:
        self._heap: list[tuple[int, int, Job, dict[str, Any]]] = []
        self._timed: list[tuple[float, int, Job, dict[str, Any]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._run, name=f"heap-pool-{n}", daemon=True)
            for n in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def push(self, fn: Job, args: dict[str, Any], priority: int = 0) -> None:
        """Queue one call and wake one idle thread."""
        with self._cond:
            heapq.heappush(self._heap, (priority, next(self._seq), fn, args))
            self._cond.notify()

    def push_many(self, fn: Job, batch: list[dict[str, Any]]) -> None:
        """Queue many calls under one lock acquisition."""
        with self._cond:
            for args in batch:
                heapq.heappush(self._heap, (0, next(self._seq), fn, args))
            self._cond.notify(len(batch))

    def push_at(self, fn: Job, args: dict[str, Any], due: float) -> None:
        """Queue one call for the ``time.monotonic()`` time `due`."""
        with self._cond:
            heapq.heappush(self._timed, (due, next(self._seq), fn, args))
            if self._timed[0][0] == due:
                # Sleeping threads wait for an older due time, or for ever.
                self._cond.notify_all()

    def stop(self) -> None:
        """Let the threads finish the queued calls and exit."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _run(self) -> None:
        heap = self._heap
        timed = self._timed
        while True:
            with self._cond:
                while True:
                    if timed and timed[0][0] <= time.monotonic():
                        _, _, fn, args = heapq.heappop(timed)
                        break
                    if heap:
                        _, _, fn, args = heapq.heappop(heap)
                        break
                    if self._stopping:
                        return
                    if timed:
                        self._cond.wait(timed[0][0] - time.monotonic())
                    else:
                        self._cond.wait()
            fn(args)


class HeapPoolSystem(System):
    """Adapter for :class:`HeapPool`, whose bulk insert takes the lock once."""

    name = "heapq"

    @classmethod
    def probe(cls) -> str:
        return f"stdlib (Python {platform.python_version()})"

    def start(self) -> None:
        self._gate: Gate | None = None
        self._pool = HeapPool(self.workers)
        self._pool.start()

    def start_paused(self) -> None:
        self.start()
        gate = Gate(self.workers)
        for _ in range(self.workers):
            self._pool.push(lambda args: gate.hold(), {})
        gate.wait_held()
        self._gate = gate

    def insert(self, args: dict[str, Any]) -> None:
        self._pool.push(perform, args)

    def insert_all(self, batch: list[dict[str, Any]]) -> None:
        self._pool.push_many(perform, batch)

    def insert_in(self, args: dict[str, Any], seconds: float) -> None:
        self._pool.push_at(perform, args, time.monotonic() + seconds)

    def stop(self) -> None:
        if self._gate is not None:
            self._gate.release()
        self._pool.stop()

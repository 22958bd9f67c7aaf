"""Helpers shared by the engine's tests: waiting on job events, not sleeping."""

from __future__ import annotations

import heapq
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import stagehand
from stagehand import events

HANG_GUARD = 30.0  # seconds; only reached when a test is broken

_ids = itertools.count()


class JobWatcher:
    """Wakes waiters on every job event, so tests wait on conditions."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.started: list[str] = []
        self.stopped: list[tuple[str, str]] = []
        self.handler_id = f"test-watcher-{next(_ids)}"

    def _on_event(self, event: str, measurements: Any, metadata: Any) -> None:
        with self.cond:
            job = metadata["job"]
            if event == "job.start":
                self.started.append(job.id)
            else:
                self.stopped.append((job.id, str(metadata["state"])))
            self.cond.notify_all()

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = HANG_GUARD
    ) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"condition not reached within {timeout} s")

    def wait_final(self, *jobs: stagehand.Job, timeout: float = HANG_GUARD) -> None:
        self.wait_for(lambda: all(job.is_final for job in jobs), timeout)

    def wait_stops(
        self, job: stagehand.Job, count: int, timeout: float = HANG_GUARD
    ) -> None:
        """Wait until `count` attempts of the job have emitted job.stop."""
        self.wait_for(
            lambda: sum(job_id == job.id for job_id, _ in self.stopped) >= count,
            timeout,
        )

    def wait_state(
        self, job: stagehand.Job, state: str, timeout: float = HANG_GUARD
    ) -> None:
        """Wait until the job is in `state` and its job.stop event has run.

        The event comes after the engine has handed a retried or snoozed
        job to the scheduler, so the test may then advance the clock.
        """

        def reached() -> bool:
            last = [seen for job_id, seen in self.stopped if job_id == job.id][-1:]
            return job.state == state and last == [state]

        self.wait_for(reached, timeout)


@contextmanager
def watching() -> Iterator[JobWatcher]:
    watcher = JobWatcher()
    events.attach(watcher.handler_id, ["job.start", "job.stop"], watcher._on_event)
    try:
        yield watcher
    finally:
        events.detach(watcher.handler_id)


@contextmanager
def running(**config: Any) -> Iterator[stagehand.Stagehand]:
    config.setdefault("name", f"test-{next(_ids)}")
    instance = stagehand.Stagehand(**config).start()
    try:
        yield instance
    finally:
        instance.stop()


class PopGate:
    """Stand-in for heapq.heappop that blocks the thread popping `target`.

    Patch it in with monkeypatch.setattr(heapq, "heappop", gate) before the
    instance starts; worker threads bind heappop when they start.
    """

    def __init__(self) -> None:
        self.real_pop = heapq.heappop
        self.target: stagehand.Job | None = None
        self.popped = threading.Event()
        self.release = threading.Event()

    def __call__(self, heap: list[int]) -> int:
        entry = self.real_pop(heap)
        if self.target is not None and entry == self.target._queue_seq:
            self.popped.set()
            self.release.wait(HANG_GUARD)
        return entry


def unique_name(prefix: str) -> str:
    """Return a name no other test in this run uses, such as ``review-3``."""
    return f"{prefix}-{next(_ids)}"


def new_instance(prefix: str, **config: Any) -> stagehand.Stagehand:
    """Build an instance, unstarted, whose name no other test uses."""
    config.setdefault("name", unique_name(prefix))
    return stagehand.Stagehand(**config)


def wait_until(predicate: Callable[[], bool], timeout: float = HANG_GUARD) -> None:
    """Poll `predicate` every millisecond until it is true; fail after `timeout`.

    Only for internal states that no event reports.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        time.sleep(0.001)


class Gate:
    """A point where a thread waits until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        if not self.release.wait(HANG_GUARD):
            raise AssertionError("the test never released the gate")


class HeldLive(dict):  # type: ignore[type-arg]
    """A live table whose first store by `thread` waits after storing."""

    def __init__(self) -> None:
        super().__init__()
        self.thread: int | None = None
        self.gate = Gate()

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if threading.get_ident() == self.thread and not self.gate.entered.is_set():
            self.gate.hold()


def run_in_thread(
    cleanup: list[Any], target: Any, *args: Any, live: HeldLive | None = None
) -> tuple[threading.Thread, list[Any]]:
    """Run ``target(*args)`` in a new thread, joined at cleanup.

    The returned list gets the result or the error. With `live`, the thread's
    stores into that table are the ones it holds.
    """
    outcome: list[Any] = []

    def body() -> None:
        if live is not None:
            live.thread = threading.get_ident()
        try:
            outcome.append(target(*args))
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=body)
    thread.start()
    cleanup.append(lambda: thread.join(HANG_GUARD))
    return thread, outcome


class HeldTable(dict):  # type: ignore[type-arg]
    """A table (`_pending`, `_pushing`) whose first store by `thread` waits.

    With ``after=False`` the thread waits before the store, and with
    ``after=True`` just after it.
    """

    def __init__(self, *, after: bool) -> None:
        super().__init__()
        self.after = after
        self.thread: int | None = None
        self.gate = Gate()

    def __setitem__(self, key: Any, value: Any) -> None:
        must_wait = (
            threading.get_ident() == self.thread and not self.gate.entered.is_set()
        )
        if must_wait and not self.after:
            self.gate.hold()
        super().__setitem__(key, value)
        if must_wait and self.after:
            self.gate.hold()


_LOST_WARNING = re.compile(r"stopped with (\d+) available and (\d+) scheduled")


def lost_jobs(records: list[logging.LogRecord], name: str) -> tuple[int, int]:
    """Return the (available, scheduled) jobs that stop() of `name` logged lost."""
    found = [
        _LOST_WARNING.search(record.getMessage())
        for record in records
        if repr(name) in record.getMessage()
    ]
    counts = [(int(match.group(1)), int(match.group(2))) for match in found if match]
    assert len(counts) <= 1, counts
    return counts[0] if counts else (0, 0)


# The cluster secret of the peers that tests start.
SECRET = "a test secret of enough length"
# One paused queue: inserted jobs wait, so tests can find them.
PAUSED = {"default": {"limit": 1, "paused": True}}


class Peers:
    """Starts cluster peers on 127.0.0.1 and stops them after the test."""

    def __init__(self) -> None:
        self.started: list[stagehand.Stagehand] = []
        self.cluster = unique_name("cluster")

    def start(
        self, *join: stagehand.Stagehand, secret: str = SECRET, **config: Any
    ) -> stagehand.Stagehand:
        addresses = [
            "{}:{}".format(*peer._cluster.address)  # type: ignore[union-attr]
            for peer in join
        ]
        cluster = {
            "name": self.cluster,
            "secret": secret,
            "discovery": config.pop("discovery", addresses),
            "bind": f"127.0.0.1:{config.pop('bind_port', 0)}",
            "join_timeout": HANG_GUARD,
        }
        config.setdefault("queues", {"default": 2})
        instance = stagehand.Stagehand(
            name=unique_name("peer"), cluster=cluster, **config
        )
        self.started.append(instance)
        instance.start()
        return instance

    def stop_all(self) -> None:
        # Stops every peer even if one stop() raises, so that no peer keeps
        # running into later tests, then raises the first error.
        errors: list[BaseException] = []
        for instance in reversed(self.started):
            try:
                instance.stop()
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]

"""Regression tests for engine bugs found by attacking the core.

Each test pins one behaviour that was once broken: races between timeouts,
stop, cancel, retry and the scheduler; overflowing delays; bad input that
half-worked. Each docstring gives the expected behaviour, then the old one.

Some tests reach into internals (a queue's condition, the scheduler's timer
heap, a clock that parks one thread) to hold a race open at an exact point.
The behaviour they check is public.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from support import HANG_GUARD, running, watching
from workers import (
    RUN_LOCK,
    RUNS,
    BlockingWorker,
    EchoWorker,
    FailingWorker,
    RecordingWorker,
)

import stagehand
from stagehand import (
    FakeClock,
    InvalidOption,
    Job,
    JobState,
    JobTimeout,
    ShuttingDown,
    Snooze,
    Stagehand,
    StagehandError,
    SystemClock,
    Worker,
    _registry,
    events,
)
from stagehand._worker import worker_path

_names = itertools.count()


def _name(prefix: str) -> str:
    return f"breaking-{prefix}-{next(_names)}"


def _wait_until(predicate: Callable[[], bool], guard: float = HANG_GUARD) -> bool:
    """Wait for a condition that no event signals; False when `guard` passes.

    Only a broken test reaches the guard; the short pause between checks
    keeps the loop from spinning.
    """
    deadline = time.monotonic() + guard
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _in_call(thread: threading.Thread, function: str) -> bool:
    """True while `thread` has a frame of `function` on its stack."""
    frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def _crashes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.CRITICAL and "crashed" in record.getMessage()
    ]


def _forget(instance: Stagehand) -> None:
    """Drop an instance whose queue is deadlocked: stop() would never return."""
    atexit.unregister(instance.stop)
    _registry.unregister(instance)


class _ParkingClock(SystemClock):
    """The real clock, except that it parks one chosen thread at one call.

    Set `park_now` or `park_monotonic` to a predicate on the calling thread.
    The first matching call sets `parked` and waits for `resume`.
    """

    def __init__(self) -> None:
        self.park_now: Callable[[threading.Thread], bool] | None = None
        self.park_monotonic: Callable[[threading.Thread], bool] | None = None
        self.parked = threading.Event()
        self.resume = threading.Event()

    def _maybe_park(self, attribute: str) -> None:
        predicate = getattr(self, attribute)
        if predicate is not None and predicate(threading.current_thread()):
            setattr(self, attribute, None)
            self.parked.set()
            self.resume.wait(HANG_GUARD)

    def now(self) -> Any:
        self._maybe_park("park_now")
        return super().now()

    def monotonic(self) -> float:
        self._maybe_park("park_monotonic")
        return super().monotonic()


# Workers used only here.


class _Gate:
    """Events that a gated worker waits on, and the thread that ran it."""

    by_name: ClassVar[dict[str, _Gate]] = {}

    def __init__(self) -> None:
        self.name = _name("gate")
        self.entered = threading.Event()
        self.release = threading.Event()
        self.thread: threading.Thread | None = None
        self.by_name[self.name] = self


class TimedGateWorker(Worker):
    """Blocks until its gate opens; each attempt may run 1 s (clock time)."""

    max_attempts = 1

    def timeout(self, job: Job) -> float:
        return 1

    def perform(self, job: Job) -> str:
        gate = _Gate.by_name[job.args["gate"]]
        gate.thread = threading.current_thread()
        gate.entered.set()
        gate.release.wait(HANG_GUARD)
        return "finished after the timeout"


class RaisesJobTimeoutWorker(Worker):
    """Raises stagehand.JobTimeout itself, with no timeout() configured."""

    max_attempts = 1
    threads: ClassVar[dict[str, threading.Thread]] = {}

    def perform(self, job: Job) -> None:
        self.threads[job.id] = threading.current_thread()  # type: ignore[index]
        raise JobTimeout("the upstream API timed out")


class HugeSnoozeWorker(Worker):
    """Snoozes for 10**12 s (about 31,700 years), a finite number of seconds."""

    def perform(self, job: Job) -> Snooze:
        return Snooze(1e12)


class HugeBackoffWorker(Worker):
    """Fails, with a backoff of 10**12 s, a finite number of seconds."""

    max_attempts = 2

    def backoff(self, job: Job) -> float:
        return 1e12

    def perform(self, job: Job) -> None:
        raise RuntimeError("fails")


class UniqueChildWorker(Worker):
    unique = True

    def perform(self, job: Job) -> str:
        return "child"


class UniqueParentWorker(Worker):
    """A unique job that inserts another unique job into its own instance."""

    unique = True

    def perform(self, job: Job) -> str:
        instance = stagehand.get_instance(job.args["instance"])
        assert instance is not None
        return instance.insert(UniqueChildWorker.new({})).state.value


class StopsItsInstanceWorker(Worker):
    """Stops the instance that runs it, then returns."""

    def perform(self, job: Job) -> str:
        instance = stagehand.get_instance(job.args["instance"])
        assert instance is not None
        instance.stop()
        return "stopped"


# Timeouts and the claim race.


def test_timeout_at_return_keeps_queue_usable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Expected: the queue keeps working; before the fix: JobTimeout lands inside the queue lock and the queue deadlocks."""
    # The timeout's callback claims the attempt, records it, and only then
    # raises JobTimeout in the worker thread. Here perform returns in between
    # (as it does by chance when a job ends near its deadline). The worker
    # thread loses the claim, clears pending exceptions and leaves, so the late
    # JobTimeout hits it in `_work_loop`'s ``with cond:``. Without the
    # holds below, this happened within the first 11 of 3,000 jobs whose
    # perform takes about as long as their timeout (0.002 s), in 5 of 5 runs.
    clock = FakeClock()
    instance = Stagehand(
        name=_name("claim"), clock=clock, queues={"default": 1}, shutdown_grace_period=0
    ).start()
    queue = instance._queues["default"]
    gate = _Gate()
    lock_taken = threading.Event()
    handler_id = _name("handler")
    job = instance.insert(TimedGateWorker.new({"gate": gate.name}))
    assert gate.entered.wait(HANG_GUARD)
    worker_thread = gate.thread
    assert worker_thread is not None

    def worker_waits_for_queue_lock() -> bool:
        if not worker_thread.is_alive():
            return True
        frame = sys._current_frames().get(worker_thread.ident)  # type: ignore[arg-type]
        return (
            frame is not None
            and frame.f_code.co_name == "__enter__"
            and frame.f_back is not None
            and frame.f_back.f_code.co_name == "_work_loop"
        )

    def on_stop(event: str, measurements: Any, metadata: Any) -> None:
        # Runs in the scheduler thread, inside the timeout's callback, after
        # the claim and before JobTimeout is raised in the worker thread.
        if metadata["job"] is not job:
            return
        queue.cond.acquire()
        lock_taken.set()
        gate.release.set()
        _wait_until(worker_waits_for_queue_lock, guard=10)

    def release_queue_lock() -> None:
        # Same due time as the timeout, queued after it: runs right after
        # the callback has raised JobTimeout in the worker thread.
        if lock_taken.is_set():
            queue.cond.release()

    events.attach(handler_id, ["job.stop"], on_stop)
    instance._scheduler.call_at(clock.monotonic() + 1, release_queue_lock)  # type: ignore[union-attr]
    healthy = False
    try:
        with caplog.at_level(logging.CRITICAL, logger="stagehand"):
            clock.advance(1)
            _wait_until(lambda: not worker_thread.is_alive() or bool(_crashes(caplog)))
            assert _crashes(caplog) == []
            assert queue.cond.acquire(timeout=10), "the queue lock is held forever"
            queue.cond.release()
            healthy = True
            assert job.state is JobState.DISCARDED
            stats = instance.check_queue("default")
            assert stats["executing"] == 0
            assert stats["stuck"] == 0
            assert stats["threads"] == 1
    finally:
        events.detach(handler_id)
        gate.release.set()
        if healthy:
            instance.stop()
        else:
            _forget(instance)


def test_raised_job_timeout_fails_attempt() -> None:
    """Expected: a JobTimeout raised by perform (no timeout set) fails the attempt; before the fix: the job stays executing forever and its thread exits."""
    threads = RaisesJobTimeoutWorker.threads
    with running(queues={"default": 2}, shutdown_grace_period=0) as instance:
        job = instance.insert(RaisesJobTimeoutWorker.new({}))

        def settled() -> bool:
            # A fixed engine finishes the job, and the broken one ends the thread.
            thread = threads.get(job.id)  # type: ignore[arg-type]
            return job.is_final or (thread is not None and not thread.is_alive())

        _wait_until(settled)
        assert job.state is JobState.DISCARDED
        assert "JobTimeout" in job.errors[-1]["error"]


@pytest.mark.parametrize("worker", [HugeSnoozeWorker, HugeBackoffWorker])
def test_huge_delay_keeps_job(
    worker: type[Worker], caplog: pytest.LogCaptureFixture
) -> None:
    """Expected: a 1e12 s snooze or backoff keeps the job waiting, or is rejected; before the fix: OverflowError crashes the worker thread and loses the job."""
    with (
        caplog.at_level(logging.CRITICAL, logger="stagehand"),
        running(queues={"default": 1}, shutdown_grace_period=0) as instance,
        watching() as watcher,
    ):
        job = instance.insert(worker.new({}))
        sentinel = instance.insert(EchoWorker.new({}))
        watcher.wait_final(sentinel)
        instance.pause_queue("default")

        assert _crashes(caplog) == []
        # retry_job makes a job that waits in the scheduler available now.
        assert instance.retry_job(job.id).state is JobState.AVAILABLE  # type: ignore[arg-type]


# Validation: bad input that half-works or raises the wrong error.


@pytest.mark.parametrize(
    "schedule_in", [1e12, 10**400, (1e8, "days")], ids=["1e12", "10**400", "1e8 days"]
)
def test_new_rejects_overflowing_schedule_in(schedule_in: Any) -> None:
    """Expected: Worker.new raises InvalidOption; before the fix: 1e12 is accepted (insert then raises OverflowError), 10**400 raises OverflowError."""
    with pytest.raises(InvalidOption, match="schedule_in"):
        EchoWorker.new({}, schedule_in=schedule_in)


def test_failed_insert_all_leaves_no_job() -> None:
    """Expected: insert_all raises InvalidOption and lists no job; before the fix: OverflowError, and the first job stays listed as available but is in no queue."""
    with running(queues={"default": {"limit": 1, "paused": True}}) as instance:
        first = EchoWorker.new({})
        try:
            second = EchoWorker.new({}, schedule_in=1e12)
        except InvalidOption:
            return  # rejected when built, so nothing can be half-inserted
        with pytest.raises((InvalidOption, OverflowError)) as raised:
            instance.insert_all([first, second])

        assert instance.jobs() == []
        assert isinstance(raised.value, InvalidOption)


def test_deep_args_raise_invalid_option() -> None:
    """Expected: InvalidOption naming args; before the fix: RecursionError from the JSON encoder."""
    tree: dict[str, Any] = {}
    for _ in range(100_000):
        tree = {"a": tree}
    with pytest.raises(InvalidOption, match="args"):
        EchoWorker.new({"tree": tree})


def test_insert_rejects_hand_built_priority() -> None:
    """Expected: insert(Job(..., priority="urgent")) raises InvalidOption and enqueues nothing; before the fix: accepted (a str priority later kills the scheduler thread)."""
    with running(queues={"default": {"limit": 1, "paused": True}}) as instance:
        job = Job(worker=worker_path(EchoWorker), args={}, priority="urgent")  # type: ignore[arg-type]
        with pytest.raises(InvalidOption, match="priority"):
            instance.insert(job)
        assert instance.jobs() == []


@pytest.mark.parametrize(
    "fields",
    [{"state": JobState.COMPLETED}, {"cancel_requested": True}],
    ids=["completed", "cancel-requested"],
)
def test_insert_rejects_hand_built_outcome(fields: dict[str, Any]) -> None:
    # A new job that is not available, or whose cancel was requested, would
    # run with a state or a request it never had. insert() rejects it,
    # naming the field, and enqueues nothing.
    with running(queues={"default": 1}) as instance:
        job = Job(worker=worker_path(EchoWorker), args={}, **fields)
        name = next(iter(fields))
        with pytest.raises(InvalidOption, match=name):
            instance.insert(job)
        assert instance.jobs() == []
        assert job.id is None


@pytest.mark.parametrize("seconds", [math.nan, math.inf])
def test_advance_rejects_non_finite_seconds(seconds: float) -> None:
    """Expected: ValueError and the clock unchanged; before the fix: the clock moves to nan/inf and now() fails from then on."""
    clock = FakeClock()
    before = clock.now()
    with pytest.raises(ValueError, match="seconds"):
        clock.advance(seconds)
    assert clock.now() == before


def test_stop_with_huge_grace_period_waits() -> None:
    """Expected: stop() waits for the executing job (shutdown_grace_period=1e10 is accepted); before the fix: stop() raises OverflowError at once and leaves the scheduler thread running."""
    entered, release = BlockingWorker.gate(_name("grace"))
    gate_name = next(
        name for name, value in BlockingWorker.gates.items() if value[0] is entered
    )
    instance = Stagehand(name=_name("grace"), shutdown_grace_period=1e10).start()
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            instance.stop()
        except BaseException as error:
            errors.append(error)

    job = instance.insert(BlockingWorker.new({"gate": gate_name}))
    assert entered.wait(HANG_GUARD)
    stopper = threading.Thread(target=stop, daemon=True)
    stopper.start()
    try:
        _wait_until(lambda: not stopper.is_alive() or _in_call(stopper, "wait_idle"))
    finally:
        release.set()
    stopper.join(HANG_GUARD)

    assert errors == []
    assert job.state is JobState.COMPLETED
    scheduler = instance._scheduler
    assert scheduler is not None
    assert not scheduler._thread.is_alive()  # type: ignore[union-attr]


# Races with stop() and with jobs that finish.


def test_insert_racing_stop_is_rejected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Expected: an insert caught by stop() raises ShuttingDown, or its job runs or is counted as lost; before the fix: an available job that never runs and is not counted."""
    clock = _ParkingClock()
    instance = Stagehand(name=_name("insert-stop"), clock=clock).start()
    outcome: list[Any] = []

    def insert() -> None:
        try:
            outcome.append(instance.insert(EchoWorker.new({})))
        except ShuttingDown as error:
            outcome.append(error)

    inserter = threading.Thread(target=insert, name=_name("inserter"), daemon=True)
    clock.park_now = lambda thread: thread is inserter
    with caplog.at_level(logging.WARNING, logger="stagehand"):
        inserter.start()
        try:
            # The insert has passed its state check and waits to stamp the job.
            assert clock.parked.wait(HANG_GUARD)
            stopper = threading.Thread(target=instance.stop, daemon=True)
            stopper.start()
            stopper.join(2)  # a fixed stop() may wait for the insert instead
        finally:
            clock.resume.set()
        inserter.join(HANG_GUARD)
        stopper.join(HANG_GUARD)

    assert not instance.running
    assert len(outcome) == 1
    counted = any("stopped with 1 available" in r.getMessage() for r in caplog.records)
    result = outcome[0]
    assert isinstance(result, ShuttingDown) or result.is_final or counted


def test_get_job_finds_finishing_job() -> None:
    """Expected: get_job finds a job throughout its retention; before the fix: None (and JobNotFound from cancel_job) while it moves from live to retained."""
    clock = _ParkingClock()
    queue = _name("finishing")
    instance = Stagehand(
        name=_name("finishing"), clock=clock, queues={queue: 1}
    ).start()
    # The worker thread reads the monotonic clock first when it retains
    # the finished job, after it has dropped it from the live jobs.
    clock.park_monotonic = lambda thread: thread.name.startswith(f"stagehand-{queue}-")
    try:
        job = instance.insert(EchoWorker.new({}, queue=queue))
        assert clock.parked.wait(HANG_GUARD)
        # The state turns final only once the job is retained.
        assert job.state is JobState.EXECUTING
        assert instance.get_job(job.id) is job  # type: ignore[arg-type]
        assert job in instance.jobs()
    finally:
        clock.resume.set()
        instance.stop()


def test_check_queue_counts_finished_job_once() -> None:
    """Expected: in job.stop the finished job counts as completed only; before the fix: check_queue counts it as executing and completed at once."""
    seen: list[dict[str, Any]] = []
    handler_id = _name("check-queue")
    with running(queues={"default": 1}) as instance, watching() as watcher:

        def on_stop(event: str, measurements: Any, metadata: Any) -> None:
            if metadata["instance"] == instance.name:
                seen.append(instance.check_queue("default"))

        events.attach(handler_id, ["job.stop"], on_stop)
        try:
            job = instance.insert(EchoWorker.new({}))
            watcher.wait_final(job)
        finally:
            events.detach(handler_id)

    assert seen[0]["completed"] == 1
    assert seen[0]["executing"] == 0


def test_stop_from_job_completes_job() -> None:
    """Expected: a job that calls stop() completes; before the fix: stop() waits the whole grace period for the job that called it, then discards it as abandoned."""
    with watching():
        name = _name("self-stop")
        instance = Stagehand(name=name, shutdown_grace_period=1).start()
        job = instance.insert(StopsItsInstanceWorker.new({"instance": name}))
        assert _wait_until(lambda: job.is_final)

    assert job.state is JobState.COMPLETED, job.errors


def test_retry_job_after_stop_raises() -> None:
    """Expected: retry_job after stop() raises ShuttingDown and the job stays discarded; before the fix: it returns the job as available, and it never runs."""
    with watching() as watcher:
        with running() as instance:
            job = instance.insert(FailingWorker.new({}, max_attempts=1))
            watcher.wait_final(job)

        with pytest.raises(StagehandError):
            instance.retry_job(job.id)  # type: ignore[arg-type]
        assert job.state is JobState.DISCARDED


# Queue order and drain.


def test_retried_job_runs_after_earlier_jobs() -> None:
    """Expected: A (cancelled, then retried) runs after B, which became available first; before the fix: A runs first, from its stale heap entry."""
    with (
        running(queues={"default": {"limit": 1, "paused": True}}) as instance,
        watching() as watcher,
    ):
        first = instance.insert(RecordingWorker.new({"label": "A"}))
        second = instance.insert(RecordingWorker.new({"label": "B"}))
        instance.cancel_job(first.id)  # type: ignore[arg-type]
        instance.retry_job(first.id)  # type: ignore[arg-type]
        instance.resume_queue("default")
        watcher.wait_final(first, second)

    with RUN_LOCK:
        order = [label for job_id, label in RUNS if job_id in (first.id, second.id)]
    assert order == ["B", "A"]


def test_drain_returns_retried_job_once() -> None:
    """Expected: drain_queue returns the job once; before the fix: twice (its stale heap entry and its new one)."""
    with running(queues={"default": {"limit": 1, "paused": True}}) as instance:
        job = instance.insert(EchoWorker.new({}))
        instance.cancel_job(job.id)  # type: ignore[arg-type]
        instance.retry_job(job.id)  # type: ignore[arg-type]

        assert instance.drain_queue("default") == [job]


def test_drain_releases_unique_fingerprints() -> None:
    """Expected: after draining a unique job, inserting it again is not a conflict; before the fix: conflict=True with a job that is in no queue."""
    with running(queues={"default": {"limit": 1, "paused": True}}) as instance:
        drained = instance.insert(EchoWorker.new({"account": 7}, unique=True))
        assert instance.drain_queue("default") == [drained]

        again = instance.insert(EchoWorker.new({"account": 7}, unique=True))
        assert not again.conflict
        assert again.id != drained.id


def test_jobs_lists_batch_in_order() -> None:
    """Expected: jobs() lists the batch oldest insert first, as given; before the fix: the finished second job comes before the executing first one."""
    entered, release = BlockingWorker.gate(_name("batch"))
    gate_name = next(
        name for name, value in BlockingWorker.gates.items() if value[0] is entered
    )
    with running(queues={"default": 2}) as instance, watching() as watcher:
        try:
            first, second = instance.insert_all(
                [BlockingWorker.new({"gate": gate_name}), EchoWorker.new({})]
            )
            assert entered.wait(HANG_GUARD)
            watcher.wait_final(second)

            assert instance.jobs() == [first, second]
        finally:
            release.set()


# Testing modes and threads.


def test_inline_nested_unique_insert_completes() -> None:
    """Expected: the nested unique insert runs and the parent completes; before the fix: the inserting thread deadlocks on the unique table's lock."""
    name = _name("inline")
    instance = Stagehand(name=name, testing="inline").start()
    results: list[Job] = []
    inserter = threading.Thread(
        target=lambda: results.append(
            instance.insert(UniqueParentWorker.new({"instance": name}))
        ),
        daemon=True,
    )
    inserter.start()
    inserter.join(10)
    if inserter.is_alive():
        _forget(instance)
    else:
        instance.stop()

    assert not inserter.is_alive(), "the inline insert deadlocked"
    assert results[0].result == "completed"


@pytest.mark.parametrize("mode", ["manual", "inline", "not started"])
def test_scale_queue_starts_no_stray_threads(mode: str) -> None:
    """Expected: scale_queue on a manual, inline or unstarted instance starts no thread; before the fix: it starts worker threads, leaked for good if the instance never starts."""
    queue = _name("scale")
    testing = "disabled" if mode == "not started" else mode
    instance = Stagehand(name=_name("scale"), testing=testing, queues={queue: 1})
    if mode != "not started":
        instance.start()
    try:
        instance.scale_queue(queue, 3)
        threads = [
            t.name
            for t in threading.enumerate()
            if t.name.startswith(f"stagehand-{queue}-")
        ]
        assert threads == []
    finally:
        instance.stop()
        # stop() on a never-started instance does not close its queues.
        for worker_queue in instance._queues.values():
            worker_queue.close()


# Events.


def test_handler_system_exit_spares_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Expected: the handler is detached and logged, the job completes; before the fix: the worker thread crashes, the job stays executing and the handler stays attached."""
    handler_id = _name("exits")

    def exits(event: str, measurements: Any, metadata: Any) -> None:
        raise SystemExit("handler called sys.exit()")

    with (
        caplog.at_level(logging.CRITICAL, logger="stagehand"),
        running(queues={"default": 1}, shutdown_grace_period=0) as instance,
    ):
        events.attach(handler_id, ["job.start"], exits)
        try:
            job = instance.insert(EchoWorker.new({}))
            _wait_until(lambda: job.is_final or bool(_crashes(caplog)))
            attached = handler_id in events.handlers()
        finally:
            events.detach(handler_id)

    assert _crashes(caplog) == []
    assert job.state is JobState.COMPLETED
    assert not attached


def test_start_in_a_child_forked_without_hooks_draws_a_new_id_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # uWSGI forks without running os.register_at_fork hooks; the process id
    # recorded with the prefix then differs from the current one.
    from stagehand import _job

    monkeypatch.setattr(_job, "_id_pid", -1)
    old_prefix = _job._id_prefix
    with running() as instance:
        job = instance.insert(EchoWorker.new({"value": 1}))
    assert not job.id.startswith(old_prefix)  # type: ignore[union-attr]
    assert job.id.startswith(_job._id_prefix)  # type: ignore[union-attr]
    assert _job._id_pid == os.getpid()

"""Races of cancel, retry and stop with inserts, backoff and lookups.

Each race test stops one thread at a chosen point with a gate: a wrapped
dict or method that waits on an event, which has the same effect as the
thread being descheduled there. The test then checks one guarantee.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from support import (
    HANG_GUARD,
    Gate,
    HeldLive,
    new_instance,
    run_in_thread,
    unique_name,
    wait_until,
    watching,
)
from workers import CountingWorker, runs_of

import stagehand
from stagehand import JobState
from stagehand.testing import FakeClock

pytestmark = pytest.mark.usefixtures("clear_counts")


def _flush_scheduler(
    instance: stagehand.Stagehand, clock: FakeClock, seconds: float
) -> None:
    # Advances the clock and returns once the scheduler has handed every job
    # due by then to its queue: a timer due at the same time runs after the
    # jobs of its batch are promoted.
    done = threading.Event()
    scheduler = instance._scheduler
    assert scheduler is not None
    scheduler.call_at(clock.monotonic() + seconds, done.set)
    clock.advance(seconds)
    assert done.wait(HANG_GUARD)


@pytest.mark.parametrize("batch", [False, True], ids=["insert", "insert_all"])
def test_cancel_during_scheduled_insert(cleanup: list[Any], batch: bool) -> None:
    # cancel_job runs while the inserting thread is held right after it
    # stores a scheduled job in the live table. The job is cancelled, so it
    # must stay cancelled when the insert goes on, and must never run when
    # its time comes.
    clock = FakeClock()
    live = HeldLive()
    instance = new_instance("break-review", queues={"default": 1}, clock=clock)
    instance._live = live
    instance.start()
    cleanup.append(instance.stop)
    cleanup.append(live.gate.release.set)
    job = CountingWorker.new({"n": 1}, schedule_in=60)
    if batch:
        inserter, _ = run_in_thread(cleanup, instance.insert_all, [job], live=live)
    else:
        inserter, _ = run_in_thread(cleanup, instance.insert, job, live=live)
    assert live.gate.entered.wait(HANG_GUARD)

    assert instance.cancel_job(job.id).state is JobState.CANCELLED  # type: ignore[arg-type]
    live.gate.release.set()
    inserter.join(HANG_GUARD)
    assert not inserter.is_alive()

    with watching() as watcher:
        _flush_scheduler(instance, clock, 60)
        # A job queued behind anything the scheduler promoted runs after it.
        marker = instance.insert(CountingWorker.new({"n": 2}))
        watcher.wait_final(marker)
    assert (job.state, runs_of(1)) == (JobState.CANCELLED, 0)


def test_retry_during_scheduled_insert_runs_once(cleanup: list[Any]) -> None:
    # As above, the inserting thread is held right after it stores a
    # scheduled job in the live table. cancel_job cancels the job and
    # retry_job queues it again, on a paused queue. When the insert goes on
    # and the job's scheduled time comes, the job must still be queued once
    # and run once.
    clock = FakeClock()
    live = HeldLive()
    instance = new_instance(
        "break-review", queues={"default": {"limit": 1, "paused": True}}, clock=clock
    )
    instance._live = live
    instance.start()
    cleanup.append(instance.stop)
    cleanup.append(live.gate.release.set)
    job = CountingWorker.new({"n": 1}, schedule_in=60)
    inserter, _ = run_in_thread(cleanup, instance.insert, job, live=live)
    assert live.gate.entered.wait(HANG_GUARD)
    instance.cancel_job(job.id)  # type: ignore[arg-type]
    assert instance.retry_job(job.id).state is JobState.AVAILABLE  # type: ignore[arg-type]
    live.gate.release.set()
    inserter.join(HANG_GUARD)
    assert not inserter.is_alive()

    with watching() as watcher:
        _flush_scheduler(instance, clock, 60)
        instance.resume_queue("default")
        # One thread, so the marker runs after every queued copy of `job`.
        marker = instance.insert(CountingWorker.new({"n": 2}))
        watcher.wait_final(marker)
    assert runs_of(1) == 1


def test_cancel_before_scheduler_not_lost(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # A scheduled insert marks the job scheduled, then hands it to the
    # scheduler. cancel_job runs between the two. The cancelled job is
    # retained, not waiting, so stop() must not log it as a lost scheduled job.
    instance = new_instance("break-review", queues={"default": 1}, clock=FakeClock())
    instance.start()
    cleanup.append(instance.stop)
    scheduler = instance._scheduler
    assert scheduler is not None
    add_job = scheduler.add_job
    gate = Gate()
    cleanup.append(gate.release.set)

    def gated_add_job(*args: Any, **kwargs: Any) -> None:
        gate.hold()
        add_job(*args, **kwargs)

    scheduler.add_job = gated_add_job  # type: ignore[method-assign]
    job = CountingWorker.new({"n": 1}, schedule_in=60)
    inserter, _ = run_in_thread(cleanup, instance.insert, job)
    assert gate.entered.wait(HANG_GUARD)
    instance.cancel_job(job.id)  # type: ignore[arg-type]
    gate.release.set()
    inserter.join(HANG_GUARD)
    assert not inserter.is_alive()
    with caplog.at_level("WARNING", logger="stagehand"):
        instance.stop()
    lost = [r.getMessage() for r in caplog.records if "are lost" in r.getMessage()]
    assert (job.state, lost) == (JobState.CANCELLED, [])


class _StopGate(Gate):
    def __init__(self) -> None:
        super().__init__()
        self.returned = threading.Event()


_STOP_GATES: dict[str, tuple[_StopGate, stagehand.Stagehand]] = {}


class StopsItsStoppingInstanceWorker(stagehand.Worker):
    """Waits for its gate, then calls stop() on its own instance."""

    def perform(self, job: stagehand.Job) -> None:
        gate, instance = _STOP_GATES[job.args["gate"]]
        gate.hold()
        instance.stop()
        gate.returned.set()


class _WatchedStopped(threading.Event):
    """An instance's stopped event that blocks a worker thread's wait until
    `unblock` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.job_waits = threading.Event()
        self.unblock = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread().name.startswith("stagehand-"):
            self.job_waits.set()
            return self.unblock.wait(HANG_GUARD)
        return super().wait(timeout)


def test_stop_from_job_while_stopping(cleanup: list[Any]) -> None:
    # docs/guide.md: stop() called from a job of the same instance returns at
    # once, since waiting would wait for the calling job itself. Here stop()
    # has begun in another thread and waits for the executing job; the job
    # then calls stop(). That call must return without waiting for the stop,
    # which would hold the job until the grace period ends and abandon it.
    name = unique_name("break-review")
    gate = _StopGate()
    instance = new_instance(
        "break-review",
        name=name,
        queues={"default": 1},
        shutdown_grace_period=HANG_GUARD,
    )
    _STOP_GATES[name] = (gate, instance)
    stopped = _WatchedStopped()
    instance._stopped = stopped
    instance.start()
    cleanup.append(instance.stop)
    cleanup.append(gate.release.set)
    job = instance.insert(StopsItsStoppingInstanceWorker.new({"gate": name}))
    assert gate.entered.wait(HANG_GUARD)
    stopper, _ = run_in_thread(cleanup, instance.stop)
    cleanup.append(stopped.unblock.set)
    wait_until(lambda: instance._queues["default"]._closed)
    gate.release.set()
    wait_until(lambda: gate.returned.is_set() or stopped.job_waits.is_set())
    assert not stopped.job_waits.is_set(), "the job's stop() waited for the stop"
    stopper.join(HANG_GUARD)
    assert job.state is JobState.COMPLETED


class RaisingConstructorWorker(stagehand.Worker):
    """A worker whose constructor raises, as one needing a missing resource."""

    max_attempts = 1

    def __init__(self) -> None:
        raise RuntimeError("the worker could not be built")

    def perform(self, job: stagehand.Job) -> None:
        raise AssertionError("perform ran although the constructor raised")


def test_constructor_error_fails_attempt(cleanup: list[Any]) -> None:
    # A worker class is built anew for every attempt. When its constructor
    # raises, that attempt must fail like any error (here, with one attempt,
    # the job is discarded). It must not stay executing with no thread
    # running it, counted as executing by check_queue for ever.
    instance = new_instance("break-review", queues={"default": 1})
    instance.start()
    cleanup.append(instance.stop)
    with watching() as watcher:
        job = instance.insert(RaisingConstructorWorker.new({}))
        # One thread: the marker runs after the thread that took `job` is
        # done with it, or after its replacement has started.
        marker = instance.insert(CountingWorker.new({"n": 1}))
        watcher.wait_final(marker)
    assert job.state is JobState.DISCARDED
    assert instance.check_queue("default")["executing"] == 0


_BACKOFF_GATES: dict[str, Gate] = {}


class SlowBackoffWorker(stagehand.Worker):
    """Fails every attempt; its backoff waits on the gate named in args."""

    max_attempts = 5

    def backoff(self, job: stagehand.Job) -> float:
        _BACKOFF_GATES[job.args["gate"]].hold()
        return 10.0

    def perform(self, job: stagehand.Job) -> None:
        raise RuntimeError(f"attempt {job.attempt} failed")


def test_cancel_during_backoff_not_retried(cleanup: list[Any]) -> None:
    # docs/guide.md: an executing job gets cancel_requested, and if that
    # attempt fails it is cancelled rather than retried. Here the attempt has
    # failed and the engine is calling the worker's backoff() for the retry
    # delay when cancel_job runs. The job is still executing, so cancel_job
    # requests cancellation. Once backoff() returns, the job must end
    # cancelled, not retryable.
    name = unique_name("break-review")
    gate = _BACKOFF_GATES[name] = Gate()
    instance = new_instance("break-review", queues={"default": 1}, clock=FakeClock())
    instance.start()
    cleanup.append(instance.stop)
    cleanup.append(gate.release.set)
    with watching() as watcher:
        job = instance.insert(SlowBackoffWorker.new({"gate": name}))
        assert gate.entered.wait(HANG_GUARD)
        cancelled = instance.cancel_job(job.id)  # type: ignore[arg-type]
        assert (cancelled.state, cancelled.cancel_requested) == (
            JobState.EXECUTING,
            True,
        )
        gate.release.set()
        watcher.wait_stops(job, 1)
    assert job.state is JobState.CANCELLED


def test_get_job_finds_job_being_retried(cleanup: list[Any]) -> None:
    # Every job is visible to get_job while live or retained. get_job reads
    # the live table, then retention. Here get_job has found nothing in the
    # live table of a completed job and is held before it reads retention.
    # Then retry_job moves the job from retention to the live table. The
    # held get_job must still return the job, and so must cancel_job and
    # retry_job, which look the job up the same way.
    instance = new_instance("break-review", queues={"default": 1})
    instance.start()
    cleanup.append(instance.stop)
    with watching() as watcher:
        job = instance.insert(CountingWorker.new({"n": 1}))
        watcher.wait_stops(job, 1)
    instance.pause_queue("default")
    retention = instance._retained
    retention_get = retention.get
    gate = Gate()
    cleanup.append(gate.release.set)
    gated_threads: list[int] = []

    def gated_get(job_id: str) -> Any:
        if threading.get_ident() in gated_threads:
            gate.hold()
        return retention_get(job_id)

    retention.get = gated_get  # type: ignore[method-assign]

    def look_up() -> stagehand.Job | None:
        gated_threads.append(threading.get_ident())
        return instance.get_job(job.id)  # type: ignore[arg-type]

    reader, found = run_in_thread(cleanup, look_up)
    assert gate.entered.wait(HANG_GUARD)
    assert instance.retry_job(job.id).state is JobState.AVAILABLE  # type: ignore[arg-type]
    gate.release.set()
    reader.join(HANG_GUARD)
    assert found == [job]


def test_churn_keeps_exact_counts(
    cleanup: list[Any], frequent_thread_switches: None
) -> None:
    # Threads insert (one by one and in batches, now and scheduled), cancel,
    # retry, pause, resume and scale at once, while another thread checks
    # that every inserted job stays visible to get_job. At the end every job
    # is final. A job never retried ran once if completed and never if
    # cancelled, and a retried job ran at most once more than it was retried.
    # jobs() and check_queue count every job exactly once.
    import random

    clock = FakeClock()
    instance = new_instance("break-review", queues={"a": 3, "b": 2}, clock=clock)
    instance.start()
    cleanup.append(instance.stop)
    lock = threading.Lock()
    inserted: list[stagehand.Job] = []
    retried: dict[str, int] = {}
    missing: list[str] = []
    done = threading.Event()
    numbers = iter(range(1, 1_000_000))

    def build(rng: random.Random) -> stagehand.Job:
        with lock:
            number = next(numbers)
        options: dict[str, Any] = {"queue": rng.choice(["a", "b"])}
        if rng.random() < 0.3:
            options["schedule_in"] = 5
        return CountingWorker.new({"n": number}, **options)

    def insert(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            if rng.random() < 0.3:
                jobs = instance.insert_all([build(rng) for _ in range(4)])
            else:
                jobs = [instance.insert(build(rng))]
            with lock:
                inserted.extend(jobs)

    def pick(rng: random.Random) -> stagehand.Job | None:
        with lock:
            return rng.choice(inserted) if inserted else None

    def cancel(seed: int) -> None:
        rng = random.Random(seed)
        while not done.is_set():
            job = pick(rng)
            if job is None:
                continue
            instance.cancel_job(job.id)  # type: ignore[arg-type]

    def retry(seed: int) -> None:
        rng = random.Random(seed)
        while not done.is_set():
            job = pick(rng)
            # Only jobs with an even number are retried.
            if job is not None and job.args["n"] % 2 == 0:
                with lock:
                    retried[job.id] = retried.get(job.id, 0) + 1  # type: ignore[index]
                instance.retry_job(job.id)  # type: ignore[arg-type]

    def control(seed: int) -> None:
        rng = random.Random(seed)
        while not done.is_set():
            queue = rng.choice(["a", "b"])
            action = rng.randrange(3)
            if action == 0:
                instance.pause_queue(queue)
            elif action == 1:
                instance.resume_queue(queue)
            else:
                instance.scale_queue(queue, rng.randint(1, 4))

    def check(_seed: int) -> None:
        while not done.is_set():
            with lock:
                known = list(inserted)
            for job in known:
                if instance.get_job(job.id) is not job:  # type: ignore[arg-type]
                    missing.append(job.id)  # type: ignore[arg-type]

    inserters = [threading.Thread(target=insert, args=(seed,)) for seed in range(4)]
    others = [
        threading.Thread(target=target, args=(seed,))
        for seed, target in enumerate([cancel, cancel, retry, control, check])
    ]
    for thread in inserters + others:
        thread.start()
    for thread in inserters:
        thread.join(HANG_GUARD)
    done.set()
    for thread in others:
        thread.join(HANG_GUARD)
    assert not any(thread.is_alive() for thread in inserters + others)

    for queue in ("a", "b"):
        instance.scale_queue(queue, 3)
        instance.resume_queue(queue)
    with watching() as watcher:
        _flush_scheduler(instance, clock, 5)
        watcher.wait_for(lambda: all(job.is_final for job in inserted))

    assert missing == []
    for job in inserted:
        runs = runs_of(job.args["n"])
        times = retried.get(job.id, 0)  # type: ignore[arg-type]
        if times == 0:
            expected = 1 if job.state is JobState.COMPLETED else 0
            assert (job.state, runs) in (
                (JobState.COMPLETED, 1),
                (JobState.CANCELLED, 0),
            ), f"job {job.id}: {job.state.value}, ran {runs} times"
            assert runs == expected
        else:
            assert runs <= 1 + times, f"job {job.id} ran {runs} times, retried {times}"
    listed = instance.jobs()
    assert sorted(job.id for job in listed) == sorted(job.id for job in inserted)  # type: ignore[type-var]
    total = 0
    for queue in ("a", "b"):
        counts = instance.check_queue(queue)
        assert counts["available"] == counts["executing"] == counts["scheduled"] == 0
        total += counts["completed"] + counts["cancelled"] + counts["discarded"]
    assert total == len(inserted)

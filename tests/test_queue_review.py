"""Concurrency tests of the lock-free take and the code around it.

Each test drives real worker threads into one interleaving. In the first two
groups, that interleaving once lost a job, ran it twice, hung, killed a worker
thread, raised RuntimeError, or showed wrong states or counts. The last group
covers races that held. Where the interleaving is rare, a gate stops one
thread at that point, as `support.PopGate` does. That has the
same effect as the thread being descheduled there.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from typing import Any

import pytest
from support import (
    HANG_GUARD,
    PopGate,
    new_instance,
    running,
    unique_name,
    wait_until,
    watching,
)
from workers import (
    COUNT_LOCK,
    COUNTS,
    RUN_LOCK,
    RUNS,
    BlockingWorker,
    CountingWorker,
    EchoWorker,
    RecordingWorker,
    runs_of,
)

import stagehand
from stagehand import JobState, Snooze, Worker, events
from stagehand import _queue as queue_module

pytestmark = pytest.mark.usefixtures("clear_counts")

# Seconds a test waits for a call that correct code returns from at once.
# It is well under HANG_GUARD, so a deadlock fails the test quickly.
DEADLOCK_GUARD = 3.0


# ---------------------------------------------------------------------------
# Races in cancel_job, insert_all, timeouts and jobs()


def test_cancel_job_lost_to_worker_requests_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # cancel_job reads job.state (available) and then calls queue.remove().
    # The test lets a worker thread claim the job in between and leave
    # _taking before cancel_job calls queue.taking(). Before the fix,
    # cancel_job then treated the job as inserted but not pushed yet and
    # cancelled it by the state it read first. It returned the running job as
    # cancelled, emitted job.stop for it and never set cancel_requested. Now
    # cancel_job reads the state again once no take is in progress.
    gate = PopGate()
    monkeypatch.setattr(heapq, "heappop", gate)
    name = unique_name("cancel")
    entered, release = BlockingWorker.gate(name)
    instance = new_instance("review", queues={"default": {"limit": 1, "paused": True}})
    instance.start()
    queue = instance._queues["default"]
    real_remove = queue.remove

    def late_remove(job: stagehand.Job) -> bool:
        # cancel_job has read the state. The worker finishes its claim and
        # starts the job before the remove.
        gate.release.set()
        assert entered.wait(HANG_GUARD)
        return real_remove(job)

    try:
        with watching() as watcher:
            job = BlockingWorker.new({"gate": name})
            gate.target = job
            instance.insert(job)
            instance.resume_queue("default")
            assert gate.popped.wait(HANG_GUARD)
            monkeypatch.setattr(queue, "remove", late_remove)
            returned = instance.cancel_job(job.id)  # type: ignore[arg-type]
            state_then = returned.state
            release.set()
            watcher.wait_for(lambda: job.state is JobState.COMPLETED)
        assert state_then is JobState.EXECUTING, (
            f"cancel_job returned the running job as {state_then}"
        )
        assert job.cancel_requested
    finally:
        gate.release.set()
        release.set()
        instance.stop()


def test_insert_all_with_cancel_and_retry_runs_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # insert_all puts its jobs in _live, where get_job and jobs() find them,
    # before push_many(inserted=True) queues them. A cancel_job and a
    # retry_job from another thread in between make retry_job queue the job.
    # Before the fix, push_many checked only that the job was available, so
    # it queued the job again under its insert key. Both keys were in
    # _pending, and the job ran twice. Now push_many(inserted=True) skips a
    # job queued since it was stamped, as push() does for insert().
    instance = new_instance("review", queues={"default": {"limit": 1, "paused": True}})
    instance.start()
    queue = instance._queues["default"]
    in_insert = threading.Event()
    go = threading.Event()
    # _enqueue_batch calls ensure_open() after filling _live and before
    # push_many(). The call is held until the job is cancelled and retried.
    ensure_open = queue.ensure_open

    def held_ensure_open() -> None:
        if not in_insert.is_set():
            in_insert.set()
            go.wait(HANG_GUARD)
        ensure_open()

    monkeypatch.setattr(queue, "ensure_open", held_ensure_open)
    job = CountingWorker.new({"n": 1})
    inserter = threading.Thread(target=instance.insert_all, args=([job],))
    try:
        with watching() as watcher:
            inserter.start()
            assert in_insert.wait(HANG_GUARD)
            instance.cancel_job(job.id)  # type: ignore[arg-type]
            instance.retry_job(job.id)  # type: ignore[arg-type]
            go.set()
            inserter.join(HANG_GUARD)
            after = instance.insert(CountingWorker.new({"n": 2}))
            instance.resume_queue("default")
            # One thread takes keys in order, and `after` has the largest.
            watcher.wait_final(after)
        assert runs_of(1) == 1, (
            f"job ran {runs_of(1)} times; attempts {job.attempt}, state {job.state}"
        )
    finally:
        go.set()
        inserter.join(HANG_GUARD)
        instance.stop()


class SnoozeThenSpinWorker(Worker):
    """Snoozes for 0 s on attempt 1, then spins until its timeout on attempt 2."""

    def timeout(self, job: stagehand.Job) -> float | None:
        return 0.05 if job.attempt >= 2 else None

    def backoff(self, job: stagehand.Job) -> float:
        return 3600.0

    def perform(self, job: stagehand.Job) -> Any:
        if job.attempt == 1:
            return Snooze(0)
        while True:  # JobTimeout lands here
            time.sleep(0.001)


def test_timeout_keeps_other_threads_running_entry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Attempt 1 snoozes for 0 s, and its thread is still in job.stop handlers
    # when attempt 2 times out in another thread. Before the fix,
    # release_stuck_slot took the job and deleted the _running entry of every
    # thread running it, so the first thread's own `del running[me]` raised
    # KeyError and killed the thread. Now release_stuck_slot takes a thread id.
    handler_id = unique_name("review-stop")
    first_thread: list[threading.Thread] = []

    def hold_first_thread(event: str, measurements: Any, metadata: Any) -> None:
        job = metadata["job"]
        if job.worker.endswith("SnoozeThenSpinWorker") and (
            metadata["state"] is JobState.SCHEDULED
        ):
            first_thread.append(threading.current_thread())
            wait_until(lambda: job.attempt == 2 and job.state is JobState.RETRYABLE)

    instance = new_instance("review", queues={"default": 2})
    instance.start()
    queue = instance._queues["default"]
    events.attach(handler_id, ["job.stop"], hold_first_thread)
    try:
        with caplog.at_level(logging.CRITICAL, logger="stagehand"):
            job = instance.insert(SnoozeThenSpinWorker.new({}))
            wait_until(lambda: len(first_thread) == 1)
            # The first thread either goes idle, which leaves two idle threads
            # (it and the replacement for the stuck one), or dies.
            wait_until(
                lambda: not first_thread[0].is_alive() or len(queue._sleepers) == 2
            )
        crashes = [
            r.getMessage() for r in caplog.records if "crashed" in r.getMessage()
        ]
        assert crashes == []
        assert first_thread[0].is_alive()
        assert job.state is JobState.RETRYABLE
    finally:
        events.detach(handler_id)
        instance.stop()


def test_jobs_show_at_most_retention_limit(
    frequent_thread_switches: None,
) -> None:
    # Live jobs finish while jobs() and check_queue() copy the tables. Before
    # the fix, jobs() copied the live jobs that were not final, then the
    # retained ones, and only later filtered by state. A job that finished in
    # between was listed as finished beside the `limit` retained ones, and
    # check_queue() counted it too. Now each state is read once, and at most
    # `limit` finished jobs are shown. When retention was an OrderedDict, this
    # loop raised "RuntimeError: OrderedDict mutated during iteration"
    # instead. Calls that raise RuntimeError are skipped here, because the
    # next test covers that error.
    limit = 2_000
    final = ["completed", "discarded", "cancelled"]
    with (
        running(queues={"default": 8}, retention_limit=limit) as instance,
        watching() as watcher,
    ):
        jobs = instance.insert_all(EchoWorker.new({"value": i}) for i in range(20_000))
        over: list[tuple[int, int]] = []
        calls = 0
        while not jobs[-1].state.is_final and calls < 100:
            calls += 1
            try:
                listed = len(instance.jobs(state=final))
                counted = instance.check_queue("default")["completed"]
            except RuntimeError:
                continue
            if max(listed, counted) > limit:
                over.append((listed, counted))
        watcher.wait_final(*jobs)
    assert over == [], f"(jobs(), check_queue) above {limit}: {over[:5]}"


class _SlowFinalizer:
    """Garbage in a reference cycle whose finalizer releases the GIL.

    Closing a socket or a file in a finalizer does the same.
    """

    def __init__(self) -> None:
        self.cycle = self

    def __del__(self) -> None:
        time.sleep(0.005)


class NapWorker(Worker):
    def perform(self, job: stagehand.Job) -> None:
        time.sleep(0.0005)


def test_jobs_during_gc_finalizer_does_not_raise() -> None:
    # Before each jobs() call, the test leaves a reference cycle whose
    # finalizer releases the GIL, while worker threads remove finished jobs
    # from _live. Before the fix, jobs() and check_queue() copied _live with
    # list(live.items()), which makes one tuple per job, so a garbage
    # collection ran inside the copy, and the finalizer let _live change. The
    # copy then raised "RuntimeError: dictionary changed size during
    # iteration". Now they use dict.copy(), which makes no object per entry,
    # so no collection runs inside the copy.
    with (
        running(queues={"default": 8}) as instance,
        watching() as watcher,
    ):
        jobs = instance.insert_all(NapWorker.new({}) for _ in range(30_000))
        errors: list[str] = []
        for _ in range(10):
            _SlowFinalizer()
            try:
                instance.jobs()
            except RuntimeError as error:
                errors.append(repr(error))
                break
        drained = {job.id for job in instance.drain_queue("default")}
        watcher.wait_final(*[job for job in jobs if job.id not in drained])
    assert errors == []


# ---------------------------------------------------------------------------
# Races in promotion, stop(), pause() and check_queue()


class SnoozeThenBlockWorker(Worker):
    """Snoozes for 0 s on attempt 1, then waits on its gate on attempt 2."""

    def perform(self, job: stagehand.Job) -> Any:
        if job.attempt == 1:
            return Snooze(0)
        entered, release = BlockingWorker.gate(job.args["gate"])
        entered.set()
        if not release.wait(HANG_GUARD):
            raise TimeoutError("the test never released the gate")
        return "second attempt"


def test_promotion_with_cancel_and_retry_runs_once() -> None:
    # The scheduler takes a due job off its heap (marking it in transit),
    # releases its lock, and only then pushes the job into the queue. If the
    # job is cancelled and retried in between, retry_job queues it. Before the
    # fix, push_many accepted available jobs, so it queued the job a second
    # time. Both keys were valid in _pending, so the job ran twice. (Before
    # the take became lock-free, the older entry was skipped because
    # job._queue_seq no longer matched it.) Now push_many queues only jobs
    # still in transit and waiting.
    in_transit = threading.Event()
    release = threading.Event()
    promoted = threading.Event()
    instance = new_instance("review", queues={"default": 1})
    promote = instance._promote

    def gated_promote(queue: str, jobs: list[stagehand.Job]) -> None:
        ours = any(job.args.get("n") == 1 for job in jobs)
        if ours:
            in_transit.set()
            release.wait(HANG_GUARD)
        promote(queue, jobs)
        if ours:
            promoted.set()

    # The scheduler is built by start() with the bound method it finds here.
    instance._promote = gated_promote  # type: ignore[method-assign]
    instance.start()
    try:
        with watching() as watcher:
            job = instance.insert(CountingWorker.new({"n": 1}, schedule_in=0.01))
            assert in_transit.wait(HANG_GUARD)
            # Paused, so the retried job cannot run and finish before the
            # scheduler's push below.
            instance.pause_queue("default")
            instance.cancel_job(job.id)
            instance.retry_job(job.id)
            release.set()
            assert promoted.wait(HANG_GUARD)
            after = instance.insert(CountingWorker.new({"n": 2}))
            instance.resume_queue("default")
            # One thread takes jobs in order, so once the job inserted after
            # has finished, every entry of the first job has been taken.
            watcher.wait_final(after)
            watcher.wait_final(job)
        assert runs_of(1) == 1, (
            f"job ran {runs_of(1)} times; attempts {job.attempt}, state {job.state}"
        )
    finally:
        release.set()
        instance.stop()


def test_stop_waits_for_job_rerun_after_snooze() -> None:
    # Attempt 1 returns Snooze(0), and a second thread starts attempt 2 while
    # the first thread is still in job.stop handlers, before it removes its
    # entry from _running. Before the fix, _running was keyed by id(job), so
    # that removal dropped the entry of attempt 2. wait_idle() then saw no
    # running job, and stop() abandoned attempt 2 at once instead of waiting
    # for its grace period. Now _running is keyed by thread.
    gate = unique_name("snooze")
    entered, release = BlockingWorker.gate(gate)
    handler_id = unique_name("review-stop")

    def hold_first_thread(event: str, measurements: Any, metadata: Any) -> None:
        job = metadata["job"]
        if job.args.get("gate") == gate and job.attempt == 1:
            # Runs in the thread of attempt 1, before it removes its entry
            # from _running.
            entered.wait(HANG_GUARD)

    instance = new_instance(
        "review", queues={"default": 2}, shutdown_grace_period=HANG_GUARD
    )
    instance.start()
    events.attach(handler_id, ["job.stop"], hold_first_thread)
    stopper = threading.Thread(target=instance.stop)
    try:
        job = instance.insert(SnoozeThenBlockWorker.new({"gate": gate}))
        assert entered.wait(HANG_GUARD)
        stopper.start()
        # Attempt 2 is executing and the grace period is 30 s, so stop() must
        # still be waiting for it.
        stopper.join(1.0)
        stop_returned = not stopper.is_alive()
        state_then = job.state
        release.set()
        stopper.join(HANG_GUARD)
        assert not stop_returned, (
            f"stop() returned while attempt 2 was executing; the job became "
            f"{state_then}: {job.errors[-1:]}"
        )
        assert job.state is JobState.COMPLETED, job
    finally:
        release.set()
        events.detach(handler_id)
        instance.stop()


def test_pause_returns_on_free_threaded_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the GIL a take pops under `cond` (_pop_locked), after the
    # thread has joined _taking. Before the fix, pause() kept `cond` while it
    # waited for _taking to empty. A thread between its check of `paused` and
    # its pop then waited for `cond` forever, and pause() spun forever. Now
    # pause() releases `cond` before it waits.
    monkeypatch.setattr(queue_module, "_GIL_ENABLED", False)
    about_to_pop = threading.Event()
    go = threading.Event()
    pop_locked = queue_module.Queue._pop_locked

    def gated_pop_locked(self: Any, heap: Any) -> Any:
        if not about_to_pop.is_set():
            about_to_pop.set()
            go.wait(HANG_GUARD)
        return pop_locked(self, heap)

    monkeypatch.setattr(queue_module.Queue, "_pop_locked", gated_pop_locked)
    instance = new_instance("review", queues={"default": {"limit": 1, "paused": True}})
    instance.start()
    queue = instance._queues["default"]
    pauser = threading.Thread(target=instance.pause_queue, args=("default",))
    try:
        instance.insert(CountingWorker.new({"n": 1}))
        instance.resume_queue("default")
        assert about_to_pop.wait(HANG_GUARD)
        pauser.start()
        # pause() sets the flag under `cond`, then waits for the thread.
        wait_until(lambda: queue.paused)
        go.set()
        pauser.join(DEADLOCK_GUARD)
        assert not pauser.is_alive(), (
            "pause_queue() did not return: it keeps the queue's lock while the "
            "thread it waits for waits for that lock"
        )
    finally:
        go.set()
        # Lets a deadlocked pause() return, so stop() can take the lock.
        queue._taking.clear()
        pauser.join(HANG_GUARD)
        instance.stop()


# Names of the threads in which a _FollowUp finalizer inserted its job.
FOLLOW_UPS: list[str] = []


class _FollowUp:
    """A job result whose finalizer inserts a follow-up job."""

    def __init__(self, instance_name: str) -> None:
        self.instance_name = instance_name

    def __del__(self) -> None:
        stagehand.get_instance(self.instance_name).insert(
            EchoWorker.new({"value": "follow-up"})
        )
        FOLLOW_UPS.append(threading.current_thread().name)


class FollowUpWorker(Worker):
    def perform(self, job: stagehand.Job) -> Any:
        return _FollowUp(job.args["instance"])


def test_pause_returns_when_take_runs_finalizer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker drops its reference to the previous job when it rebinds `job`
    # in `job = pending.pop(...)`, inside the take (the thread is in
    # _taking). If that was the last reference, the job's result is freed
    # there and its finalizer runs. Before the fix, a finalizer that inserts
    # a job waited for `cond`, which pause() kept while it waited for
    # _taking, so both waited forever. Now pause() releases `cond` first.
    FOLLOW_UPS.clear()
    gate = PopGate()
    monkeypatch.setattr(heapq, "heappop", gate)
    name = unique_name("review")
    instance = new_instance(
        "review",
        name=name,
        queues={"default": {"limit": 1, "paused": True}},
        retention_limit=0,
    )
    instance.start()
    queue = instance._queues["default"]
    pauser = threading.Thread(target=instance.pause_queue, args=("default",))
    try:
        # No reference to the first job is kept here.
        instance.insert(FollowUpWorker.new({"instance": name}))
        second = CountingWorker.new({"n": 1})
        gate.target = second
        instance.insert(second)
        instance.resume_queue("default")
        assert gate.popped.wait(HANG_GUARD)

        # pause() starts while the worker is held inside the take, which
        # then frees the first job and runs its result's finalizer.
        pauser.start()
        wait_until(lambda: queue.paused)
        gate.release.set()
        pauser.join(DEADLOCK_GUARD)
        assert not pauser.is_alive(), (
            "pause_queue() did not return: the finalizer run inside the take "
            "waits for the lock that pause() keeps"
        )

        # The finalizer ran in the worker thread, during the take.
        wait_until(lambda: len(FOLLOW_UPS) == 1)
        assert FOLLOW_UPS[0].startswith("stagehand-default-")
    finally:
        gate.release.set()
        queue._taking.clear()
        pauser.join(HANG_GUARD)
        instance.stop()


def test_check_queue_counts_every_job_under_load(
    frequent_thread_switches: None,
) -> None:
    # A finishing job is added to retention, then removed from _live. Before
    # the fix, check_queue() counted the jobs of jobs(), which copied the
    # retained jobs first and the live ones second. A job that finished
    # between the two copies was in neither, so the counts added up to fewer
    # jobs than there were. Now _live is copied before and after retention.
    total = 20_000
    states = [state.value for state in JobState]
    with (
        running(queues={"default": 8}, retention_limit=total) as instance,
        watching() as watcher,
    ):
        jobs = instance.insert_all(EchoWorker.new({"value": i}) for i in range(total))
        sums: list[int] = []
        calls = 0
        while not jobs[-1].state.is_final and calls < 50:
            calls += 1
            try:
                counts = instance.check_queue("default")
            except RuntimeError:
                continue  # see test_jobs_during_gc_finalizer_does_not_raise
            sums.append(sum(counts[state] for state in states))
        watcher.wait_final(*jobs)
    assert [s for s in sums if s != total] == []


# ---------------------------------------------------------------------------
# Races that held


def test_single_thread_order_with_stale_keys(
    frequent_thread_switches: None,
) -> None:
    # Cancelled jobs leave their keys in the heap, and a retried job gets a
    # new key. One thread must still take the jobs strictly by priority, then
    # in the order they became available.
    rng = random.Random(411)
    with RUN_LOCK:
        RUNS.clear()
    with (
        running(queues={"default": {"limit": 1, "paused": True}}) as instance,
        watching() as watcher,
    ):
        jobs = [
            instance.insert(
                RecordingWorker.new({"label": i}, priority=rng.randrange(10))
            )
            for i in range(200)
        ]
        jobs += instance.insert_all(
            RecordingWorker.new({"label": i}, priority=rng.randrange(10))
            for i in range(200, 400)
        )
        became_available = {job.id: index for index, job in enumerate(jobs)}
        cancelled = rng.sample(jobs, 150)
        for job in cancelled:
            instance.cancel_job(job.id)  # type: ignore[arg-type]
        for index, job in enumerate(cancelled[:75], start=len(jobs)):
            instance.retry_job(job.id)  # type: ignore[arg-type]
            became_available[job.id] = index  # type: ignore[index]
        to_run = [job for job in jobs if job not in cancelled[75:]]
        instance.resume_queue("default")
        watcher.wait_final(*to_run)

    expected = sorted(to_run, key=lambda job: (job.priority, became_available[job.id]))
    with RUN_LOCK:
        ran = [label for _, label in RUNS]
    assert ran == [job.args["label"] for job in expected]
    assert all(job.state is JobState.CANCELLED for job in cancelled[75:])


class ParentWorker(Worker):
    """Counts its run and inserts one child job from inside perform."""

    def perform(self, job: stagehand.Job) -> None:
        number = job.args["n"]
        with COUNT_LOCK:
            COUNTS[number] = COUNTS.get(number, 0) + 1
        stagehand.get_instance(job.args["instance"]).insert(
            CountingWorker.new({"n": number + 100_000}, queue="scaled")
        )


def test_scale_and_pause_churn_runs_each_once(
    frequent_thread_switches: None,
) -> None:
    # Another thread scales the pool between 1 and 8 and pauses and resumes
    # it while jobs insert jobs. Idle threads sleep on their own wake locks,
    # so a missed wake-up would leave jobs queued and the wait below would
    # time out.
    name = unique_name("review")
    rng = random.Random(86)
    with running(name=name, queues={"scaled": 4}) as instance:
        stop_churn = threading.Event()

        def churn() -> None:
            while not stop_churn.is_set():
                instance.scale_queue("scaled", rng.randint(1, 8))
                if rng.random() < 0.3:
                    instance.pause_queue("scaled")
                    instance.resume_queue("scaled")

        churner = threading.Thread(target=churn)
        churner.start()
        try:
            parents = instance.insert_all(
                ParentWorker.new({"n": n, "instance": name}, queue="scaled")
                for n in range(2_000)
            )
            wait_until(
                lambda: (
                    all(job.is_final for job in parents)
                    and _count_done(200_000) == 4_000
                )
            )
        finally:
            stop_churn.set()
            churner.join(HANG_GUARD)
        instance.scale_queue("scaled", 3)
        wait_until(lambda: _pool_threads("scaled") == 3)
        counts = instance.check_queue("scaled")
    with COUNT_LOCK:
        runs = dict(COUNTS)
    assert sorted(runs) == list(range(2_000)) + list(range(100_000, 102_000))
    assert set(runs.values()) == {1}
    assert counts["threads"] == 3
    assert counts["executing"] == 0
    assert counts["available"] == 0


def _count_done(below: int) -> int:
    with COUNT_LOCK:
        return sum(1 for number in COUNTS if number < below)


def _pool_threads(queue: str) -> int:
    prefix = f"stagehand-{queue}-"
    return sum(
        thread.name.startswith(prefix) and thread.is_alive()
        for thread in threading.enumerate()
    )

"""Worker threads take jobs without a lock; these races must stay exact.

Each test drives real worker threads against cancel, pause, drain, stop
and retention, many times over, and checks that every job ran once or never,
and that its final state says which.
"""

from __future__ import annotations

import heapq
import threading

import pytest
from support import HANG_GUARD, PopGate, running, watching
from workers import COUNT_LOCK, COUNTS, CountingWorker, runs_of

import stagehand
from stagehand import JobState

pytestmark = pytest.mark.usefixtures("clear_counts", "frequent_thread_switches")

ROUNDS = 100


def test_cancel_racing_workers_runs_each_job_once_or_never() -> None:
    with running(queues={"default": 8}) as instance, watching() as watcher:
        jobs = []
        for n in range(3_000):
            job = instance.insert(CountingWorker.new({"n": n}))
            jobs.append(job)
            if n % 2:
                instance.cancel_job(job.id)
        watcher.wait_final(*jobs)

    for n, job in enumerate(jobs):
        if job.state is JobState.CANCELLED:
            assert runs_of(n) == 0, job
        else:
            assert job.state is JobState.COMPLETED, job
            assert runs_of(n) == 1, job
    assert all(jobs[n].state is JobState.COMPLETED for n in range(0, 3_000, 2))


def test_pause_returns_only_after_the_last_take() -> None:
    with running(queues={"default": 8}) as instance, watching() as watcher:
        for round_number in range(ROUNDS):
            jobs = [
                instance.insert(CountingWorker.new({"n": round_number * 1_000 + i}))
                for i in range(300)
            ]
            instance.pause_queue("default")
            taken = [job for job in jobs if job.state is not JobState.AVAILABLE]
            watcher.wait_final(*taken)
            watcher.wait_for(lambda: instance.check_queue("default")["executing"] == 0)

            left = [job for job in jobs if job not in taken]
            assert all(job.state is JobState.AVAILABLE for job in left)
            assert instance.check_queue("default")["available"] == len(left)
            instance.resume_queue("default")
            watcher.wait_final(*jobs)

    assert sorted(COUNTS.values()) == [1] * (ROUNDS * 300)


def test_drain_racing_workers_hands_back_only_unrun_jobs() -> None:
    with running(queues={"default": 8}) as instance, watching() as watcher:
        for round_number in range(ROUNDS):
            jobs = [
                instance.insert(CountingWorker.new({"n": round_number * 1_000 + i}))
                for i in range(300)
            ]
            drained = instance.drain_queue("default")
            kept = [job for job in jobs if job not in drained]
            watcher.wait_final(*kept)

            assert all(runs_of(job.args["n"]) == 0 for job in drained)
            assert all(job.state is JobState.AVAILABLE for job in drained)
            assert all(runs_of(job.args["n"]) == 1 for job in kept)
            assert [job.args["n"] for job in drained] == sorted(
                job.args["n"] for job in drained
            )
            assert instance.check_queue("default")["available"] == 0


def test_stop_racing_workers_leaves_each_job_run_once_or_queued() -> None:
    for _ in range(ROUNDS):
        with COUNT_LOCK:
            COUNTS.clear()
        with running(queues={"default": 8}) as instance:
            jobs = [instance.insert(CountingWorker.new({"n": i})) for i in range(500)]
        # running() stopped the instance on exit.
        for job in jobs:
            if job.state is JobState.AVAILABLE:
                assert runs_of(job.args["n"]) == 0, job
            else:
                assert job.state is JobState.COMPLETED, job
                assert runs_of(job.args["n"]) == 1, job


def test_retention_limit_holds_with_eight_threads_finishing() -> None:
    with (
        running(queues={"default": 8}, retention_limit=50) as instance,
        watching() as watcher,
    ):
        jobs = [instance.insert(CountingWorker.new({"n": i})) for i in range(5_000)]
        watcher.wait_final(*jobs)

        completed = instance.jobs(state="completed")
        assert len(completed) == 50
        assert sum(instance.get_job(job.id) is not None for job in jobs) == 50


@pytest.mark.parametrize("action", ["pause", "stop"])
def test_pause_and_stop_wait_for_a_thread_part_way_through_a_take(
    monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    gate = PopGate()
    monkeypatch.setattr(heapq, "heappop", gate)
    instance = stagehand.Stagehand(name=f"gate-{action}", queues={"default": 1})
    instance.start()
    try:
        instance.pause_queue("default")
        job = CountingWorker.new({"n": 1})
        gate.target = job
        instance.insert(job)
        instance.resume_queue("default")
        assert gate.popped.wait(HANG_GUARD)

        seen: list[JobState] = []

        def act() -> None:
            if action == "pause":
                instance.pause_queue("default")
            else:
                instance.stop()
            seen.append(job.state)

        actor = threading.Thread(target=act)
        actor.start()
        # The thread is part way through taking the job, so the call must not
        # return yet; it returns only after the release below.
        actor.join(0.3)
        assert seen == []
        gate.release.set()
        actor.join(HANG_GUARD)
        assert seen in ([JobState.EXECUTING], [JobState.COMPLETED])
    finally:
        gate.release.set()
        instance.stop()

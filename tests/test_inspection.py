"""get_job, jobs(), retention, cancel_job, retry_job and insert_all."""

from __future__ import annotations

import pytest
from support import running, watching
from workers import (
    RUN_LOCK,
    RUNS,
    BlockingWorker,
    EchoWorker,
    FailingWorker,
    RecordingWorker,
)

from stagehand import FakeClock, InvalidOption, Job, JobNotFound, JobState


def test_get_job_live_and_retained() -> None:
    with running() as instance, watching() as watcher:
        job = instance.insert(EchoWorker.new({"value": 3}))
        watcher.wait_final(job)

        assert instance.get_job(job.id) is job
        assert instance.get_job("missing") is None


def test_jobs_filters() -> None:
    queues = {"default": {"limit": 1, "paused": True}, "mailers": 2}
    with running(queues=queues) as instance, watching() as watcher:
        done = instance.insert(EchoWorker.new({"value": 1}, queue="mailers"))
        watcher.wait_final(done)
        waiting = instance.insert(EchoWorker.new({"value": 2}))
        failing = instance.insert(FailingWorker.new({}, queue="mailers"))
        watcher.wait_state(failing, "retryable")

        assert instance.jobs() == [done, waiting, failing]
        assert instance.jobs(state="completed") == [done]
        assert instance.jobs(state=[JobState.AVAILABLE, "retryable"]) == [
            waiting,
            failing,
        ]
        assert instance.jobs(queue="mailers") == [done, failing]
        assert instance.jobs(worker=FailingWorker) == [failing]
        assert instance.jobs(worker="workers.EchoWorker", queue="default") == [waiting]
        with pytest.raises(InvalidOption, match="state must be one of"):
            instance.jobs(state="finished")
        with pytest.raises(InvalidOption, match="worker must be a Worker subclass"):
            instance.jobs(worker=3)  # type: ignore[arg-type]
        with pytest.raises(
            InvalidOption, match="is not a subclass of stagehand.Worker"
        ):
            instance.jobs(worker=int)


def test_retention_expires_by_time() -> None:
    clock = FakeClock()
    with running(clock=clock, retention_period=60) as instance, watching() as watcher:
        job = instance.insert(EchoWorker.new({}))
        watcher.wait_final(job)
        clock.advance(59)
        assert instance.get_job(job.id) is job

        clock.advance(1)
        assert instance.get_job(job.id) is None
        assert instance.jobs() == []


def test_retention_keeps_newest_jobs() -> None:
    with (
        running(retention_limit=5, queues={"default": 1}) as instance,
        watching() as watcher,
    ):
        jobs = [instance.insert(EchoWorker.new({"value": i})) for i in range(8)]
        watcher.wait_final(*jobs)

        assert [job.result for job in instance.jobs()] == [3, 4, 5, 6, 7]


def test_cancel_job_each_state() -> None:
    clock = FakeClock()
    queues = {"default": {"limit": 1, "paused": True}, "busy": 1}
    with running(clock=clock, queues=queues) as instance, watching() as watcher:
        available = instance.insert(EchoWorker.new({}))
        scheduled = instance.insert(EchoWorker.new({}, schedule_in=60))
        entered, release = BlockingWorker.gate("cancel-executing")
        executing = instance.insert(
            BlockingWorker.new({"gate": "cancel-executing"}, queue="busy")
        )
        assert entered.wait(30)

        assert instance.cancel_job(available.id).state is JobState.CANCELLED
        assert instance.cancel_job(scheduled.id).state is JobState.CANCELLED
        assert instance.cancel_job(executing.id).state is JobState.EXECUTING
        assert executing.cancel_requested is True
        assert instance.check_queue("default")["available"] == 0
        assert instance.check_queue("default")["scheduled"] == 0

        instance.resume_queue("default")
        clock.advance(60)
        release.set()
        watcher.wait_final(executing)
        sentinel = instance.insert(EchoWorker.new({}))
        watcher.wait_final(sentinel)

    assert available.state is JobState.CANCELLED
    assert available.attempt == 0
    assert scheduled.attempt == 0
    assert executing.state is JobState.COMPLETED
    with pytest.raises(JobNotFound, match="no live or retained job has id 'nope'"):
        instance.cancel_job("nope")


def test_cancel_requested_stops_retries() -> None:
    with running(queues={"default": 1}) as instance, watching() as watcher:
        entered, release = BlockingWorker.gate("cancel-then-fail")
        job = instance.insert(
            BlockingWorker.new({"gate": "cancel-then-fail", "fail": True})
        )
        assert entered.wait(30)
        instance.cancel_job(job.id)
        release.set()
        watcher.wait_final(job)

    assert job.state is JobState.CANCELLED
    assert job.attempt == 1
    assert "RuntimeError: failed after release" in job.errors[0]["error"]


def test_retry_job_runs_discarded_job() -> None:
    clock = FakeClock()
    with running(clock=clock) as instance, watching() as watcher:
        job = instance.insert(FailingWorker.new({}, max_attempts=1))
        watcher.wait_final(job)
        assert job.state is JobState.DISCARDED

        instance.retry_job(job.id)
        watcher.wait_stops(job, 2)

    assert job.max_attempts == 2
    assert job.state is JobState.DISCARDED
    assert len(job.errors) == 2


def test_retry_job_runs_retryable_now() -> None:
    clock = FakeClock()
    with running(clock=clock) as instance, watching() as watcher:
        job = instance.insert(FailingWorker.new({}))
        watcher.wait_state(job, "retryable")
        instance.retry_job(job.id)
        watcher.wait_stops(job, 2)
        assert job.state is JobState.RETRYABLE
        stats = instance.check_queue("default")

    assert stats["retryable"] == 1


def test_insert_all_is_atomic() -> None:
    with running(queues={"default": {"limit": 1, "paused": True}}) as instance:
        good = EchoWorker.new({})
        bad = EchoWorker.new({}, queue="elsewhere")
        with pytest.raises(InvalidOption, match="queue 'elsewhere' is not configured"):
            instance.insert_all([good, bad])

        assert good.id is None
        assert instance.jobs() == []
        assert instance.check_queue("default")["available"] == 0


def test_insert_all_returns_jobs_in_order() -> None:
    with running() as instance, watching() as watcher:
        jobs = instance.insert_all(
            [
                EchoWorker.new({"value": i}, schedule_in=0 if i % 2 else 0.01)
                for i in range(50)
            ]
        )
        watcher.wait_final(*jobs)

    assert [job.result for job in jobs] == list(range(50))
    assert len({job.id for job in jobs}) == 50


def test_insert_all_orders_each_queue_by_priority() -> None:
    # One batch over two paused queues with mixed priorities, and one job
    # built as Job(...), whose fields insert_all checks like insert does.
    paused = {"limit": 1, "paused": True}
    labelled = [
        ("a", "default", 5),
        ("b", "mailers", 0),
        ("c", "default", 0),
        ("d", "mailers", 9),
        ("e", "default", 5),
        ("f", "mailers", 0),
    ]
    batch = [
        RecordingWorker.new({"label": label}, queue=queue, priority=priority)
        for label, queue, priority in labelled
    ]
    batch.append(Job("workers.RecordingWorker", {"label": "g"}, priority=1))
    with (
        running(queues={"default": paused, "mailers": paused}) as instance,
        watching() as watcher,
    ):
        inserted = instance.insert_all(batch)
        available = [
            instance.check_queue(name)["available"] for name in ("default", "mailers")
        ]
        instance.resume_queue("default")
        instance.resume_queue("mailers")
        watcher.wait_final(*inserted)

    ids = {job.id: job.queue for job in inserted}
    with RUN_LOCK:
        runs = [(ids[job_id], label) for job_id, label in RUNS if job_id in ids]
    assert inserted == batch
    assert available == [4, 3]
    assert [label for queue, label in runs if queue == "default"] == [
        "c",
        "g",
        "a",
        "e",
    ]
    assert [label for queue, label in runs if queue == "mailers"] == ["b", "f", "d"]
    assert batch[-1]._worker_class is RecordingWorker


def test_insert_all_rejects_repeated_job() -> None:
    with running() as instance:
        job = EchoWorker.new({})
        with pytest.raises(InvalidOption, match=r"jobs\[1\] appears twice"):
            instance.insert_all([job, job])


def test_job_not_found_names_limits() -> None:
    with running(retention_limit=50) as instance:
        with pytest.raises(JobNotFound) as raised:
            instance.retry_job("nope")
    assert "at most 50 of them (retention_limit)" in str(raised.value)


@pytest.mark.parametrize("call", ["get_job", "cancel_job", "retry_job"])
def test_job_id_must_be_string(call: str) -> None:
    with running() as instance:
        with pytest.raises(TypeError, match="job_id must be a job's id string"):
            getattr(instance, call)(5)

"""Manual-mode recording: waiting assertions and retried jobs."""

from __future__ import annotations

import threading

from stagehand import JobState, testing
from support import running
from workers import EchoWorker, FailingWorker


def test_assert_waits_for_other_thread() -> None:
    with running(testing="manual") as instance:
        waiting = threading.Event()

        def insert_later() -> None:
            waiting.wait(30)
            instance.insert(EchoWorker.new({"value": "late"}))

        inserter = threading.Thread(target=insert_later)
        inserter.start()
        waiting.set()
        job = testing.assert_enqueued(instance, worker=EchoWorker, timeout=30)
        inserter.join(30)

    assert job.args == {"value": "late"}


def test_retry_job_records_again() -> None:
    with running(testing="manual") as instance:
        job = instance.insert(FailingWorker.new({}, max_attempts=1))
        counts = testing.drain_queue("default", instance)
        assert counts["discarded"] == 1
        testing.refute_enqueued(instance, worker=FailingWorker)

        instance.retry_job(job.id)

        assert job.state is JobState.AVAILABLE
        assert testing.assert_enqueued(instance, worker=FailingWorker) is job

"""Objects that a finished job keeps alive while it is retained.

Retention keeps thousands of finished jobs, and each full run of CPython's
cyclic garbage collector visits every container object they reference. The
claim list of the last attempt is no use once the job is final, so it goes.
"""

from __future__ import annotations

import pytest
from support import running, watching
from workers import EchoWorker, OutcomeWorker

from stagehand import JobState


@pytest.mark.parametrize(
    ("outcome", "state"),
    [("done", JobState.COMPLETED), ("cancel", JobState.CANCELLED)],
)
def test_finished_job_drops_its_claim(outcome: str, state: JobState) -> None:
    with running(queues={"default": 2}) as instance, watching() as watcher:
        job = instance.insert(OutcomeWorker.new({"outcome": outcome}))
        watcher.wait_state(job, state.value)
        assert job._claim is None
        assert instance.get_job(job.id) is job  # type: ignore[arg-type]


def test_discarded_job_drops_its_claim() -> None:
    with running(queues={"default": 2}) as instance, watching() as watcher:
        job = instance.insert(OutcomeWorker.new({"outcome": "error"}, max_attempts=1))
        watcher.wait_state(job, "discarded")
        assert job._claim is None
        assert [error["attempt"] for error in job.errors] == [1]


def test_retried_job_runs_again() -> None:
    with running(queues={"default": 2}) as instance, watching() as watcher:
        job = instance.insert(EchoWorker.new({"value": 7}))
        watcher.wait_state(job, "completed")
        instance.retry_job(job.id)  # type: ignore[arg-type]
        watcher.wait_stops(job, 2)
        watcher.wait_state(job, "completed")
        assert job.attempt == 2
        assert job.result == 7
        assert job._claim is None

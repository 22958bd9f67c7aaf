"""A sixth review: huge ints, hand-built jobs, and the `jobs()` filters.

Each test guards a bug that a review found and that is fixed. Tests that
depend on time use a FakeClock and wait on the job.stop event through
`wait_for_job`, never on bare sleeps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import stagehand
from stagehand import InvalidOption, Job, QueueNotConfigured, StagehandError, Worker
from stagehand._worker import worker_path
from stagehand.testing import FakeClock, wait_for_job
from tests.support import HANG_GUARD, running, unique_name
from tests.workers import EchoWorker

# A finite int that float() cannot hold (it is about 1e400).
HUGE = 10**400
# An int of more than 4,300 digits (Python's default limit for int to str),
# for which json.dumps raises ValueError.
UNWRITABLE = 10**5000


class HugeBackoffWorker(Worker):
    """Fails its first attempt; its backoff is a finite int too big for a float."""

    max_attempts = 3

    def backoff(self, job: Job) -> float:
        return HUGE

    def perform(self, job: Job) -> None:
        raise RuntimeError("first attempt fails")


class HugeTimeoutWorker(Worker):
    """Completes at once; its timeout is a finite int too big for a float."""

    def timeout(self, job: Job) -> float:
        return HUGE

    def perform(self, job: Job) -> str:
        return "ran"


# Worker hooks that return huge ints


def test_inline_huge_backoff_retries() -> None:
    # The guide: a backoff that returns more than 100 years is capped at
    # 100 years, and one that returns anything odd is logged and replaced
    # by the default. Either way the failed attempt is retried.
    with stagehand.Stagehand(name=unique_name("sixth"), testing="inline") as instance:
        job = HugeBackoffWorker.new({}).insert(instance)

        assert job.state == "retryable"
        assert job.attempt == 1


def test_huge_backoff_retries_in_worker_thread() -> None:
    clock = FakeClock()
    with running(clock=clock, queues={"default": 1}) as instance:
        job = HugeBackoffWorker.new({}).insert(instance)

        wait_for_job(job, ["retryable", "discarded"], timeout=HANG_GUARD)

        assert job.state == "retryable"
        assert "internal error" not in job.errors[-1]["error"]


def test_huge_timeout_runs_the_job() -> None:
    clock = FakeClock()
    with running(clock=clock, queues={"default": 1}) as instance:
        job = HugeTimeoutWorker.new({}).insert(instance)

        wait_for_job(job, timeout=HANG_GUARD)

        assert job.state == "completed"
        assert job.result == "ran"


# Settings and options that are huge ints


@pytest.mark.parametrize(
    "build",
    [
        lambda: stagehand.Stagehand(
            name=unique_name("sixth"), shutdown_grace_period=HUGE
        ),
        lambda: stagehand.Stagehand(name=unique_name("sixth"), retention_period=HUGE),
        lambda: EchoWorker.new({}, unique={"period": HUGE}),
    ],
    ids=["shutdown_grace_period", "retention_period", "unique-period"],
)
def test_huge_int_setting_raises_value_error(build: Callable[[], Any]) -> None:
    # SPEC: bad input raises ValueError, TypeError or a StagehandError,
    # naming the value. OverflowError is not one of them.
    with pytest.raises((ValueError, TypeError, StagehandError)):
        build()


@pytest.mark.parametrize(
    "args",
    [{"n": UNWRITABLE}, {"n": [UNWRITABLE]}],
    ids=["top-level", "nested"],
)
def test_args_int_json_cannot_encode(args: dict[str, Any]) -> None:
    # json.dumps raises for ints of more than 4,300 digits, so a job that
    # carries one cannot be serialised (to_dict, the cluster wire).
    with pytest.raises(InvalidOption, match="args"):
        EchoWorker.new(args)


# Hand-built jobs


@pytest.mark.parametrize(
    "fields",
    [{"conflict": True}, {"attempt": 50, "max_attempts": 3}],
    ids=["conflict", "attempt-past-max"],
)
def test_insert_rejects_used_hand_built_job(fields: dict[str, Any]) -> None:
    # A new job has not conflicted and has made no attempt. Accepted, the
    # first would return an inserted job marked as a duplicate, and the
    # second would run attempt 51 of 3.
    with stagehand.Stagehand(name=unique_name("sixth"), testing="manual") as instance:
        job = Job(worker=worker_path(EchoWorker), args={}, **fields)

        with pytest.raises(InvalidOption):
            instance.insert(job)

        assert instance.jobs() == []
        assert job.id is None


# Inspection filters


@pytest.mark.parametrize(
    ("queue", "error"),
    [("mailerz", QueueNotConfigured), (5, (InvalidOption, TypeError))],
    ids=["unconfigured", "int"],
)
def test_jobs_rejects_bad_queue_filter(queue: Any, error: Any) -> None:
    # check_queue, pause_queue and the testing assertions all raise for a
    # queue that is not configured, so jobs() raises too rather than return
    # [] as if the queue were empty.
    with stagehand.Stagehand(
        name=unique_name("sixth"), testing="manual", queues={"mailers": 1}
    ) as instance:
        EchoWorker.new({}, queue="mailers").insert(instance)

        with pytest.raises(error):
            instance.jobs(queue=queue)


# FakeClock


@pytest.mark.parametrize("start", ["2026-01-01", 0], ids=["str", "int"])
def test_fake_clock_rejects_non_datetime_start(start: Any) -> None:
    # A naive datetime gets a ValueError that names the fix. A value that is
    # not a datetime should get a TypeError or ValueError too.
    with pytest.raises((TypeError, ValueError), match="start"):
        FakeClock(start)

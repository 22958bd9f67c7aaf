"""Review of the django.tasks backend against the Tasks API contract.

Each test guards a bug that the review found, now fixed.
The tasks defined here are module-level, so TaskWorker imports them by
their module path, as it does the project's own tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone
from django_project.shop import tasks

import stagehand
from stagehand.testing import drain_queue
from stagehand_django import lifecycle
from stagehand_django.tasks import (
    InvalidTask,
    TaskResultStatus,
    task,
    task_finished,
    task_started,
)

QUEUES = {"default": 2, "mailers": 1}
BACKEND = "stagehand_django.tasks.StagehandBackend"

# Calls of `counted`, so a test can tell how often the task body ran.
CALLS: list[int] = []


@task()
def counted(number: int) -> int:
    CALLS.append(number)
    return number


def _echo(value: int) -> int:
    return value


# A task whose module attribute is not named after its function.
echo = task()(_echo)


@task()
def pair() -> tuple[int, int]:
    return (1, 2)


@contextmanager
def started(
    mode: str, tasks_setting: dict[str, Any] | None = None, **stagehand: Any
) -> Iterator[stagehand.Stagehand]:
    """Start the default instance in `mode`, with TASKS if given."""
    config = {"queues": QUEUES, "testing": mode, **stagehand}
    overrides: dict[str, Any] = {"STAGEHAND": config}
    if tasks_setting is not None:
        overrides["TASKS"] = tasks_setting
    with override_settings(**overrides):
        instance = lifecycle.start()
        try:
            yield instance
        finally:
            lifecycle.stop()


def retrying(**extra: Any) -> dict[str, Any]:
    """TASKS with the default backend retrying a failed task once."""
    backends = {
        "default": {
            "BACKEND": BACKEND,
            "QUEUES": list(QUEUES),
            "OPTIONS": {"max_attempts": 2},
        }
    }
    backends.update(extra)
    return backends


@contextmanager
def receiving(signal: Any, receiver: Callable[..., None]) -> Iterator[None]:
    signal.connect(receiver, weak=False)
    try:
        yield
    finally:
        signal.disconnect(receiver)


@pytest.fixture
def calls() -> Iterator[list[int]]:
    CALLS.clear()
    yield CALLS
    CALLS.clear()


def test_task_finished_result_is_complete() -> None:
    seen: list[Any] = []

    def receive(sender: Any, task_result: Any, **kwargs: Any) -> None:
        seen.append((task_result.finished_at, len(task_result.errors)))

    with started("inline"), receiving(task_finished, receive):
        result = tasks.fail.enqueue("boom")
    assert result.status == TaskResultStatus.FAILED
    ((finished_at, errors),) = seen
    assert finished_at is not None
    assert errors == 1


def test_refresh_in_task_finished_receiver() -> None:
    seen: list[Any] = []

    def receive(sender: Any, task_result: Any, **kwargs: Any) -> None:
        task_result.refresh()
        seen.append(task_result.status)

    with started("inline"), receiving(task_finished, receive):
        tasks.add.enqueue(1, 2)
    assert seen == [TaskResultStatus.SUCCESSFUL]


def test_finished_receiver_error_no_rerun(
    calls: list[int],
) -> None:
    raised: list[bool] = []

    def receive(sender: Any, task_result: Any, **kwargs: Any) -> None:
        if not raised:
            raised.append(True)
            raise RuntimeError("monitoring is down")

    with started("manual", retrying()), receiving(task_finished, receive):
        result = counted.enqueue(7)
        drain_queue("default")
        # A second round runs whatever the first left to retry.
        drain_queue("default", with_scheduled=True)
        fetched = counted.get_result(result.id)
    assert calls == [7]
    assert fetched.status == TaskResultStatus.SUCCESSFUL


def run_two_attempts(
    instance: stagehand.Stagehand, clock: stagehand.FakeClock, result_id: str
) -> None:
    """Drain the mailers queue, move the clock to the retry, drain again."""
    drain_queue("mailers")
    job = instance.get_job(result_id)
    assert job is not None
    assert job.scheduled_at is not None
    clock.set(job.scheduled_at)
    drain_queue("mailers")


def test_started_at_is_first_attempt() -> None:
    clock = stagehand.FakeClock()
    with started("manual", retrying(), clock=clock) as instance:
        result = tasks.fail.enqueue("boom")
        first = clock.now()
        run_two_attempts(instance, clock, result.id)
        fetched = tasks.fail.get_result(result.id)
    assert fetched.status == TaskResultStatus.FAILED
    assert fetched.attempts == 2
    assert fetched.last_attempted_at > first
    assert fetched.started_at == first


def test_each_error_keeps_its_own_exception_class() -> None:
    clock = stagehand.FakeClock()
    raised: list[bool] = []

    def receive(sender: Any, task_result: Any, **kwargs: Any) -> None:
        if not raised:
            raised.append(True)
            raise RuntimeError("monitoring is down")

    with (
        started("manual", retrying(), clock=clock) as instance,
        receiving(task_started, receive),
    ):
        result = tasks.fail.enqueue("boom")
        run_two_attempts(instance, clock, result.id)
        fetched = tasks.fail.get_result(result.id)
    assert "RuntimeError: monitoring is down" in fetched.errors[0].traceback
    assert "ValueError: boom" in fetched.errors[1].traceback
    assert [error.exception_class for error in fetched.errors] == [
        RuntimeError,
        ValueError,
    ]


def test_task_under_another_name() -> None:
    with started("inline"):
        try:
            result = echo.enqueue(5)
        except InvalidTask:
            return
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 5


def test_whole_float_priority_is_accepted() -> None:
    with started("manual") as instance:
        result = tasks.add.using(priority=50.0).enqueue(1, 2)
        job = instance.get_job(result.id)
    assert job is not None
    assert job.priority == 2


def test_result_names_the_backend_that_enqueued_it() -> None:
    backends = retrying(other={"BACKEND": BACKEND, "QUEUES": list(QUEUES)})
    with started("manual", backends):
        result = tasks.add.enqueue(1, 2)
        fetched = tasks.add.using(backend="other").get_result(result.id)
    assert fetched.task.backend == "default"
    assert fetched.backend == "default"


def test_return_value_is_normalised_to_json() -> None:
    with started("inline"):
        result = pair.enqueue()
    assert result.return_value == [1, 2]


def test_result_times_follow_use_tz_false() -> None:
    with override_settings(USE_TZ=False), started("manual"):
        result = tasks.add.enqueue(1, 2)
        now = timezone.now()
    assert result.enqueued_at is not None
    assert result.enqueued_at <= now

"""The django.tasks backend (Django 6's django.tasks or the django-tasks
backport on Django 5.2)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

import stagehand
from django_project.shop import tasks
from django_project.support import job_stops
from stagehand_django import lifecycle
from stagehand_django.tasks import (
    StagehandBackend,
    TaskResultDoesNotExist,
    TaskResultStatus,
    task_enqueued,
    task_finished,
    task_started,
    to_priority,
)


@pytest.fixture
def signals() -> Iterator[list[tuple[str, Any]]]:
    seen: list[tuple[str, Any]] = []

    def receiver(name: str):  # type: ignore[no-untyped-def]
        def receive(sender: Any, task_result: Any, **kwargs: Any) -> None:
            seen.append((name, task_result.status))

        return receive

    handlers = {
        "enqueued": (task_enqueued, receiver("enqueued")),
        "started": (task_started, receiver("started")),
        "finished": (task_finished, receiver("finished")),
    }
    for signal, handler in handlers.values():
        signal.connect(handler)
    yield seen
    for signal, handler in handlers.values():
        signal.disconnect(handler)


def instance_in(mode: str, runtime: Path | None = None) -> Any:
    settings = {"queues": {"default": 2, "mailers": 1}, "testing": mode}
    return override_settings(STAGEHAND=settings, STAGEHAND_RUNTIME_DIR=str(runtime))


@pytest.fixture
def manual() -> Iterator[stagehand.Stagehand]:
    with instance_in("manual"):
        yield lifecycle.start()
        lifecycle.stop()


@pytest.fixture
def inline() -> Iterator[stagehand.Stagehand]:
    with instance_in("inline"):
        yield lifecycle.start()
        lifecycle.stop()


@pytest.mark.parametrize(
    ("django", "expected"),
    [
        (100, 0),
        (81, 0),
        (80, 1),
        (1, 4),
        (0, 5),
        (-19, 5),
        (-20, 6),
        (-79, 8),
        (-80, 9),
        (-100, 9),
    ],
)
def test_priority_mapping(django: int, expected: int) -> None:
    assert to_priority(django) == expected


def test_manual_mode_records_like_the_dummy_backend(
    manual: stagehand.Stagehand, signals: list[tuple[str, Any]]
) -> None:
    result = tasks.add.enqueue(2, 3)
    assert result.status == TaskResultStatus.READY
    assert (result.args, result.kwargs, result.backend) == ([2, 3], {}, "default")
    (job,) = manual.jobs()
    assert job.id == result.id
    assert (job.queue, job.priority, job.max_attempts) == ("default", 5, 1)
    assert job.args["task"] == "django_project.shop.tasks.add"
    assert signals == [("enqueued", TaskResultStatus.READY)]
    assert tasks.add.get_result(result.id).status == TaskResultStatus.READY


def test_priority_queue_and_run_after_reach_the_job(
    manual: stagehand.Stagehand,
) -> None:
    when = datetime(2031, 1, 2, 3, 4, tzinfo=UTC)
    result = tasks.fail.using(run_after=when, priority=-100).enqueue("x")
    job = manual.get_job(result.id)
    assert job is not None
    assert (job.queue, job.priority, job.scheduled_at) == ("mailers", 9, when)
    assert job.state is stagehand.JobState.SCHEDULED


def test_inline_mode_runs_like_the_immediate_backend(
    inline: stagehand.Stagehand, signals: list[tuple[str, Any]]
) -> None:
    result = tasks.add.enqueue(2, b=5)
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 7
    assert result.attempts == 1
    assert signals == [
        ("started", TaskResultStatus.RUNNING),
        ("finished", TaskResultStatus.SUCCESSFUL),
        ("enqueued", TaskResultStatus.SUCCESSFUL),
    ]
    fetched = tasks.add.get_result(result.id)
    assert (fetched.status, fetched.return_value) == (TaskResultStatus.SUCCESSFUL, 7)


def test_failure_keeps_the_exception_class_and_traceback(
    inline: stagehand.Stagehand,
) -> None:
    result = tasks.fail.enqueue("boom")
    assert result.status == TaskResultStatus.FAILED
    (error,) = result.errors
    assert error.exception_class is ValueError
    assert "ValueError: boom" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        result.return_value


def test_context_gives_the_attempt(inline: stagehand.Stagehand) -> None:
    assert tasks.attempt_number.enqueue().return_value == 1


def test_worker_threads_run_tasks(tmp_path: Path) -> None:
    with instance_in("disabled", tmp_path):
        lifecycle.start()
        try:
            with job_stops() as stops:
                result = tasks.add.enqueue(20, 22)
                stops.wait(1)
            fetched = tasks.add.get_result(result.id)
        finally:
            lifecycle.stop()
    assert fetched.status == TaskResultStatus.SUCCESSFUL
    assert fetched.return_value == 42
    assert fetched.worker_ids[0].split(":")[-1].startswith("stagehand-default-")
    assert fetched.finished_at is not None
    assert fetched.enqueued_at <= fetched.started_at <= fetched.finished_at


def test_unknown_result_id(manual: stagehand.Stagehand) -> None:
    with pytest.raises(TaskResultDoesNotExist):
        tasks.add.get_result("no-such-id")


def test_backend_capabilities() -> None:
    assert StagehandBackend.supports_defer is True
    assert StagehandBackend.supports_priority is True
    assert StagehandBackend.supports_async_task is True


def test_bad_max_attempts_is_improperly_configured() -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="max_attempts.*got 0"):
        StagehandBackend("other", {"OPTIONS": {"max_attempts": 0}})


def test_scheduled_in_the_future_is_ready(manual: stagehand.Stagehand) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    result = tasks.add.using(run_after=later).enqueue(1, 1)
    assert result.status == TaskResultStatus.READY

"""The django.tasks backend: its task_finished handler and run_after.

Each test guards a bug that a review found, now fixed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from django.test import override_settings
from django.utils import timezone
from django_project.shop import tasks

import stagehand
from stagehand import events
from stagehand_django import lifecycle
from stagehand_django.tasks import TaskResultStatus, task_finished
from tests.test_django_tasks_review import receiving

QUEUES = {"default": 2, "mailers": 1}


class Abort(BaseException):
    """Not an Exception: send_robust lets it through."""


@contextmanager
def started(mode: str) -> Iterator[stagehand.Stagehand]:
    with override_settings(STAGEHAND={"queues": QUEUES, "testing": mode}):
        instance = lifecycle.start()
        try:
            yield instance
        finally:
            lifecycle.stop()


def test_receiver_base_exception_keeps_handler() -> None:
    seen: list[Any] = []

    def receive(sender: Any, task_result: Any, **kwargs: Any) -> None:
        seen.append(task_result.status)
        if len(seen) == 1:
            raise Abort("receiver gave up")

    try:
        with started("inline"), receiving(task_finished, receive):
            tasks.add.enqueue(1, 2)
            tasks.add.enqueue(3, 4)
        assert seen == [TaskResultStatus.SUCCESSFUL, TaskResultStatus.SUCCESSFUL]
    finally:
        # Put the handler back for the tests that follow.
        if "stagehand_django.tasks" not in events.handlers():
            from stagehand_django.tasks import _send_finished

            events.attach("stagehand_django.tasks", ["job.stop"], _send_finished)


def test_run_after_naive_without_tz() -> None:
    with override_settings(USE_TZ=False), started("manual"):
        when = timezone.now() + timedelta(hours=1)
        result = tasks.add.using(run_after=when).enqueue(1, 2)
        fetched = tasks.add.get_result(result.id)
    assert result.task.run_after == when
    assert timezone.is_naive(fetched.task.run_after)
    assert fetched.task.run_after == when

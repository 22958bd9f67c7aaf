"""django.tasks functions of the test project (Django 6 or the backport)."""

from __future__ import annotations

from stagehand_django.tasks import task


@task()
def add(a: int, b: int) -> int:
    return a + b


@task(queue_name="mailers", priority=50)
def fail(message: str) -> None:
    raise ValueError(message)


@task(takes_context=True)
def attempt_number(context: object) -> int:
    return context.attempt  # type: ignore[attr-defined]

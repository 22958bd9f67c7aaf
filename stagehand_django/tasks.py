"""A django.tasks backend that runs tasks as Stagehand jobs.

Works with Django 6's built-in ``django.tasks`` and, on Django 5.2, with
the ``django-tasks`` backport (import name ``django_tasks``)::

    TASKS = {
        "default": {
            "BACKEND": "stagehand_django.tasks.StagehandBackend",
            "QUEUES": ["default", "mailers"],   # Stagehand queues
            "OPTIONS": {"max_attempts": 1},
        }
    }

Each task runs as a `TaskWorker` job in the process that enqueued it. The
job's id is the result id, and `StagehandBackend.get_result` reads the job
from the instance for as long as it is retained (``retention_period``), in
the same process only. With ``STAGEHAND["testing"]`` set to "manual" tasks
are recorded and not run, as with Django's DummyBackend. With "inline" they
run in the caller, as with its ImmediateBackend.

Priority: Django's -100..100 (larger runs sooner) maps onto Stagehand's
0..9 (lower runs sooner) in bands of 20: ``min((100 - priority) // 20, 9)``,
so 100..81 give 0, 20..1 give 4, 0..-19 (Django's default 0 included) give
5 and -80..-100 give 9; see `to_priority`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone
from django.utils.module_loading import import_string

import stagehand
from stagehand import Job, JobState, Worker, events

# Django 6 ships django.tasks; on Django 5.2 the django-tasks backport
# provides the same API under the name django_tasks.
_PACKAGE = (
    "django.tasks" if importlib.util.find_spec("django.tasks") else "django_tasks"
)
_base: Any = importlib.import_module(f"{_PACKAGE}.base")
_backends: Any = importlib.import_module(f"{_PACKAGE}.backends.base")
_exceptions: Any = importlib.import_module(f"{_PACKAGE}.exceptions")
_signals: Any = importlib.import_module(f"{_PACKAGE}.signals")

BaseTaskBackend = _backends.BaseTaskBackend
TaskContext = _base.TaskContext
TaskError = _base.TaskError
TaskResult = _base.TaskResult
TaskResultStatus = _base.TaskResultStatus
task = _base.task
InvalidTask = getattr(_exceptions, "InvalidTask", None) or _exceptions.InvalidTaskError
try:
    from django.utils.json import normalize_json
except ImportError:  # Django 5.2 with the backport
    normalize_json = importlib.import_module("django_tasks.utils").normalize_json

logger = logging.getLogger(__name__)
TaskResultDoesNotExist = _exceptions.TaskResultDoesNotExist
task_enqueued = _signals.task_enqueued
task_finished = _signals.task_finished
task_started = _signals.task_started

__all__ = ["StagehandBackend", "TaskWorker", "task", "to_priority"]

_STATUS = {
    JobState.AVAILABLE: TaskResultStatus.READY,
    JobState.SCHEDULED: TaskResultStatus.READY,
    JobState.RETRYABLE: TaskResultStatus.READY,
    JobState.EXECUTING: TaskResultStatus.RUNNING,
    JobState.COMPLETED: TaskResultStatus.SUCCESSFUL,
    JobState.DISCARDED: TaskResultStatus.FAILED,
    JobState.CANCELLED: TaskResultStatus.FAILED,
}


def to_priority(priority: int) -> int:
    """Map a django.tasks priority (-100..100) onto Stagehand's 0..9.

    Bands of 20 from the top: 100..81 give 0, 80..61 give 1, and so on to
    -60..-79, which give 8; -80..-100 give 9.
    """
    return int(min((100 - priority) // 20, 9))


class StagehandBackend(BaseTaskBackend):  # type: ignore[misc,valid-type]
    """Enqueues django.tasks tasks into the default Stagehand instance.

    OPTIONS: ``max_attempts`` (attempts per task, default 1: django.tasks
    has no retry policy of its own).
    """

    supports_defer = True
    supports_async_task = True
    supports_priority = True
    # Results live in the memory of the process that enqueued the task.
    supports_get_result = False

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.max_attempts = self.options.get("max_attempts", 1)
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise ImproperlyConfigured(
                f"TASKS[{alias!r}]['OPTIONS']['max_attempts'] must be an int >= 1; "
                f"got {self.max_attempts!r}"
            )
        self.worker_id = f"{os.uname().nodename}:{os.getpid()}"

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        """Insert the task as a job now, and return its `TaskResult`.

        The insert does not wait for a transaction to commit; wrap the call
        in ``transaction.on_commit`` for that, as django.tasks recommends.
        """
        self.validate_task(task)
        found = _import_or_none(task.module_path)
        if getattr(found, "func", None) is not task.func:
            raise InvalidTask(
                f"the task {task.module_path!r} cannot be found again by that "
                "path, so a worker could not run it; define it with @task on a "
                "module-level function, under the function's own name"
            )
        options: dict[str, Any] = {
            "queue": task.queue_name,
            "priority": to_priority(task.priority),
            "max_attempts": self.max_attempts,
        }
        if task.run_after is not None:
            options["scheduled_at"] = _aware(task.run_after)
        job = TaskWorker.new(
            {
                "task": task.module_path,
                "backend": self.alias,
                # The options set with task.using(), so the task can be
                # rebuilt as it was enqueued.
                "task_options": {
                    "priority": task.priority,
                    "queue_name": task.queue_name,
                    "run_after": None
                    if task.run_after is None
                    else _aware(task.run_after).isoformat(),
                },
                "args": list(args),
                "kwargs": dict(kwargs),
            },
            **options,
        )
        inserted = job.insert(on_commit=False)
        result = self._result(inserted, task)
        task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> Any:
        """Return the result of a job of this process that is still retained.

        Raises:
            TaskResultDoesNotExist: No such job, or it is no longer retained.
        """
        instance = stagehand.default_instance()
        job = None if instance is None else instance.get_job(result_id)
        if job is None or job.worker != TaskWorker._stagehand_path:
            raise TaskResultDoesNotExist(result_id)
        return self._result(job, _task_of(job))

    def _result(self, job: Job, task: Any) -> Any:
        started = job.meta.get("started_at")
        result: Any = TaskResult(
            task=task,
            id=str(job.id),
            status=_STATUS[job.state],
            enqueued_at=_local(job.inserted_at),
            started_at=_local(
                job.attempted_at if started is None else datetime.fromisoformat(started)
            ),
            finished_at=_local(job.completed_at),
            last_attempted_at=_local(job.attempted_at),
            args=job.args["args"],
            kwargs=job.args["kwargs"],
            # The backend that enqueued the task, whichever one reads it.
            backend=job.args["backend"],
            errors=_errors(job),
            worker_ids=list(job.meta.get("worker_ids", [])),
        )
        if job.state is JobState.COMPLETED:
            object.__setattr__(result, "_return_value", job.result)
        return result


def _task_of(job: Job) -> Any:
    """Return the task of a TaskWorker job, with the options it was enqueued with."""
    task = import_string(job.args["task"])
    options = job.args.get("task_options")
    if not options:
        return task
    run_after = options.get("run_after")
    return task.using(
        priority=options["priority"],
        queue_name=options["queue_name"],
        run_after=None
        if run_after is None
        else _local(datetime.fromisoformat(run_after)),
        backend=job.args["backend"],
    )


def _import_or_none(path: str) -> Any:
    try:
        return import_string(path)
    except ImportError:
        return None


def _local(moment: datetime | None) -> datetime | None:
    # Naive, in the current time zone, when USE_TZ is False, as
    # timezone.now() returns it then.
    if moment is None or settings.USE_TZ:
        return moment
    return timezone.make_naive(moment)


def _aware(moment: datetime) -> datetime:
    if timezone.is_aware(moment):
        return moment
    return timezone.make_aware(moment)


def _errors(job: Job) -> list[Any]:
    # The exception class of each failed attempt, by attempt number.
    paths = job.meta.get("exception_paths", {})
    errors = []
    for error in job.errors:
        path = paths.get(str(error["attempt"]), "builtins.Exception")
        errors.append(TaskError(exception_class_path=path, traceback=error["error"]))
    return errors


class TaskWorker(Worker):
    """Runs one django.tasks task, imported by its module path.

    Sends ``task_started`` before the call, from the worker thread (or the
    inserting thread, in inline mode). ``task_finished`` follows once the
    job has reached its final state; see `_send_finished`.
    """

    max_attempts = 1

    def perform(self, job: Job) -> Any:
        if job.attempted_at is not None:
            job.meta.setdefault("started_at", job.attempted_at.isoformat())
        try:
            backend = _backend(job.args["backend"])
            task = _task_of(job)
            job.meta.setdefault("worker_ids", []).append(
                f"{backend.worker_id}:{threading.current_thread().name}"
            )
            result = backend._result(job, task)
            object.__setattr__(result, "status", TaskResultStatus.RUNNING)
            task_started.send(type(backend), task_result=result)
            return normalize_json(self._call(task, result, job))
        except BaseException as error:
            kind = type(error)
            job.meta.setdefault("exception_paths", {})[str(job.attempt)] = (
                f"{kind.__module__}.{kind.__qualname__}"
            )
            raise

    def _call(self, task: Any, result: Any, job: Job) -> Any:
        args, kwargs = job.args["args"], job.args["kwargs"]
        if task.takes_context:
            return task.call(TaskContext(task_result=result), *args, **kwargs)
        return task.call(*args, **kwargs)


def _send_finished(
    event: str, measurements: Mapping[str, Any], metadata: Mapping[str, Any]
) -> None:
    # A job.stop handler: sends task_finished once a task's job is final, so
    # that receivers see finished_at and the last error, and can read the
    # result again. It catches every error, because events detaches a
    # handler that raises, and a receiver's error must not fail the task.
    job = metadata["job"]
    if job.worker != TaskWorker._stagehand_path or not job.state.is_final:
        return
    try:
        backend = _backend(job.args["backend"])
        result = backend._result(job, _task_of(job))
        responses = task_finished.send_robust(type(backend), task_result=result)
    except BaseException:
        # BaseException too: events detaches a handler for anything but
        # KeyboardInterrupt and JobTimeout, which it lets through.
        logger.exception("sending task_finished for task %s failed", job.id)
        return
    for receiver, response in responses:
        if isinstance(response, Exception):
            logger.error(
                "task_finished receiver %r failed for task %s",
                receiver,
                job.id,
                exc_info=response,
            )


events.attach("stagehand_django.tasks", ["job.stop"], _send_finished)


def _backend(alias: str) -> StagehandBackend:
    backend = importlib.import_module(_PACKAGE).task_backends[alias]
    if not isinstance(backend, StagehandBackend):
        raise InvalidTask(
            f"task backend {alias!r} is {type(backend).__name__}, not "
            "StagehandBackend; a TaskWorker job needs its backend"
        )
    return backend

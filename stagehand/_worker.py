"""The `Worker` base class and the lookup of workers by dotted path."""

from __future__ import annotations

import importlib
import inspect
import random
import threading
from typing import Any, ClassVar

from stagehand import _options
from stagehand._job import Job
from stagehand.exceptions import InvalidOption, UnknownWorker

__all__ = ["Worker", "default_backoff", "resolve_worker", "worker_path"]

# Default backoff: 15 s plus 2 ** attempt seconds, with the exponent capped at
# 17 and the delay at one day, then scaled by a random factor in [0.9, 1.1].
BACKOFF_BASE = 15.0
BACKOFF_MAX_EXPONENT = 17
BACKOFF_MAX = 86_400.0
BACKOFF_JITTER = 0.1


def default_backoff(attempt: int) -> float:
    """Return the default delay in seconds before the attempt after `attempt`.

    The exponent is capped before it is raised, so attempt 10,000 gives the
    one-day cap rather than an overflow.
    """
    exponent = min(max(attempt, 0), BACKOFF_MAX_EXPONENT)
    delay = min(BACKOFF_BASE + 2.0**exponent, BACKOFF_MAX)
    jitter = random.uniform(1.0 - BACKOFF_JITTER, 1.0 + BACKOFF_JITTER)
    return min(delay * jitter, BACKOFF_MAX)


class Worker:
    """Base class of every job worker.

    Subclass it, set the class attributes you need and implement `perform`::

        class EmailWorker(Worker):
            queue = "mailers"
            max_attempts = 5

            def perform(self, job):
                send_mail(job.args["to"], job.args["body"])

    Class attributes (each is also an option of `new`):
        queue: Queue name. Defaults to "default".
        max_attempts: Attempts before the job is discarded. Defaults to 20.
        priority: 0 to 9, lower runs first. Defaults to 0.
        unique: None or False (not unique), True (default settings) or a dict
            with "period", "fields", "keys" and "states".
        tags: Strings kept on each job, for filtering.

    `perform` runs in one of the queue's worker threads, with a new instance
    of the class for every attempt.
    """

    queue: ClassVar[str] = "default"
    max_attempts: ClassVar[int] = 20
    priority: ClassVar[int] = 0
    unique: ClassVar[bool | dict[str, Any] | None] = None
    tags: ClassVar[tuple[str, ...] | list[str]] = ()

    _stagehand_path: ClassVar[str] = ""
    _stagehand_unique: ClassVar[dict[str, Any] | None] = None
    _stagehand_tags: ClassVar[tuple[str, ...]] = ()
    _stagehand_has_timeout: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        where = f"{cls.__qualname__}"
        _options.check_queue_name(cls.queue, f"{where}.queue")
        _options.check_max_attempts(cls.max_attempts, f"{where}.max_attempts")
        _options.check_priority(cls.priority, f"{where}.priority")
        cls._stagehand_tags = _options.check_tags(cls.tags, f"{where}.tags")
        cls._stagehand_unique = _options.normalize_unique(cls.unique)
        cls._stagehand_path = worker_path(cls)
        cls._stagehand_has_timeout = cls.timeout is not Worker.timeout
        for method in ("perform", "backoff", "timeout"):
            if inspect.iscoroutinefunction(getattr(cls, method)):
                raise TypeError(
                    f"{where}.{method} is a coroutine function, but Stagehand runs "
                    f"workers in threads and would never await it; define "
                    f"'def {method}(self, job)' and call asyncio.run(...) inside "
                    "it if you need async code"
                )

    def perform(self, job: Job) -> Any:
        """Do the job's work.

        Returns:
            None or any value to complete the job (kept as `job.result`),
            `Error(reason)` to fail this attempt, `Snooze(seconds)` to run
            it again later without using an attempt, or `Cancel(reason)` to
            stop it. Raising any exception fails the attempt.
        """
        raise NotImplementedError(
            f"{type(self).__qualname__} must implement perform(self, job)"
        )

    def backoff(self, job: Job) -> float:
        """Return the seconds to wait before retrying a failed attempt.

        The default is ``min(15 + 2 ** min(job.attempt, 17), 86400)`` seconds,
        times a random factor from 0.9 to 1.1, capped at 86400.
        """
        return default_backoff(job.attempt)

    def timeout(self, job: Job) -> float | None:
        """Return the seconds an attempt may run, or None for no limit."""
        return None

    @classmethod
    def new(cls, args: dict[str, Any] | None = None, **options: Any) -> Job:
        """Build an unsaved job for this worker.

        Args:
            args: JSON-serialisable dict with string keys, passed to
                `perform` as ``job.args`` after a JSON round trip.
            **options: queue, max_attempts, priority, unique, schedule_in
                (seconds or ``(amount, unit)``), scheduled_at (aware
                datetime), tags, meta. Each overrides the class attribute.

        Raises:
            InvalidOption: An option or the args are invalid.
        """
        if cls is Worker:
            raise TypeError("Worker.new() needs a subclass: MyWorker.new(args)")
        if cls.perform is Worker.perform:
            raise TypeError(
                f"{cls.__qualname__} does not implement perform(self, job), so "
                "its jobs could only fail; define perform before building jobs"
            )
        job = Job._for_worker(
            cls._stagehand_path,
            _options.normalize_json_dict({} if args is None else args, "args"),
            cls.queue,
            cls._stagehand_tags,
            cls.priority,
            cls.max_attempts,
            cls._stagehand_unique,
            cls,
        )
        if options:
            apply_options(job, options)
        return job


def apply_options(job: Job, options: dict[str, Any]) -> None:
    """Validate `options` and set them on the unsaved `job`."""
    unknown = set(options) - _options.JOB_OPTIONS
    if unknown:
        raise InvalidOption(
            f"unknown job options {sorted(unknown)}; valid options are "
            f"{sorted(_options.JOB_OPTIONS)}"
        )
    if "schedule_in" in options and "scheduled_at" in options:
        raise InvalidOption(
            "pass schedule_in or scheduled_at, not both; got "
            f"schedule_in={options['schedule_in']!r} and "
            f"scheduled_at={options['scheduled_at']!r}"
        )
    if "queue" in options:
        job.queue = _options.check_queue_name(options["queue"])
    if "max_attempts" in options:
        job.max_attempts = _options.check_max_attempts(options["max_attempts"])
    if "priority" in options:
        job.priority = _options.check_priority(options["priority"])
    if "unique" in options:
        job.unique = _options.normalize_unique(options["unique"])
    if "tags" in options:
        job.tags = _options.check_tags(options["tags"])
    if "meta" in options:
        job.meta = _options.normalize_json_dict(options["meta"], "meta")
    if "schedule_in" in options:
        job.schedule_in = _options.normalize_schedule_in(options["schedule_in"])
    if "scheduled_at" in options:
        job.scheduled_at = _options.check_scheduled_at(options["scheduled_at"])


def check_job_fields(job: Job) -> None:
    """Validate and normalize the fields of a job built as ``Job(...)``.

    `Worker.new` checks each option as it sets it; a hand-built job gets the
    same checks here, at insert, and must look like a job that has never
    run: no attempt, errors, result, attempt times or conflict.
    """
    used = {
        name: value
        for name, value in (
            ("attempt", job.attempt),
            ("conflict", job.conflict),
            ("errors", job._errors),
            ("result", job.result),
            ("attempted_at", job._attempted_at),
            ("completed_at", job._completed_at),
        )
        if value not in (0, False, None, [])
    }
    if used:
        fields = ", ".join(f"{name}={value!r}" for name, value in used.items())
        raise InvalidOption(
            f"a new job must not have {fields}: those belong to a job that "
            "has run. Build it with Worker.new(...), or leave them at their "
            "defaults"
        )
    _options.check_queue_name(job.queue)
    _options.check_priority(job.priority)
    _options.check_max_attempts(job.max_attempts)
    job.tags = _options.check_tags(job.tags)
    job.args = _options.normalize_json_dict(job.args, "args")
    job.meta = _options.normalize_json_dict(job.meta, "meta")
    job.unique = _options.normalize_unique(job.unique)
    if job.schedule_in is not None:
        job.schedule_in = _options.normalize_schedule_in(job.schedule_in)
    if job.scheduled_at is not None:
        job.scheduled_at = _options.check_scheduled_at(job.scheduled_at)


def worker_path(cls: type) -> str:
    """Return the dotted path by which `resolve_worker` finds `cls`."""
    return f"{cls.__module__}.{cls.__qualname__}"


_resolved: dict[str, type[Worker]] = {}
_resolve_lock = threading.Lock()


def resolve_worker(worker: object) -> type[Worker]:
    """Return the `Worker` subclass named by a class or a dotted path.

    Raises:
        UnknownWorker: The path cannot be imported or does not name a
            `Worker` subclass.
    """
    if isinstance(worker, type):
        if issubclass(worker, Worker) and worker is not Worker:
            return worker
        raise UnknownWorker(
            f"{worker!r} is not a subclass of stagehand.Worker; define "
            "class MyWorker(stagehand.Worker) with a perform(self, job) method"
        )
    if not isinstance(worker, str) or not worker:
        raise UnknownWorker(
            f"a worker must be a Worker subclass or its dotted path; got {worker!r}"
        )
    found = _resolved.get(worker)
    if found is not None:
        return found
    found = _import_worker(worker)
    with _resolve_lock:
        _resolved[worker] = found
    return found


def _import_worker(path: str) -> type[Worker]:
    parts = path.split(".")
    missing: ModuleNotFoundError | None = None
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            target: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                missing = error
                continue
            raise
        for attribute in parts[split:]:
            target = getattr(target, attribute, None)
            if target is None:
                break
        if (
            isinstance(target, type)
            and issubclass(target, Worker)
            and target is not Worker
        ):
            return target
        raise UnknownWorker(
            f"{path!r} does not name a stagehand.Worker subclass in module "
            f"{module_name!r}; check the spelling of the class name"
        )
    top = missing.name if missing is not None else parts[0]
    raise UnknownWorker(
        f"cannot import worker path {path!r}: no module named {top!r}. Check "
        "the spelling, that the module is on sys.path (the project root or "
        "an installed package), and that the path is the full dotted path, "
        "such as 'myapp.workers.EmailWorker'"
    )

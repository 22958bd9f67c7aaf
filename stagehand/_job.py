"""Jobs, their states, and the values `Worker.perform` may return."""

from __future__ import annotations

import copy
import enum
import itertools
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from stagehand.exceptions import NotRunning, StagehandError

if TYPE_CHECKING:
    from stagehand._instance import Stagehand

__all__ = [
    "Cancel",
    "Error",
    "Job",
    "JobState",
    "Snooze",
    "ensure_fresh_ids",
    "new_job_id",
    "new_job_ids",
]


@enum.unique
class JobState(enum.StrEnum):
    """The stage of a job's life.

    `available`, `scheduled`, `executing` and `retryable` are live states;
    `completed`, `discarded` and `cancelled` are final.
    """

    AVAILABLE = "available"
    SCHEDULED = "scheduled"
    EXECUTING = "executing"
    RETRYABLE = "retryable"
    COMPLETED = "completed"
    DISCARDED = "discarded"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """True for completed, discarded and cancelled."""
        return self in _FINAL_STATES


_FINAL_STATES = frozenset({JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED})


@dataclass(frozen=True, slots=True)
class Snooze:
    """Return value of `perform`: run the job again after `seconds`.

    A snooze does not use up an attempt: `max_attempts` grows by one.
    """

    seconds: float

    def __post_init__(self) -> None:
        _check_seconds("Snooze seconds", self.seconds)


@dataclass(frozen=True, slots=True)
class Cancel:
    """Return value of `perform`: stop the job, with no more attempts."""

    reason: Any = None


@dataclass(frozen=True, slots=True)
class Error:
    """Return value of `perform`: fail this attempt, as an exception would."""

    reason: Any = None


# The longest delay accepted anywhere: 100 years, in seconds. Longer delays
# would overflow datetime arithmetic near the year 9999.
MAX_DELAY = 100 * 365 * 86_400.0


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds; got {value!r}")
    if not 0 <= value <= MAX_DELAY:
        raise ValueError(
            f"{name} must be a number of seconds from 0 to {MAX_DELAY:.0f} "
            f"(100 years); got {value!r}"
        )


# Job ids: a random per-process prefix and a counter. The prefix makes ids
# unique across the peers of a cluster. A forked child draws a new prefix:
# through os.register_at_fork, and, for servers that fork without running
# those hooks (uWSGI by default), when an instance starts in a process whose
# id differs from the one that drew the prefix. Inserts need a started
# instance, so checking there keeps the system call off every insert.
_id_prefix = secrets.token_hex(5)
_id_counter = itertools.count(1)
_id_pid = os.getpid()


def _reset_ids_after_fork() -> None:
    global _id_prefix, _id_counter, _id_pid
    _id_prefix = secrets.token_hex(5)
    _id_counter = itertools.count(1)
    _id_pid = os.getpid()


os.register_at_fork(after_in_child=_reset_ids_after_fork)


def ensure_fresh_ids() -> None:
    """Draw a new id prefix if this process was forked without fork hooks."""
    if os.getpid() != _id_pid:
        _reset_ids_after_fork()


def new_job_id() -> str:
    """Return an id that is unique across processes, such as ``3f9a1c0b2e-1a``."""
    return f"{_id_prefix}-{next(_id_counter):x}"


def new_job_ids(count: int) -> list[str]:
    """Return `count` ids as `new_job_id` makes them, in increasing order."""
    prefix = _id_prefix
    return [f"{prefix}-{number:x}" for number in itertools.islice(_id_counter, count)]


# Set by a framework integration (stagehand_django sets it in its app's
# ready()). `Job.insert` calls ``hook(job, instance, on_commit)`` with the
# validated job; the hook inserts it now or when the transaction commits and
# returns what `Job.insert` returns.
on_commit_hook: Callable[[Job, Stagehand, bool | None], Job] | None = None


class Job:
    """One unit of work: a worker, its arguments and its bookkeeping.

    Build jobs with `Worker.new(args, **options)` and insert them with
    `job.insert()` or `Stagehand.insert(job)`. An inserted job is the live
    record that the instance updates as the job runs, so read its fields but
    do not assign them.

    Times are aware UTC datetimes. On the system clock the job stores them
    as nanoseconds since the epoch and builds the datetime on each read,
    which saves work on every insert and attempt. `errors` contains one
    dict per failed attempt, with the keys ``attempt``, ``at`` (ISO 8601) and
    ``error`` (the formatted traceback or the `Error` reason).

    A plain class with slots rather than a dataclass: `meta` and `errors`
    are made only when first used, which saves 120 bytes per queued job.
    """

    __slots__ = (
        "_attempted_at",
        "_claim",
        "_completed_at",
        "_errors",
        "_inserted_at",
        "_instance",
        "_meta",
        "_queue_seq",
        "_schedule_seq",
        "_scheduled_at",
        "_sequence",
        "_worker_class",
        "args",
        "attempt",
        "cancel_requested",
        "conflict",
        "id",
        "max_attempts",
        "priority",
        "queue",
        "result",
        "schedule_in",
        "state",
        "tags",
        "unique",
        "worker",
    )

    worker: str
    args: dict[str, Any]
    queue: str
    tags: tuple[str, ...]
    priority: int
    max_attempts: int
    attempt: int
    state: JobState
    id: str | None
    result: Any
    unique: dict[str, Any] | None
    conflict: bool
    cancel_requested: bool
    # Delay requested with schedule_in, resolved against the clock on insert.
    schedule_in: float | None
    # Bookkeeping that belongs to the instance running the job.
    _worker_class: Any
    _sequence: int
    _queue_seq: int
    _schedule_seq: int
    # Set when an attempt begins to [id of the running thread]; see
    # stagehand._execute for the race it settles.
    _claim: list[int] | None
    _instance: Any
    _meta: dict[str, Any] | None
    _errors: list[dict[str, Any]] | None
    # The four times: an aware datetime, or an int of nanoseconds since the
    # epoch that the properties below turn into one when read.
    _inserted_at: datetime | int | None
    _scheduled_at: datetime | int | None
    _attempted_at: datetime | int | None
    _completed_at: datetime | int | None

    def __init__(
        self,
        worker: str,
        args: dict[str, Any],
        queue: str = "default",
        meta: dict[str, Any] | None = None,
        tags: tuple[str, ...] = (),
        priority: int = 0,
        max_attempts: int = 20,
        attempt: int = 0,
        state: JobState = JobState.AVAILABLE,
        id: str | None = None,
        inserted_at: datetime | None = None,
        scheduled_at: datetime | None = None,
        attempted_at: datetime | None = None,
        completed_at: datetime | None = None,
        errors: list[dict[str, Any]] | None = None,
        result: Any = None,
        unique: dict[str, Any] | None = None,
        conflict: bool = False,
        cancel_requested: bool = False,
        schedule_in: float | None = None,
        _worker_class: Any = None,
        _sequence: int = 0,
        _queue_seq: int = 0,
        _schedule_seq: int = 0,
        _claim: list[int] | None = None,
        _instance: Any = None,
    ):
        self.worker = worker
        self.args = args
        self.queue = queue
        self._meta = meta
        self.tags = tags
        self.priority = priority
        self.max_attempts = max_attempts
        self.attempt = attempt
        self.state = state
        self.id = id
        self.inserted_at = inserted_at
        self.scheduled_at = scheduled_at
        self.attempted_at = attempted_at
        self.completed_at = completed_at
        self._errors = errors
        self.result = result
        self.unique = unique
        self.conflict = conflict
        self.cancel_requested = cancel_requested
        self.schedule_in = schedule_in
        self._worker_class = _worker_class
        self._sequence = _sequence
        self._queue_seq = _queue_seq
        self._schedule_seq = _schedule_seq
        self._claim = _claim
        self._instance = _instance

    @classmethod
    def _for_worker(
        cls,
        worker: str,
        args: dict[str, Any],
        queue: str,
        tags: tuple[str, ...],
        priority: int,
        max_attempts: int,
        unique: dict[str, Any] | None,
        worker_class: Any,
    ) -> Job:
        # Builds the job for Worker.new, whose values are checked already.
        # Plain stores take less than half the time of __init__, which
        # matches 26 keywords. Every other field gets its __init__ default,
        # and test_new_matches_job_constructor compares the two.
        job = _new_object(cls)
        job.worker = worker
        job.args = args
        job.queue = queue
        job._meta = None
        job.tags = tags
        job.priority = priority
        job.max_attempts = max_attempts
        job.unique = unique

        # Defaults of a job that has never been inserted.
        job.attempt = 0
        job.state = _AVAILABLE
        job.id = None
        job._inserted_at = None
        job._scheduled_at = None
        job._attempted_at = None
        job._completed_at = None
        job._errors = None
        job.result = None
        job.conflict = False
        job.cancel_requested = False
        job.schedule_in = None

        # Bookkeeping of the instance that runs the job.
        job._worker_class = worker_class
        job._sequence = 0
        job._queue_seq = 0
        job._schedule_seq = 0
        job._claim = None
        job._instance = None
        return job

    @property
    def inserted_at(self) -> datetime | None:
        """When the job was inserted."""
        return _as_datetime(self._inserted_at)

    @inserted_at.setter
    def inserted_at(self, value: datetime | None) -> None:
        self._inserted_at = value

    @property
    def scheduled_at(self) -> datetime | None:
        """When the job is due to run, or was due."""
        return _as_datetime(self._scheduled_at)

    @scheduled_at.setter
    def scheduled_at(self, value: datetime | None) -> None:
        self._scheduled_at = value

    @property
    def attempted_at(self) -> datetime | None:
        """When the last attempt began."""
        return _as_datetime(self._attempted_at)

    @attempted_at.setter
    def attempted_at(self, value: datetime | None) -> None:
        self._attempted_at = value

    @property
    def completed_at(self) -> datetime | None:
        """When the job reached its final state."""
        return _as_datetime(self._completed_at)

    @completed_at.setter
    def completed_at(self, value: datetime | None) -> None:
        self._completed_at = value

    @property
    def meta(self) -> dict[str, Any]:
        """Free-form JSON data about the job, not passed to `perform`."""
        meta = self._meta
        if meta is None:
            meta = self._meta = {}
        return meta

    @meta.setter
    def meta(self, value: dict[str, Any]) -> None:
        self._meta = value

    @property
    def errors(self) -> list[dict[str, Any]]:
        """One dict per failed attempt, oldest first."""
        errors = self._errors
        if errors is None:
            errors = self._errors = []
        return errors

    @errors.setter
    def errors(self, value: list[dict[str, Any]]) -> None:
        self._errors = value

    def __repr__(self) -> str:
        # Reads the private fields, so a repr never creates meta or errors.
        fields = ", ".join(
            f"{name.lstrip('_')}={_or_empty(self, name)!r}" for name in _REPR_FIELDS
        )
        return f"Job({fields})"

    def insert(
        self, instance: Stagehand | None = None, *, on_commit: bool | None = None
    ) -> Job:
        """Insert this job into `instance`, or into the default instance.

        Args:
            instance: The instance to insert into. Defaults to the default
                instance.
            on_commit: True to insert only when the current database
                transaction commits (and drop the job on rollback); False to
                insert now. None (the default) inserts now, unless a
                framework integration such as ``stagehand_django`` has set
                `on_commit_hook`, whose setting then decides. The job is
                validated at this call either way.

        Returns:
            The inserted job, with `id` and `state` set. If a unique job
            already exists, a copy of that job with `conflict=True`. A
            deferred job is returned unsaved (``id`` None) and gets its id
            when the transaction commits; a deferred unique job that finds
            a duplicate then becomes that copy, with `conflict=True`.

        Raises:
            NotRunning: No instance was given and no default instance exists.
            InvalidOption: The job was inserted already, or waits for a
                commit to be inserted.
            StagehandError: ``on_commit=True`` and no transaction hook is
                registered.
        """
        if on_commit is not None and not isinstance(on_commit, bool):
            raise TypeError(f"on_commit must be True, False or None; got {on_commit!r}")
        if instance is None:
            from stagehand._registry import default_instance

            instance = default_instance()
            if instance is None:
                raise NotRunning(
                    "no default Stagehand instance exists; call "
                    "stagehand.start(...) first, or pass the instance: "
                    "job.insert(instance). Under Django the app starts it in "
                    "serving processes only; in a shell or script call "
                    "stagehand_django.lifecycle.start()"
                )
        elif not hasattr(instance, "validate"):
            raise TypeError(
                f"instance must be a stagehand.Stagehand; got {instance!r}. To "
                "insert into a named instance, pass stagehand.get_instance(name)"
            )
        hook = on_commit_hook
        if hook is None and not on_commit:
            return instance.insert(self)
        if hook is None:
            raise StagehandError(
                "job.insert(on_commit=True) needs a transaction hook and none is "
                "registered; add 'stagehand_django' to INSTALLED_APPS, or insert "
                "with on_commit=False"
            )
        instance.validate(self)
        return hook(self, instance, on_commit)

    @property
    def is_final(self) -> bool:
        """True once the job is completed, discarded or cancelled."""
        return self.state in _FINAL_STATES

    def snapshot(self) -> Job:
        """Return a detached copy whose fields no longer change."""
        clone = copy.copy(self)
        clone.args = copy.deepcopy(self.args)
        clone._meta = copy.deepcopy(self._meta)
        clone._errors = (
            None if self._errors is None else [dict(e) for e in self._errors]
        )
        clone._claim = None
        return clone

    def to_dict(self) -> dict[str, Any]:
        """Return the job's public fields as JSON-serialisable values."""
        return {
            "id": self.id,
            "worker": self.worker,
            "queue": self.queue,
            "args": self.args,
            "meta": {} if self._meta is None else self._meta,
            "tags": list(self.tags),
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "attempt": self.attempt,
            "state": self.state.value,
            "inserted_at": _isoformat(self.inserted_at),
            "scheduled_at": _isoformat(self.scheduled_at),
            "attempted_at": _isoformat(self.attempted_at),
            "completed_at": _isoformat(self.completed_at),
            "errors": [] if self._errors is None else self._errors,
            "unique": self.unique,
            "conflict": self.conflict,
        }


_REPR_FIELDS = (
    "worker",
    "args",
    "queue",
    "_meta",
    "tags",
    "priority",
    "max_attempts",
    "attempt",
    "state",
    "id",
    "inserted_at",
    "scheduled_at",
    "attempted_at",
    "completed_at",
    "_errors",
    "result",
    "unique",
    "conflict",
    "cancel_requested",
)


_new_object = object.__new__
_AVAILABLE = JobState.AVAILABLE


def _as_datetime(value: datetime | int | None) -> datetime | None:
    # An int is a time.time_ns() read of the system clock: 0.04 µs against
    # 0.14 for datetime.now(UTC) here, and each job reads it three times.
    # Whole microseconds are kept and the rest cut off, as datetime.now()
    # does, so the two order the same way. (A float from time.time() would
    # round up, and read 1 µs later than a now() taken after it.)
    if isinstance(value, int):
        return _EPOCH + timedelta(microseconds=value // 1000)
    return value


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _or_empty(job: Job, name: str) -> Any:
    value = getattr(job, name)
    if value is None and name in ("_meta", "_errors"):
        return {} if name == "_meta" else []
    return value


def _isoformat(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()

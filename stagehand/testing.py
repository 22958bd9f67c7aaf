"""Helpers for testing code that inserts and runs Stagehand jobs.

Build the instance under test with ``testing="manual"`` so inserts are
validated as in production and then recorded instead of run::

    sh = stagehand.Stagehand(testing="manual", name="test").start()
    EmailWorker.new({"to": "a@example.com"}).insert(sh)
    assert_enqueued(sh, worker=EmailWorker, args={"to": "a@example.com"})
    assert drain_queue("default", sh)["completed"] == 1

Which jobs the assertions search depends on the instance's mode: a manual
instance's recorded jobs, or the live and retained jobs (`Stagehand.jobs`)
of any other instance. `recorded_jobs` returns that list.

`JobFilter`, `is_subset`, `format_job` and `failure_message` are the
building blocks of the assertions, public so that other test integrations
(such as Django test cases) match and report jobs the same way.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from stagehand import _options, events
from stagehand._clock import FakeClock
from stagehand._instance import Stagehand
from stagehand._job import Job, JobState, new_job_id
from stagehand._registry import default_instance
from stagehand._worker import Worker, resolve_worker, worker_path
from stagehand.exceptions import (
    InvalidOption,
    JobNotFound,
    NotRunning,
    QueueNotConfigured,
    UnknownWorker,
)

__all__ = [
    "DRAIN_OUTCOMES",
    "ENQUEUED_STATES",
    "FakeClock",
    "JobFilter",
    "all_enqueued",
    "assert_enqueued",
    "build_job",
    "drain_queue",
    "failure_message",
    "format_job",
    "is_subset",
    "perform_job",
    "recorded_jobs",
    "refute_enqueued",
    "reset",
    "wait_for_job",
]

ENQUEUED_STATES = frozenset({JobState.AVAILABLE, JobState.SCHEDULED})
"""States that count as still enqueued, the default `state` filter."""

DRAIN_OUTCOMES = ("completed", "retryable", "scheduled", "discarded", "cancelled")
"""Keys of the dict that `drain_queue` returns, one per state an attempt
can end in ("scheduled" counts snoozed jobs)."""

_STOP_STATES = frozenset(JobState(outcome) for outcome in DRAIN_OUTCOMES)
_FINAL_STATES = frozenset({JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED})
_WAITING_STATES = frozenset({JobState.SCHEDULED, JobState.RETRYABLE})
_MAX_LISTED = 10
_RECHECK_SECONDS = 0.05

# Notified after each attempt that `drain_queue` runs, since the attempt may
# record new jobs; waiting assertions wait on it between checks.
_recorded_changed = threading.Condition()


# Matching


def is_subset(expected: Any, actual: Any) -> bool:
    """Return True if `expected` is contained in `actual`.

    Dicts match when every key of `expected` is in `actual` with a matching
    value, compared recursively, so nested dicts are subsets too. Any other
    value must be equal as a JSON value: lists element by element (and
    dicts inside lists in full), and True or False never equal 1 or 0.
    """
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return False
        for key, value in expected.items():
            if key not in actual or not is_subset(value, actual[key]):
                return False
        return True
    return _json_equal(expected, actual)


def _json_equal(first: Any, second: Any) -> bool:
    if isinstance(first, bool) or isinstance(second, bool):
        return type(first) is type(second) and first == second
    if isinstance(first, list) and isinstance(second, list):
        if len(first) != len(second):
            return False
        return all(_json_equal(a, b) for a, b in zip(first, second, strict=True))
    if isinstance(first, dict) and isinstance(second, dict):
        if first.keys() != second.keys():
            return False
        return all(_json_equal(first[key], second[key]) for key in first)
    return bool(first == second)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobFilter:
    """Criteria that a job must meet; build one with `JobFilter.build`.

    Each field left as None matches every job. `args` and `meta` match as
    subsets (see `is_subset`), `tags` when all of them are on the job, and
    `states` when the job's state is one of them.
    """

    worker: str | None = None
    # The class `worker` names, when known: a job inserted under another path
    # to the same class matches too.
    worker_class: type[Worker] | None = None
    queue: str | None = None
    args: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    priority: int | None = None
    tags: tuple[str, ...] | None = None
    states: frozenset[JobState] = ENQUEUED_STATES

    @classmethod
    def build(
        cls,
        *,
        worker: type[Worker] | str | None = None,
        queue: str | None = None,
        args: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        priority: int | None = None,
        tags: Iterable[str] | None = None,
        state: JobState | str | Iterable[JobState | str] | None = None,
    ) -> JobFilter:
        """Validate and normalize filters, as the assertions accept them.

        Args:
            worker: A `Worker` subclass or its dotted path.
            queue: A queue name.
            args: Items the job's args must contain. They are compared
                after a JSON round trip, as workers see them, so a tuple
                matches a list.
            meta: Items the job's meta must contain, compared like args.
            priority: The exact priority, 0 to 9.
            tags: Tags that must all be on the job.
            state: One state or several. Defaults to available and
                scheduled, the jobs still enqueued.

        Raises:
            InvalidOption: A filter value is invalid.
            UnknownWorker: `worker` is a class that is not a Worker subclass.
        """
        worker_class: type[Worker] | None = None
        if isinstance(worker, type):
            worker_class = resolve_worker(worker)
            worker = worker_path(worker_class)
        elif worker is not None and (not isinstance(worker, str) or not worker):
            raise InvalidOption(
                "worker must be a Worker subclass or its dotted path, such as "
                f"'myapp.workers.EmailWorker'; got {worker!r}"
            )
        return cls(
            worker=worker,
            worker_class=worker_class,
            queue=None if queue is None else _options.check_queue_name(queue),
            args=None if args is None else _normalize_dict(args, "args"),
            meta=None if meta is None else _normalize_dict(meta, "meta"),
            priority=None if priority is None else _options.check_priority(priority),
            tags=None if tags is None else _options.check_tags(tags),
            states=ENQUEUED_STATES if state is None else _check_states(state),
        )

    def matches(self, job: Job) -> bool:
        """Return True if `job` meets every criterion."""
        return all(self._checks(job).values())

    def closeness(self, job: Job) -> tuple[bool, bool, int]:
        """Return a sort key: jobs closer to this filter compare greater.

        The same worker counts most, then the same queue, then the number
        of other criteria met.
        """
        checks = self._checks(job)
        worker = checks.pop("worker")
        queue = checks.pop("queue")
        return (worker, queue, sum(checks.values()))

    def _checks(self, job: Job) -> dict[str, bool]:
        tags = self.tags
        return {
            "worker": self.worker is None
            or job.worker == self.worker
            or (
                self.worker_class is not None and job._worker_class is self.worker_class
            ),
            "queue": self.queue is None or job.queue == self.queue,
            "args": self.args is None or is_subset(self.args, job.args),
            "meta": self.meta is None or is_subset(self.meta, job.meta),
            "priority": self.priority is None or job.priority == self.priority,
            "tags": tags is None or set(tags) <= set(job.tags),
            "state": job.state in self.states,
        }

    def describe(self) -> str:
        """Return the criteria as text, such as ``queue='mailers', ...``."""
        parts: list[str] = []
        if self.worker is not None:
            parts.append(f"worker={self.worker!r}")
        if self.queue is not None:
            parts.append(f"queue={self.queue!r}")
        if self.args is not None:
            parts.append(f"args containing {_json(self.args)}")
        if self.meta is not None:
            parts.append(f"meta containing {_json(self.meta)}")
        if self.priority is not None:
            parts.append(f"priority={self.priority}")
        if self.tags is not None:
            parts.append(f"tags including {list(self.tags)!r}")
        parts.append(f"state in {_state_names(self.states)!r}")
        return ", ".join(parts)


def _normalize_dict(value: object, name: str) -> dict[str, Any]:
    if isinstance(value, Mapping) and not isinstance(value, dict):
        value = dict(value)
    return _options.normalize_json_dict(value, name)


def _check_states(
    state: JobState | str | Iterable[JobState | str],
) -> frozenset[JobState]:
    try:
        values = [state] if isinstance(state, str) else list(state)
        states = frozenset(JobState(value) for value in values)
    except (TypeError, ValueError):
        # A name that is no state, or a value that is neither a name nor a
        # list of names, such as state=5.
        states = frozenset()
    if not states:
        raise InvalidOption(
            f"state must be one of {[s.value for s in JobState]}, or a list of "
            f"them; got {state!r}"
        )
    return states


def _state_names(states: Iterable[JobState]) -> list[str]:
    return [state.value for state in JobState if state in states]


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


# Messages


def format_job(job: Job) -> str:
    """Return one line that shows the fields the filters look at."""
    return (
        f"id={job.id} worker={job.worker!r} queue={job.queue!r} "
        f"args={_json(job.args)} meta={_json(job.meta)} priority={job.priority} "
        f"tags={list(job.tags)!r} state={job.state.value!r}"
    )


def failure_message(
    job_filter: JobFilter,
    jobs: list[Job],
    instance: Stagehand,
    *,
    refute: bool = False,
    waited: float | None = None,
) -> str:
    """Build the message of a failed `assert_enqueued` or `refute_enqueued`.

    Args:
        job_filter: The criteria that were checked.
        jobs: Every job that was searched, as `recorded_jobs` returns them.
        instance: The instance the jobs belong to, named in the message.
        refute: True for a refutation, which lists the matching jobs; False
            for an assertion, which lists the jobs closest to the filter.
        waited: Seconds the assertion waited, if it was given a timeout.

    Returns:
        Text that names the filter, gives the number of jobs searched, and
        lists up to ten of them.
    """
    expectation = "no enqueued job" if refute else "an enqueued job"
    head = f"expected {expectation} matching {job_filter.describe()}"
    if waited is not None:
        head += f" within {waited:g} s"
    if not jobs:
        return f"{head}; {_no_jobs_phrase(instance)}"
    searched = _searched_phrase(len(jobs), instance)
    if refute:
        listed = [job for job in jobs if job_filter.matches(job)]
        verb = "matches" if len(listed) == 1 else "match"
        verdict = f"{len(listed)} of {searched} {verb}:"
    else:
        listed = sorted(jobs, key=job_filter.closeness, reverse=True)
        verdict = f"none of {searched} matches. Closest first:"
    lines = [f"{head}; {verdict}"]
    for job in listed[:_MAX_LISTED]:
        lines.append(f"  {format_job(job)}")
    if len(listed) > _MAX_LISTED:
        lines.append(f"  ... and {len(listed) - _MAX_LISTED} more")
    return "\n".join(lines)


def _no_jobs_phrase(instance: Stagehand) -> str:
    if instance.testing == "manual":
        return f"instance {instance.name!r} recorded no jobs"
    return f"instance {instance.name!r} has no live or retained jobs"


def _searched_phrase(count: int, instance: Stagehand) -> str:
    jobs = "job" if count == 1 else "jobs"
    if instance.testing == "manual":
        return f"{count} {jobs} recorded by instance {instance.name!r}"
    return f"{count} live or retained {jobs} of instance {instance.name!r}"


# Assertions


def _resolve_instance(instance: Stagehand | None) -> Stagehand:
    if instance is None:
        found = default_instance()
        if found is None:
            raise NotRunning(
                "no default Stagehand instance is running; pass the instance, "
                "start one with stagehand.start(testing='manual'), or use the "
                "stagehand_default pytest fixture"
            )
        return found
    if not isinstance(instance, Stagehand):
        raise TypeError(
            "instance must be a stagehand.Stagehand or None for the default "
            f"instance; got {instance!r}. Look an instance up by name with "
            "stagehand.get_instance(name)."
        )
    return instance


def recorded_jobs(instance: Stagehand | None = None) -> list[Job]:
    """Return the jobs that the assertions search, oldest insert first.

    For a ``testing="manual"`` instance these are its recorded jobs, in
    every state. For other instances they are the live and retained jobs
    that `Stagehand.jobs` returns.

    Args:
        instance: The instance, or None for the default instance.

    Raises:
        NotRunning: `instance` is None and no default instance is running.
    """
    target = _resolve_instance(instance)
    if target.testing == "manual":
        with target._recorded_lock:
            return list(target._recorded)
    return target.jobs()


def all_enqueued(
    instance: Stagehand | None = None,
    **filters: Any,
) -> list[Job]:
    """Return the jobs that match `filters`, oldest insert first.

    Args:
        instance: The instance, or None for the default instance.
        **filters: worker, queue, args, meta, priority, tags and state, as
            `JobFilter.build` takes them. By default only jobs still
            enqueued (available or scheduled) match.

    Returns:
        The matching jobs themselves, not copies, so their fields change
        when the instance runs or cancels them.

    Raises:
        NotRunning: `instance` is None and no default instance is running.
        InvalidOption: A filter is invalid.
    """
    target = _resolve_instance(instance)
    job_filter = _build_filter(target, filters)
    return [job for job in recorded_jobs(target) if job_filter.matches(job)]


def assert_enqueued(
    instance: Stagehand | None = None,
    *,
    timeout: float | None = None,
    **filters: Any,
) -> Job:
    """Assert that a job matching `filters` is enqueued, and return it.

    Args:
        instance: The instance, or None for the default instance.
        timeout: Seconds (real time) to wait for a matching job, for jobs
            inserted by another thread. None or 0 checks once.
        **filters: worker, queue, args, meta, priority, tags and state, as
            `JobFilter.build` takes them.

    Returns:
        The first matching job, oldest insert first.

    Raises:
        AssertionError: No job matches; the message lists the closest jobs.
        NotRunning: `instance` is None and no default instance is running.
        InvalidOption: A filter or the timeout is invalid.
    """
    target = _resolve_instance(instance)
    job_filter = _build_filter(target, filters)
    jobs, matched = _search(target, job_filter, _check_timeout(timeout))
    if not matched:
        raise AssertionError(failure_message(job_filter, jobs, target, waited=timeout))
    return matched[0]


def refute_enqueued(
    instance: Stagehand | None = None,
    *,
    timeout: float | None = None,
    **filters: Any,
) -> None:
    """Assert that no job matching `filters` is enqueued.

    Args:
        instance: The instance, or None for the default instance.
        timeout: Seconds (real time) during which no matching job may
            appear. The call fails as soon as one does, and otherwise
            returns after the whole timeout. None or 0 checks once.
        **filters: worker, queue, args, meta, priority, tags and state, as
            `JobFilter.build` takes them.

    Raises:
        AssertionError: A job matches; the message lists the matching jobs.
        NotRunning: `instance` is None and no default instance is running.
        InvalidOption: A filter or the timeout is invalid.
    """
    target = _resolve_instance(instance)
    job_filter = _build_filter(target, filters)
    jobs, matched = _search(target, job_filter, _check_timeout(timeout))
    if matched:
        raise AssertionError(
            failure_message(job_filter, jobs, target, refute=True, waited=timeout)
        )


_FILTER_NAMES = ("worker", "queue", "args", "meta", "priority", "tags", "state")


def _build_filter(instance: Stagehand, filters: dict[str, Any]) -> JobFilter:
    # Checks what JobFilter.build cannot know alone: that each filter name
    # exists, that a worker path imports, and that the queue is configured,
    # so that a typo fails instead of matching nothing.
    unknown = sorted(set(filters) - set(_FILTER_NAMES))
    if unknown:
        # TypeError, as for any unexpected keyword argument.
        raise TypeError(
            f"unknown filters {unknown}; valid filters are {list(_FILTER_NAMES)}"
        )

    worker = filters.get("worker")
    worker_class: type[Worker] | None = None
    if isinstance(worker, str) and worker:
        # The path is matched as given, since a job keeps the path it was
        # inserted under, and so is any other path to the same class.
        try:
            worker_class = resolve_worker(worker)
        except UnknownWorker:
            # A class defined inside a function has no importable path, but
            # its jobs still carry one.
            if not any(job.worker == worker for job in recorded_jobs(instance)):
                raise

    queue = filters.get("queue")
    configured = sorted(settings.name for settings in instance.settings.queues)
    if isinstance(queue, str) and queue not in configured:
        raise QueueNotConfigured(
            f"queue {queue!r} is not configured on instance {instance.name!r}, so "
            f"no job can be in it; configured queues are {configured}"
        )

    job_filter = JobFilter.build(**filters)
    if worker_class is not None:
        job_filter = replace(job_filter, worker_class=worker_class)
    return job_filter


def _check_timeout(timeout: object) -> float:
    if timeout is None:
        return 0.0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidOption(f"timeout must be a number of seconds; got {timeout!r}")
    if not 0 <= timeout < float("inf"):
        raise InvalidOption(f"timeout must be a finite number >= 0; got {timeout!r}")
    return float(timeout)


def _search(
    instance: Stagehand, job_filter: JobFilter, timeout: float
) -> tuple[list[Job], list[Job]]:
    # Searches until a job matches or `timeout` seconds have passed, and
    # returns the searched jobs and the matching ones.
    deadline = time.monotonic() + timeout
    while True:
        version = instance._recorded_version
        jobs = recorded_jobs(instance)
        matched = [job for job in jobs if job_filter.matches(job)]
        remaining = deadline - time.monotonic()
        if matched or remaining <= 0:
            return jobs, matched
        if instance.testing == "disabled":
            # NOTE: a running instance notifies no one of inserts (that
            # would cost every production insert), so this re-checks every
            # 0.05 s.
            with _recorded_changed:
                _recorded_changed.wait(min(remaining, _RECHECK_SECONDS))
            continue
        with instance._recorded_changed:
            if instance._recorded_version == version:
                instance._recorded_changed.wait(remaining)


# Running jobs in the test


def build_job(
    worker: type[Worker] | str,
    args: dict[str, Any] | None = None,
    *,
    attempt: int = 1,
    **options: Any,
) -> Job:
    """Build the job that `perform_job` runs, without running it.

    Useful to call a worker's `backoff` or `timeout` directly. The job comes
    from ``worker.new(args, **options)``, so it is validated the same way.
    It is then stamped as attempt `attempt` in progress. It gets an id, the
    state executing, and the current UTC time as inserted_at and
    attempted_at, and as scheduled_at unless an option sets that.

    Args:
        worker: A `Worker` subclass or its dotted path.
        args: The job's args; a JSON-serialisable dict with string keys.
        attempt: The attempt number, from 1 to the job's max_attempts.
            Defaults to 1.
        **options: Options of `Worker.new`, such as max_attempts or meta.

    Raises:
        UnknownWorker: `worker` does not name a Worker subclass.
        InvalidOption: An option, the args or `attempt` is invalid.
    """
    job = resolve_worker(worker).new(args, **options)
    if (
        isinstance(attempt, bool)
        or not isinstance(attempt, int)
        or not 1 <= attempt <= job.max_attempts
    ):
        raise InvalidOption(
            f"attempt must be an int from 1 to the job's max_attempts "
            f"({job.max_attempts}); got {attempt!r}. Pass max_attempts=... to "
            "test a later attempt."
        )
    now = datetime.now(UTC)
    job.id = new_job_id()
    job.state = JobState.EXECUTING
    job.attempt = attempt
    job.inserted_at = now
    job.attempted_at = now
    if job.schedule_in is not None:
        job.scheduled_at = now + timedelta(seconds=job.schedule_in)
    elif job.scheduled_at is None:
        job.scheduled_at = now
    return job


def perform_job(
    worker: type[Worker] | str,
    args: dict[str, Any] | None = None,
    *,
    attempt: int = 1,
    **options: Any,
) -> Any:
    """Build a job as `Worker.new` does and run one attempt in this thread.

    No instance is involved: the job is neither inserted nor recorded, and
    no timeout applies. See `build_job` for how the job is built.

    Args:
        worker: A `Worker` subclass or its dotted path.
        args: The job's args; a JSON-serialisable dict with string keys.
        attempt: The attempt number that the job shows, from 1 to its
            max_attempts. Defaults to 1.
        **options: Options of `Worker.new`, such as max_attempts or meta.

    Returns:
        What `perform` returned, unchanged: a value, None, or a `Snooze`,
        `Cancel` or `Error`.

    Raises:
        UnknownWorker: `worker` does not name a Worker subclass.
        InvalidOption: An option, the args or `attempt` is invalid.
        Exception: Whatever `perform` raised, unchanged.
    """
    job = build_job(worker, args, attempt=attempt, **options)
    return job._worker_class().perform(job)


def drain_queue(
    queue: str,
    instance: Stagehand | None = None,
    *,
    with_scheduled: bool = False,
    with_recursion: bool = False,
) -> dict[str, int]:
    """Run the recorded jobs of `queue` in this thread and count outcomes.

    Jobs run in priority order (0 first), then in insert order, one attempt
    each, and the instance records each attempt as its worker threads
    would. Jobs that finish (completed, discarded, cancelled) leave the
    recorded jobs. Jobs that fail with attempts left (retryable) or snooze
    (scheduled) stay recorded with their new state and due time, so a later
    call runs them again once they are due. A call never runs one job twice.

    Args:
        queue: The queue to drain.
        instance: A ``testing="manual"`` instance, or None for the default
            instance. An ``"inline"`` instance records nothing, so draining
            it runs nothing.
        with_scheduled: Also run jobs whose due time lies ahead on the
            instance clock. By default only available jobs and jobs already
            due run.
        with_recursion: Keep draining until no job is left to run, so jobs
            that the drained jobs insert into `queue` run too. Jobs inserted
            during one round run in the next round.

    Returns:
        A dict with the keys of `DRAIN_OUTCOMES` and the number of jobs
        whose attempt ended in each, such as ``{"completed": 2, "retryable":
        1, "scheduled": 0, "discarded": 0, "cancelled": 0}``.

    Raises:
        NotRunning: `instance` is None and no default instance is running.
        InvalidOption: `with_scheduled` or `with_recursion` is not a bool,
            or the instance runs jobs itself (``"disabled"``).
        QueueNotConfigured: `queue` is not one of the instance's queues.
    """
    _check_flag("with_scheduled", with_scheduled)
    _check_flag("with_recursion", with_recursion)
    target = _resolve_instance(instance)
    _check_drainable(target, queue)
    counts = dict.fromkeys(DRAIN_OUTCOMES, 0)
    ran: set[str] = set()
    while True:
        batch = _due_jobs(target, queue, with_scheduled, ran)
        for job in batch:
            if _claim(target, job, with_scheduled):
                ran.add(job.id)  # type: ignore[arg-type]
                _run_attempt(target, job, counts)
        if not batch or not with_recursion:
            return counts


def _check_flag(name: str, value: object) -> None:
    # A string such as "no" is true, so it would quietly turn the flag on.
    if not isinstance(value, bool):
        raise InvalidOption(
            f"drain_queue() {name} must be True or False; got {value!r}. "
            f"Pass {name}=True or leave it out."
        )


def _check_drainable(instance: Stagehand, queue: str) -> None:
    if instance.testing == "disabled":
        raise InvalidOption(
            f"drain_queue() runs the recorded jobs of a testing='manual' "
            f"instance, but instance {instance.name!r} runs its jobs in worker "
            "threads (testing='disabled'). Build it with testing='manual', or "
            "wait for its jobs with wait_for_job()."
        )
    if queue not in instance.queues:
        raise QueueNotConfigured(
            f"queue {queue!r} is not configured on instance {instance.name!r}; "
            f"configured queues are {sorted(instance.queues)}"
        )


def _is_due(job: Job, now: datetime, with_scheduled: bool) -> bool:
    if job.state is JobState.AVAILABLE:
        return True
    if job.state not in _WAITING_STATES:
        return False
    return with_scheduled or job.scheduled_at is None or job.scheduled_at <= now


def _due_jobs(
    instance: Stagehand, queue: str, with_scheduled: bool, ran: set[str]
) -> list[Job]:
    now = instance.clock.now()
    with instance._recorded_lock:
        due = [
            job
            for job in instance._recorded
            if job.queue == queue
            and job.id not in ran
            and _is_due(job, now, with_scheduled)
        ]
    # sorted() is stable, so jobs of equal priority keep their insert order.
    return sorted(due, key=lambda job: job.priority)


def _claim(instance: Stagehand, job: Job, with_scheduled: bool) -> bool:
    # Another thread may have drained, cancelled or reset the job since the
    # snapshot. The check runs under the lock that cancel_job also takes, so
    # exactly one drainer moves the job to executing.
    now = instance.clock.now()
    with instance._recorded_lock:
        recorded = instance._live.get(job.id) is job  # type: ignore[arg-type]
        if not recorded or not _is_due(job, now, with_scheduled):
            return False
        job.state = JobState.EXECUTING
        return True


def _run_attempt(instance: Stagehand, job: Job, counts: dict[str, int]) -> None:
    instance._executor.run(job, None)
    state = job.state
    if state.is_final:
        # reset() may have cleared the recorded jobs meanwhile.
        with instance._recorded_lock, contextlib.suppress(ValueError):
            instance._recorded.remove(job)
    if state.value in counts:
        counts[state.value] += 1
    with instance._recorded_changed:
        instance._recorded_version += 1
        instance._recorded_changed.notify_all()
    with _recorded_changed:
        _recorded_changed.notify_all()


def reset(instance: Stagehand | None = None) -> int:
    """Forget the jobs of a testing instance, so the next test starts clean.

    Clears the recorded jobs, the live jobs that are not executing, the
    retained finished jobs and the fingerprints of unique jobs.

    Args:
        instance: A ``testing="manual"`` or ``"inline"`` instance, or None
            for the default instance.

    Returns:
        The number of recorded jobs cleared.

    Raises:
        NotRunning: `instance` is None and no default instance is running.
        InvalidOption: The instance runs jobs itself (``"disabled"``).
    """
    target = _resolve_instance(instance)
    if target.testing == "disabled":
        raise InvalidOption(
            f"reset() clears a testing='manual' or 'inline' instance, but "
            f"instance {target.name!r} runs its jobs in worker threads "
            "(testing='disabled'); build a new instance instead"
        )
    with target._recorded_lock:
        cleared = len(target._recorded)
        target._recorded.clear()
    for job_id, job in list(target._live.items()):
        if job.state is not JobState.EXECUTING:
            target._live.pop(job_id, None)
    target._retained.clear()
    target._unique.clear()
    return cleared


# Waiting for jobs run by worker threads


def wait_for_job(
    job: Job | str,
    state: JobState | str | Iterable[JobState | str] | None = None,
    *,
    instance: Stagehand | None = None,
    timeout: float = 10.0,
) -> Job:
    """Block until an attempt of `job` ends in one of `state`; return the job.

    The wait is woken by the ``job.stop`` event, not by polling. Use it with
    a ``testing="disabled"`` instance, whose worker threads run the job:
    advance the instance's `FakeClock` to make scheduled jobs, retries and
    snoozes due, then wait for the state the attempt leads to.

    Args:
        job: An inserted job, or its id.
        state: One state or several, from completed, retryable, scheduled,
            discarded and cancelled: the states an attempt ends in. Defaults
            to the final states (completed, discarded, cancelled).
        instance: The instance that owns a job given by id; None for the
            default instance.
        timeout: Seconds of real time to wait before giving up, a guard
            against hanging tests. Defaults to 10.

    Returns:
        The live job, already in the requested state if it was in it when
        the call began.

    Raises:
        TimeoutError: No attempt ended in `state` within `timeout`.
        JobNotFound: No live or retained job has the id.
        InvalidOption: `state` or `timeout` is invalid, or the job was never
            inserted.
    """
    live = _live_job(job, instance)
    states = _FINAL_STATES if state is None else _check_stop_states(state)
    if _check_timeout(timeout) == 0:
        raise InvalidOption(f"timeout must be a number of seconds > 0; got {timeout!r}")
    reached = threading.Condition()
    ended: list[JobState] = []

    def on_stop(
        event: str, measurements: Mapping[str, Any], metadata: Mapping[str, Any]
    ) -> None:
        if metadata["job"] is live:
            with reached:
                ended.append(metadata["state"])
                reached.notify_all()

    def has_reached() -> bool:
        if any(ended_state in states for ended_state in ended):
            return True
        return live.state in states and _is_settled(live)

    handler_id = ("stagehand.testing.wait_for_job", object())
    events.attach(handler_id, ["job.stop"], on_stop)
    try:
        with reached:
            if reached.wait_for(has_reached, timeout):
                return live
    finally:
        events.detach(handler_id)
    raise TimeoutError(_timeout_message(live, states, timeout))


def _live_job(job: Job | str, instance: Stagehand | None) -> Job:
    if isinstance(job, str):
        target = _resolve_instance(instance)
        found = target.get_job(job)
        if found is None:
            raise JobNotFound(
                f"instance {target.name!r} has no live or retained job {job!r}"
            )
        return found
    if not isinstance(job, Job):
        raise TypeError(f"job must be an inserted stagehand.Job or its id; got {job!r}")
    if job.id is None:
        raise InvalidOption(
            f"job for {job.worker} was never inserted; insert it and wait on the "
            "job that insert() returns"
        )
    if not job.conflict:
        return job
    # A conflict is a detached copy of the existing job, which never changes.
    owner = instance if instance is not None else job._instance
    found = owner.get_job(job.id) if owner is not None else None
    if found is None:
        raise JobNotFound(f"no live or retained job has id {job.id!r}")
    return found


def _check_stop_states(
    state: JobState | str | Iterable[JobState | str],
) -> frozenset[JobState]:
    states = _check_states(state)
    if not states <= _STOP_STATES:
        raise InvalidOption(
            f"wait_for_job() waits for a state that an attempt ends in, one of "
            f"{list(DRAIN_OUTCOMES)}; got {state!r}"
        )
    return states


def _is_settled(job: Job) -> bool:
    # A waiting state counts only once the scheduler holds the job, so a
    # test that then advances a FakeClock can rely on the retry or snooze being queued.
    scheduler = job._instance._scheduler if job._instance is not None else None
    if job.state in _WAITING_STATES and scheduler is not None:
        return job._schedule_seq > 0
    return True


def _timeout_message(job: Job, states: frozenset[JobState], timeout: float) -> str:
    message = (
        f"job {job.id} ({job.worker}) did not reach state {_state_names(states)} "
        f"within {timeout:g} s; it is {job.state.value!r}"
    )
    if job.state in _WAITING_STATES and job.scheduled_at is not None:
        message += f" and due at {job.scheduled_at.isoformat()}"
        clock = job._instance.clock if job._instance is not None else None
        if isinstance(clock, FakeClock):
            message += (
                f", but its instance's FakeClock reads {clock.now().isoformat()}; "
                "advance the clock to the due time first"
            )
    return message

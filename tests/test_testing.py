"""Tests of stagehand.testing: recording modes, assertions, running helpers,
and the FakeClock driving a real instance."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import stagehand
from stagehand import (
    Cancel,
    Error,
    FakeClock,
    Job,
    JobState,
    Snooze,
    Worker,
    events,
    testing,
)
from stagehand._worker import worker_path
from stagehand.exceptions import (
    InvalidOption,
    JobNotFound,
    NotRunning,
    QueueNotConfigured,
    UnknownWorker,
)
from stagehand.testing import (
    JobFilter,
    all_enqueued,
    assert_enqueued,
    build_job,
    drain_queue,
    failure_message,
    format_job,
    is_subset,
    perform_job,
    recorded_jobs,
    refute_enqueued,
    reset,
    wait_for_job,
)

HANG_GUARD = 30.0  # seconds; reached only when a test is broken
START = datetime(2026, 1, 1, tzinfo=UTC)
QUEUES = {"default": 2, "mailers": 2}

_names = itertools.count(1)

# Filled by the workers below, read by tests; guarded by RUN_LOCK.
RUN_LOCK = threading.Lock()
RUNS: list[tuple[str | None, Any]] = []


class EchoWorker(Worker):
    def perform(self, job: Job) -> Any:
        with RUN_LOCK:
            RUNS.append((job.id, job.args.get("label")))
        return job.args.get("value")


class EmailWorker(Worker):
    queue = "mailers"
    tags = ("email",)

    def perform(self, job: Job) -> None:
        with RUN_LOCK:
            RUNS.append((job.id, job.args.get("to")))


class OutcomeWorker(Worker):
    """Returns or raises the outcome named by args["outcome"]."""

    def backoff(self, job: Job) -> float:
        return 30.0

    def perform(self, job: Job) -> Any:
        outcome = job.args["outcome"]
        if outcome == "raise":
            raise RuntimeError(f"attempt {job.attempt} failed")
        if outcome == "error":
            return Error("bad input")
        if outcome == "snooze":
            return Snooze(60)
        if outcome == "cancel":
            return Cancel("not needed")
        return f"done on attempt {job.attempt}"


class FlakyWorker(Worker):
    """Fails its first attempt, then completes."""

    max_attempts = 3

    def backoff(self, job: Job) -> float:
        return 30.0 * job.attempt

    def perform(self, job: Job) -> str:
        if job.attempt == 1:
            raise RuntimeError("first attempt fails")
        return "ok"


class SnoozeOnceWorker(Worker):
    def perform(self, job: Job) -> Any:
        if job.attempt == 1:
            return Snooze(300)
        return "woke up"


class ParentWorker(Worker):
    """Inserts a ChildWorker job into the same instance."""

    def perform(self, job: Job) -> None:
        ChildWorker.new({"parent": job.id}).insert(job._instance)


class ChildWorker(Worker):
    def perform(self, job: Job) -> None:
        with RUN_LOCK:
            RUNS.append((job.id, "child"))


class UniqueWorker(Worker):
    unique = True

    def perform(self, job: Job) -> None:
        return None


def _new_instance(testing_mode: str = "manual", **config: Any) -> stagehand.Stagehand:
    config.setdefault("queues", QUEUES)
    config.setdefault("clock", FakeClock())
    return stagehand.Stagehand(
        testing=testing_mode, name=f"test-testing-{next(_names)}", **config
    )


@pytest.fixture(autouse=True)
def _clear_runs() -> None:
    with RUN_LOCK:
        RUNS.clear()


@pytest.fixture
def manual() -> Iterator[stagehand.Stagehand]:
    with _new_instance("manual") as instance:
        yield instance


@pytest.fixture
def inline() -> Iterator[stagehand.Stagehand]:
    with _new_instance("inline") as instance:
        yield instance


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def live(clock: FakeClock) -> Iterator[stagehand.Stagehand]:
    with _new_instance("disabled", clock=clock) as instance:
        yield instance


@pytest.fixture
def default_manual() -> Iterator[stagehand.Stagehand]:
    with stagehand.Stagehand(testing="manual", queues=QUEUES) as instance:
        yield instance


def _labels() -> list[Any]:
    with RUN_LOCK:
        return [label for _, label in RUNS]


# Manual and inline modes


def test_manual_records_args_after_json_round_trip(manual: stagehand.Stagehand) -> None:
    job = EchoWorker.new({"ids": (1, 2), "nested": {"at": None}}).insert(manual)

    assert recorded_jobs(manual) == [job]
    assert job.args == {"ids": [1, 2], "nested": {"at": None}}
    assert job.state is JobState.AVAILABLE
    assert _labels() == []


def test_manual_records_scheduled_jobs(manual: stagehand.Stagehand) -> None:
    job = EchoWorker.new({}, schedule_in=(5, "minutes")).insert(manual)

    assert job.state is JobState.SCHEDULED
    assert job.scheduled_at == START + timedelta(minutes=5)


def test_manual_rejects_invalid_jobs(manual: stagehand.Stagehand) -> None:
    with pytest.raises(InvalidOption, match="priority must be an int from 0"):
        EchoWorker.new({}, priority=12)
    with pytest.raises(InvalidOption, match="args must be JSON-serialisable"):
        EchoWorker.new({"at": datetime.now(UTC)})
    with pytest.raises(QueueNotConfigured, match="'reports' is not configured"):
        EchoWorker.new({}, queue="reports").insert(manual)

    assert recorded_jobs(manual) == []


def test_inline_returns_completed_job(inline: stagehand.Stagehand) -> None:
    job = OutcomeWorker.new({"outcome": "complete"}).insert(inline)

    assert job.state is JobState.COMPLETED
    assert job.result == "done on attempt 1"
    assert job.attempt == 1
    assert recorded_jobs(inline) == [job]


@pytest.mark.parametrize(
    ("outcome", "max_attempts", "state"),
    [
        ("raise", 20, JobState.RETRYABLE),
        ("error", 20, JobState.RETRYABLE),
        ("raise", 1, JobState.DISCARDED),
        ("cancel", 20, JobState.CANCELLED),
    ],
)
def test_inline_reports_failed_attempts(
    inline: stagehand.Stagehand, outcome: str, max_attempts: int, state: JobState
) -> None:
    job = OutcomeWorker.new({"outcome": outcome}, max_attempts=max_attempts).insert(
        inline
    )

    assert job.state is state
    assert job.attempt == 1
    assert len(job.errors) == 1
    assert job.errors[0]["attempt"] == 1


def test_inline_reports_retry_without_sleeping(inline: stagehand.Stagehand) -> None:
    job = OutcomeWorker.new({"outcome": "raise"}).insert(inline)

    # The backoff of 30 s is reported as the due time, not slept through:
    # the FakeClock never moved.
    assert inline.clock.now() == START
    assert job.scheduled_at == START + timedelta(seconds=30)
    assert "RuntimeError: attempt 1 failed" in job.errors[0]["error"]


def test_inline_reports_snooze(inline: stagehand.Stagehand) -> None:
    job = OutcomeWorker.new({"outcome": "snooze"}).insert(inline)

    assert job.state is JobState.SCHEDULED
    assert job.scheduled_at == START + timedelta(seconds=60)
    assert job.max_attempts == 21
    assert job.errors == []


def test_inline_does_not_sleep_on_system_clock() -> None:
    with _new_instance("inline", clock=None) as instance:
        job = OutcomeWorker.new({"outcome": "snooze"}).insert(instance)

    assert job.state is JobState.SCHEDULED


# Matching


@pytest.mark.parametrize(
    ("expected", "actual", "result"),
    [
        ({}, {"a": 1}, True),
        ({"a": 1}, {"a": 1, "b": 2}, True),
        ({"a": 1}, {"a": 2}, False),
        ({"a": 1}, {"b": 1}, False),
        ({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}, True),
        ({"a": {"b": 1}}, {"a": {"c": 2}}, False),
        ({"a": {"b": 1}}, {"a": [1]}, False),
        ({"a": [1, 2]}, {"a": [1, 2]}, True),
        ({"a": [1]}, {"a": [1, 2]}, False),
        ({"a": None}, {"a": None}, True),
        ({"a": None}, {}, False),
        (1, 1, True),
        ({"a": 1}, 1, False),
        ({"a": 1}, {"a": True}, False),
        ({"a": True}, {"a": 1}, False),
        ({"a": False}, {"a": False}, True),
        ({"a": 1}, {"a": 1.0}, True),
        ({"a": [1]}, {"a": [True]}, False),
        ({"a": [{"b": 1}]}, {"a": [{"b": 1}]}, True),
        ({"a": [{"b": 1}]}, {"a": [{"b": 1, "c": 2}]}, False),
        ({"a": [{"b": 1}]}, {"a": [{"b": True}]}, False),
    ],
)
def test_is_subset(expected: Any, actual: Any, result: bool) -> None:
    assert is_subset(expected, actual) is result


@pytest.mark.parametrize(
    ("filters", "error", "message"),
    [
        ({"worker": 3}, InvalidOption, "worker must be a Worker subclass"),
        ({"worker": ""}, InvalidOption, "worker must be a Worker subclass"),
        ({"worker": dict}, UnknownWorker, "is not a subclass of stagehand.Worker"),
        ({"queue": ""}, InvalidOption, "queue must be a non-empty string"),
        ({"priority": 10}, InvalidOption, "priority must be an int from 0"),
        ({"tags": "email"}, InvalidOption, "tags must be a list or tuple"),
        ({"args": [1]}, InvalidOption, "args must be a dict"),
        ({"meta": {"at": object()}}, InvalidOption, "meta must be JSON-serialisable"),
        ({"state": "done"}, InvalidOption, "state must be one of"),
        ({"state": []}, InvalidOption, "state must be one of"),
    ],
)
def test_filter_rejects_invalid_values(
    filters: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        JobFilter.build(**filters)


def test_filter_normalizes_values() -> None:
    job_filter = JobFilter.build(
        worker=EchoWorker, args={"ids": (1, 2)}, tags=["a"], state="cancelled"
    )

    assert job_filter.worker == worker_path(EchoWorker)
    assert job_filter.args == {"ids": [1, 2]}
    assert job_filter.tags == ("a",)
    assert job_filter.states == frozenset({JobState.CANCELLED})


def test_unknown_filter_is_type_error(manual: stagehand.Stagehand) -> None:
    with pytest.raises(TypeError) as raised:
        all_enqueued(manual, args_subset={"a": 1})

    assert str(raised.value) == (
        "unknown filters ['args_subset']; valid filters are "
        "['worker', 'queue', 'args', 'meta', 'priority', 'tags', 'state']"
    )


def test_misspelled_worker_path_raises(manual: stagehand.Stagehand) -> None:
    EmailWorker.new({"to": "a"}).insert(manual)

    with pytest.raises(UnknownWorker, match="check the spelling of the class name"):
        refute_enqueued(manual, worker=f"{__name__}.EmailWorkr")


def test_unconfigured_queue_filter_raises(manual: stagehand.Stagehand) -> None:
    with pytest.raises(QueueNotConfigured) as raised:
        refute_enqueued(manual, queue="defualt")

    assert str(raised.value) == (
        f"queue 'defualt' is not configured on instance {manual.name!r}, so no "
        "job can be in it; configured queues are ['default', 'mailers']"
    )


def test_filter_describe() -> None:
    job_filter = JobFilter.build(
        worker="app.Mailer",
        queue="mailers",
        args={"to": "a@example.com"},
        meta={"trace": {"id": 1}},
        priority=3,
        tags=("vip",),
        state=["scheduled", "available"],
    )

    assert job_filter.describe() == (
        "worker='app.Mailer', queue='mailers', args containing "
        '{"to": "a@example.com"}, meta containing {"trace": {"id": 1}}, '
        "priority=3, tags including ['vip'], state in ['available', 'scheduled']"
    )


# Assertions


def test_assert_enqueued_matches_each_filter(manual: stagehand.Stagehand) -> None:
    job = EmailWorker.new(
        {"to": "a@example.com", "opts": {"html": True, "lang": "en"}},
        meta={"trace": {"id": 7, "span": 2}},
        priority=4,
        tags=["email", "vip"],
    ).insert(manual)
    EchoWorker.new({}).insert(manual)

    assert assert_enqueued(manual, worker=EmailWorker) is job
    assert assert_enqueued(manual, worker=worker_path(EmailWorker)) is job
    assert assert_enqueued(manual, queue="mailers") is job
    assert assert_enqueued(manual, args={"opts": {"lang": "en"}}) is job
    assert assert_enqueued(manual, meta={"trace": {"id": 7}}) is job
    assert assert_enqueued(manual, priority=4) is job
    assert assert_enqueued(manual, tags=["vip"]) is job
    refute_enqueued(manual, worker=EmailWorker, priority=5)
    refute_enqueued(manual, args={"opts": {"lang": "fr"}})
    refute_enqueued(manual, tags=["vip", "urgent"])


def test_args_compare_after_json_round_trip(manual: stagehand.Stagehand) -> None:
    EchoWorker.new({"ids": (1, 2)}).insert(manual)

    assert_enqueued(manual, args={"ids": (1, 2)})
    assert_enqueued(manual, args={"ids": [1, 2]})
    refute_enqueued(manual, args={"ids": [2, 1]})


def test_state_filter_defaults_to_enqueued(manual: stagehand.Stagehand) -> None:
    available = EchoWorker.new({"n": 1}).insert(manual)
    scheduled = EchoWorker.new({"n": 2}, schedule_in=60).insert(manual)
    cancelled = EchoWorker.new({"n": 3}).insert(manual)
    manual.cancel_job(cancelled.id)  # type: ignore[arg-type]

    assert all_enqueued(manual) == [available, scheduled]
    assert all_enqueued(manual, state="cancelled") == [cancelled]
    assert all_enqueued(manual, state=list(JobState)) == [
        available,
        scheduled,
        cancelled,
    ]
    refute_enqueued(manual, args={"n": 3})


def test_all_enqueued_filters_in_insert_order(manual: stagehand.Stagehand) -> None:
    first = EmailWorker.new({"to": "a"}).insert(manual)
    echo = EchoWorker.new({"to": "a"}).insert(manual)
    second = EmailWorker.new({"to": "b"}).insert(manual)

    assert all_enqueued(manual, worker=EmailWorker) == [first, second]
    assert all_enqueued(manual, worker=EmailWorker, args={"to": "b"}) == [second]
    assert all_enqueued(manual, queue="default") == [echo]
    assert all_enqueued(manual, queue="default", args={"to": "b"}) == []


def test_assert_message_with_no_jobs(manual: stagehand.Stagehand) -> None:
    with pytest.raises(AssertionError) as raised:
        assert_enqueued(manual, worker=EmailWorker)

    assert str(raised.value) == (
        f"expected an enqueued job matching worker={worker_path(EmailWorker)!r}, "
        f"state in ['available', 'scheduled']; instance {manual.name!r} recorded "
        "no jobs"
    )


def test_assert_message_lists_closest_jobs(manual: stagehand.Stagehand) -> None:
    other_queue = EchoWorker.new({"to": "a@example.com"}).insert(manual)
    same_queue = EchoWorker.new({}, queue="mailers").insert(manual)
    same_worker = EmailWorker.new({"to": "b@example.com"}).insert(manual)
    path = worker_path(EmailWorker)
    echo = worker_path(EchoWorker)

    with pytest.raises(AssertionError) as raised:
        assert_enqueued(
            manual, worker=EmailWorker, queue="mailers", args={"to": "a@example.com"}
        )

    assert str(raised.value) == (
        f"expected an enqueued job matching worker={path!r}, queue='mailers', "
        "args containing "
        "{\"to\": \"a@example.com\"}, state in ['available', 'scheduled']; "
        f"none of 3 jobs recorded by instance {manual.name!r} matches. "
        "Closest first:\n"
        f"  id={same_worker.id} worker={path!r} queue='mailers' "
        'args={"to": "b@example.com"} meta={} priority=0 tags=[\'email\'] '
        "state='available'\n"
        f"  id={same_queue.id} worker={echo!r} queue='mailers' args={{}} meta={{}} "
        "priority=0 tags=[] state='available'\n"
        f"  id={other_queue.id} worker={echo!r} queue='default' "
        'args={"to": "a@example.com"} meta={} priority=0 tags=[] '
        "state='available'"
    )


def test_refute_message_lists_matches(manual: stagehand.Stagehand) -> None:
    job = EmailWorker.new({"to": "a@example.com"}).insert(manual)
    EchoWorker.new({}).insert(manual)

    with pytest.raises(AssertionError) as raised:
        refute_enqueued(manual, queue="mailers")

    assert str(raised.value) == (
        "expected no enqueued job matching queue='mailers', state in "
        "['available', 'scheduled']; 1 of 2 jobs recorded by instance "
        f"{manual.name!r} matches:\n  {format_job(job)}"
    )


def test_message_lists_at_most_ten_jobs(manual: stagehand.Stagehand) -> None:
    jobs = [EchoWorker.new({"n": n}).insert(manual) for n in range(12)]

    with pytest.raises(AssertionError) as raised:
        refute_enqueued(manual, worker=EchoWorker)

    lines = str(raised.value).splitlines()
    assert lines[0].endswith(
        f"12 of 12 jobs recorded by instance {manual.name!r} match:"
    )
    assert lines[1:11] == [f"  {format_job(job)}" for job in jobs[:10]]
    assert lines[11] == "  ... and 2 more"
    assert len(lines) == 12


def test_message_for_one_job_is_singular(manual: stagehand.Stagehand) -> None:
    EchoWorker.new({}).insert(manual)

    message = failure_message(
        JobFilter.build(queue="mailers"), recorded_jobs(manual), manual
    )

    assert f"none of 1 job recorded by instance {manual.name!r} matches" in message


def test_helpers_use_default_instance(default_manual: stagehand.Stagehand) -> None:
    job = EchoWorker.new({"n": 1}).insert()

    assert assert_enqueued(worker=EchoWorker) is job
    assert all_enqueued() == [job]
    assert recorded_jobs() == [job]
    refute_enqueued(worker=EmailWorker)
    assert drain_queue("default") == {
        "completed": 1,
        "retryable": 0,
        "scheduled": 0,
        "discarded": 0,
        "cancelled": 0,
    }
    assert reset() == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda: assert_enqueued(worker=EchoWorker),
        lambda: refute_enqueued(),
        lambda: all_enqueued(),
        lambda: recorded_jobs(),
        lambda: drain_queue("default"),
        lambda: reset(),
        lambda: wait_for_job("some-id"),
    ],
)
def test_helpers_without_default_instance(call: Any) -> None:
    assert stagehand.default_instance() is None
    with pytest.raises(NotRunning, match="no default Stagehand instance is running"):
        call()


def test_helpers_reject_non_instance() -> None:
    with pytest.raises(TypeError, match=r"instance must be a stagehand\.Stagehand"):
        all_enqueued("default")  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, "1", float("inf"), float("nan"), True])
def test_timeout_rejects_invalid_values(
    manual: stagehand.Stagehand, timeout: Any
) -> None:
    with pytest.raises(InvalidOption, match="timeout must be"):
        assert_enqueued(manual, timeout=timeout)
    with pytest.raises(InvalidOption, match="timeout must be"):
        refute_enqueued(manual, timeout=timeout)


def test_assert_waits_for_other_thread(manual: stagehand.Stagehand) -> None:
    go = threading.Event()

    def insert_later() -> None:
        go.wait(HANG_GUARD)
        EmailWorker.new({"to": "late@example.com"}).insert(manual)

    thread = threading.Thread(target=insert_later)
    thread.start()
    go.set()
    job = assert_enqueued(manual, worker=EmailWorker, timeout=HANG_GUARD)
    thread.join(HANG_GUARD)

    assert job.args == {"to": "late@example.com"}


def test_assert_timeout_message(manual: stagehand.Stagehand) -> None:
    with pytest.raises(AssertionError) as raised:
        assert_enqueued(manual, queue="mailers", timeout=0.1)

    assert str(raised.value) == (
        "expected an enqueued job matching queue='mailers', state in "
        f"['available', 'scheduled'] within 0.1 s; instance {manual.name!r} "
        "recorded no jobs"
    )


def test_refute_fails_when_job_appears(manual: stagehand.Stagehand) -> None:
    go = threading.Event()

    def insert_later() -> None:
        go.wait(HANG_GUARD)
        EmailWorker.new({"to": "late@example.com"}).insert(manual)

    thread = threading.Thread(target=insert_later)
    thread.start()
    go.set()
    with pytest.raises(AssertionError, match=r"within 30 s; 1 of 1 job recorded"):
        refute_enqueued(manual, worker=EmailWorker, timeout=HANG_GUARD)
    thread.join(HANG_GUARD)


def test_refute_passes_when_nothing_appears(manual: stagehand.Stagehand) -> None:
    EchoWorker.new({}).insert(manual)

    refute_enqueued(manual, worker=EmailWorker, timeout=0.1)


def test_instances_record_separately(
    manual: stagehand.Stagehand, inline: stagehand.Stagehand
) -> None:
    with _new_instance("manual") as other:
        job = EchoWorker.new({}).insert(manual)

        assert all_enqueued(other) == []
        assert all_enqueued(manual) == [job]
        refute_enqueued(other, worker=EchoWorker)


# Instances that run their own jobs


def test_disabled_instance_matches_live_jobs(
    live: stagehand.Stagehand, clock: FakeClock
) -> None:
    scheduled = EchoWorker.new({"n": 1}, schedule_in=60).insert(live)
    finished = EchoWorker.new({"n": 2}).insert(live)
    wait_for_job(finished)

    assert all_enqueued(live) == [scheduled]
    assert all_enqueued(live, state="completed") == [finished]
    assert_enqueued(live, args={"n": 1}, state="scheduled")
    refute_enqueued(live, args={"n": 2})


def test_disabled_instance_message(live: stagehand.Stagehand) -> None:
    job = EchoWorker.new({}).insert(live)
    wait_for_job(job)

    with pytest.raises(AssertionError) as raised:
        assert_enqueued(live, worker=EchoWorker)

    assert str(raised.value) == (
        f"expected an enqueued job matching worker={worker_path(EchoWorker)!r}, "
        "state in ['available', 'scheduled']; none of 1 live or retained "
        f"job of instance {live.name!r} matches. Closest first:\n"
        f"  {format_job(job)}"
    )


def test_inline_instance_matches_snoozed_jobs(inline: stagehand.Stagehand) -> None:
    snoozed = OutcomeWorker.new({"outcome": "snooze"}).insert(inline)
    OutcomeWorker.new({"outcome": "complete"}).insert(inline)

    assert all_enqueued(inline) == [snoozed]


# perform_job and build_job


def test_perform_job_returns_value() -> None:
    assert perform_job(EchoWorker, {"value": {"ids": (1, 2)}}) == {"ids": [1, 2]}
    assert stagehand.default_instance() is None


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        ("error", Error("bad input")),
        ("snooze", Snooze(60)),
        ("cancel", Cancel("not needed")),
        ("complete", "done on attempt 1"),
    ],
)
def test_perform_job_returns_outcome_unchanged(outcome: str, expected: Any) -> None:
    assert perform_job(OutcomeWorker, {"outcome": outcome}) == expected


def test_perform_job_propagates_exception() -> None:
    with pytest.raises(RuntimeError, match="attempt 1 failed"):
        perform_job(OutcomeWorker, {"outcome": "raise"})


def test_perform_job_takes_dotted_path_and_attempt() -> None:
    path = worker_path(OutcomeWorker)

    assert perform_job(path, {"outcome": "complete"}, attempt=3) == "done on attempt 3"


@pytest.mark.parametrize("attempt", [0, -1, True, 1.0, 21])
def test_perform_job_rejects_invalid_attempt(attempt: Any) -> None:
    with pytest.raises(InvalidOption, match=r"attempt must be an int from 1 .* \(20\)"):
        perform_job(OutcomeWorker, {"outcome": "complete"}, attempt=attempt)


def test_perform_job_later_attempt_with_max_attempts() -> None:
    value = perform_job(
        OutcomeWorker, {"outcome": "complete"}, attempt=25, max_attempts=25
    )

    assert value == "done on attempt 25"


def test_perform_job_validates_like_new() -> None:
    with pytest.raises(InvalidOption, match="unknown job options \\['retries'\\]"):
        perform_job(EchoWorker, {}, retries=3)
    with pytest.raises(InvalidOption, match="args must be JSON-serialisable"):
        perform_job(EchoWorker, {"at": object()})
    with pytest.raises(UnknownWorker):
        perform_job("no_such_module.Worker", {})
    with pytest.raises(UnknownWorker):
        perform_job(dict, {})  # type: ignore[arg-type]


def test_build_job_fields() -> None:
    job = build_job(FlakyWorker, {"n": 1}, attempt=2, meta={"m": 1}, priority=3)

    assert job.worker == worker_path(FlakyWorker)
    assert job.args == {"n": 1}
    assert job.meta == {"m": 1}
    assert job.priority == 3
    assert job.max_attempts == 3
    assert job.attempt == 2
    assert job.state is JobState.EXECUTING
    assert job.id is not None
    assert job.attempted_at is not None
    assert job.scheduled_at == job.inserted_at == job.attempted_at
    assert FlakyWorker().backoff(job) == 60.0


def test_build_job_keeps_scheduled_at() -> None:
    when = datetime(2030, 5, 1, tzinfo=UTC)

    assert build_job(EchoWorker, {}, scheduled_at=when).scheduled_at == when


# drain_queue


def test_drain_runs_by_priority_then_insert_order(manual: stagehand.Stagehand) -> None:
    for label, priority in [("a", 5), ("b", 0), ("c", 5), ("d", 0), ("e", 9)]:
        EchoWorker.new({"label": label}, priority=priority).insert(manual)

    assert drain_queue("default", manual)["completed"] == 5
    assert _labels() == ["b", "d", "a", "c", "e"]
    assert recorded_jobs(manual) == []


def test_drain_counts_outcomes(manual: stagehand.Stagehand) -> None:
    jobs = {
        outcome: OutcomeWorker.new(
            {"outcome": outcome}, max_attempts=max_attempts
        ).insert(manual)
        for outcome, max_attempts in [
            ("complete", 20),
            ("raise", 20),
            ("error", 1),
            ("snooze", 20),
            ("cancel", 20),
        ]
    }

    counts = drain_queue("default", manual)

    assert counts == {
        "completed": 1,
        "retryable": 1,
        "scheduled": 1,
        "discarded": 1,
        "cancelled": 1,
    }
    assert jobs["complete"].result == "done on attempt 1"
    assert jobs["raise"].state is JobState.RETRYABLE
    assert jobs["error"].state is JobState.DISCARDED
    assert jobs["snooze"].state is JobState.SCHEDULED
    assert jobs["cancel"].state is JobState.CANCELLED
    assert recorded_jobs(manual) == [jobs["raise"], jobs["snooze"]]


def test_drain_empty_queue_counts_zero(manual: stagehand.Stagehand) -> None:
    assert drain_queue("mailers", manual) == dict.fromkeys(testing.DRAIN_OUTCOMES, 0)


def test_drain_leaves_other_queues(manual: stagehand.Stagehand) -> None:
    email = EmailWorker.new({"to": "a"}).insert(manual)
    EchoWorker.new({}).insert(manual)

    assert drain_queue("default", manual)["completed"] == 1
    assert recorded_jobs(manual) == [email]
    assert email.state is JobState.AVAILABLE


def test_drain_runs_retry_once_due(manual: stagehand.Stagehand) -> None:
    job = FlakyWorker.new({}).insert(manual)

    assert drain_queue("default", manual)["retryable"] == 1
    assert job.scheduled_at == START + timedelta(seconds=30)
    assert drain_queue("default", manual)["retryable"] == 0
    assert job.attempt == 1

    manual.clock.advance(30)  # type: ignore[attr-defined]

    assert drain_queue("default", manual)["completed"] == 1
    assert job.attempt == 2
    assert job.result == "ok"
    assert recorded_jobs(manual) == []


def test_drain_scheduled_jobs(manual: stagehand.Stagehand) -> None:
    later = EchoWorker.new({"label": "later"}, schedule_in=3600).insert(manual)

    assert drain_queue("default", manual)["completed"] == 0
    assert later.state == "scheduled"
    assert drain_queue("default", manual, with_scheduled=True)["completed"] == 1
    assert later.state == "completed"


def test_drain_snoozed_job_with_scheduled(manual: stagehand.Stagehand) -> None:
    job = SnoozeOnceWorker.new({}).insert(manual)

    assert drain_queue("default", manual, with_scheduled=True)["scheduled"] == 1
    assert_enqueued(manual, worker=SnoozeOnceWorker, state="scheduled")
    assert drain_queue("default", manual, with_scheduled=True)["completed"] == 1
    assert job.result == "woke up"
    assert job.attempt == 2


def test_drain_without_recursion_leaves_inserted(manual: stagehand.Stagehand) -> None:
    ParentWorker.new({}).insert(manual)

    assert drain_queue("default", manual)["completed"] == 1
    child = assert_enqueued(manual, worker=ChildWorker)
    assert child.state is JobState.AVAILABLE


def test_drain_with_recursion_runs_inserted(manual: stagehand.Stagehand) -> None:
    parent = ParentWorker.new({}).insert(manual)

    assert drain_queue("default", manual, with_recursion=True)["completed"] == 2
    assert _labels() == ["child"]
    assert recorded_jobs(manual) == []
    assert manual.jobs(worker=ChildWorker)[0].args == {"parent": parent.id}


def test_recursion_does_not_rerun_retries(manual: stagehand.Stagehand) -> None:
    job = OutcomeWorker.new({"outcome": "raise"}).insert(manual)

    counts = drain_queue("default", manual, with_scheduled=True, with_recursion=True)

    assert counts["retryable"] == 1
    assert job.attempt == 1


def test_drain_skips_cancelled_jobs(manual: stagehand.Stagehand) -> None:
    job = EchoWorker.new({}).insert(manual)
    manual.cancel_job(job.id)  # type: ignore[arg-type]

    assert drain_queue("default", manual) == dict.fromkeys(testing.DRAIN_OUTCOMES, 0)
    assert _labels() == []


def test_drain_emits_job_events(manual: stagehand.Stagehand) -> None:
    seen: list[tuple[str, str]] = []
    events.attach(
        "test-drain-events",
        ["job.stop"],
        lambda e, m, md: seen.append((md["job"].id, md["state"])),
    )
    try:
        job = EchoWorker.new({}).insert(manual)
        drain_queue("default", manual)
    finally:
        events.detach("test-drain-events")

    assert seen == [(job.id, JobState.COMPLETED)]


def test_drain_rejects_disabled_instance(live: stagehand.Stagehand) -> None:
    with pytest.raises(InvalidOption, match="runs its jobs in worker threads"):
        drain_queue("default", live)


def test_drain_rejects_unknown_queue(manual: stagehand.Stagehand) -> None:
    with pytest.raises(QueueNotConfigured, match="queue 'reports' is not configured"):
        drain_queue("reports", manual)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {"with_scheduled": "no"},
            "drain_queue() with_scheduled must be True or False; got 'no'. "
            "Pass with_scheduled=True or leave it out.",
        ),
        (
            {"with_recursion": 1},
            "drain_queue() with_recursion must be True or False; got 1. "
            "Pass with_recursion=True or leave it out.",
        ),
    ],
    ids=["with_scheduled", "with_recursion"],
)
def test_drain_rejects_non_bool_flags(
    manual: stagehand.Stagehand, flags: dict[str, Any], message: str
) -> None:
    # "no" is true, so before the check it ran the job that is due later.
    later = EchoWorker.new({"label": "later"}, schedule_in=3600).insert(manual)

    with pytest.raises(InvalidOption) as raised:
        drain_queue("default", manual, **flags)

    assert str(raised.value) == message
    assert later.state == "scheduled"
    assert later.attempt == 0
    assert _labels() == []


def test_drain_inline_instance_runs_nothing(inline: stagehand.Stagehand) -> None:
    OutcomeWorker.new({"outcome": "snooze"}).insert(inline)

    assert drain_queue("default", inline, with_scheduled=True)["completed"] == 0


# reset


def test_reset_clears_recorded_jobs(manual: stagehand.Stagehand) -> None:
    job = EchoWorker.new({}).insert(manual)
    EmailWorker.new({}).insert(manual)

    assert reset(manual) == 2
    assert recorded_jobs(manual) == []
    assert manual.get_job(job.id) is None  # type: ignore[arg-type]
    assert manual.check_queue("default")["available"] == 0


def test_reset_forgets_unique_jobs(manual: stagehand.Stagehand) -> None:
    UniqueWorker.new({"n": 1}).insert(manual)
    assert UniqueWorker.new({"n": 1}).insert(manual).conflict is True

    reset(manual)

    assert UniqueWorker.new({"n": 1}).insert(manual).conflict is False


def test_reset_clears_inline_jobs(inline: stagehand.Stagehand) -> None:
    snoozed = OutcomeWorker.new({"outcome": "snooze"}).insert(inline)
    done = OutcomeWorker.new({"outcome": "complete"}).insert(inline)

    assert reset(inline) == 0
    assert inline.get_job(snoozed.id) is None  # type: ignore[arg-type]
    assert inline.get_job(done.id) is None  # type: ignore[arg-type]
    assert inline.jobs() == []


def test_reset_rejects_disabled_instance(live: stagehand.Stagehand) -> None:
    with pytest.raises(InvalidOption, match="build a new instance instead"):
        reset(live)


# Threads


def test_helpers_from_many_threads(manual: stagehand.Stagehand) -> None:
    inserters, per_thread = 8, 50
    start = threading.Barrier(inserters + 4)
    errors: list[BaseException] = []
    counts: list[dict[str, int]] = []

    def insert(thread: int) -> None:
        start.wait(HANG_GUARD)
        for n in range(per_thread):
            EchoWorker.new({"label": (thread, n)}).insert(manual)

    def drain() -> None:
        start.wait(HANG_GUARD)
        for _ in range(20):
            counts.append(drain_queue("default", manual))

    def check() -> None:
        start.wait(HANG_GUARD)
        for _ in range(20):
            for job in all_enqueued(manual, worker=EchoWorker):
                assert job.queue == "default"
            refute_enqueued(manual, worker=EmailWorker)

    def guarded(target: Any, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=guarded, args=(insert, n)) for n in range(inserters)
    ]
    threads += [threading.Thread(target=guarded, args=(drain,)) for _ in range(2)]
    threads += [threading.Thread(target=guarded, args=(check,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD)
    counts.append(drain_queue("default", manual))

    assert errors == []
    assert sum(count["completed"] for count in counts) == inserters * per_thread
    with RUN_LOCK:
        ids = [job_id for job_id, _ in RUNS]
    assert len(ids) == len(set(ids)) == inserters * per_thread
    assert recorded_jobs(manual) == []


# FakeClock with an instance that runs its jobs


def test_clock_makes_scheduled_job_due(
    live: stagehand.Stagehand, clock: FakeClock
) -> None:
    job = EchoWorker.new({"value": 1}, schedule_in=60).insert(live)
    clock.advance(59)

    assert job.state == "scheduled"

    clock.advance(1)

    assert wait_for_job(job) is job
    assert job.state == "completed"
    assert job.attempted_at == START + timedelta(seconds=60)


def test_clock_makes_retry_due(live: stagehand.Stagehand, clock: FakeClock) -> None:
    job = FlakyWorker.new({}).insert(live)

    wait_for_job(job, "retryable")
    assert job.scheduled_at == START + timedelta(seconds=30)
    assert len(job.errors) == 1

    clock.set(job.scheduled_at)

    wait_for_job(job)
    assert job.state is JobState.COMPLETED
    assert job.attempt == 2
    assert job.attempted_at == START + timedelta(seconds=30)


def test_clock_makes_snooze_due(live: stagehand.Stagehand, clock: FakeClock) -> None:
    job = SnoozeOnceWorker.new({}).insert(live)

    wait_for_job(job, "scheduled")
    assert job.max_attempts == 21
    assert job.scheduled_at == START + timedelta(seconds=300)

    clock.advance(300)

    wait_for_job(job)
    assert job.result == "woke up"


class _HoldRetryLog(logging.Filter):
    """Blocks the worker thread while it logs a retry, after the scheduler
    holds the job."""

    def __init__(self) -> None:
        super().__init__()
        self.logged = threading.Event()
        self.release = threading.Event()

    def filter(self, record: logging.LogRecord) -> bool:
        if "retrying in" in record.getMessage():
            self.logged.set()
            self.release.wait(HANG_GUARD)
            # Dropped: once released, it could reach a handler after the test.
            return False
        return True


def test_wait_for_retry_returns_once_held(
    live: stagehand.Stagehand, clock: FakeClock
) -> None:
    logger = logging.getLogger("stagehand._execute")
    hold = _HoldRetryLog()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addFilter(hold)
    try:
        job = FlakyWorker.new({}).insert(live)
        assert hold.logged.wait(HANG_GUARD)
        # The job turns retryable under the scheduler's lock, together with
        # its due time, so it is already held while its thread still logs.
        assert job.state is JobState.RETRYABLE
        assert live._scheduler.waiting == 1  # type: ignore[union-attr]
        assert wait_for_job(job, "retryable") is job
    finally:
        hold.release.set()
        logger.removeFilter(hold)
        logger.setLevel(level)

    clock.advance(30)

    assert wait_for_job(job).state is JobState.COMPLETED


def test_wait_for_job_timeout_message(live: stagehand.Stagehand) -> None:
    job = EchoWorker.new({}, schedule_in=60).insert(live)

    with pytest.raises(TimeoutError) as raised:
        wait_for_job(job, timeout=0.1)

    assert str(raised.value) == (
        f"job {job.id} ({worker_path(EchoWorker)}) did not reach state "
        "['completed', 'discarded', 'cancelled'] within 0.1 s; it is 'scheduled' "
        "and due at 2026-01-01T00:01:00+00:00, but its instance's FakeClock "
        "reads 2026-01-01T00:00:00+00:00; advance the clock to the due time first"
    )


def test_wait_for_finished_job_returns_at_once(inline: stagehand.Stagehand) -> None:
    job = OutcomeWorker.new({"outcome": "cancel"}).insert(inline)

    assert job.id is not None
    assert wait_for_job(job) is job
    assert wait_for_job(job.id, "cancelled", instance=inline) is job


def test_wait_for_job_by_id_on_default(default_manual: stagehand.Stagehand) -> None:
    job = EchoWorker.new({}).insert()
    drain_queue("default")

    assert wait_for_job(job.id) is job  # type: ignore[arg-type]


def test_wait_for_conflict_copy_waits_on_original(manual: stagehand.Stagehand) -> None:
    original = UniqueWorker.new({}).insert(manual)
    copy = UniqueWorker.new({}).insert(manual)
    drain_queue("default", manual)

    assert copy.conflict is True
    assert wait_for_job(copy) is original


def test_wait_for_job_detaches_handler(inline: stagehand.Stagehand) -> None:
    job = OutcomeWorker.new({"outcome": "complete"}).insert(inline)
    before = events.handlers()

    wait_for_job(job)
    with pytest.raises(TimeoutError):
        wait_for_job(job, "retryable", timeout=0.01)

    assert events.handlers() == before


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"state": "available"}, InvalidOption, "a state that an attempt ends in"),
        ({"state": "executing"}, InvalidOption, "a state that an attempt ends in"),
        ({"state": "done"}, InvalidOption, "state must be one of"),
        ({"timeout": 0}, InvalidOption, "timeout must be a number of seconds > 0"),
        ({"timeout": -1}, InvalidOption, "timeout must be a finite number"),
    ],
)
def test_wait_for_job_rejects_invalid_arguments(
    inline: stagehand.Stagehand,
    kwargs: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    job = OutcomeWorker.new({"outcome": "complete"}).insert(inline)

    with pytest.raises(error, match=message):
        wait_for_job(job, **kwargs)


def test_wait_for_job_rejects_unknown_jobs(manual: stagehand.Stagehand) -> None:
    with pytest.raises(JobNotFound, match="has no live or retained job 'missing'"):
        wait_for_job("missing", instance=manual)
    with pytest.raises(InvalidOption, match="was never inserted"):
        wait_for_job(EchoWorker.new({}))
    with pytest.raises(TypeError, match=r"job must be an inserted stagehand\.Job"):
        wait_for_job(42)  # type: ignore[arg-type]


def test_fake_clock_is_reexported() -> None:
    assert testing.FakeClock is stagehand.FakeClock

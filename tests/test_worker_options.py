"""Worker attributes and Worker.new options: validation at the call."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

import stagehand
from stagehand import InvalidOption, Job, UnknownWorker, Worker
from stagehand._worker import default_backoff
from workers import EchoWorker


def test_new_builds_unsaved_job() -> None:
    job = EchoWorker.new({"value": 1})

    assert isinstance(job, Job)
    assert job.id is None
    assert job.worker == "workers.EchoWorker"
    assert job.queue == "default"
    assert job.priority == 0
    assert job.max_attempts == 20
    assert job.args == {"value": 1}
    assert job.state == "available"


def test_new_matches_job_constructor() -> None:
    # Worker.new builds its Job without __init__, for speed. Every slot must
    # hold what Job(...) would put there, so a slot added to one and not the
    # other fails here.
    built = EchoWorker.new({"value": 1})
    expected = Job(
        worker="workers.EchoWorker",
        args={"value": 1},
        unique=None,
        _worker_class=EchoWorker,
    )

    for name in Job.__slots__:
        assert getattr(built, name) == getattr(expected, name), name


def test_new_applies_every_option() -> None:
    job = EchoWorker.new(
        {"value": 1},
        queue="mailers",
        max_attempts=5,
        priority=3,
        tags=["billing", "eu"],
        meta={"source": "test"},
        schedule_in=(2, "minutes"),
        unique={"period": 30},
    )

    assert job.queue == "mailers"
    assert job.max_attempts == 5
    assert job.priority == 3
    assert job.tags == ("billing", "eu")
    assert job.meta == {"source": "test"}
    assert job.schedule_in == 120.0
    assert job.unique == {
        "period": 30.0,
        "fields": ["worker", "queue", "args"],
        "keys": None,
        "states": ["available", "scheduled", "executing", "retryable"],
    }


def test_args_are_copied_through_json() -> None:
    args = {"ids": (1, 2), "nested": {"a": [1]}}
    job = EchoWorker.new(args)
    args["nested"]["a"].append(2)

    assert job.args == {"ids": [1, 2], "nested": {"a": [1]}}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"priority": 10}, "priority must be an int from 0 (runs first) to 9; got 10"),
        ({"priority": -1}, "got -1"),
        ({"priority": True}, "got True"),
        ({"priority": "1"}, "got '1'"),
        ({"max_attempts": 0}, "max_attempts must be an int from 1 to 2**62; got 0"),
        ({"max_attempts": 1.5}, "got 1.5"),
        ({"schedule_in": -1}, "schedule_in must be from 0 to 100 years; got -1"),
        ({"schedule_in": math.nan}, "from 0 to 100 years"),
        (
            {"schedule_in": (5, "weeks")},
            "unit must be one of seconds, minutes, hours, days; got 'weeks'",
        ),
        ({"schedule_in": (5,)}, "(amount, unit)"),
        ({"schedule_in": "5"}, "got '5'"),
        ({"scheduled_at": datetime(2030, 1, 1)}, "naive"),
        ({"scheduled_at": "2030-01-01"}, "aware datetime"),
        ({"queue": ""}, "queue must be a non-empty string"),
        ({"queue": 5}, "got 5"),
        ({"tags": "billing"}, 'Write a list, such as tags=["billing"]'),
        (
            {"unique": {"keys": "account"}},
            'Write a list, such as unique={"keys": ["account"]}',
        ),
        ({"tags": ["ok", 3]}, "got 3"),
        ({"meta": [1]}, "meta must be a dict with string keys; got list"),
        ({"unique": "yes"}, "unique must be None, False, True or a dict; got 'yes'"),
        (
            {"unique": {"period": 0}},
            "unique period must be a finite number of seconds > 0",
        ),
        ({"unique": {"perido": 5}}, "unknown unique keys ['perido']"),
        ({"unique": {"fields": ["args", "color"]}}, "got 'color'"),
        ({"unique": {"states": ["finished"]}}, "got 'finished'"),
        ({"unique": {"fields": []}}, "must not be empty"),
        ({"queu": "x"}, "unknown job options ['queu']"),
        ({"tags": {"billing": 1}}, "tags must be a list or tuple of strings"),
        ({"unique": {"keys": []}}, "unique keys must name at least one key"),
    ],
)
def test_new_rejects_bad_option(options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidOption) as raised:
        EchoWorker.new({}, **options)

    assert message in str(raised.value)


def test_new_rejects_both_schedule_options() -> None:
    with pytest.raises(InvalidOption, match="schedule_in or scheduled_at, not both"):
        EchoWorker.new({}, schedule_in=5, scheduled_at=datetime.now(UTC))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([1, 2], "args must be a dict with string keys; got list"),
        ({1: "a"}, "string keys at every level; got the key 1 (int)"),
        ({"a": {2: "b"}}, "got the key 2 (int)"),
        ({"a": [{3: "c"}]}, "got the key 3 (int)"),
        ({"a": math.nan}, "JSON-serialisable"),
        ({"a": {1, 2}}, "JSON-serialisable"),
        ({"a": object()}, "JSON-serialisable"),
    ],
)
def test_new_rejects_bad_args(args: object, message: str) -> None:
    with pytest.raises(InvalidOption) as raised:
        EchoWorker.new(args)  # type: ignore[arg-type]

    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (2.5, 2.5),
        ((3, "seconds"), 3.0),
        ((2, "minutes"), 120.0),
        ((1, "hours"), 3600.0),
        ((2, "days"), 172800.0),
        (timedelta(minutes=1), 60.0),
    ],
)
def test_schedule_in_units(value: object, seconds: float) -> None:
    assert EchoWorker.new({}, schedule_in=value).schedule_in == seconds


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        (
            {"priority": 12},
            "BadWorker.priority must be an int from 0 (runs first) to 9; got 12",
        ),
        ({"max_attempts": 0}, "BadWorker.max_attempts must be an int from 1 to 2**62; got 0"),
        ({"queue": ""}, "BadWorker.queue must be a non-empty string"),
        ({"tags": "x"}, "BadWorker.tags must be a list or tuple of strings"),
        ({"unique": {"period": -5}}, "unique period"),
    ],
)
def test_worker_class_attributes_checked(
    attributes: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidOption) as raised:
        type("BadWorker", (Worker,), attributes)

    assert message in str(raised.value)


def test_worker_base_class_new_rejected() -> None:
    with pytest.raises(TypeError, match="needs a subclass"):
        Worker.new({})


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "workers.NoSuchWorker",
            "does not name a stagehand.Worker subclass in module 'workers'",
        ),
        ("workers.RUN_LOCK", "does not name a stagehand.Worker subclass"),
        ("no_such_module.Worker", "no module named 'no_such_module'"),
        ("", "a worker must be a Worker subclass or its dotted path"),
        (42, "got 42"),
        (dict, "is not a subclass of stagehand.Worker"),
        (Worker, "is not a subclass of stagehand.Worker"),
    ],
)
def test_resolve_worker_rejects(path: object, message: str) -> None:
    with pytest.raises(UnknownWorker) as raised:
        stagehand.resolve_worker(path)

    assert message in str(raised.value)


def test_resolve_worker_finds_path() -> None:
    assert stagehand.resolve_worker("workers.EchoWorker") is EchoWorker
    assert stagehand.resolve_worker(EchoWorker) is EchoWorker


@pytest.mark.parametrize("attempt", [1, 2, 5, 10, 17, 100, 10_000])
def test_default_backoff_bounds(attempt: int) -> None:
    expected = min(15 + 2 ** min(attempt, 17), 86_400)
    delay = default_backoff(attempt)

    assert expected * 0.9 <= delay <= min(expected * 1.1, 86_400)
    assert math.isfinite(delay)


def test_async_perform_rejected() -> None:
    with pytest.raises(TypeError, match="AsyncWorker.perform is a coroutine function"):

        class AsyncWorker(Worker):
            async def perform(self, job: Job) -> None:
                return None


def test_missing_perform_rejected_at_new() -> None:
    class Abstract(Worker):
        queue = "mailers"

    with pytest.raises(TypeError, match="Abstract does not implement perform"):
        Abstract.new({})


def test_insert_rejects_non_instance() -> None:
    with pytest.raises(
        TypeError, match="instance must be a stagehand.Stagehand; got 'default'"
    ):
        EchoWorker.new({}).insert("default")  # type: ignore[arg-type]

"""Jobs handed from one instance to another keep their identity and history.

Cluster mode will carry these JSON objects between peers; here two
instances in one process stand in for two peers.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

import stagehand
from stagehand import FakeClock, InvalidOption, JobState, QueueNotConfigured
from stagehand._wire import job_from_wire, job_to_wire
from stagehand.exceptions import ShuttingDown, UnknownWorker
from tests.support import running, watching
from tests.workers import EchoWorker, RecordingWorker


def over_the_wire(job: stagehand.Job) -> dict[str, Any]:
    """Return the job's JSON object as the receiving peer decodes it."""
    decoded: dict[str, Any] = json.loads(json.dumps(job_to_wire(job)))
    return decoded


def drained_job(**options: Any) -> dict[str, Any]:
    """Insert a job into a paused instance, drain it, and return its JSON."""
    with running(queues={"default": 1}) as source:
        source.pause_queue("default")
        job = EchoWorker.new({"value": 7}, meta={"m": 1}, tags=["t"], **options).insert(
            source
        )
        [drained] = source.drain_queue("default")
        assert drained is job
        return over_the_wire(job)


def test_adopted_job_keeps_id_and_runs() -> None:
    data = drained_job(priority=2, max_attempts=5)

    with running(queues={"default": 1}) as target, watching() as watcher:
        job = job_from_wire(data)
        target._adopt(job)
        watcher.wait_final(job)

    assert job.id == data["id"]
    assert job.state is JobState.COMPLETED
    assert job.result == 7
    assert job.attempt == 1
    assert job.priority == 2
    assert job.max_attempts == 5
    assert job.meta == {"m": 1}
    assert job.tags == ("t",)
    assert job.inserted_at is not None
    assert job.inserted_at.isoformat() == data["inserted_at"]
    assert target.get_job(data["id"]) is job


def test_retryable_job_waits_for_its_time() -> None:
    clock = FakeClock()
    data = drained_job()
    retry_at = clock.now() + timedelta(seconds=30)
    data.update(
        state="retryable",
        attempt=1,
        scheduled_at=retry_at.isoformat(),
        errors=[{"attempt": 1, "at": clock.now().isoformat(), "error": "boom"}],
    )

    with running(queues={"default": 1}, clock=clock) as target, watching() as watcher:
        job = job_from_wire(data)
        target._adopt(job)
        assert job.state is JobState.RETRYABLE
        assert target.check_queue("default")["retryable"] == 1

        clock.advance(30)
        watcher.wait_final(job)

    assert job.state is JobState.COMPLETED
    assert job.attempt == 2
    assert job.errors == data["errors"]
    assert job.scheduled_at == retry_at


def test_retryable_job_keeps_attempted_at() -> None:
    clock = FakeClock()
    data = drained_job()
    attempted = clock.now() - timedelta(seconds=5)
    data.update(
        state="retryable",
        attempt=1,
        scheduled_at=(clock.now() + timedelta(seconds=30)).isoformat(),
        attempted_at=attempted.isoformat(),
        errors=[{"attempt": 1, "at": clock.now().isoformat(), "error": "boom"}],
    )

    with running(queues={"default": 1}, clock=clock) as target:
        job = job_from_wire(data)
        target._adopt(job)
        found = target.get_job(data["id"])

    assert found is job
    assert job.attempted_at == attempted
    assert over_the_wire(job)["attempted_at"] == attempted.isoformat()


def test_overdue_scheduled_job_runs_at_once() -> None:
    clock = FakeClock()
    data = drained_job()
    data.update(state="scheduled", scheduled_at=clock.now().isoformat())

    with running(queues={"default": 1}, clock=clock) as target, watching() as watcher:
        job = job_from_wire(data)
        target._adopt(job)
        watcher.wait_final(job)

    assert job.state is JobState.COMPLETED


def test_second_copy_is_rejected() -> None:
    data = drained_job()

    with running(queues={"default": 1}) as target, watching() as watcher:
        target.pause_queue("default")
        first = job_from_wire(data)
        target._adopt(first)
        with pytest.raises(InvalidOption, match="on this peer already"):
            target._adopt(job_from_wire(data))
        target.resume_queue("default")
        watcher.wait_final(first)
        # Also after it finished: retention still has it.
        with pytest.raises(InvalidOption, match="on this peer already"):
            target._adopt(job_from_wire(data))

    assert [job_id for job_id, _ in watcher.stopped] == [data["id"]]


def test_unknown_queue_is_rejected() -> None:
    data = drained_job()
    data["queue"] = "mailers"

    with running(queues={"default": 1}) as target:
        with pytest.raises(QueueNotConfigured, match="'mailers' is not configured"):
            target._adopt(job_from_wire(data))
        assert target.get_job(data["id"]) is None


def test_stopped_instance_rejects() -> None:
    data = drained_job()
    with running(queues={"default": 1}) as target:
        pass
    with pytest.raises(ShuttingDown):
        target._adopt(job_from_wire(data))


def test_adopted_unique_job_blocks_duplicates() -> None:
    data = drained_job(unique={"period": 300})

    with running(queues={"default": 1}) as target:
        target.pause_queue("default")
        job = job_from_wire(data)
        target._adopt(job)
        duplicate = EchoWorker.new({"value": 7}, unique={"period": 300}).insert(target)

    assert duplicate.conflict is True
    assert duplicate.id == job.id


def test_wire_object_has_fixed_fields() -> None:
    data = drained_job()
    assert sorted(data) == sorted(
        [
            "id",
            "worker",
            "queue",
            "args",
            "meta",
            "tags",
            "priority",
            "max_attempts",
            "attempt",
            "state",
            "inserted_at",
            "scheduled_at",
            "errors",
            "unique",
        ]
    )
    assert data["worker"] == "tests.workers.EchoWorker"
    assert data["state"] == "available"
    assert data["args"] == {"value": 7}


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"worker": "os.path.join"}, UnknownWorker, "os.path.join"),
        ({"worker": "no_such_module.Worker"}, UnknownWorker, "no_such_module"),
        ({"state": "executing"}, InvalidOption, "only available, scheduled"),
        ({"state": "completed"}, InvalidOption, "only available, scheduled"),
        ({"state": "lost"}, InvalidOption, "unknown state 'lost'"),
        ({"attempt": 21}, InvalidOption, "from 0 to max_attempts"),
        ({"attempt": True}, InvalidOption, "attempt must be an int"),
        ({"id": ""}, InvalidOption, "printable, non-empty"),
        ({"id": 5}, InvalidOption, "printable, non-empty"),
        ({"inserted_at": "yesterday"}, InvalidOption, "not an ISO 8601 time"),
        ({"inserted_at": "2026-01-01T00:00:00"}, InvalidOption, "aware datetime"),
        ({"scheduled_at": None}, InvalidOption, "must be an ISO 8601 string"),
        ({"attempted_at": 5}, InvalidOption, "attempted_at must be an ISO"),
        ({"errors": {}}, InvalidOption, "errors must be a list"),
        ({"errors": [{"attempt": 1}]}, InvalidOption, "each error must be"),
        (
            {"errors": [{"attempt": "1", "at": "x", "error": "y"}]},
            InvalidOption,
            "an int attempt",
        ),
        ({"args": {"value": float("nan")}}, InvalidOption, "JSON-serialisable"),
        ({"priority": 99}, InvalidOption, "priority"),
        ({"unique": {"period": -1}}, InvalidOption, "unique period"),
        ({"extra": 1}, InvalidOption, "unknown \\['extra'\\]"),
    ],
)
def test_invalid_wire_job_raises(
    change: dict[str, Any], error: type[Exception], message: str
) -> None:
    data = drained_job()
    data.update(change)
    with pytest.raises(error, match=message):
        job_from_wire(data)


def test_missing_field_and_non_object_raise() -> None:
    data = drained_job()
    del data["errors"]
    with pytest.raises(InvalidOption, match="missing \\['errors'\\]"):
        job_from_wire(data)
    with pytest.raises(InvalidOption, match="must be a JSON object; got \\[1\\]"):
        job_from_wire([1])


def test_recording_worker_gets_args() -> None:
    with running(queues={"default": 1}) as source:
        source.pause_queue("default")
        job = RecordingWorker.new({"to": "a@example.com"}).insert(source)
        source.drain_queue("default")
        data = over_the_wire(job)

    with running(queues={"default": 1}) as target, watching() as watcher:
        adopted = job_from_wire(data)
        target._adopt(adopted)
        watcher.wait_final(adopted)

    assert adopted.state is JobState.COMPLETED
    assert adopted.args == {"to": "a@example.com"}

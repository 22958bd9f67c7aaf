"""The four times of a job on the system clock.

On the system clock the engine stores each time as nanoseconds since the
epoch and `Job` turns it into an aware UTC datetime when read, so the
fields read the same as on any other clock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from support import running, watching
from workers import EchoWorker

from stagehand import FakeClock, InvalidOption, Job, JobState
from stagehand._worker import worker_path

MICROSECOND = timedelta(microseconds=1)


def test_times_are_aware_utc_datetimes() -> None:
    before = datetime.now(UTC)
    with running(queues={"default": 1}) as instance, watching() as watcher:
        job = instance.insert(EchoWorker.new({"value": 1}))
        watcher.wait_state(job, "completed")
    after = datetime.now(UTC)

    times = [job.inserted_at, job.scheduled_at, job.attempted_at, job.completed_at]
    for value in times:
        assert isinstance(value, datetime)
        assert value.utcoffset() == timedelta(0)
    assert before - MICROSECOND <= job.inserted_at  # type: ignore[operator]
    assert job.scheduled_at == job.inserted_at
    assert job.inserted_at <= job.attempted_at  # type: ignore[operator]
    assert job.attempted_at <= job.completed_at  # type: ignore[operator]
    assert job.completed_at <= after + MICROSECOND  # type: ignore[operator]


def test_schedule_in_adds_to_inserted_at() -> None:
    with running(queues={"default": 1}) as instance:
        job = instance.insert(EchoWorker.new({"value": 1}, schedule_in=90))
        gap = job.scheduled_at - job.inserted_at  # type: ignore[operator]
        assert job.state is JobState.SCHEDULED
        assert abs(gap - timedelta(seconds=90)) <= MICROSECOND


def test_explicit_scheduled_at_is_kept() -> None:
    due = datetime.now(UTC) + timedelta(hours=2)
    with running(queues={"default": 1}) as instance:
        job = instance.insert(EchoWorker.new({"value": 1}, scheduled_at=due))
        assert job.scheduled_at == due
        assert job.state is JobState.SCHEDULED


def test_to_dict_and_snapshot_read_datetimes() -> None:
    with running(queues={"default": 1}) as instance, watching() as watcher:
        job = instance.insert(EchoWorker.new({"value": 1}))
        watcher.wait_state(job, "completed")
    record = job.to_dict()
    snapshot = job.snapshot()

    assert record["inserted_at"] == job.inserted_at.isoformat()  # type: ignore[union-attr]
    assert record["completed_at"].endswith("+00:00")
    assert snapshot.attempted_at == job.attempted_at
    assert snapshot.completed_at == job.completed_at


def test_assigned_time_reads_back_as_given() -> None:
    with running(queues={"default": 1}) as instance, watching() as watcher:
        job = instance.insert(EchoWorker.new({"value": 1}))
        watcher.wait_state(job, "completed")
    moment = datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    job.completed_at = moment
    assert job.completed_at is moment
    job.completed_at = None
    assert job.completed_at is None


def test_fake_clock_times_are_exact() -> None:
    clock = FakeClock()
    with running(queues={"default": 1}, clock=clock) as instance:
        job = instance.insert(EchoWorker.new({"value": 1}, schedule_in=30))
        assert job.inserted_at == datetime(2026, 1, 1, tzinfo=UTC)
        assert job.scheduled_at == datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)


def test_scheduled_at_in_other_zone_reads_utc() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    due = datetime.now(tokyo) + timedelta(hours=2)
    with running(queues={"default": 1}) as instance:
        job = instance.insert(EchoWorker.new({"value": 1}, scheduled_at=due))
        assert job.scheduled_at == due
        assert job.scheduled_at.utcoffset() == timedelta(0)  # type: ignore[union-attr]
        assert job.to_dict()["scheduled_at"].endswith("+00:00")


def test_hand_built_job_scheduled_at_reads_utc() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    due = datetime.now(tokyo) + timedelta(hours=2)
    job = Job(worker_path(EchoWorker), {"value": 1}, scheduled_at=due)
    with running(queues={"default": 1}) as instance:
        instance.insert(job)
        assert job.scheduled_at == due
        assert job.scheduled_at.utcoffset() == timedelta(0)  # type: ignore[union-attr]


def test_naive_scheduled_at_names_fix() -> None:
    with pytest.raises(InvalidOption) as raised:
        EchoWorker.new({"value": 1}, scheduled_at=datetime(2030, 1, 1))
    assert "naive" in str(raised.value)
    assert "datetime.now(timezone.utc)" in str(raised.value)


def test_scheduled_at_out_of_range_in_utc() -> None:
    edge = datetime(1, 1, 1, tzinfo=ZoneInfo("Asia/Tokyo"))
    with pytest.raises(InvalidOption, match="outside the years 1 to 9999 in UTC"):
        EchoWorker.new({"value": 1}, scheduled_at=edge)

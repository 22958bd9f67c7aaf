"""A fourth review of the Django integration: each test guards a fixed bug.

The Django test project in tests/django_project provides the settings.
conftest.py sets Django up only for a run that includes the test_django_*
modules, so this module also sets it up when it runs alone.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import django
from django.conf import settings

if not settings.configured:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
    django.setup()

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, transaction
from django.test import SimpleTestCase, override_settings
from django_project.support import job_stops

import stagehand
from stagehand import Job, Worker, _job, events, testing
from stagehand_django import db, lifecycle, transactions
from stagehand_django.control import Survey
from stagehand_django.management.commands import stagehand_status
from stagehand_django.test import StagehandTestMixin


class Echo(Worker):
    """Returns its args; touches no database."""

    def perform(self, job: Job) -> Any:
        return job.args


class _Case(StagehandTestMixin, SimpleTestCase):
    """A test case used only for its assertion methods."""

    __test__ = False  # pytest skips it, because it has no test of its own

    def runTest(self) -> None:  # pragma: no cover - never run
        pass


@pytest.fixture(autouse=True)
def _transaction_hook() -> Iterator[None]:
    # conftest.py enables the app's hook only for the test_django_* modules.
    saved = _job.on_commit_hook
    transactions.install()
    yield
    _job.on_commit_hook = saved


@pytest.fixture
def manual() -> Iterator[stagehand.Stagehand]:
    with override_settings(STAGEHAND={"testing": "manual"}):
        instance = lifecycle.start()
        try:
            yield instance
        finally:
            lifecycle.stop()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("second_on_commit", [True, False])
def test_deferred_job_inserted_twice(
    manual: stagehand.Stagehand, second_on_commit: bool
) -> None:
    with transaction.atomic():
        job = Echo.new({"n": 1})
        job.insert(on_commit=True)
        with pytest.raises(stagehand.InvalidOption, match="already inserted"):
            job.insert(on_commit=second_on_commit)
    assert len(testing.recorded_jobs(manual)) == 1


@pytest.mark.django_db(transaction=True)
def test_job_dropped_by_savepoint_can_wait_again(
    manual: stagehand.Stagehand,
) -> None:
    # The savepoint's rollback drops the deferred insert, so the same job
    # may wait for the outer commit instead, and is inserted once.
    job = Echo.new({"n": 1})
    with transaction.atomic():
        try:
            with transaction.atomic():
                job.insert(on_commit=True)
                raise DatabaseError("roll back the savepoint")
        except DatabaseError:
            pass
        job.insert(on_commit=True)
        waiting = job.id
    assert waiting is None
    assert testing.recorded_jobs(manual) == [job]


@pytest.mark.django_db(transaction=True)
def test_deferred_unique_conflict_reported(
    manual: stagehand.Stagehand,
) -> None:
    first = Echo.new({"n": 1}, unique=True).insert()
    with transaction.atomic():
        deferred = Echo.new({"n": 1}, unique=True).insert(on_commit=True)
    assert len(testing.recorded_jobs(manual)) == 1
    assert deferred.conflict is True
    assert deferred.id == first.id


def test_capture_enqueued_keeps_drained_jobs(
    manual: stagehand.Stagehand,
) -> None:
    case = _Case()
    with case.captureEnqueued() as captured:
        job = Echo.new({"n": 1}).insert()
        assert testing.drain_queue("default")["completed"] == 1
    assert captured == [job]


@pytest.mark.parametrize("count", ["1", True, 1.0, -1])
def test_enqueued_count_rejects_non_int(
    manual: stagehand.Stagehand, count: Any
) -> None:
    Echo.new({"n": 1}).insert()
    case = _Case()
    with pytest.raises((TypeError, ValueError), match="count"):
        case.assertEnqueuedCount(count)


def _one_process(directory: str) -> Survey:
    report = {
        "pid": 1,
        "host": "web1",
        "command": "manage.py stagehand_worker",
        "running": True,
        "leader": True,
        "peers": [],
        "queues": [],
    }
    return Survey(directory=directory, reports=[report])


@pytest.mark.parametrize("seconds", ["inf", "1e300"])
def test_status_watch_rejects_huge_interval(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, seconds: str
) -> None:
    calls: list[str] = []

    def fake_query_all(directory: str) -> Survey:
        calls.append(directory)
        if len(calls) > 1:
            raise KeyboardInterrupt  # ends the --watch loop if the command waits the interval
        return _one_process(directory)

    monkeypatch.setattr(stagehand_status, "query_all", fake_query_all)
    with pytest.raises(CommandError, match="--watch"):
        call_command(
            "stagehand_status", "--watch", seconds, "--runtime-dir", str(tmp_path)
        )


def test_failed_close_keeps_connection_keeper(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    failures = [DatabaseError("server closed the connection unexpectedly")]
    calls: list[str] = []

    def flaky_close() -> None:
        calls.append(threading.current_thread().name)
        if failures:
            raise failures.pop()

    monkeypatch.setattr(db, "close_old_connections", flaky_close)
    queues = {"queues": {"default": 1}, "testing": "disabled"}
    try:
        with override_settings(STAGEHAND=queues, STAGEHAND_RUNTIME_DIR=str(tmp_path)):
            instance = lifecycle.start()
            try:
                with job_stops() as stops:
                    Echo.new({"n": 1}).insert(instance, on_commit=False)
                    Echo.new({"n": 2}).insert(instance, on_commit=False)
                    stops.wait(2)
            finally:
                lifecycle.stop()
        assert db.HANDLER_ID in events.handlers()
        # close_old_connections() runs before and after each of the 2 jobs.
        assert len(calls) == 4
    finally:
        db.keeper.attach()  # put the handler back for the other tests


@pytest.mark.parametrize("flag", ["--norel", "--noreloa"])
def test_runserver_noreload_prefix_starts_eagerly(flag: str) -> None:
    with override_settings(STAGEHAND={"testing": "disabled"}, STAGEHAND_AUTOSTART=None):
        assert lifecycle.decide(["manage.py", "runserver", flag]) == lifecycle.EAGER

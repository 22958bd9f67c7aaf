"""job.insert(on_commit=...) on a real SQLite database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import transaction
from django.test import override_settings
from django_project.shop.models import Note
from django_project.shop.workers import FileWorker, NoteWorker
from django_project.support import job_stops

import stagehand
from stagehand import _job
from stagehand_django import lifecycle

pytestmark = pytest.mark.django_db(transaction=True)


class Rollback(Exception):
    pass


@pytest.fixture
def manual() -> Iterator[stagehand.Stagehand]:
    with override_settings(STAGEHAND={"testing": "manual"}):
        instance = lifecycle.start()
        yield instance
        lifecycle.stop()


def recorded(instance: stagehand.Stagehand) -> list[str]:
    return [job.args["text"] for job in instance.jobs(worker=NoteWorker)]


def test_insert_waits_for_commit(manual: stagehand.Stagehand) -> None:
    with transaction.atomic():
        job = NoteWorker.new({"text": "a"}).insert(on_commit=True)
        assert job.id is None
        assert recorded(manual) == []
    assert recorded(manual) == ["a"]
    assert job.id is not None
    assert manual.get_job(job.id) is job


def test_rollback_drops_the_job(manual: stagehand.Stagehand) -> None:
    with pytest.raises(Rollback), transaction.atomic():
        job = NoteWorker.new({"text": "a"}).insert(on_commit=True)
        raise Rollback
    assert recorded(manual) == []
    assert job.id is None


def test_savepoint_rollback_drops_only_its_jobs(manual: stagehand.Stagehand) -> None:
    with transaction.atomic():
        NoteWorker.new({"text": "outer"}).insert(on_commit=True)
        with pytest.raises(Rollback), transaction.atomic():
            NoteWorker.new({"text": "inner"}).insert(on_commit=True)
            raise Rollback
    assert recorded(manual) == ["outer"]


def test_outside_a_transaction_inserts_at_once(manual: stagehand.Stagehand) -> None:
    job = NoteWorker.new({"text": "a"}).insert(on_commit=True)
    assert job.id is not None
    assert recorded(manual) == ["a"]


def test_plain_insert_is_immediate_by_default(manual: stagehand.Stagehand) -> None:
    with transaction.atomic():
        NoteWorker.new({"text": "a"}).insert()
        assert recorded(manual) == ["a"]


@override_settings(STAGEHAND_INSERT_ON_COMMIT=True)
def test_setting_makes_on_commit_the_default(manual: stagehand.Stagehand) -> None:
    with transaction.atomic():
        NoteWorker.new({"text": "deferred"}).insert()
        NoteWorker.new({"text": "now"}).insert(on_commit=False)
        assert recorded(manual) == ["now"]
    assert recorded(manual) == ["now", "deferred"]


def test_bad_queue_fails_at_the_call(manual: stagehand.Stagehand) -> None:
    with transaction.atomic():
        with pytest.raises(stagehand.QueueNotConfigured, match="'nowhere'"):
            NoteWorker.new({"text": "a"}, queue="nowhere").insert(on_commit=True)
    assert manual.jobs() == []


def test_unknown_worker_fails_at_the_call(manual: stagehand.Stagehand) -> None:
    job = stagehand.Job(worker="django_project.shop.workers.Missing", args={})
    with transaction.atomic():
        with pytest.raises(stagehand.UnknownWorker, match="Missing"):
            job.insert(on_commit=True)
    assert manual.jobs() == []


def test_no_instance_fails_at_the_call() -> None:
    with transaction.atomic(), pytest.raises(stagehand.NotRunning):
        NoteWorker.new({"text": "a"}).insert(on_commit=True)


def test_on_commit_must_be_a_bool(manual: stagehand.Stagehand) -> None:
    with pytest.raises(
        TypeError, match="on_commit must be True, False or None; got 'yes'"
    ):
        NoteWorker.new({"text": "a"}).insert(on_commit="yes")  # type: ignore[arg-type]
    assert manual.jobs() == []


def test_without_the_hook_on_commit_true_is_an_error(
    manual: stagehand.Stagehand, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_job, "on_commit_hook", None)
    with pytest.raises(stagehand.StagehandError, match="INSTALLED_APPS"):
        NoteWorker.new({"text": "a"}).insert(on_commit=True)
    assert manual.jobs() == []


def test_committed_job_runs_in_a_worker_thread_and_sees_the_commit(
    tmp_path: Path,
) -> None:
    settings = {"queues": {"default": 2}, "testing": "disabled"}
    with override_settings(STAGEHAND=settings, STAGEHAND_RUNTIME_DIR=str(tmp_path)):
        lifecycle.start()
        try:
            with job_stops() as stops:
                with transaction.atomic():
                    Note.objects.create(text="first")
                    job = NoteWorker.new({"text": "second"}).insert(on_commit=True)
                (stopped,) = stops.wait(1)
        finally:
            lifecycle.stop()
    assert stopped is job
    assert (job.state, job.result) == (stagehand.JobState.COMPLETED, 2)
    assert sorted(Note.objects.values_list("text", flat=True)) == ["first", "second"]


def test_failing_deferred_insert_is_logged(
    manual: stagehand.Stagehand, caplog: pytest.LogCaptureFixture
) -> None:
    with transaction.atomic():
        job = FileWorker.new({"path": "unused"}).insert(on_commit=True)
        manual.stop()
    assert job.id is None
    assert "was not inserted after its transaction committed" in caplog.text

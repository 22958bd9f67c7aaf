"""StagehandTestCase, StagehandTestMixin and the stagehand_jobs fixture."""

from __future__ import annotations

import unittest
from collections.abc import Iterator

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import (
    LiveServerTestCase,
    SimpleTestCase,
    TransactionTestCase,
    override_settings,
)
from django_project.shop.workers import FileWorker, NoteWorker

import stagehand
from stagehand_django import lifecycle

# stagehand.testing is built alongside this module; skip until it lands.
pytest.importorskip("stagehand.testing")

from stagehand import testing
from stagehand_django.test import (
    StagehandTestCase,
    StagehandTestMixin,
    default_test_instance,
)


@pytest.fixture(autouse=True, scope="module")
def manual_instance() -> Iterator[None]:
    with override_settings(
        STAGEHAND={"testing": "manual", "queues": {"default": 1, "mailers": 1}}
    ):
        lifecycle.start()
        yield
        lifecycle.stop()


class CaseTests(StagehandTestCase):
    def test_assert_enqueued_returns_the_job(self) -> None:
        inserted = NoteWorker.new({"text": "a", "n": 1}).insert()
        found = self.assertEnqueued(worker=NoteWorker, args={"text": "a"})
        self.assertIs(found, inserted)

    def test_recorded_jobs_are_reset_per_test_first(self) -> None:
        NoteWorker.new({"text": "left over"}).insert()
        self.assertEnqueuedCount(1)

    def test_recorded_jobs_are_reset_per_test_second(self) -> None:
        NoteWorker.new({"text": "left over"}).insert()
        self.assertEnqueuedCount(1)

    def test_assert_enqueued_failure_lists_jobs(self) -> None:
        NoteWorker.new({"text": "a"}).insert()
        with self.assertRaises(AssertionError) as caught:
            self.assertEnqueued(worker=NoteWorker, args={"text": "b"})
        self.assertIn('"text": "a"', str(caught.exception))

    def test_assert_not_enqueued(self) -> None:
        NoteWorker.new({"text": "a"}).insert()
        self.assertNotEnqueued(worker=FileWorker)
        with self.assertRaises(AssertionError):
            self.assertNotEnqueued(worker=NoteWorker)

    def test_assert_enqueued_count(self) -> None:
        NoteWorker.new({"text": "a"}).insert()
        NoteWorker.new({"text": "b"}, queue="mailers").insert()
        self.assertEqual(len(self.assertEnqueuedCount(2, worker=NoteWorker)), 2)
        self.assertEnqueuedCount(1, queue="mailers")
        with self.assertRaises(AssertionError) as caught:
            self.assertEnqueuedCount(3, worker=NoteWorker)
        self.assertIn("expected 3 enqueued job(s)", str(caught.exception))
        self.assertIn("found 2", str(caught.exception))

    def test_capture_enqueued(self) -> None:
        NoteWorker.new({"text": "before"}).insert()
        with self.captureEnqueued() as jobs:
            NoteWorker.new({"text": "inside"}).insert()
        NoteWorker.new({"text": "after"}).insert()
        self.assertEqual([job.args["text"] for job in jobs], ["inside"])


class MixinTests(StagehandTestMixin, SimpleTestCase):
    def test_mixin_works_on_simple_test_case(self) -> None:
        FileWorker.new({"path": "x"}).insert()
        self.assertEnqueued(worker="django_project.shop.workers.FileWorker")


def _run_case(base: type[TransactionTestCase]) -> unittest.TestResult:
    # The class is built here, not at module level, so pytest does not collect
    # it. The tests use no database, so TransactionTestCase flushes none.
    class Case(StagehandTestMixin, base):  # type: ignore[valid-type,misc]
        databases: frozenset[str] = frozenset()
        host = "127.0.0.1"

        def test_first(self) -> None:
            NoteWorker.new({"text": "first"}).insert()
            self.assertEnqueuedCount(1, worker=NoteWorker)

        def test_second(self) -> None:
            NoteWorker.new({"text": "second"}).insert()
            self.assertEnqueuedCount(1, worker=NoteWorker)

    # A job left over from before the case must not reach its first test.
    NoteWorker.new({"text": "left over from before the case"}).insert()
    result = unittest.TestResult()
    unittest.defaultTestLoader.loadTestsFromTestCase(Case).run(result)
    return result


@pytest.mark.parametrize("base", [TransactionTestCase, LiveServerTestCase])
def test_mixin_on_transaction_test_cases(base: type[TransactionTestCase]) -> None:
    # Django 5.2 made _pre_setup a classmethod, which setUpClass calls.
    result = _run_case(base)

    assert [text for _, text in result.errors] == []
    assert [text for _, text in result.failures] == []
    assert result.testsRun == 2


def test_pytest_fixture_resets(stagehand_jobs: stagehand.Stagehand) -> None:
    assert stagehand_jobs is stagehand.default_instance()
    NoteWorker.new({"text": "a"}).insert()
    assert [job.args["text"] for job in stagehand_jobs.jobs()] == ["a"]


def test_pytest_fixture_from_plugin(request: pytest.FixtureRequest) -> None:
    # The pytest plugin that Stagehand installs provides the fixture: this
    # module neither imports it nor loads stagehand_django.test as a plugin.
    NoteWorker.new({"text": "left over"}).insert()

    instance = request.getfixturevalue("stagehand_jobs")

    assert instance is stagehand.default_instance()
    assert testing.recorded_jobs(instance) == []


def test_without_a_testing_instance_the_error_says_what_to_set() -> None:
    lifecycle.stop()
    try:
        with pytest.raises(ImproperlyConfigured, match=r"STAGEHAND\['testing'\]"):
            default_test_instance()
    finally:
        with override_settings(
            STAGEHAND={"testing": "manual", "queues": {"default": 1, "mailers": 1}}
        ):
            lifecycle.start()


OVERRIDE_ERROR = (
    "Stagehand test assertions need the default instance in a testing mode, "
    "and {found}. Set STAGEHAND['testing'] = 'manual' in the settings module "
    "loaded at startup, for example with manage.py test "
    "--settings=mysite.test_settings. override_settings cannot change it, "
    "because the app builds the default instance once, at startup."
)


def test_override_settings_error_message() -> None:
    lifecycle.stop()
    try:
        with (
            override_settings(STAGEHAND={"testing": "manual"}),
            pytest.raises(ImproperlyConfigured) as raised,
        ):
            default_test_instance()
        assert str(raised.value) == OVERRIDE_ERROR.format(found="none runs")
    finally:
        with override_settings(
            STAGEHAND={"testing": "manual", "queues": {"default": 1, "mailers": 1}}
        ):
            lifecycle.start()


def test_disabled_instance_error_message() -> None:
    lifecycle.stop()
    disabled = stagehand.Stagehand(queues={"default": 1}).start()
    try:
        with pytest.raises(ImproperlyConfigured) as raised:
            default_test_instance()
        assert str(raised.value) == OVERRIDE_ERROR.format(
            found="it has testing='disabled'"
        )
    finally:
        disabled.stop()
        with override_settings(
            STAGEHAND={"testing": "manual", "queues": {"default": 1, "mailers": 1}}
        ):
            lifecycle.start()

"""Test cases and a pytest fixture for projects that insert Stagehand jobs.

Set ``STAGEHAND = {"testing": "manual"}`` in the settings module loaded at
startup, such as ``manage.py test --settings=mysite.test_settings``. The app
builds the default instance once, at startup, so ``override_settings``
cannot change its mode. Inserts are then validated and recorded, not run.
`StagehandTestCase` (a Django `TestCase`) and `StagehandTestMixin` (for any
Django test case) forget the recorded jobs before each test and add
assertions built on `stagehand.testing`::

    class CheckoutTests(StagehandTestCase):
        def test_confirmation_is_sent(self):
            self.client.post("/order/")
            self.assertEnqueued(worker=ConfirmationWorker, queue="mailers")

With pytest-django, request the `stagehand_jobs` fixture, which the pytest
plugin that Stagehand installs provides (see `stagehand.pytest_plugin`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.test import TestCase

import stagehand
from stagehand import Job, testing
from stagehand._instance import insert_mark

__all__ = ["StagehandTestCase", "StagehandTestMixin", "default_test_instance"]


def default_test_instance() -> stagehand.Stagehand:
    """Return the default instance, which must run in a testing mode.

    Raises:
        ImproperlyConfigured: No default instance runs, or it runs jobs in
            worker threads.
    """
    instance = stagehand.default_instance()
    if instance is None or instance.testing == "disabled":
        found = "none runs" if instance is None else "it has testing='disabled'"
        raise ImproperlyConfigured(
            "Stagehand test assertions need the default instance in a testing "
            f"mode, and {found}. Set STAGEHAND['testing'] = 'manual' in the "
            "settings module loaded at startup, for example with manage.py test "
            "--settings=mysite.test_settings. override_settings cannot change "
            "it, because the app builds the default instance once, at startup."
        )
    return instance


class StagehandTestMixin:
    """Assertions about enqueued jobs, for any Django test case.

    Filters are those of `stagehand.testing.assert_enqueued`: worker (class
    or dotted path), queue, args and meta (subsets), priority, tags, state.
    """

    failureException: type[BaseException]

    @classmethod
    def _pre_setup(cls) -> None:
        # Django calls _pre_setup before setUp, so a setUp that does not call
        # super() still starts from no recorded jobs. Since Django 5.2 it is a
        # classmethod, which TransactionTestCase.setUpClass also calls on the
        # class, in place of the call before the first test.
        super()._pre_setup()  # type: ignore[misc]
        testing.reset(default_test_instance())

    def assertEnqueued(self, **filters: Any) -> Job:
        """Assert that a matching job is enqueued, and return it."""
        try:
            return testing.assert_enqueued(default_test_instance(), **filters)
        except AssertionError as error:
            raise self.failureException(str(error)) from None

    def assertNotEnqueued(self, **filters: Any) -> None:
        """Assert that no matching job is enqueued."""
        try:
            testing.refute_enqueued(default_test_instance(), **filters)
        except AssertionError as error:
            raise self.failureException(str(error)) from None

    def assertEnqueuedCount(self, count: int, **filters: Any) -> list[Job]:
        """Assert that exactly `count` matching jobs are enqueued; return them.

        Raises:
            TypeError, ValueError: `count` is not an int of 0 or more.
        """
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(
                f"count must be the number of jobs expected, an int; got {count!r}"
            )
        if count < 0:
            raise ValueError(f"count must be 0 or more; got {count}")
        instance = default_test_instance()
        jobs = testing.all_enqueued(instance, **filters)
        if len(jobs) != count:
            listed = "\n".join(f"  {testing.format_job(job)}" for job in jobs)
            described = testing.JobFilter.build(**filters).describe()
            raise self.failureException(
                f"expected {count} enqueued job(s) matching {described}, found "
                f"{len(jobs)}" + (f":\n{listed}" if listed else "")
            )
        return jobs

    @contextmanager
    def captureEnqueued(self) -> Iterator[list[Job]]:
        """Yield a list that receives the jobs enqueued inside the block.

        The list is filled when the block ends, oldest insert first. It
        holds the jobs inserted inside the block, including those that a
        `drain_queue` inside the block ran.
        """
        instance = default_test_instance()
        # Every insert takes a larger sequence number than this one.
        mark = insert_mark()
        captured: list[Job] = []
        yield captured
        found = {
            id(job): job
            for job in (*testing.recorded_jobs(instance), *instance.jobs())
            if job._sequence > mark
        }
        captured.extend(sorted(found.values(), key=lambda job: job._sequence))


class StagehandTestCase(StagehandTestMixin, TestCase):
    """A Django `TestCase` with the assertions of `StagehandTestMixin`."""


# The pytest plugin provides the fixture. It is imported here too, so that a
# conftest.py line ``pytest_plugins = ["stagehand_django.test"]`` still
# works. pytest is optional: the fixture needs it, the classes do not.
with suppress(ImportError):
    from stagehand.pytest_plugin import stagehand_jobs  # noqa: F401

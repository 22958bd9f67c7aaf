"""Test configuration shared by all tests.

Django is configured only when the run includes the Django tests (the
``test_django_*`` modules): pytest-django then sets it up from
tests/django_project/settings.py. The test settings start no Stagehand
instance on their own, and the transaction hook that the app registers is
enabled only while a Django test runs, so the core tests see the core alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Peers

HERE = Path(__file__).resolve().parent


def _runs_django_tests(config: pytest.Config) -> bool:
    paths = [Path(arg.split("::")[0]).resolve() for arg in config.args] or [HERE]
    for path in paths:
        if path == HERE or (
            HERE in path.parents
            and (path.name.startswith("test_django_") or "django_project" in path.parts)
        ):
            return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    if not _runs_django_tests(config):
        return
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
    from django.conf import settings

    # Reading a setting loads the settings module, so that pytest-django's
    # own pytest_configure (which runs last) finds them and sets Django up.
    assert settings.INSTALLED_APPS


def _is_django_test(request: pytest.FixtureRequest) -> bool:
    return request.node.path.name.startswith("test_django_")


@pytest.fixture(autouse=True)
def _stagehand_django_hook(request: pytest.FixtureRequest) -> Iterator[None]:
    from stagehand import _job

    if not _is_django_test(request):
        saved, _job.on_commit_hook = _job.on_commit_hook, None
        yield
        _job.on_commit_hook = saved
        return
    from stagehand_django import transactions

    transactions.install()
    yield


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    """Hand the GIL over every microsecond instead of every 5 ms.

    A thread is then often interrupted part way through taking a job.
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


@pytest.fixture
def clear_counts() -> None:
    """Forget the runs that CountingWorker recorded in earlier tests."""
    from workers import COUNT_LOCK, COUNTS

    with COUNT_LOCK:
        COUNTS.clear()


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    """Collect callables, such as gate releases and stop(), to run after the
    test, last first."""
    calls: list[Any] = []
    yield calls
    for call in reversed(calls):
        call()


@pytest.fixture
def peers() -> Iterator[Peers]:
    """Start cluster peers with `Peers.start`, and stop them after the test."""
    group = Peers()
    yield group
    group.stop_all()

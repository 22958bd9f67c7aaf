"""Pytest fixtures for code that uses Stagehand (registered as ``pytest11``).

Pytest loads this module in every run where Stagehand is installed, so it
imports Stagehand only when a test requests one of its fixtures, and it
defines no autouse fixture. Disable it with ``-p no:stagehand``.

Fixtures:
    stagehand_clock: A `stagehand.FakeClock`, shared by the two below.
    stagehand_instance: A started ``testing="manual"`` instance with a name
        unique to the test, stopped after the test.
    stagehand_default: The same, registered as the default instance (named
        "default"), so `Job.insert()` and the `stagehand.testing` helpers
        find it without being passed an instance.
    stagehand_jobs: For Django projects (pytest-django): the default
        instance that the ``stagehand_django`` app started in a testing
        mode, with its recorded jobs cleared. It imports Django only when a
        test requests it.

The ``stagehand`` marker sets the keyword arguments of `stagehand.Stagehand`
for these fixtures, for example
``@pytest.mark.stagehand(queues={"default": 1, "mailers": 1}, testing="inline")``.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from stagehand import FakeClock, Stagehand

__all__ = [
    "stagehand_clock",
    "stagehand_default",
    "stagehand_instance",
    "stagehand_jobs",
]

MARKER_OPTIONS = frozenset(
    {
        "queues",
        "plugins",
        "testing",
        "shutdown_grace_period",
        "retention_period",
        "retention_limit",
        "unique_limit",
    }
)

_instance_numbers = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    if _outer_config[0] is None:
        _outer_config[0] = config
    config.addinivalue_line(
        "markers",
        "stagehand(**options): keyword arguments of stagehand.Stagehand for the "
        "stagehand_instance and stagehand_default fixtures, such as "
        'queues={"default": 1} or testing="inline" (default testing="manual")',
    )


@pytest.fixture
def stagehand_clock() -> FakeClock:
    """Provide a `stagehand.FakeClock` at 2026-01-01 00:00 UTC.

    Move it with ``advance(seconds)`` or ``set(datetime)``.
    """
    from stagehand import FakeClock

    return FakeClock()


@pytest.fixture
def stagehand_instance(
    request: pytest.FixtureRequest, stagehand_clock: FakeClock
) -> Iterator[Stagehand]:
    """Provide a started Stagehand instance in manual mode, private to the test.

    Its name is unique, so it never clashes with the default instance. It
    uses the `stagehand_clock` fixture as its clock and takes the options of
    the closest ``stagehand`` marker. It is stopped after the test, which
    discards its recorded jobs.
    """
    name = f"pytest-{next(_instance_numbers)}"
    yield from _run_instance(request, stagehand_clock, name)


@pytest.fixture
def stagehand_default(
    request: pytest.FixtureRequest, stagehand_clock: FakeClock
) -> Iterator[Stagehand]:
    """Provide an instance like `stagehand_instance`, registered as the default.

    `Job.insert()`, `stagehand.insert()` and the `stagehand.testing` helpers
    called without an instance use it. The test fails at setup if another
    default instance is already running.
    """
    import stagehand

    running = stagehand.default_instance()
    if running is not None:
        pytest.fail(
            f"stagehand_default needs the name 'default', but {running!r} is "
            "already running; stop it first, or use the stagehand_instance "
            "fixture and pass it to the helpers",
            pytrace=False,
        )
    yield from _run_instance(request, stagehand_clock, "default")


@pytest.fixture
def stagehand_jobs() -> Stagehand:
    """Clear the recorded jobs of the Django app's default instance; return it.

    The ``stagehand_django`` app starts that instance when Django is ready,
    in the testing mode of ``STAGEHAND["testing"]`` ("manual" or "inline")
    in the settings module loaded at startup. The test fails at setup when
    Django is not installed or set up, or the app is not installed.
    """
    _require_django_app()
    from stagehand import testing
    from stagehand_django.test import default_test_instance

    instance = default_test_instance()
    testing.reset(instance)
    return instance


def _require_django_app() -> None:
    try:
        from django.apps import apps
    except ImportError:
        pytest.fail(
            "stagehand_jobs needs Django, which is not installed; without "
            "Django, request stagehand_default instead",
            pytrace=False,
        )
    if not apps.ready:
        pytest.fail(
            "stagehand_jobs needs Django set up, and it is not; install "
            "pytest-django and set DJANGO_SETTINGS_MODULE (or pass --ds)",
            pytrace=False,
        )
    if not apps.is_installed("stagehand_django"):
        pytest.fail(
            "stagehand_jobs needs the stagehand_django app; add "
            '"stagehand_django" to INSTALLED_APPS',
            pytrace=False,
        )


def _run_instance(
    request: pytest.FixtureRequest, clock: FakeClock, name: str
) -> Iterator[Stagehand]:
    from stagehand import Stagehand

    options = _marker_options(request)
    instance = Stagehand(name=name, clock=clock, **options).start()
    try:
        yield instance
    finally:
        instance.stop()


def _marker_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    options: dict[str, Any] = {"testing": "manual"}
    marker = request.node.get_closest_marker("stagehand")
    if marker is None:
        return options
    if marker.args:
        pytest.fail(
            "pytest.mark.stagehand takes keyword arguments only; got the "
            f"positional arguments {marker.args!r}. Write for example "
            'pytest.mark.stagehand(queues={"default": 1}).',
            pytrace=False,
        )
    unknown = sorted(set(marker.kwargs) - MARKER_OPTIONS)
    if unknown:
        pytest.fail(
            f"pytest.mark.stagehand got unknown options {unknown}; valid options "
            f"are {sorted(MARKER_OPTIONS)}. The fixtures set name and clock "
            "themselves.",
            pytrace=False,
        )
    options.update(marker.kwargs)
    return options


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    # Stops the Django app's instance while pytest still captures output:
    # at exit its log lines would go to streams that pytest has closed. Only
    # the outermost session does, since pytester runs inner sessions in the
    # same process.
    if session.config is not _outer_config[0]:
        return
    lifecycle = sys.modules.get("stagehand_django.lifecycle")
    if lifecycle is not None:
        lifecycle.stop()


# The config of the first session in this process.
_outer_config: list[pytest.Config | None] = [None]

"""Tests of the pytest plugin, run in inner pytest sessions, and of the
examples in docs/testing.md, each run as a test module of its own."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOCS = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


@pytest.fixture(autouse=True)
def _without_django(monkeypatch: pytest.MonkeyPatch) -> None:
    # A full run configures Django for the Django tests; the inner sessions
    # here test the plugin alone.
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "no:django", "-p", "no:cacheprovider", *args)


def _doc_examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", DOCS.read_text(), re.M | re.S)


def test_fixtures_are_listed(pytester: pytest.Pytester) -> None:
    result = _run(pytester, "--fixtures")

    result.stdout.fnmatch_lines(
        [
            "*stagehand_clock*",
            "*Provide a `stagehand.FakeClock` at 2026-01-01 00:00 UTC.",
            "*stagehand_instance*",
            "*Provide a started Stagehand instance in manual mode, private to the*",
            "*stagehand_default*",
            "*Provide an instance like `stagehand_instance`, registered as the*",
        ]
    )


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.stagehand(queues={"default": 1})
        def test_marked(stagehand_instance):
            assert stagehand_instance.queues == ["default"]
        """
    )

    markers = _run(pytester, "--markers")

    markers.stdout.fnmatch_lines(["@pytest.mark.stagehand(**options):*"])
    _run(pytester, "--strict-markers").assert_outcomes(passed=1)


def test_instance_fixture_defaults(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import stagehand

        seen = []

        def test_first(stagehand_instance, stagehand_clock):
            assert stagehand_instance.testing == "manual"
            assert stagehand_instance.running
            assert stagehand_instance.name.startswith("pytest-")
            assert stagehand_instance.clock is stagehand_clock
            assert stagehand_instance.queues == ["default"]
            assert stagehand.get_instance(stagehand_instance.name) is stagehand_instance
            assert stagehand.default_instance() is None
            seen.append(stagehand_instance)

        def test_second(stagehand_instance):
            assert stagehand_instance.name != seen[0].name
            assert not seen[0].running
            seen.append(stagehand_instance)

        def test_failing(stagehand_instance):
            seen.append(stagehand_instance)
            assert False, "fails on purpose"

        def test_all_stopped():
            assert len(seen) == 3
            assert [instance.running for instance in seen] == [False, False, False]
        """
    )

    _run(pytester).assert_outcomes(passed=3, failed=1)


def test_default_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import stagehand
        from stagehand import Worker
        from stagehand.testing import assert_enqueued, drain_queue

        class Hello(Worker):
            def perform(self, job):
                return "hi"

        def test_default(stagehand_default, stagehand_clock):
            assert stagehand.default_instance() is stagehand_default
            assert stagehand_default.name == "default"
            assert stagehand_default.testing == "manual"
            assert stagehand_default.clock is stagehand_clock
            job = Hello.new({"n": 1}).insert()
            assert assert_enqueued(worker=Hello) is job
            assert drain_queue("default")["completed"] == 1

        def test_stopped_afterwards():
            assert stagehand.default_instance() is None
        """
    )

    _run(pytester).assert_outcomes(passed=2)


def test_both_fixtures_share_clock(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_both(stagehand_instance, stagehand_default, stagehand_clock):
            assert stagehand_instance is not stagehand_default
            assert stagehand_instance.clock is stagehand_default.clock
            stagehand_clock.advance(60)
            assert stagehand_instance.clock.now().isoformat() == (
                "2026-01-01T00:01:00+00:00"
            )
        """
    )

    _run(pytester).assert_outcomes(passed=1)


def test_recorded_jobs_do_not_leak(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from stagehand import Worker
        from stagehand.testing import all_enqueued

        class Hello(Worker):
            def perform(self, job):
                pass

        def test_first(stagehand_default):
            Hello.new({}).insert()
            assert len(all_enqueued()) == 1

        def test_second(stagehand_default):
            assert all_enqueued() == []
        """
    )

    _run(pytester).assert_outcomes(passed=2)


def test_marker_options(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from stagehand import Worker

        pytestmark = pytest.mark.stagehand(queues={"mailers": 2})

        class Mail(Worker):
            queue = "mailers"

            def perform(self, job):
                return "sent"

        def test_module_marker(stagehand_instance):
            assert stagehand_instance.queues == ["mailers"]
            assert stagehand_instance.testing == "manual"

        @pytest.mark.stagehand(queues={"mailers": 1}, testing="inline")
        def test_function_marker_wins(stagehand_instance):
            job = Mail.new({}).insert(stagehand_instance)
            assert job.state == "completed"
            assert job.result == "sent"

        @pytest.mark.stagehand(queues={"bulk": 1}, retention_period=0)
        class TestClassMarker:
            def test_class_marker(self, stagehand_default):
                assert stagehand_default.queues == ["bulk"]
                assert stagehand_default.settings.retention_period == 0
        """
    )

    _run(pytester).assert_outcomes(passed=3)


def test_marker_rejects_invalid_options(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.stagehand(name="mine", queues={"default": 1})
        def test_unknown(stagehand_instance):
            pass

        @pytest.mark.stagehand({"default": 1})
        def test_positional(stagehand_instance):
            pass

        @pytest.mark.stagehand(testing="sometimes")
        def test_invalid_value(stagehand_instance):
            pass
        """
    )

    result = _run(pytester)

    result.assert_outcomes(errors=3)
    lines = result.stdout.lines
    assert (
        "pytest.mark.stagehand got unknown options ['name']; valid options are "
        "['plugins', 'queues', 'retention_limit', 'retention_period', "
        "'shutdown_grace_period', 'testing', 'unique_limit']. The fixtures set "
        "name and clock themselves."
    ) in lines
    assert (
        "pytest.mark.stagehand takes keyword arguments only; got the positional "
        "arguments ({'default': 1},). Write for example "
        'pytest.mark.stagehand(queues={"default": 1}).'
    ) in lines
    assert (
        "E           stagehand.exceptions.InvalidOption: testing must be one of "
        "'disabled', 'manual', 'inline'; got 'sometimes'"
    ) in lines


def test_default_fixture_conflict(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        import stagehand

        @pytest.fixture
        def own_default():
            with stagehand.Stagehand(testing="manual") as instance:
                yield instance

        def test_conflict(own_default, stagehand_default):
            pass
        """
    )

    result = _run(pytester)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*stagehand_default needs the name 'default', but <Stagehand 'default'"
            " running testing='manual'> is already running; stop it first, or use"
            " the stagehand_instance fixture and pass it to the helpers"
        ]
    )


def test_fixtures_are_not_autouse(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import stagehand

        def test_plain(request):
            assert not [name for name in request.fixturenames if "stagehand" in name]
            assert stagehand.default_instance() is None
        """
    )

    _run(pytester).assert_outcomes(passed=1)


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_needs_fixture(stagehand_instance):
            pass
        """
    )

    result = _run(pytester, "-p", "no:stagehand")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'stagehand_instance' not found*"])


def test_jobs_fixture_without_django(pytester: pytest.Pytester) -> None:
    # A new process, because a full run has set Django up in this one.
    pytester.makepyfile(
        """
        def test_needs_django(stagehand_jobs):
            pass
        """
    )

    result = pytester.runpytest_subprocess("-p", "no:django", "-p", "no:cacheprovider")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*stagehand_jobs needs Django set up, and it is not; install "
            "pytest-django and set DJANGO_SETTINGS_MODULE (or pass --ds)"
        ]
    )


def test_importing_plugin_has_no_side_effects() -> None:
    code = textwrap.dedent(
        """
        import sys, threading
        before = threading.active_count()
        import stagehand.pytest_plugin
        import stagehand
        assert threading.active_count() == before, threading.enumerate()
        assert stagehand.default_instance() is None
        assert "stagehand.testing" not in sys.modules
        assert "django" not in sys.modules
        """
    )

    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_docs_have_examples() -> None:
    assert len(_doc_examples()) >= 8


@pytest.mark.parametrize("index", range(len(_doc_examples())))
def test_doc_example_runs(pytester: pytest.Pytester, index: int) -> None:
    example = _doc_examples()[index]
    pytester.makepyfile(**{f"test_doc_example_{index}": example})

    result = _run(pytester)

    result.assert_outcomes(passed=example.count("\ndef test_"))


def test_django_instance_stops_before_exit(pytester: pytest.Pytester) -> None:
    # The app's instance logs as it stops. Stopped at exit, it would write
    # to the stream that pytest captured and has closed by then.
    pytester.makeconftest(
        """
        import logging
        import sys

        import django
        from django.conf import settings

        settings.configure(
            INSTALLED_APPS=["stagehand_django"], STAGEHAND={"testing": "manual"}
        )
        django.setup()
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
        """
    )
    pytester.makepyfile(
        """
        def test_jobs(stagehand_jobs):
            assert stagehand_jobs.testing == "manual"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:django", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=1)
    assert "Logging error" not in result.stderr.str()

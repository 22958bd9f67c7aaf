"""The Cron plugin, driven by a FakeClock: slots, stalls, DST, leadership."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import stagehand
from stagehand import FakeClock, Stagehand
from stagehand.exceptions import (
    InvalidCronExpression,
    InvalidOption,
    QueueNotConfigured,
    UnknownWorker,
)
from stagehand.plugins import Cron
from support import HANG_GUARD, running
from workers import EchoWorker, RecordingWorker

START = datetime(2026, 3, 1, 11, 59, 30, tzinfo=UTC)
NOON = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
PAUSED = {"default": {"limit": 1, "paused": True}}


@contextmanager
def cron_instance(
    crontab: list[Any], clock: FakeClock, **config: Any
) -> Iterator[tuple[Stagehand, Cron]]:
    """Run an instance with paused queues and one Cron plugin."""
    options = {"crontab": crontab, **config.pop("cron", {})}
    config.setdefault("queues", PAUSED)
    with running(clock=clock, plugins=[(Cron, options)], **config) as instance:
        yield instance, instance._plugins[0]  # type: ignore[misc]


def move_to(clock: FakeClock, plugin: Cron, when: datetime) -> None:
    clock.set(when)
    assert plugin.wait_caught_up(HANG_GUARD), "the cron thread did not catch up"


def slots(instance: Stagehand) -> list[tuple[str, str]]:
    """Return (cron_expr, cron_slot) of every job, oldest insert first."""
    return [(job.meta["cron_expr"], job.meta["cron_slot"]) for job in instance.jobs()]


def labelled(instance: Stagehand) -> list[tuple[str, str]]:
    """Return (args["label"], cron_slot) of every job, oldest insert first."""
    return [(job.args["label"], job.meta["cron_slot"]) for job in instance.jobs()]


def iso(text: str) -> str:
    """Return the cron_slot string of a UTC time given as 'YYYY-MM-DD HH:MM'."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).isoformat()


def cron_threads() -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name.startswith("stagehand-cron-")
    ]


# Scheduling


def test_every_minute_entry_once_per_minute() -> None:
    clock = FakeClock(START)
    with cron_instance([("* * * * *", EchoWorker)], clock) as (instance, plugin):
        for step in range(1, 21):
            move_to(clock, plugin, START + step * timedelta(seconds=30))
            assert len(instance.jobs()) == (step + 1) // 2

        jobs = instance.jobs()
        assert [job.meta["cron_slot"] for job in jobs] == [
            (NOON + minute * MINUTE).isoformat() for minute in range(10)
        ]
        assert plugin.ticks == 10
        first = jobs[0]
        assert first.meta == {
            "cron": True,
            "cron_expr": "* * * * *",
            "cron_entry": first.meta["cron_entry"],
            "cron_slot": "2026-03-01T12:00:00+00:00",
        }
        assert len(first.meta["cron_entry"]) == 16
        assert {job.meta["cron_entry"] for job in jobs} == {first.meta["cron_entry"]}
        assert first.worker == "workers.EchoWorker"
        assert first.args == {}
        assert first.state is stagehand.JobState.AVAILABLE
        assert first.unique == {
            "period": 86400.0,
            "fields": ["worker", "queue", "meta"],
            "keys": ["cron_entry", "cron_slot"],
            "states": [state.value for state in stagehand.JobState],
        }


def test_entry_options_reach_job() -> None:
    clock = FakeClock(START)
    options = {
        "queue": "reports",
        "priority": 3,
        "max_attempts": 2,
        "tags": ["nightly"],
        "meta": {"team": "ops"},
        "args": {"value": 7},
    }
    queues = {**PAUSED, "reports": {"limit": 1, "paused": True}}
    crontab = [("0 * * * *", "workers.EchoWorker", options)]
    with cron_instance(crontab, clock, queues=queues) as (instance, plugin):
        move_to(clock, plugin, NOON)

        [job] = instance.jobs()
        assert job.worker == "workers.EchoWorker"
        assert job.queue == "reports"
        assert job.priority == 3
        assert job.max_attempts == 2
        assert job.tags == ("nightly",)
        assert job.args == {"value": 7}
        assert job.meta["team"] == "ops"
        assert job.meta["cron_slot"] == "2026-03-01T12:00:00+00:00"


def test_entries_in_another_zone() -> None:
    clock = FakeClock(START)
    crontab = [
        ("@hourly", EchoWorker, {"args": {"label": "hourly IST"}}),
        ("@hourly", EchoWorker, {"args": {"label": "hourly UTC"}, "timezone": "UTC"}),
        ("0 18 * * *", EchoWorker, {"args": {"label": "18:00 IST"}}),
    ]
    cron = {"timezone": "Asia/Kolkata"}  # UTC+05:30, no DST
    with cron_instance(crontab, clock, cron=cron) as (instance, plugin):
        for minute in range(106):  # 12:00 to 13:45 UTC
            move_to(clock, plugin, NOON + minute * MINUTE)

        assert labelled(instance) == [
            ("hourly UTC", iso("2026-03-01 12:00")),
            ("hourly IST", iso("2026-03-01 12:30")),
            ("18:00 IST", iso("2026-03-01 12:30")),
            ("hourly UTC", iso("2026-03-01 13:00")),
            ("hourly IST", iso("2026-03-01 13:30")),
        ]


NEW_YORK_DAYS = [
    pytest.param(
        # 02:00 EST becomes 03:00 EDT at 07:00 UTC.
        "2026-03-08 05:00",
        [
            ("@hourly", "2026-03-08 06:00"),  # 01:00 EST
            ("30 1 * * *", "2026-03-08 06:30"),  # 01:30 EST
            ("30 2 * * *", "2026-03-08 07:00"),  # skipped 02:30 runs at 03:00 EDT
            ("@hourly", "2026-03-08 07:00"),  # 03:00 EDT
            ("@hourly", "2026-03-08 08:00"),  # 04:00 EDT
            ("@hourly", "2026-03-08 09:00"),  # 05:00 EDT
        ],
        id="spring-forward",
    ),
    pytest.param(
        # 02:00 EDT becomes 01:00 EST at 06:00 UTC.
        "2026-11-01 04:00",
        [
            ("@hourly", "2026-11-01 05:00"),  # 01:00 EDT
            ("30 1 * * *", "2026-11-01 05:30"),  # 01:30 EDT, and not 01:30 EST
            ("@hourly", "2026-11-01 06:00"),  # 01:00 EST
            ("@hourly", "2026-11-01 07:00"),  # 02:00 EST
            ("30 2 * * *", "2026-11-01 07:30"),  # 02:30 EST
            ("@hourly", "2026-11-01 08:00"),  # 03:00 EST
        ],
        id="fall-back",
    ),
]


@pytest.mark.parametrize(("midnight", "expected"), NEW_YORK_DAYS)
def test_new_york_dst_days(midnight: str, expected: list[tuple[str, str]]) -> None:
    start = datetime.fromisoformat(midnight).replace(tzinfo=UTC) + timedelta(seconds=30)
    clock = FakeClock(start)
    crontab = [
        ("30 1 * * *", EchoWorker),
        ("30 2 * * *", EchoWorker),
        ("@hourly", EchoWorker),
    ]
    cron = {"timezone": "America/New_York"}
    with cron_instance(crontab, clock, cron=cron) as (instance, plugin):
        for minute in range(1, 241):  # four hours, minute by minute
            move_to(clock, plugin, start.replace(second=0) + minute * MINUTE)

        assert slots(instance) == [(expr, iso(slot)) for expr, slot in expected]


def test_no_catch_up_at_start() -> None:
    clock = FakeClock(NOON)
    with cron_instance([("* * * * *", EchoWorker)], clock) as (instance, plugin):
        move_to(clock, plugin, NOON + timedelta(seconds=59))
        assert instance.jobs() == []

        move_to(clock, plugin, NOON + MINUTE)
        assert slots(instance) == [("* * * * *", iso("2026-03-01 12:01"))]


# Stalls


def test_stall_inserts_one_job_per_entry(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(START)
    crontab = [
        ("* * * * *", EchoWorker),
        ("@hourly", EchoWorker),
        ("30 13 * * *", EchoWorker),
        ("0 20 * * *", EchoWorker),
    ]
    with cron_instance(crontab, clock) as (instance, plugin):
        move_to(clock, plugin, NOON)
        assert len(instance.jobs()) == 2

        with caplog.at_level(logging.INFO, logger="stagehand._cron_plugin"):
            move_to(clock, plugin, NOON + timedelta(hours=3, seconds=15))
        assert slots(instance)[2:] == [
            ("* * * * *", iso("2026-03-01 15:00")),
            ("@hourly", iso("2026-03-01 15:00")),
            ("30 13 * * *", iso("2026-03-01 13:30")),
        ]
        held_up = [
            r.getMessage() for r in caplog.records if "held up" in r.getMessage()
        ]
        assert len(held_up) == 3
        assert "crontab[0] '* * * * *'" in held_up[0]
        assert (
            "from 2026-03-01T12:01:00+00:00 to 2026-03-01T15:00:00+00:00" in held_up[0]
        )
        assert "2026-03-01T13:30:00+00:00 5415 s late" in held_up[2]

        move_to(clock, plugin, NOON + timedelta(hours=3, minutes=1))
        assert slots(instance)[5:] == [("* * * * *", iso("2026-03-01 15:01"))]
        assert plugin.ticks == 3


def test_long_stall_inserts_latest_slot() -> None:
    clock = FakeClock(START)
    crontab = [
        ("* * * * *", EchoWorker),
        ("@yearly", EchoWorker),
        ("0 9 * * mon", EchoWorker),
        ("0 0 29 2 *", EchoWorker),  # no Feb 29 in 2026 or 2027
    ]
    with cron_instance(crontab, clock) as (instance, plugin):
        # 400 days on: Monday 2027-04-05 12:00:15 UTC.
        move_to(clock, plugin, NOON + timedelta(days=400, seconds=15))

        assert slots(instance) == [
            ("* * * * *", iso("2027-04-05 12:00")),
            ("@yearly", iso("2027-01-01 00:00")),
            ("0 9 * * mon", iso("2027-04-05 09:00")),
        ]


# Leadership


def test_leader_change_within_minute_dedupes() -> None:
    clock = FakeClock(START)
    with cron_instance([("* * * * *", EchoWorker)], clock) as (instance, plugin):
        move_to(clock, plugin, NOON)
        assert plugin.ticks == 1

        clock.advance(20)
        instance.leadership.set_leader(False)
        instance.leadership.set_leader(True)
        assert plugin.wait_caught_up(HANG_GUARD)

        # The new leader tried the 12:00 slot again, and got a conflict.
        assert plugin.ticks == 2
        assert slots(instance) == [("* * * * *", iso("2026-03-01 12:00"))]

        move_to(clock, plugin, NOON + MINUTE)
        assert len(instance.jobs()) == 2


def test_new_leader_checks_current_minute() -> None:
    clock = FakeClock(START)
    with cron_instance([("* * * * *", EchoWorker)], clock) as (instance, plugin):
        move_to(clock, plugin, NOON)
        instance.leadership.set_leader(False)
        for minute in range(1, 6):
            move_to(clock, plugin, NOON + minute * MINUTE)
        assert len(instance.jobs()) == 1

        clock.advance(20)
        instance.leadership.set_leader(True)
        assert plugin.wait_caught_up(HANG_GUARD)
        move_to(clock, plugin, NOON + 6 * MINUTE)

        assert slots(instance) == [
            ("* * * * *", iso("2026-03-01 12:00")),
            ("* * * * *", iso("2026-03-01 12:05")),
            ("* * * * *", iso("2026-03-01 12:06")),
        ]


def test_non_leader_inserts_nothing() -> None:
    clock = FakeClock(START)
    options = {"crontab": [("* * * * *", EchoWorker), ("@hourly", EchoWorker)]}
    instance = Stagehand(
        name="cron-follower", clock=clock, queues=PAUSED, plugins=[(Cron, options)]
    )
    instance.leadership.set_leader(False)
    plugin: Cron = instance._plugins[0]  # type: ignore[assignment]
    with instance:
        for minute in range(10):
            move_to(clock, plugin, NOON + minute * MINUTE)

        assert instance.jobs() == []
        assert plugin.ticks == 0


def test_two_plugins_share_each_slot() -> None:
    clock = FakeClock(START)
    options = {"crontab": [("* * * * *", RecordingWorker)]}
    plugins = [(Cron, options), (Cron, options)]
    with running(clock=clock, queues=PAUSED, plugins=plugins) as instance:
        first, second = instance._plugins
        assert isinstance(first, Cron)
        assert isinstance(second, Cron)
        for minute in range(3):
            clock.set(NOON + minute * MINUTE)
            assert first.wait_caught_up(HANG_GUARD)
            assert second.wait_caught_up(HANG_GUARD)

        assert first.ticks == 3
        assert second.ticks == 3
        assert slots(instance) == [
            ("* * * * *", iso("2026-03-01 12:00")),
            ("* * * * *", iso("2026-03-01 12:01")),
            ("* * * * *", iso("2026-03-01 12:02")),
        ]


# Lifecycle


def test_stop_joins_thread_and_ends_inserts() -> None:
    clock = FakeClock(START)
    with cron_instance([("* * * * *", EchoWorker)], clock) as (instance, plugin):
        assert cron_threads() == [f"stagehand-cron-{instance.name}"]
        move_to(clock, plugin, NOON)

        plugin.stop()
        assert cron_threads() == []
        clock.set(NOON + 5 * MINUTE)
        assert plugin.wait_caught_up(HANG_GUARD) is False
        assert len(instance.jobs()) == 1

    assert cron_threads() == []


def test_instance_stop_ends_cron_thread() -> None:
    clock = FakeClock(START)
    with cron_instance([("@daily", EchoWorker)], clock) as (instance, _):
        assert cron_threads() == [f"stagehand-cron-{instance.name}"]
    assert cron_threads() == []


def test_empty_crontab_starts_no_thread() -> None:
    with cron_instance([], FakeClock(START)) as (_, plugin):
        assert cron_threads() == []
        assert plugin.wait_caught_up(0) is True


def test_manual_mode_starts_no_thread() -> None:
    clock = FakeClock(START)
    with cron_instance([("* * * * *", EchoWorker)], clock, testing="manual") as (
        instance,
        plugin,
    ):
        clock.set(NOON)
        assert cron_threads() == []
        assert plugin.wait_caught_up(0) is False
        assert instance.jobs() == []


def test_plugin_and_worker_by_dotted_path() -> None:
    clock = FakeClock(START)
    options = {"crontab": [("* * * * *", "workers.EchoWorker")]}
    plugins = [("stagehand.plugins.Cron", options)]
    with running(clock=clock, queues=PAUSED, plugins=plugins) as instance:
        plugin = instance._plugins[0]
        assert isinstance(plugin, Cron)
        move_to(clock, plugin, NOON)
        assert [job.worker for job in instance.jobs()] == ["workers.EchoWorker"]


# Validation

BAD_ENTRIES = [
    (("61 * * * *", EchoWorker), InvalidCronExpression, "invalid cron expression"),
    ((5, EchoWorker), InvalidCronExpression, "must be a string"),
    (("* * * * *", "workers.NoSuchWorker"), UnknownWorker, "NoSuchWorker"),
    (("* * * * *", dict), UnknownWorker, "not a subclass of stagehand.Worker"),
    (("* * * * *", EchoWorker, {"priority": 12}), InvalidOption, "priority must be"),
    (("* * * * *", EchoWorker, {"args": [1]}), InvalidOption, "args must be a dict"),
    (("* * * * *", EchoWorker, ["queue"]), InvalidOption, "options must be a dict"),
    (("* * * * *",), InvalidOption, "must be (expression, worker)"),
    (("* * * * *", EchoWorker, {}, 1), InvalidOption, "must be (expression, worker)"),
    ("* * * * * EchoWorker", InvalidOption, "must be (expression, worker)"),
    (("* * * * *", EchoWorker, {"unique": True}), InvalidOption, "'unique' is not"),
    (("* * * * *", EchoWorker, {"schedule_in": 5}), InvalidOption, "'schedule_in'"),
    (
        ("* * * * *", EchoWorker, {"colour": 1}),
        InvalidOption,
        "unknown option 'colour'",
    ),
    (("* * * * *", EchoWorker, {"meta": {"cron_slot": 1}}), InvalidOption, "cron_slot"),
    (("* * * * *", EchoWorker, {"timezone": "Mars/Base"}), InvalidOption, "Mars/Base"),
    (("* * * * *", EchoWorker, {"queue": "reports"}), QueueNotConfigured, "'reports'"),
    (("@daily", EchoWorker), InvalidOption, "repeats crontab[0]"),
]


@pytest.mark.parametrize(("entry", "error", "words"), BAD_ENTRIES)
def test_bad_entry_rejected_with_index(
    entry: object, error: type[Exception], words: str
) -> None:
    crontab = [("@daily", EchoWorker), entry]
    with pytest.raises(error) as raised:
        Stagehand(
            name="cron-invalid", queues=PAUSED, plugins=[(Cron, {"crontab": crontab})]
        )
    message = str(raised.value)
    assert message.startswith("crontab[1]")
    assert words in message


BAD_OPTIONS = [
    ({"crontab": [], "cron_tab": []}, "valid options are ['crontab', 'timezone']"),
    ({"timezone": "UTC"}, "option 'crontab' is missing"),
    ({"crontab": "* * * * *"}, "crontab must be a list"),
    (
        {"crontab": [], "timezone": "Mars/Base"},
        "'Mars/Base' was not found in the time zone database",
    ),
    ({"crontab": [], "timezone": 3}, "timezone must be an IANA zone name"),
]


@pytest.mark.parametrize(("options", "words"), BAD_OPTIONS)
def test_bad_plugin_option_rejected(options: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidOption) as raised:
        Stagehand(name="cron-invalid", plugins=[(Cron, options)])
    assert words in str(raised.value)


def test_validate_normalizes_options() -> None:
    normalized = Cron.validate(
        {"crontab": [("*/5  *  * * *", EchoWorker, {"args": {"n": 1}})]}
    )

    assert normalized["timezone"] is UTC
    [entry] = normalized["crontab"]
    assert entry.cron.expression == "*/5 * * * *"
    assert entry.worker is EchoWorker
    assert entry.args == {"n": 1}
    assert entry.queue == "default"

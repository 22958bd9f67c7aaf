"""Instance settings, start, the default instance, and graceful stop."""

from __future__ import annotations

import logging
import threading

import pytest

import stagehand
from stagehand import (
    InvalidOption,
    JobState,
    NotRunning,
    QueueNotConfigured,
    ShuttingDown,
    Stagehand,
    StagehandError,
)
from support import running, watching
from workers import BlockingWorker, EchoWorker


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"queues": {}}, "queues must be a non-empty dict"),
        ({"queues": ["default"]}, "queues must be a non-empty dict"),
        (
            {"queues": {"default": 0}},
            "limit of queue 'default' must be an int from 1 to 1000",
        ),
        ({"queues": {"default": "10"}}, "got '10'"),
        (
            {"queues": {"default": {"limit": 2, "pause": True}}},
            "must be an int or a dict with 'limit'",
        ),
        ({"queues": {" x": 1}}, "queue name must be a non-empty string"),
        (
            {"queues": {"Bad Name!": 1}},
            "letters, digits, '_', '.', ':' and '-', such as 'mailers'; "
            "got 'Bad Name!'",
        ),
        (
            {"testing": "manaul"},
            "testing must be one of 'disabled', 'manual', 'inline'; got 'manaul'",
        ),
        (
            {"shutdown_grace_period": -1},
            "shutdown_grace_period must be a finite number of seconds >= 0",
        ),
        ({"retention_limit": -1}, "retention_limit must be an int >= 0"),
        ({"name": ""}, "name must be a non-empty string"),
        (
            {"plugins": "stagehand.plugins.Cron"},
            "plugins must be a list of (PluginClass, options) pairs",
        ),
        (
            {"plugins": [("no.such.Plugin", {})]},
            "plugins[0]: cannot import 'no.such.Plugin'",
        ),
        (
            {"plugins": [(dict, {})]},
            "plugins[0] must be a stagehand.plugins.Plugin subclass",
        ),
        (
            {"clock": "now"},
            "clock must be a stagehand.testing.FakeClock or another Clock",
        ),
        ({"cluster": {"name": "shop"}}, "cluster secret must be a str or bytes"),
    ],
)
def test_bad_settings_rejected(settings: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidOption) as raised:
        Stagehand(**settings)  # type: ignore[arg-type]

    assert message in str(raised.value)


def test_unknown_setting_rejected() -> None:
    with pytest.raises(TypeError, match="queus"):
        Stagehand(queus={"default": 1})  # type: ignore[call-arg]


def test_insert_before_start_rejected() -> None:
    instance = Stagehand(name="not-started")
    with pytest.raises(NotRunning, match="instance 'not-started' is not started"):
        instance.insert(EchoWorker.new({}))


def test_insert_unconfigured_queue_changes_nothing() -> None:
    with running() as instance:
        job = EchoWorker.new({}, queue="mailers")
        with pytest.raises(
            QueueNotConfigured, match=r"configured queues are \['default'\]"
        ):
            instance.insert(job)

        assert job.id is None
        assert instance.jobs() == []


def test_insert_twice_rejected() -> None:
    with running(queues={"default": {"limit": 1, "paused": True}}) as instance:
        job = instance.insert(EchoWorker.new({}))
        with pytest.raises(InvalidOption, match=f"job {job.id} was already inserted"):
            instance.insert(job)


def test_default_instance_functions() -> None:
    assert stagehand.default_instance() is None
    with pytest.raises(NotRunning, match="no default Stagehand instance"):
        EchoWorker.new({}).insert()

    instance = stagehand.start(queues={"default": 2})
    try:
        with watching() as watcher:
            one = EchoWorker.new({"value": 1}).insert()
            two = stagehand.insert(EchoWorker.new({"value": 2}))
            three, four = stagehand.insert_all(
                [EchoWorker.new({"value": v}) for v in (3, 4)]
            )
            watcher.wait_final(one, two, three, four)
        assert stagehand.default_instance() is instance
    finally:
        stagehand.stop()

    assert [job.result for job in (one, two, three, four)] == [1, 2, 3, 4]
    assert stagehand.default_instance() is None


def test_same_name_rejected() -> None:
    with running(name="twin"):
        with pytest.raises(
            InvalidOption, match="instance named 'twin' is already running"
        ):
            Stagehand(name="twin").start()


def test_restart_after_stop_rejected() -> None:
    instance = Stagehand(name="restart").start()
    instance.stop()
    instance.stop()
    with pytest.raises(StagehandError, match="cannot start again"):
        instance.start()


def test_stop_waits_for_executing_job() -> None:
    instance = Stagehand(name="graceful", shutdown_grace_period=30).start()
    entered, release = BlockingWorker.gate("graceful-stop")
    job = instance.insert(BlockingWorker.new({"gate": "graceful-stop"}))
    assert entered.wait(30)
    stopper = threading.Thread(target=instance.stop)
    stopper.start()
    try:
        while instance.running:
            stopper.join(0.01)
        with pytest.raises(ShuttingDown, match="accepts no new jobs"):
            instance.insert(EchoWorker.new({}))
        assert stopper.is_alive()
    finally:
        release.set()
        stopper.join(30)

    assert not stopper.is_alive()
    assert job.state is JobState.COMPLETED
    assert job.result == "released"


def test_stop_abandons_after_grace(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="stagehand")
    instance = Stagehand(
        name="impatient", shutdown_grace_period=0.2, queues={"default": 1}
    ).start()
    entered, release = BlockingWorker.gate("abandon")
    job = instance.insert(BlockingWorker.new({"gate": "abandon"}))
    queued = [instance.insert(EchoWorker.new({})) for _ in range(3)]
    scheduled = instance.insert(EchoWorker.new({}, schedule_in=3600))
    assert entered.wait(30)
    try:
        instance.stop()
    finally:
        release.set()

    assert job.state is JobState.DISCARDED
    assert instance.check_queue("default")["stuck"] == 1
    assert (
        "abandoned: still executing when the shutdown grace period of 0.2 s ended"
        in job.errors[0]["error"]
    )
    assert f"job {job.id} (workers.BlockingWorker) abandoned" in caplog.text
    assert (
        "stopped with 3 available and 1 scheduled or retryable jobs; they are lost"
        in caplog.text
    )
    assert all(item.state is JobState.AVAILABLE for item in queued)
    assert scheduled.state is JobState.SCHEDULED


def test_context_manager_starts_and_stops() -> None:
    with Stagehand(name="context") as instance:
        assert instance.running
    assert not instance.running
    assert stagehand.get_instance("context") is None


class BrokenPlugin(stagehand.plugins.Plugin):
    def start(self) -> None:
        raise OSError("cannot bind")


def test_plugin_start_failure_stops_instance() -> None:
    instance = Stagehand(name="broken-plugin", plugins=[BrokenPlugin])
    with pytest.raises(OSError, match="cannot bind"):
        instance.start()

    assert not instance.running
    assert stagehand.get_instance("broken-plugin") is None
    assert not any(
        thread.name.startswith("stagehand-scheduler-broken-plugin")
        for thread in threading.enumerate()
        if thread.is_alive()
    )


def test_plugin_lookup_by_class() -> None:
    instance = Stagehand(name="plugin-lookup", plugins=[BrokenPlugin])

    assert isinstance(instance.plugin(BrokenPlugin), BrokenPlugin)
    with pytest.raises(
        LookupError, match="has no Cron plugin; its plugins are \\['BrokenPlugin'\\]"
    ):
        instance.plugin(stagehand.plugins.Cron)

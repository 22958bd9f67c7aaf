"""Event handlers: payloads, detaching, and handlers that raise."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from stagehand import JobState, events
from support import running, watching
from workers import EchoWorker, FailingWorker


@pytest.fixture
def recorded() -> Any:
    received: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    lock = threading.Lock()

    def handler(event: str, measurements: Any, metadata: Any) -> None:
        with lock:
            received.append((event, dict(measurements), dict(metadata)))

    events.attach("test-recorded", events.EVENTS, handler)
    yield received
    events.detach("test-recorded")


def test_job_events_payload(recorded: list[Any]) -> None:
    with running(name="events-payload") as instance, watching() as watcher:
        job = instance.insert(EchoWorker.new({"value": 1}))
        watcher.wait_final(job)

    names = [event for event, _, metadata in recorded if metadata.get("job") is job]
    assert names == ["job.start", "job.stop"]
    _, measurements, metadata = recorded[-1]
    assert measurements["duration"] >= 0
    assert metadata["state"] is JobState.COMPLETED
    assert metadata["instance"] == "events-payload"


def test_exception_event(recorded: list[Any]) -> None:
    with running() as instance, watching() as watcher:
        job = instance.insert(FailingWorker.new({}, max_attempts=1))
        watcher.wait_final(job)

    exceptions = [entry for entry in recorded if entry[0] == "job.exception"]
    assert len(exceptions) == 1
    metadata = exceptions[0][2]
    assert metadata["kind"] == "exception"
    assert metadata["state"] is JobState.DISCARDED
    assert isinstance(metadata["error"], RuntimeError)


def test_queue_events(recorded: list[Any]) -> None:
    with running(name="events-queue") as instance:
        instance.pause_queue("default")
        instance.resume_queue("default")

    assert [(event, metadata) for event, _, metadata in recorded] == [
        ("queue.pause", {"queue": "default", "instance": "events-queue"}),
        ("queue.resume", {"queue": "default", "instance": "events-queue"}),
    ]


def test_raising_handler_is_detached(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken(event: str, measurements: Any, metadata: Any) -> None:
        calls.append(event)
        raise ZeroDivisionError("handler bug")

    events.attach("test-broken", ["job.start"], broken)
    with running() as instance, watching() as watcher:
        first = instance.insert(EchoWorker.new({"value": 1}))
        watcher.wait_final(first)
        second = instance.insert(EchoWorker.new({"value": 2}))
        watcher.wait_final(second)

    assert calls == ["job.start"]
    assert first.state is JobState.COMPLETED
    assert second.result == 2
    assert "test-broken" not in events.handlers()
    assert (
        "event handler 'test-broken' raised on 'job.start' and was detached"
        in caplog.text
    )


def test_attach_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown event names \\['job.finish'\\]"):
        events.attach("bad-name", ["job.finish"], print)
    with pytest.raises(TypeError, match="handler must be callable"):
        events.attach("bad-handler", ["job.stop"], "print")  # type: ignore[arg-type]
    events.attach("twice", ["job.stop"], print)
    try:
        with pytest.raises(ValueError, match="'twice' is already attached"):
            events.attach("twice", ["job.start"], print)
    finally:
        assert events.detach("twice") is True
    assert events.detach("twice") is False
    assert "bad-name" not in events.handlers()


def test_cancel_job_emits_stop(recorded: list[Any]) -> None:
    with running(queues={"default": {"limit": 1, "paused": True}}) as instance:
        job = instance.insert(EchoWorker.new({}))
        instance.cancel_job(job.id)

    stops = [
        (measurements, metadata)
        for event, measurements, metadata in recorded
        if event == "job.stop"
    ]
    assert stops == [
        (
            {"duration": 0.0},
            {"job": job, "instance": instance.name, "state": JobState.CANCELLED},
        )
    ]

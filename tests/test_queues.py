"""Queue dispatch order, pause, resume and scaling under load."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from stagehand import InvalidOption, JobState, QueueNotConfigured
from support import running, watching
from workers import RUN_LOCK, RUNS, BlockingWorker, EchoWorker, RecordingWorker


@pytest.fixture(autouse=True)
def clear_runs() -> None:
    with RUN_LOCK:
        RUNS.clear()


def test_dispatch_by_priority_then_fifo() -> None:
    queues = {"default": {"limit": 1, "paused": True}}
    with running(queues=queues) as instance, watching() as watcher:
        plan = [(5, "p5-a"), (0, "p0-a"), (9, "p9-a"), (5, "p5-b"), (0, "p0-b"), (1, "p1-a")]
        jobs = [
            instance.insert(RecordingWorker.new({"label": label}, priority=priority))
            for priority, label in plan
        ]
        instance.resume_queue("default")
        watcher.wait_final(*jobs)

    labels = [label for _, label in RUNS]
    assert labels == ["p0-a", "p0-b", "p1-a", "p5-a", "p5-b", "p9-a"]


def test_paused_queue_holds_jobs() -> None:
    with running(queues={"default": 2}) as instance, watching() as watcher:
        instance.pause_queue("default")
        job = instance.insert(EchoWorker.new({"value": 1}))
        stats = instance.check_queue("default")

        assert stats["paused"] is True
        assert stats["available"] == 1
        assert job.state is JobState.AVAILABLE

        instance.resume_queue("default")
        watcher.wait_final(job)

    assert job.state is JobState.COMPLETED


def test_check_queue_counts() -> None:
    with running(queues={"default": 1, "other": 1}) as instance, watching() as watcher:
        entered, release = BlockingWorker.gate("check-counts")
        busy = instance.insert(BlockingWorker.new({"gate": "check-counts"}))
        assert entered.wait(30)
        queued = [instance.insert(EchoWorker.new({"value": i})) for i in range(3)]
        instance.insert(EchoWorker.new({}, schedule_in=3600))
        stats = instance.check_queue("default")
        release.set()
        watcher.wait_final(busy, *queued)

    assert stats == {
        "queue": "default",
        "limit": 1,
        "paused": False,
        "available": 3,
        "scheduled": 1,
        "retryable": 0,
        "executing": 1,
        "stuck": 0,
        "threads": 1,
        "completed": 0,
        "discarded": 0,
        "cancelled": 0,
    }


def test_scale_under_load_runs_each_job_once() -> None:
    with running(queues={"default": 2}) as instance, watching() as watcher:
        jobs = []
        for round_number, limit in enumerate([8, 1, 5, 2, 10, 3]):
            jobs += [
                instance.insert(RecordingWorker.new({"label": f"{round_number}-{i}"}))
                for i in range(300)
            ]
            instance.scale_queue("default", limit)
        watcher.wait_final(*jobs)
        stats = instance.check_queue("default")

    counts = Counter(job_id for job_id, _ in RUNS)
    assert len(counts) == 1800
    assert set(counts.values()) == {1}
    assert all(job.state is JobState.COMPLETED for job in jobs)
    assert stats["limit"] == 3


def test_scale_down_lets_busy_threads_finish() -> None:
    with running(queues={"default": 3}) as instance, watching() as watcher:
        gates = [BlockingWorker.gate(f"scale-down-{i}") for i in range(3)]
        busy = [
            instance.insert(BlockingWorker.new({"gate": f"scale-down-{i}"})) for i in range(3)
        ]
        for entered, _ in gates:
            assert entered.wait(30)
        instance.scale_queue("default", 1)
        for _, release in gates:
            release.set()
        watcher.wait_final(*busy)
        follow_up = [instance.insert(EchoWorker.new({"value": i})) for i in range(20)]
        watcher.wait_final(*follow_up)
        names = {thread.name for thread in threading.enumerate()}

    assert [job.result for job in busy] == ["released"] * 3
    assert [job.result for job in follow_up] == list(range(20))
    assert instance.check_queue("default")["limit"] == 1
    assert sum(name.startswith("stagehand-default-") for name in names) >= 1


@pytest.mark.parametrize("limit", [0, -1, 1001, 2.5, "4", True])
def test_scale_rejects_bad_limit(limit: object) -> None:
    with running() as instance:
        with pytest.raises(InvalidOption, match="must be an int from 1 to 1000"):
            instance.scale_queue("default", limit)  # type: ignore[arg-type]

        assert instance.check_queue("default")["limit"] == 10


@pytest.mark.parametrize(
    "call",
    ["pause_queue", "resume_queue", "check_queue", "drain_queue"],
)
def test_control_rejects_unknown_queue(call: str) -> None:
    with running() as instance:
        with pytest.raises(QueueNotConfigured, match="queue 'mailers' is not configured"):
            getattr(instance, call)("mailers")


def test_drain_queue_returns_available_jobs() -> None:
    with running(queues={"default": {"limit": 2, "paused": True}}) as instance:
        jobs = [
            instance.insert(EchoWorker.new({"value": i}, priority=9 - i)) for i in range(5)
        ]
        drained = instance.drain_queue("default")
        stats = instance.check_queue("default")

    assert [job.args["value"] for job in drained] == [4, 3, 2, 1, 0]
    assert {job.id for job in drained} == {job.id for job in jobs}
    assert stats["available"] == 0
    assert instance.get_job(jobs[0].id) is None

"""Unique jobs on one process: fingerprints, conflicts, periods, races."""

from __future__ import annotations

import threading

from stagehand import FakeClock, JobState
from stagehand._unique import fingerprint
from support import running, watching
from workers import EchoWorker


def test_duplicate_returns_conflict() -> None:
    with running(queues={"default": {"limit": 1, "paused": True}}) as instance:
        first = instance.insert(EchoWorker.new({"a": 1, "b": 2}, unique=True))
        second = instance.insert(EchoWorker.new({"b": 2, "a": 1}, unique=True))

        assert first.conflict is False
        assert second.conflict is True
        assert second.id == first.id
        assert second is not first
        assert instance.check_queue("default")["available"] == 1


def test_fingerprint_keys_subset() -> None:
    unique = {"keys": ["account"]}
    one = EchoWorker.new({"account": 7, "nonce": 1}, unique=unique)
    two = EchoWorker.new({"nonce": 2, "account": 7}, unique=unique)
    other = EchoWorker.new({"account": 8, "nonce": 1}, unique=unique)

    assert fingerprint(one) == fingerprint(two)
    assert fingerprint(one) != fingerprint(other)


def test_fingerprint_fields() -> None:
    by_args = {"fields": ["args"]}
    mailers = EchoWorker.new({"x": 1}, queue="mailers", unique=by_args)
    default = EchoWorker.new({"x": 1}, unique=by_args)
    with_meta = EchoWorker.new({"x": 1}, meta={"m": 1}, unique={"fields": ["args", "meta"]})
    other_meta = EchoWorker.new({"x": 1}, meta={"m": 2}, unique={"fields": ["args", "meta"]})

    assert fingerprint(mailers) == fingerprint(default)
    assert fingerprint(with_meta) != fingerprint(other_meta)
    assert fingerprint(EchoWorker.new({"x": 1}, unique=True)) != fingerprint(
        EchoWorker.new({"x": 1}, queue="mailers", unique=True)
    )


def test_completed_job_does_not_block() -> None:
    with running() as instance, watching() as watcher:
        first = instance.insert(EchoWorker.new({"v": 1}, unique=True))
        watcher.wait_final(first)
        second = instance.insert(EchoWorker.new({"v": 1}, unique=True))
        watcher.wait_final(second)

    assert second.conflict is False
    assert second.id != first.id


def test_states_option_blocks_completed() -> None:
    unique = {"states": ["available", "scheduled", "executing", "retryable", "completed"]}
    with running() as instance, watching() as watcher:
        first = instance.insert(EchoWorker.new({"v": 1}, unique=unique))
        watcher.wait_final(first)
        second = instance.insert(EchoWorker.new({"v": 1}, unique=unique))

    assert second.conflict is True
    assert second.state is JobState.COMPLETED


def test_period_expires() -> None:
    clock = FakeClock()
    queues = {"default": {"limit": 1, "paused": True}}
    with running(clock=clock, queues=queues) as instance:
        first = instance.insert(EchoWorker.new({"v": 1}, unique={"period": 30}))
        clock.advance(29)
        blocked = instance.insert(EchoWorker.new({"v": 1}, unique={"period": 30}))
        clock.advance(1)
        allowed = instance.insert(EchoWorker.new({"v": 1}, unique={"period": 30}))

    assert blocked.conflict is True
    assert allowed.conflict is False
    assert allowed.id != first.id


def test_period_none_never_expires() -> None:
    clock = FakeClock()
    queues = {"default": {"limit": 1, "paused": True}}
    with running(clock=clock, queues=queues) as instance:
        instance.insert(EchoWorker.new({"v": 1}, unique={"period": None}))
        clock.advance(365 * 86400)
        again = instance.insert(EchoWorker.new({"v": 1}, unique={"period": None}))

    assert again.conflict is True


def test_concurrent_inserts_yield_one_job() -> None:
    queues = {"default": {"limit": 1, "paused": True}}
    with running(queues=queues) as instance:
        barrier = threading.Barrier(50)
        results = []
        results_lock = threading.Lock()

        def insert() -> None:
            job = EchoWorker.new({"order": 42}, unique=True)
            barrier.wait(30)
            inserted = instance.insert(job)
            with results_lock:
                results.append(inserted)

        threads = [threading.Thread(target=insert) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        stats = instance.check_queue("default")

    assert len(results) == 50
    assert sum(not job.conflict for job in results) == 1
    assert len({job.id for job in results}) == 1
    assert stats["available"] == 1

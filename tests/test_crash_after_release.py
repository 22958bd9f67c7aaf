"""A worker thread that crashes after its slot was handed to a new thread.

When a job's timeout or `stop()` takes a job from a thread that is still
running it, the queue counts that thread as stuck and starts a replacement.
If the stuck thread then fails in Stagehand's own code instead of returning,
it must leave the counts as a normal return would: stuck back to 0, and no
extra thread for the queue.
"""

from __future__ import annotations

import threading
from typing import Any

from support import HANG_GUARD, new_instance, unique_name, wait_until, watching
from workers import BlockingWorker, TimedBlockingWorker

from stagehand import FakeClock, Job


def _queue_threads(name: str) -> list[threading.Thread]:
    prefix = f"stagehand-{name}-"
    return [
        thread for thread in threading.enumerate() if thread.name.startswith(prefix)
    ]


def test_crash_after_timeout_keeps_counts(cleanup: list[Any]) -> None:
    clock = FakeClock()
    gate = unique_name("crash-after-release")
    entered, release = BlockingWorker.gate(gate)
    cleanup.append(release.set)
    # A queue name no other test uses, so its threads' names are this test's.
    instance = new_instance("crash", queues={"crashing": 1}, clock=clock)
    queue = instance._queues["crashing"]
    run = queue._runner
    crashed = threading.Event()

    def crash_when_lost(job: Job, owner: Any) -> bool:
        # Fails as Stagehand's own code might, once the job was taken from
        # this thread. Set before start(): each thread reads it when it starts.
        if run(job, owner):
            crashed.set()
            raise RuntimeError("failure after the slot was released")
        return False

    queue._runner = crash_when_lost
    instance.start()
    cleanup.append(instance.stop)
    with watching() as watcher:
        job = instance.insert(
            TimedBlockingWorker.new({"gate": gate}, queue="crashing", max_attempts=1)
        )
        assert entered.wait(HANG_GUARD)
        clock.advance(6)
        watcher.wait_state(job, "discarded")
    assert queue.stuck == 1

    release.set()
    assert crashed.wait(HANG_GUARD)
    wait_until(lambda: queue.stuck == 0)
    wait_until(lambda: len(_queue_threads("crashing")) == 1)
    assert queue.stats()["threads"] == 1
    assert queue.stats()["stuck"] == 0

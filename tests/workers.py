"""Workers used by the engine's tests, importable by dotted path."""

from __future__ import annotations

import threading
from typing import Any

from stagehand import Cancel, Error, Job, Snooze, Worker

# Filled by RecordingWorker, read by tests; guarded by RUN_LOCK.
RUN_LOCK = threading.Lock()
RUNS: list[tuple[str, Any]] = []


class EchoWorker(Worker):
    def perform(self, job: Job) -> Any:
        return job.args.get("value")


class RecordingWorker(Worker):
    """Appends (job id, args["label"]) to RUNS."""

    def perform(self, job: Job) -> None:
        with RUN_LOCK:
            RUNS.append((job.id, job.args.get("label")))


class FailingWorker(Worker):
    max_attempts = 3

    def backoff(self, job: Job) -> float:
        return 10.0

    def perform(self, job: Job) -> None:
        raise RuntimeError(f"attempt {job.attempt} failed")


class OutcomeWorker(Worker):
    """Returns the outcome named by args["outcome"]."""

    def perform(self, job: Job) -> Any:
        outcome = job.args["outcome"]
        if outcome == "error":
            return Error("bad input")
        if outcome == "snooze":
            return Snooze(30)
        if outcome == "cancel":
            return Cancel("not needed")
        return {"ok": True}


class BlockingWorker(Worker):
    """Waits until its release event is set; see `gate`."""

    gates: dict[str, tuple[threading.Event, threading.Event]] = {}

    @classmethod
    def gate(cls, name: str) -> tuple[threading.Event, threading.Event]:
        """Return (entered, release) events for jobs with args["gate"] == name."""
        return cls.gates.setdefault(name, (threading.Event(), threading.Event()))

    def perform(self, job: Job) -> str:
        entered, release = self.gate(job.args["gate"])
        entered.set()
        if not release.wait(60):
            raise TimeoutError("the test never released the gate")
        if job.args.get("fail"):
            raise RuntimeError("failed after release")
        return "released"


# Filled by CountingWorker, read by the race tests; guarded by COUNT_LOCK.
COUNT_LOCK = threading.Lock()
COUNTS: dict[int, int] = {}


class CountingWorker(Worker):
    """Counts how many times the job with args["n"] ran, in COUNTS."""

    def perform(self, job: Job) -> None:
        number = job.args["n"]
        with COUNT_LOCK:
            COUNTS[number] = COUNTS.get(number, 0) + 1


def runs_of(number: int) -> int:
    """Return how many times the CountingWorker job with args["n"] ran."""
    with COUNT_LOCK:
        return COUNTS.get(number, 0)


class TimedBlockingWorker(Worker):
    """Blocks in a C call like BlockingWorker, under a 5 s timeout."""

    def timeout(self, job: Job) -> float:
        return 5.0

    def perform(self, job: Job) -> None:
        BlockingWorker().perform(job)

"""Reliability soak: runs many jobs under load and checks that none is lost or doubled.

This is a checker, not a benchmark: it measures no speed. Two modes:

- ``python -m bench.soak --seconds 60 --seed 1`` runs one instance with
  three queues. Seeded workers complete, raise, return `Error`, snooze,
  cancel or run past their timeout. Several threads insert jobs while a
  chaos thread cancels, retries, pauses, resumes, scales and drains. At the
  end every job must be final or drained, and each job's attempts must
  match what its worker did.
- ``python -m bench.soak --cluster --seconds 60 --seed 1`` runs three peers
  in child processes on 127.0.0.1, with a static discovery list. Peers stop
  gracefully and restart while the others insert. Every job must run
  exactly once somewhere, unless a log line reports it as possibly lost.

The summary lists violations with their job ids; the exit status is 1 when
there is any, 0 otherwise. Random choices come from the seed, but thread
interleavings do not, so two runs with one seed can differ.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import random
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import stagehand
from stagehand import Cancel, Error, Job, JobState, Snooze, Worker, events
from stagehand.exceptions import JobNotFound, ShuttingDown, StagehandError

# Seconds the soak waits, at most, for a condition that should hold well
# before; reaching it is itself a violation.
DEADLINE = 120.0

QUEUES = {"a": 4, "b": 2, "c": 1}
# Seconds the timeout worker allows an attempt, and how long a "slow"
# attempt blocks in Event.wait (a C call that JobTimeout cannot interrupt).
# The margin is wide because a garbage collection of the ledger's objects
# can hold up the scheduler thread for a few hundred milliseconds.
TIMEOUT = 0.05
SLOW_WAIT = 2.0
# Long enough that every unique fingerprint blocks for the whole run.
UNIQUE_PERIOD = 3600

FAILS = ("raise", "error", "timeout")
FINAL = frozenset({JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED})


# ---------------------------------------------------------------------------
# Single-process mode: the ledger and the workers


@dataclass
class Attempt:
    job_id: str
    number: int
    thread: int
    start_seq: int
    planned: str
    outcome: str | None = None  # what perform did; None while it runs
    end_seq: int | None = None


@dataclass
class Inserted:
    job: Job
    max_attempts: int
    plan: list[str]
    unique_key: int | None
    call_started: float  # time.time() around the insert call
    call_ended: float


class Ledger:
    """Thread-safe record of inserts, attempts, events and control calls.

    Every entry gets a sequence number from one counter under one lock, so
    the checks can order an attempt's start against a cancel or a drain.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._seq = 0
        self.inserted: dict[str, Inserted] = {}
        self.conflicts: list[tuple[str, int | None]] = []  # (copy id, unique key)
        self.attempts: dict[str, list[Attempt]] = defaultdict(list)
        self.active: dict[str, list[Attempt]] = defaultdict(list)
        self.starts: Counter[str] = Counter()
        # job id -> [(seq, state, emitted by the chaos thread)]
        self.stops: dict[str, list[tuple[int, str, bool]]] = defaultdict(list)
        self.api_cancels: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.retries: dict[str, list[int]] = defaultdict(list)
        self.cancel_calls: set[str] = set()
        self.drained: dict[str, tuple[int, Job]] = {}
        self.live_violations: list[str] = []
        # Set in the chaos thread only. Thread ids are reused once a thread
        # ends, so the chaos thread is not known by its id.
        self.in_chaos = threading.local()
        self.control_calls: Counter[str] = Counter()

    def next_seq(self) -> int:
        # The caller holds the lock.
        self._seq += 1
        return self._seq

    def begin(self, job: Job, planned: str) -> Attempt:
        with self.lock:
            attempt = Attempt(
                job.id or "?",
                job.attempt,
                threading.get_ident(),
                self.next_seq(),
                planned,
            )
            for other in self.active[attempt.job_id]:
                if not _timed_out(job, other.number):
                    self.live_violations.append(
                        f"job {attempt.job_id}: attempt {attempt.number} started "
                        f"while attempt {other.number} was still running in "
                        f"thread {other.thread} and had not timed out"
                    )
            self.active[attempt.job_id].append(attempt)
            self.attempts[attempt.job_id].append(attempt)
            return attempt

    def end(self, attempt: Attempt, outcome: str) -> None:
        with self.lock:
            attempt.outcome = outcome
            attempt.end_seq = self.next_seq()
            self.active[attempt.job_id].remove(attempt)

    def on_event(self, event: str, measurements: Any, metadata: Any) -> None:
        job = metadata["job"]
        with self.changed:
            if event == "job.start":
                self.starts[job.id] += 1
                return
            seq = self.next_seq()
            by_chaos = getattr(self.in_chaos, "active", False)
            state = str(metadata["state"])
            self.stops[job.id].append((seq, state, by_chaos))
            if by_chaos:
                # cancel_job emits job.stop in the calling thread once it has
                # cancelled a job that was not executing.
                self.api_cancels[job.id].append((seq, job.attempt))
            self.changed.notify_all()


def _timed_out(job: Job, number: int) -> bool:
    return any(
        entry["attempt"] == number and str(entry["error"]).startswith("JobTimeout")
        for entry in list(job.errors)
    )


LEDGER = Ledger()
# Set at the end of a run, so that threads blocked past their timeout return.
RELEASE = threading.Event()


class SoakFailure(Exception):
    """The failure a "raise" step of a plan raises."""


class PlanWorker(Worker):
    """Follows ``args["plan"]``: one outcome per attempt, then completes."""

    queue = "a"
    max_attempts = 3

    def perform(self, job: Job) -> Any:
        plan = job.args["plan"]
        step = plan[job.attempt - 1] if job.attempt <= len(plan) else "complete"
        attempt = LEDGER.begin(job, step)
        outcome = step
        try:
            if step == "raise":
                raise SoakFailure(f"planned failure of attempt {job.attempt}")
            if step == "error":
                return Error(f"planned error of attempt {job.attempt}")
            if step == "snooze":
                return Snooze(job.args["snooze"])
            if step == "cancel":
                return Cancel("planned cancel")
            if step == "slow":
                # Outlives the timeout; Event.wait is a C call that the
                # timeout's JobTimeout cannot interrupt.
                RELEASE.wait(SLOW_WAIT)
                outcome = "slow-returned"
                return None
            return {"attempt": job.attempt}
        finally:
            LEDGER.end(attempt, outcome)

    def backoff(self, job: Job) -> float:
        return 0.001 + 0.002 * (job.attempt % 3)


class TimeoutWorker(PlanWorker):
    """A PlanWorker whose attempts get `TIMEOUT` seconds."""

    def timeout(self, job: Job) -> float:
        return TIMEOUT


# ---------------------------------------------------------------------------
# Single-process mode: the soak


@dataclass
class SoloRun:
    seconds: float
    seed: int
    instance: stagehand.Stagehand
    stop_inserting: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)


def _random_plan(rng: random.Random, slow: bool) -> list[str]:
    steps = ["complete", "raise", "error", "snooze", "cancel"]
    weights = [20, 20, 15, 20, 4]
    if slow:
        steps.append("slow")
        weights.append(25)
    length = rng.choice([0, 1, 1, 2, 2, 3, 4])
    return rng.choices(steps, weights, k=length)


def _build_job(
    rng: random.Random, *, unique: bool, delay: bool
) -> tuple[Job, int | None, int]:
    slow = rng.random() < 0.1
    worker = TimeoutWorker if slow else PlanWorker
    key = rng.randrange(60) if unique else None
    args: dict[str, Any] = {
        "plan": _random_plan(rng, slow),
        "snooze": rng.choice([0.001, 0.003, 0.01]),
    }
    options: dict[str, Any] = {
        "queue": rng.choice(list(QUEUES)),
        "priority": rng.randrange(10),
        "max_attempts": rng.randint(1, 4),
    }
    if unique:
        args["key"] = key
        # Only the key counts, so jobs of both workers and of every queue
        # share the 60 keys.
        options["unique"] = {
            "period": UNIQUE_PERIOD,
            "fields": ["args"],
            "keys": ["key"],
        }
    if delay:
        options["schedule_in"] = rng.uniform(0, 0.2)
    return worker.new(args, **options), key, options["max_attempts"]


def _record_insert(
    built: tuple[Job, int | None, int], result: Job, began: float
) -> None:
    # `built` contains max_attempts as it was before the insert: a snooze may
    # have raised it by the time the insert returns.
    job, key, max_attempts = built
    ended = time.time()
    with LEDGER.lock:
        if result.conflict:
            LEDGER.conflicts.append((result.id or "?", key))
            return
        LEDGER.inserted[result.id or "?"] = Inserted(
            result, max_attempts, list(job.args["plan"]), key, began, ended
        )


def _insert_loop(run: SoloRun, index: int) -> None:
    rng = random.Random(run.seed * 1000 + index)
    instance = run.instance
    while not run.stop_inserting.is_set():
        roll = rng.random()
        try:
            if roll < 0.3:
                built = _build_job(rng, unique=False, delay=False)
                began = time.time()
                _record_insert(built, instance.insert(built[0]), began)
            elif roll < 0.5:
                batch = [
                    _build_job(rng, unique=rng.random() < 0.2, delay=rng.random() < 0.3)
                    for _ in range(rng.randint(2, 8))
                ]
                began = time.time()
                results = instance.insert_all([built[0] for built in batch])
                for built, result in zip(batch, results, strict=True):
                    _record_insert(built, result, began)
            elif roll < 0.7:
                built = _build_job(rng, unique=False, delay=True)
                began = time.time()
                _record_insert(built, instance.insert(built[0]), began)
            else:
                built = _build_job(rng, unique=True, delay=rng.random() < 0.3)
                began = time.time()
                _record_insert(built, instance.insert(built[0]), began)
        except Exception as error:
            run.errors.append(f"insert thread {index} failed: {error!r}")
            return
        run.stop_inserting.wait(rng.uniform(0.001, 0.008))


def _chaos_loop(run: SoloRun) -> None:
    rng = random.Random(run.seed * 1000 + 999)
    instance = run.instance
    LEDGER.in_chaos.active = True
    queues = list(QUEUES)
    paused: dict[str, float] = {}
    while not run.stop_inserting.is_set():
        now = time.monotonic()
        for name, until in list(paused.items()):
            if now >= until:
                instance.resume_queue(name)
                del paused[name]
        with LEDGER.lock:
            # The newest jobs, which are the likeliest to be live.
            recent = list(LEDGER.inserted)[-60:]
        roll = rng.random()
        try:
            if recent and roll < 0.35:
                job_id = rng.choice(recent)
                with LEDGER.lock:
                    LEDGER.cancel_calls.add(job_id)
                instance.cancel_job(job_id)
                LEDGER.control_calls["cancel_job"] += 1
            elif recent and roll < 0.6:
                job_id = rng.choice(recent)
                with LEDGER.lock:
                    LEDGER.retries[job_id].append(LEDGER.next_seq())
                instance.retry_job(job_id)
                LEDGER.control_calls["retry_job"] += 1
            elif roll < 0.72:
                name = rng.choice(queues)
                if name not in paused:
                    instance.pause_queue(name)
                    paused[name] = now + rng.uniform(0.01, 0.15)
                    LEDGER.control_calls["pause_queue"] += 1
            elif roll < 0.82:
                instance.scale_queue(rng.choice(queues), rng.randint(1, 6))
                LEDGER.control_calls["scale_queue"] += 1
            elif roll < 0.83:
                name = rng.choice(queues)
                drained = instance.drain_queue(name)
                with LEDGER.lock:
                    seq = LEDGER.next_seq()
                    for job in drained:
                        LEDGER.drained[job.id or "?"] = (seq, job)
                LEDGER.control_calls["drain_queue"] += 1
            else:
                _check_inspection(run)
        except JobNotFound:
            LEDGER.control_calls["job_not_found"] += 1
        except Exception as error:
            run.errors.append(f"chaos thread failed: {error!r}")
            return
        run.stop_inserting.wait(rng.uniform(0.0005, 0.005))
    for name in paused:
        instance.resume_queue(name)


def _check_inspection(run: SoloRun) -> None:
    limit = run.instance.settings.retention_limit
    finished = run.instance.jobs(state=[state.value for state in FINAL])
    if len(finished) > limit:
        run.errors.append(
            f"jobs() listed {len(finished)} finished jobs, more than the "
            f"retention_limit of {limit}"
        )
    for name in QUEUES:
        stats = run.instance.check_queue(name)
        negative = {
            key: value
            for key, value in stats.items()
            if isinstance(value, int) and value < 0
        }
        if negative:
            run.errors.append(
                f"check_queue({name!r}) returned negative counts {negative}"
            )


class LogCounter(logging.Handler):
    """Counts Stagehand's log records by level and keeps the CRITICAL ones.

    The soak's workers fail on purpose, so ERROR and WARNING records are
    expected; CRITICAL means an internal thread failed.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: Counter[str] = Counter()
        self.critical: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] += 1
        if record.levelno >= logging.CRITICAL:
            self.critical.append(f"{record.name}: {record.getMessage()}")


class GcPauses:
    """Records the longest pause of the cyclic garbage collector."""

    def __init__(self) -> None:
        self.began = 0.0
        self.longest = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.began = time.perf_counter()
        else:
            self.longest = max(self.longest, time.perf_counter() - self.began)


def run_solo(seconds: float, seed: int) -> int:
    """Run the single-process soak; print a summary and return the exit status."""
    gc_pauses = GcPauses()
    gc.callbacks.append(gc_pauses)

    # The workers fail on purpose, so Stagehand's logs are counted, not printed.
    log_counter = LogCounter()
    stagehand_logger = logging.getLogger("stagehand")
    stagehand_logger.addHandler(log_counter)
    stagehand_logger.setLevel(logging.INFO)
    stagehand_logger.propagate = False

    instance = stagehand.Stagehand(
        name=f"soak-{secrets.token_hex(4)}",
        queues=dict(QUEUES),
        retention_limit=200,
        retention_period=1.0,
        shutdown_grace_period=5,
    )
    handler_id = f"soak-{id(LEDGER)}"
    events.attach(handler_id, ["job.start", "job.stop"], LEDGER.on_event)
    instance.start()
    run = SoloRun(seconds, seed, instance)
    threads = [
        threading.Thread(
            target=_insert_loop, args=(run, index), name=f"soak-insert-{index}"
        )
        for index in range(4)
    ]
    threads.append(threading.Thread(target=_chaos_loop, args=(run,), name="soak-chaos"))
    try:
        for thread in threads:
            thread.start()
        run.stop_inserting.wait(seconds)
        run.stop_inserting.set()
        for thread in threads:
            thread.join(DEADLINE)

        # Every job left must now run to its end.
        violations = list(run.errors)
        for name, limit in QUEUES.items():
            instance.resume_queue(name)
            instance.scale_queue(name, limit)
        violations += _wait_until_settled(instance)
        violations += _check_queues_empty(instance)
        RELEASE.set()
        violations += _wait_no_stuck(instance)
        for job_id in LEDGER.drained:
            if instance.get_job(job_id) is not None:
                violations.append(f"job {job_id}: drained, but get_job still finds it")
    finally:
        RELEASE.set()
        instance.stop()
        events.detach(handler_id)

    violations += LEDGER.live_violations
    violations += [f"CRITICAL log record: {line}" for line in log_counter.critical]
    violations += check_solo()
    gc.callbacks.remove(gc_pauses)
    return _summarize_solo(seconds, seed, violations, log_counter, gc_pauses)


def _wait_until_settled(instance: stagehand.Stagehand) -> list[str]:
    # Waits on job.stop events until every inserted job is final or drained.
    deadline = time.monotonic() + DEADLINE
    with LEDGER.changed:
        pending = [
            record.job
            for job_id, record in LEDGER.inserted.items()
            if job_id not in LEDGER.drained
        ]
    while True:
        pending = [
            job
            for job in pending
            if job.state not in FINAL and job.id not in LEDGER.drained
        ]
        if not pending:
            return []
        left = deadline - time.monotonic()
        if left <= 0:
            return [
                f"job {job.id}: still {job.state.value} {DEADLINE:g} s after the "
                f"inserts stopped (attempt {job.attempt}, queue {job.queue}, "
                f"check_queue {instance.check_queue(job.queue)})"
                for job in pending[:50]
            ] + ([f"... and {len(pending) - 50} more"] if len(pending) > 50 else [])
        with LEDGER.changed:
            # Snoozes and retries end without an event in the soak's own
            # threads, so the wait is bounded as well as woken.
            LEDGER.changed.wait(min(left, 0.1))


def _check_queues_empty(instance: stagehand.Stagehand) -> list[str]:
    violations = []
    for name in QUEUES:
        stats = instance.check_queue(name)
        for key in ("available", "scheduled", "retryable", "executing"):
            if stats[key] != 0:
                violations.append(
                    f"check_queue({name!r}) shows {key}={stats[key]} after every "
                    f"job finished: {stats}"
                )
    return violations


def _wait_no_stuck(instance: stagehand.Stagehand) -> list[str]:
    # Threads past their timeout return once RELEASE is set, and stop
    # counting as stuck.
    deadline = time.monotonic() + 10
    while True:
        stuck = {name: instance.check_queue(name)["stuck"] for name in QUEUES}
        if not any(stuck.values()):
            return []
        if time.monotonic() > deadline:
            return [
                f"threads still counted stuck 10 s after their waits returned: {stuck}"
            ]
        # Polls, because no event reports that a stuck thread returned.
        time.sleep(0.01)


def check_solo() -> list[str]:
    """Check every job of the ledger; return the violations found."""
    violations: list[str] = []
    for job_id, conflict_key in LEDGER.conflicts:
        if job_id not in LEDGER.inserted and job_id not in LEDGER.drained:
            violations.append(
                f"job {job_id}: a conflict copy (key {conflict_key}) names a job "
                "that no insert returned"
            )
    for job_id, record in LEDGER.inserted.items():
        violations += _check_job(job_id, record)
    violations += _check_unique_overlaps()
    return violations


def _check_job(job_id: str, record: Inserted) -> list[str]:
    job = record.job
    attempts = sorted(LEDGER.attempts.get(job_id, []), key=lambda a: a.start_seq)
    numbers = [attempt.number for attempt in attempts]
    found: list[str] = []

    def flag(message: str) -> None:
        found.append(
            f"job {job_id} ({job.worker.rsplit('.', 1)[-1]}, plan {record.plan}): {message}"
        )

    drained = LEDGER.drained.get(job_id)
    if drained is not None:
        seq, drained_job = drained
        if drained_job is not job:
            flag("drain_queue returned another object with this id")
        late = [a.number for a in attempts if a.start_seq > seq]
        if late:
            flag(f"attempts {late} started after drain_queue returned the job")
        if job.state is not JobState.AVAILABLE:
            flag(f"drained, but its state is {job.state.value}")
    elif job.state not in FINAL:
        flag(f"ended in state {job.state.value}, neither final nor drained")
    if sorted(numbers) != list(range(1, job.attempt + 1)):
        flag(
            f"attempt numbers run were {sorted(numbers)}; job.attempt is {job.attempt}"
        )
    if LEDGER.starts[job_id] != len(attempts):
        flag(f"{LEDGER.starts[job_id]} job.start events for {len(attempts)} attempts")
    stops = LEDGER.stops.get(job_id, [])
    attempt_stops = [stop for stop in stops if not stop[2]]
    if len(attempt_stops) != len(attempts):
        flag(
            f"{len(attempt_stops)} job.stop events from attempts for {len(attempts)} attempts"
        )
    if job.state in FINAL and job.state.value not in {state for _, state, _ in stops}:
        flag(
            f"final state {job.state.value} but its job.stop events show {[s for _, s, _ in stops]}"
        )
    for cancel_seq, attempt_then in LEDGER.api_cancels.get(job_id, []):
        retried = any(seq > cancel_seq for seq in LEDGER.retries.get(job_id, []))
        late = [a.number for a in attempts if a.start_seq > cancel_seq]
        if late and not retried:
            flag(
                f"attempts {late} started after cancel_job cancelled it at attempt "
                f"{attempt_then}, with no retry_job since"
            )
    outcomes = {
        a.number: ("timeout" if _timed_out(job, a.number) else a.outcome)
        for a in attempts
    }
    last = outcomes.get(job.attempt)
    if job.state is JobState.COMPLETED and last not in ("complete",):
        flag(f"completed, but its last attempt {job.attempt} ended as {last}")
    if job.state is JobState.DISCARDED and last not in FAILS:
        flag(f"discarded, but its last attempt {job.attempt} ended as {last}")
    for number, outcome in outcomes.items():
        if outcome == "slow-returned":
            flag(
                f"attempt {number} blocked {SLOW_WAIT} s past a {TIMEOUT} s timeout and was not timed out"
            )
        if outcome is None:
            flag(f"attempt {number} never returned and did not time out")
    touched = (
        job_id in LEDGER.cancel_calls or job_id in LEDGER.retries or drained is not None
    )
    # An attempt that missed its timeout is reported above already.
    if not touched and job.state in FINAL and "slow-returned" not in outcomes.values():
        found += [
            f"job {job_id}: {problem}"
            for problem in _replay(
                record, [outcomes.get(n) for n in range(1, job.attempt + 1)]
            )
        ]
    return found


def _replay(record: Inserted, outcomes: list[str | None]) -> list[str]:
    # Replays the rules of docs/guide.md ("Outcomes and states") over the
    # outcomes the attempts had, for a job no control call touched.
    job = record.job
    max_attempts = record.max_attempts
    expected: JobState | None = None
    for number, outcome in enumerate(outcomes, start=1):
        if expected is not None:
            return [
                f"attempt {number} ran after the job should have ended as {expected.value}"
            ]
        if outcome == "snooze":
            max_attempts += 1
        elif outcome == "complete":
            expected = JobState.COMPLETED
        elif outcome == "cancel":
            expected = JobState.CANCELLED
        elif outcome in FAILS and number >= max_attempts:
            expected = JobState.DISCARDED
    problems = []
    if expected is not None and job.state is not expected:
        problems.append(
            f"outcomes {outcomes} with max_attempts {record.max_attempts} should end "
            f"{expected.value}, but it is {job.state.value}"
        )
    if expected is None:
        problems.append(
            f"outcomes {outcomes} with max_attempts {record.max_attempts} leave it "
            f"waiting, but it is {job.state.value}"
        )
    if job.max_attempts != max_attempts:
        problems.append(
            f"max_attempts is {job.max_attempts}; {record.max_attempts} plus one per "
            f"snooze in {outcomes} is {max_attempts} (state {job.state.value}, "
            f"errors {[entry['error'][:60] for entry in job.errors]})"
        )
    return problems


def _check_unique_overlaps() -> list[str]:
    # Two unique jobs of one key may both be inserted only if the first had
    # ended (or was drained, or retried) before the second insert began.
    by_key: dict[int, list[tuple[str, Inserted]]] = defaultdict(list)
    for job_id, record in LEDGER.inserted.items():
        if record.unique_key is not None:
            by_key[record.unique_key].append((job_id, record))
    violations = []
    for key, records in by_key.items():
        records.sort(key=lambda item: item[1].call_started)
        for (first_id, first), (second_id, second) in itertools.pairwise(records):
            if first_id in LEDGER.drained or first_id in LEDGER.retries:
                continue
            ended = first.job.completed_at
            if first.call_ended < second.call_started and (
                ended is None or ended.timestamp() > second.call_ended
            ):
                violations.append(
                    f"unique key {key}: job {second_id} was inserted while job "
                    f"{first_id} ({first.job.state.value}) still blocked it"
                )
    return violations


def _summarize_solo(
    seconds: float,
    seed: int,
    violations: list[str],
    log_counter: LogCounter,
    gc_pauses: GcPauses,
) -> int:
    attempts = sum(len(items) for items in LEDGER.attempts.values())
    states = Counter(record.job.state.value for record in LEDGER.inserted.values())
    drained = len(LEDGER.drained)
    print(f"soak: single process, {seconds:g} s, seed {seed}")
    print(
        f"  jobs inserted {len(LEDGER.inserted)}, unique conflicts "
        f"{len(LEDGER.conflicts)}, attempts {attempts}, drained {drained}"
    )
    print(f"  final states: {dict(sorted(states.items()))}")
    print(f"  control calls: {dict(sorted(LEDGER.control_calls.items()))}")
    print(f"  log records by level: {dict(sorted(log_counter.counts.items()))}")
    print(f"  longest garbage collection pause: {gc_pauses.longest:.3f} s")
    return _print_violations(violations)


def _print_violations(violations: list[str]) -> int:
    print(f"  violations: {len(violations)}")
    for line in violations[:200]:
        print(f"    {line}")
    if len(violations) > 200:
        print(f"    ... and {len(violations) - 200} more")
    return 1 if violations else 0


# ---------------------------------------------------------------------------
# Cluster mode: the peers


class ClusterWorker(Worker):
    """Records each attempt in this peer's JSON-lines file, then completes."""

    queue = "a"
    max_attempts = 1

    def perform(self, job: Job) -> None:
        pause = job.args.get("pause", 0.0)
        if pause:
            time.sleep(pause)  # stands for the job's work
        PEER_LOG.write(
            {
                "kind": "run",
                "id": job.id,
                "attempt": job.attempt,
                "pid": os.getpid(),
                "key": job.args.get("key"),
                "at": time.time(),
            }
        )


class JsonLines:
    """An append-only JSON-lines file shared by the threads of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._file: Any = None

    def open(self, path: Path) -> None:
        self._file = path.open("a", buffering=1, encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


PEER_LOG = JsonLines()
CLUSTER_QUEUES = {"a": 3, "b": 2}
CLUSTER_UNIQUE = {
    "period": UNIQUE_PERIOD,
    "fields": ["args"],
    "keys": ["key"],
    # Completed jobs block too, so a key runs once in the whole run.
    "states": ["available", "scheduled", "executing", "retryable", "completed"],
}


def run_peer(args: argparse.Namespace) -> int:
    """Run one peer: insert until the parent sends a command, then stop gracefully."""
    out = Path(args.out)
    label = f"peer{args.index}-gen{args.generation}"
    logging.basicConfig(
        filename=out / f"{label}.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    PEER_LOG.open(out / f"{label}.jsonl")

    ports = [int(port) for port in args.ports.split(",")]
    instance = stagehand.Stagehand(
        name=label,
        queues=dict(CLUSTER_QUEUES),
        shutdown_grace_period=10,
        cluster={
            "name": args.cluster_name,
            "secret": os.environ["SOAK_CLUSTER_SECRET"],
            "discovery": [f"127.0.0.1:{port}" for port in ports],
            "bind": f"127.0.0.1:{ports[args.index]}",
            "join_timeout": 5,
            "request_timeout": 5,
        },
    )
    instance.start()

    stop_inserting = threading.Event()
    seed = args.seed * 10_000 + args.index * 100 + args.generation
    inserter = threading.Thread(
        target=_peer_insert_loop,
        args=(instance, seed, stop_inserting),
        name="soak-insert",
    )
    inserter.start()
    print(f"ready {instance.check_cluster()['peer']}", flush=True)  # type: ignore[index]

    # Commands from the parent, one per line.
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "quiet":
                stop_inserting.set()
                inserter.join()
                print("quiet", flush=True)
            elif command == "stop":
                break
            elif command == "finish":
                stop_inserting.set()
                inserter.join()
                _wait_idle(instance)
                break
    finally:
        stop_inserting.set()
        inserter.join()
        instance.stop()
        PEER_LOG.close()
    print("stopped", flush=True)
    return 0


def _peer_insert_loop(
    instance: stagehand.Stagehand, seed: int, stop_inserting: threading.Event
) -> None:
    rng = random.Random(seed)
    while not stop_inserting.is_set():
        roll = rng.random()
        jobs = [
            _cluster_job(rng) for _ in range(rng.randint(2, 6) if roll < 0.25 else 1)
        ]
        try:
            if len(jobs) > 1:
                results = instance.insert_all(jobs)
            else:
                results = [instance.insert(jobs[0])]
        except ShuttingDown:
            # insert_all() may have inserted some jobs before it raised;
            # they have ids. A single insert that raised inserted nothing.
            results = (
                [job for job in jobs if job.id is not None] if len(jobs) > 1 else []
            )
            for result in results:
                _record_peer_insert(result)
            return
        except StagehandError as error:
            # A routed unique insert whose owner did not reply may have
            # been inserted there.
            for job in jobs:
                if job.id is None:
                    PEER_LOG.write(
                        {
                            "kind": "doubt",
                            "key": job.args.get("key"),
                            "error": str(error),
                        }
                    )
                else:
                    _record_peer_insert(job)
            continue
        for result in results:
            _record_peer_insert(result)
        stop_inserting.wait(rng.uniform(0.002, 0.01))


def _cluster_job(rng: random.Random) -> Job:
    args: dict[str, Any] = {"pause": rng.choice([0.0, 0.0, 0.001, 0.005, 0.02])}
    options: dict[str, Any] = {
        "queue": rng.choice(list(CLUSTER_QUEUES)),
        "priority": rng.randrange(10),
    }
    if rng.random() < 0.3:
        options["schedule_in"] = rng.uniform(0, 0.5)
    if rng.random() < 0.4:
        args["key"] = rng.randrange(2000)
        options["unique"] = CLUSTER_UNIQUE
    return ClusterWorker.new(args, **options)


def _record_peer_insert(job: Job) -> None:
    PEER_LOG.write(
        {
            "kind": "insert",
            "id": job.id,
            "key": job.args.get("key"),
            "conflict": job.conflict,
            "pid": os.getpid(),
        }
    )


def _wait_idle(instance: stagehand.Stagehand) -> None:
    # The last peer runs every job before it stops.
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        counts = [instance.check_queue(name) for name in CLUSTER_QUEUES]
        if all(
            stats[key] == 0
            for stats in counts
            for key in ("available", "scheduled", "retryable", "executing")
        ):
            return
        # Polls, because no event reports that a peer's queues are empty.
        time.sleep(0.05)
    logging.getLogger("bench.soak").error(
        "queues still busy after %g s: %s", DEADLINE, counts
    )


# ---------------------------------------------------------------------------
# Cluster mode: the parent


class Peer:
    """One peer's child process and its generation (restart count)."""

    def __init__(
        self, index: int, generation: int, command: list[str], env: dict[str, str]
    ):
        self.index = index
        self.generation = generation
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.peer_id = self._expect("ready", 60).split()[1]

    def _expect(self, word: str, timeout: float) -> str:
        assert self.process.stdout is not None
        result: list[str] = []
        reader = threading.Thread(
            target=lambda: result.append(self.process.stdout.readline())
        )  # type: ignore[union-attr]
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        line = result[0] if result else ""
        if not line.startswith(word):
            raise RuntimeError(
                f"peer {self.index} (generation {self.generation}) did not report "
                f"{word!r} within {timeout:g} s; got {line!r}, exit status "
                f"{self.process.poll()}"
            )
        return line

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def quiet(self) -> None:
        self.send("quiet")
        self._expect("quiet", DEADLINE)

    def stop(self, command: str = "stop") -> None:
        self.send(command)
        self._expect("stopped", DEADLINE)
        self.process.wait(DEADLINE)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def run_cluster(seconds: float, seed: int, out: Path | None = None) -> int:
    """Run the three-peer soak; print a summary and return the exit status."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="stagehand-soak-") as scratch:
        folder = out or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        ports = _free_ports(3)
        env = dict(os.environ, SOAK_CLUSTER_SECRET=secrets.token_urlsafe(24)[:32])
        cluster_name = f"soak-{secrets.token_hex(4)}"
        root = Path(__file__).resolve().parent.parent
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(root), env.get("PYTHONPATH")])
        )

        def command(index: int, generation: int) -> list[str]:
            return [
                sys.executable, "-m", "bench.soak", "--peer",
                "--index", str(index), "--generation", str(generation),
                "--ports", ",".join(map(str, ports)), "--cluster-name", cluster_name,
                "--seed", str(seed), "--out", str(folder),
            ]  # fmt: skip

        peers: list[Peer] = []
        restarts: list[str] = []
        try:
            for index in range(3):
                peers.append(Peer(index, 0, command(index, 0), env))
            count = max(2, int(seconds // 6))
            started = time.monotonic()
            pause = threading.Event()
            for number in range(count):
                pause.wait(
                    max(
                        0.0,
                        started
                        + seconds * (number + 1) / (count + 1)
                        - time.monotonic(),
                    )
                )
                index = rng.randrange(3)
                old = peers[index]
                old.stop()
                peers[index] = Peer(
                    index, old.generation + 1, command(index, old.generation + 1), env
                )
                restarts.append(
                    f"peer {index}: {old.peer_id} -> {peers[index].peer_id}"
                )
            pause.wait(max(0.0, started + seconds - time.monotonic()))
            for peer in peers:
                peer.quiet()
            peers[0].stop()
            peers[1].stop()
            peers[2].stop("finish")
        finally:
            for peer in peers:
                peer.kill()
        return _check_cluster_files(folder, seconds, seed, restarts)


_IDS_LOST = re.compile(r"may be lost.*ids \[([^\]]*)\]")
_ONE_LOST = re.compile(r"(?:no peer took job|job) (\S+) (?:; it is lost|is too large)")
_COUNT_LOST = re.compile(
    r"(\d+) jobs could not be handed|stopped with (\d+) available and (\d+) scheduled"
)


def _check_cluster_files(
    folder: Path, seconds: float, seed: int, restarts: list[str]
) -> int:
    # The peers' records: inserts, conflicts, inserts in doubt and runs.
    inserted: dict[str, dict[str, Any]] = {}
    conflicts: list[dict[str, Any]] = []
    doubts: list[dict[str, Any]] = []
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            record["peer"] = path.stem  # such as peer1-gen0
            if record["kind"] == "run":
                runs[record["id"]].append(record)
            elif record["kind"] == "doubt":
                doubts.append(record)
            elif record["conflict"]:
                conflicts.append(record)
            else:
                inserted[record["id"]] = record

    # The peers' logs: jobs given up by a hand-over, and error lines.
    given_up: set[str] = set()
    counted_lost = 0
    log_errors: list[str] = []
    for path in sorted(folder.glob("*.log")):
        for line in path.read_text(encoding="utf-8").splitlines():
            match = _IDS_LOST.search(line)
            if match:
                given_up.update(
                    part.strip(" '\"") for part in match.group(1).split(",")
                )
            match = _ONE_LOST.search(line)
            if match:
                given_up.add(match.group(1))
            match = _COUNT_LOST.search(line)
            if match:
                counted_lost += sum(int(group) for group in match.groups() if group)
            if " ERROR " in line or " CRITICAL " in line:
                log_errors.append(f"{path.name}: {line}")

    # Each job ran once, with attempt 1, and only if an insert returned it.
    violations: list[str] = []
    doubted_keys = {record["key"] for record in doubts}
    for job_id, record in inserted.items():
        count = len(runs.get(job_id, []))
        if count == 0 and job_id not in given_up:
            violations.append(
                f"job {job_id} (key {record['key']}, inserted by pid {record['pid']}): never ran"
            )
        elif count > 1:
            pids = [run["pid"] for run in runs[job_id]]
            violations.append(f"job {job_id}: ran {count} times, in pids {pids}")
    for job_id, records in runs.items():
        attempts = [run["attempt"] for run in records]
        if attempts != [1] * len(attempts):
            violations.append(
                f"job {job_id}: ran with attempt numbers {attempts}; its worker always completes"
            )
        if job_id not in inserted and records[0]["key"] not in doubted_keys:
            violations.append(
                f"job {job_id}: ran in pid {records[0]['pid']}, but no insert returned it"
            )

    # No unique key ran as two jobs.
    by_key: dict[int, set[str]] = defaultdict(set)
    for job_id, records in runs.items():
        key = records[0]["key"]
        if key is not None:
            by_key[key].add(job_id)
    first_run = min(
        (run["at"] for records in runs.values() for run in records), default=0.0
    )
    twice = 0
    for key, job_ids in sorted(by_key.items()):
        if len(job_ids) > 1:
            twice += 1
            where = [
                f"{job_id} inserted by {inserted.get(job_id, {}).get('peer', '?')}, ran on "
                f"{runs[job_id][0]['peer']} at {runs[job_id][0]['at'] - first_run:.2f} s"
                for job_id in sorted(job_ids, key=lambda job_id: runs[job_id][0]["at"])
            ]
            violations.append(
                f"unique key {key}: ran as {len(job_ids)} jobs within its period: {'; '.join(where)}"
            )

    # Each conflict copy names a job that exists.
    for record in conflicts:
        if record["id"] not in inserted and record["id"] not in runs:
            violations.append(
                f"conflict copy of key {record['key']} names job {record['id']}, which nobody inserted"
            )

    total_runs = sum(len(records) for records in runs.values())
    print(f"soak: cluster of 3 peers, {seconds:g} s, seed {seed}")
    print(f"  restarts: {restarts}")
    print(
        f"  jobs inserted {len(inserted)}, unique conflicts {len(conflicts)}, "
        f"inserts in doubt {len(doubts)}, runs {total_runs}"
    )
    print(
        f"  given up by hand-over (logged by id) {len(given_up)}, of which ran "
        f"{sum(1 for job_id in given_up if job_id in runs)}; lost by count in logs {counted_lost}"
    )
    if log_errors:
        print(f"  ERROR log lines: {len(log_errors)}")
        for line in log_errors[:20]:
            print(f"    {line}")
    # docs/cluster.md lists windows around joins and leaves in which a
    # duplicate unique job is not caught; this count shows how often.
    print(f"  unique keys that ran as two jobs: {twice}")
    return _print_violations(violations)


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="seconds of inserting (default 60)"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the random choices (default 1)"
    )
    parser.add_argument(
        "--cluster", action="store_true", help="run three peers in child processes"
    )
    parser.add_argument(
        "--out", help="folder for the cluster mode's files (default: a temporary one)"
    )
    # Used by the cluster mode for its child processes.
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--generation", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--cluster-name", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:
        return run_peer(args)
    if args.cluster:
        return run_cluster(
            args.seconds, args.seed, Path(args.out) if args.out else None
        )
    return run_solo(args.seconds, args.seed)


if __name__ == "__main__":
    # Runs the copy imported as bench.soak, so that the worker classes have
    # the dotted path that other peers resolve.
    from bench import soak

    sys.exit(soak.main())

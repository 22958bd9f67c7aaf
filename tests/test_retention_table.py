"""The table of finished jobs behind get_job, jobs() and retry_job.

The tests move a hand-set timer in place of the clock, so expiry is
exact. The instance-level behaviour (retention_limit, retention_period) is
covered in test_inspection.py.
"""

from __future__ import annotations

import threading

from workers import EchoWorker

from stagehand import Job
from stagehand._retention import Retention

PERIOD = 60.0


class Timer:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _job(number: int) -> Job:
    job = EchoWorker.new({"value": number})
    job.id = f"job-{number}"
    return job


def _table(limit: int = 100) -> tuple[Retention, Timer]:
    timer = Timer()
    return Retention(PERIOD, limit, timer), timer


def test_jobs_in_order_added() -> None:
    table, _ = _table()
    jobs = [_job(n) for n in range(5)]
    for job in jobs:
        table.add(job)
    assert table.jobs() == jobs
    assert table.get("job-3") is jobs[3]
    assert len(table) == 5


def test_limit_drops_oldest() -> None:
    table, _ = _table(limit=3)
    jobs = [_job(n) for n in range(10)]
    for job in jobs:
        table.add(job)
    assert table.jobs() == jobs[-3:]
    assert len(table) == 3
    assert table.get("job-0") is None


def test_period_expires_oldest() -> None:
    table, timer = _table()
    table.add(_job(1))
    timer.now += 30
    table.add(_job(2))
    timer.now += 30
    assert [job.id for job in table.jobs()] == ["job-2"]
    timer.now += 30
    assert table.jobs() == []
    assert len(table) == 0


def test_pop_removes_job() -> None:
    table, _ = _table()
    jobs = [_job(n) for n in range(4)]
    for job in jobs:
        table.add(job)
    assert table.pop("job-1") is jobs[1]
    assert table.pop("job-1") is None
    assert table.get("job-1") is None
    assert table.jobs() == [jobs[0], jobs[2], jobs[3]]


def test_pop_unknown_id() -> None:
    table, _ = _table()
    table.add(_job(1))
    assert table.pop("job-9") is None
    assert len(table) == 1


def test_readded_job_expires_from_second_add() -> None:
    # A retried job leaves through pop() and comes back when it finishes
    # again. It expires a period after the second add, not the first.
    table, timer = _table()
    first = _job(1)
    table.add(first)
    table.add(_job(2))
    timer.now += 40
    table.pop("job-1")
    table.add(first)
    timer.now += 30
    assert table.jobs() == [first]
    timer.now += 30
    assert table.jobs() == []


def test_readded_job_counts_once_for_limit() -> None:
    table, _ = _table(limit=2)
    first = _job(1)
    second = _job(2)
    table.add(first)
    table.add(second)
    table.pop("job-1")
    table.add(first)
    assert table.jobs() == [second, first]
    table.add(_job(3))
    assert [job.id for job in table.jobs()] == ["job-1", "job-3"]


def test_zero_limit_keeps_nothing() -> None:
    table, _ = _table(limit=0)
    table.add(_job(1))
    assert table.jobs() == []
    assert table.get("job-1") is None


def test_clear_empties_table() -> None:
    table, _ = _table()
    table.add(_job(1))
    table.clear()
    assert table.jobs() == []
    assert table.pop("job-1") is None


def test_adds_from_threads_keep_each_job() -> None:
    # Worker threads add without the lock. Each add stores the job and
    # appends its expiry and the job in one step, so none is lost or
    # split from its expiry.
    threads_count = 4
    per_thread = 5000
    table, _ = _table(limit=threads_count * per_thread)
    start = threading.Barrier(threads_count)

    def add_many(first: int) -> None:
        start.wait()
        for number in range(first, first + per_thread):
            table.add(_job(number))

    threads = [
        threading.Thread(target=add_many, args=(index * per_thread,))
        for index in range(threads_count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    jobs = table.jobs()
    order = list(table._order)
    assert all(isinstance(value, float) for value in order[0::2])
    assert all(isinstance(value, Job) for value in order[1::2])
    assert len(jobs) == threads_count * per_thread
    assert len({job.id for job in jobs}) == threads_count * per_thread
    assert table.pop("job-7") is not None
    assert len(table) == threads_count * per_thread - 1

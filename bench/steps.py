"""Time the steps of one Stagehand job, and the bare pool at 1, 2 and 8 threads.

Run from the repository root: ``python3 -m bench.steps``. It prints the
figures behind docs/performance.md. Nothing here fails on a slow result.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import threading
import timeit
from time import perf_counter
from typing import Any

import stagehand
from bench.systems.heap_pool import HeapPool
from bench.systems.stagehand_runner import NoopWorker
from bench.track import TRACKER, perform
from stagehand import JobState, _options
from stagehand._job import Job, new_job_id

CALLS = 200_000
JOBS = 100_000
POOL_JOBS = 20_000
BULK = 20_000


def per_call(statement: str, names: dict[str, Any], calls: int = CALLS) -> float:
    """Return the microseconds one run of ``statement`` takes."""
    return timeit.timeit(statement, number=calls, globals=names) / calls * 1e6


def step_table() -> None:
    instance = stagehand.Stagehand(name="steps", queues={"default": 1}).start()
    instance.pause_queue("default")
    args = {"i": 1}
    names: dict[str, Any] = {
        "NoopWorker": NoopWorker,
        "Job": Job,
        "args": args,
        "normalize": _options.normalize_json_dict,
        "new_job_id": new_job_id,
        "instance": instance,
    }
    rows = [
        ("Worker.new(args)", "NoopWorker.new(args)"),
        (
            "  the Job record",
            "Job._for_worker('w', args, 'default', (), 0, 20, None, NoopWorker)",
        ),
        ("  checking and copying args", "normalize(args, 'args')"),
        ("new_job_id()", "new_job_id()"),
        ("clock.now()", "instance.clock.now()"),
    ]
    print(f"One thread, {CALLS:,} calls each (microseconds per call)")
    for label, statement in rows:
        print(f"  {label:34s} {per_call(statement, names):6.2f}")
    jobs = iter([NoopWorker.new(args) for _ in range(CALLS)])
    names["jobs"] = jobs
    inserted = per_call("instance.insert(next(jobs))", names)
    print(f"  {'insert(job) into a paused queue':34s} {inserted:6.2f}")
    print(f"  {'insert_all(jobs), per job':34s} {_bulk_insert(instance):6.2f}")
    instance.stop()

    for collect in (True, False):
        label = f"one attempt, cyclic GC {'on' if collect else 'off'}"
        print(f"  {label:34s} {_run_attempts(collect):6.2f}")


def _bulk_insert(instance: stagehand.Stagehand, batches: int = 10) -> float:
    # Batches of the size B3 inserts, built before the clock starts, into
    # the paused queue; the fastest batch counts, as timeit's repeats would.
    best = math.inf
    for _ in range(batches):
        batch = [NoopWorker.new({"i": i}) for i in range(BULK)]
        began = perf_counter()
        instance.insert_all(batch)
        best = min(best, perf_counter() - began)
        instance.drain_queue("default")
    return best / BULK * 1e6


def _run_attempts(collect: bool) -> float:
    # Runs each job's attempt in this thread through the executor, the way a
    # worker thread does after taking it.
    instance = stagehand.Stagehand(name=f"attempts-{collect}", queues={"default": 1})
    instance.start()
    instance.pause_queue("default")
    jobs = [instance.insert(NoopWorker.new({"i": i})) for i in range(JOBS)]
    queue = instance._queues["default"]
    me = threading.get_ident()
    for job in jobs:
        queue.remove(job)
        # A worker thread claims the job before it marks it executing.
        job._claim = [me]
        job.state = JobState.EXECUTING
    TRACKER.reset(JOBS)
    run = instance._executor.run
    if not collect:
        gc.disable()
    began = perf_counter()
    for job in jobs:
        run(job, queue)
    elapsed = perf_counter() - began
    gc.enable()
    instance.stop()
    return elapsed / JOBS * 1e6


_push_times: list[float] = []


def pool_table() -> None:
    print(
        f"\nBare heap pool: {POOL_JOBS:,} jobs pushed at once, then run "
        "(microseconds per job to run them)"
    )
    for workers, interval in ((1, None), (2, None), (8, None), (8, 0.05)):
        label = f"{workers} thread(s)"
        if interval is not None:
            label += f", switch interval {interval} s"
        print(f"  {label:34s} {_pool_run(workers, interval):6.2f}")
    print(f"  {'push, per job (the bulk push)':34s} {min(_push_times):6.2f}")


def _pool_run(workers: int, interval: float | None) -> float:
    old_interval = sys.getswitchinterval()
    if interval is not None:
        sys.setswitchinterval(interval)
    pool = HeapPool(workers)
    pool.start()
    TRACKER.reset(POOL_JOBS)
    batch = [{"i": i} for i in range(POOL_JOBS)]
    began = perf_counter()
    pool.push_many(perform, batch)
    pushed = perf_counter()
    _push_times.append((pushed - began) / POOL_JOBS * 1e6)
    TRACKER.wait(120)
    pool.stop()
    sys.setswitchinterval(old_interval)
    return (TRACKER.finished_at - pushed) / POOL_JOBS * 1e6


def main() -> None:
    # The paused instances stop with jobs queued; that warning is expected.
    logging.getLogger("stagehand").setLevel(logging.ERROR)
    print(f"Python {sys.version.split()[0]}, {threading.active_count()} thread(s)")
    step_table()
    pool_table()


if __name__ == "__main__":
    main()

"""The benchmark procedures B1 to B8, run inside a child process.

Each function takes a constructed, unstarted :class:`~bench.systems.System`
and the run's :class:`Params`, starts the system, measures, and returns the
figures. The child process then calls ``stop()`` with a short time limit.
"""

from __future__ import annotations

import gc
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter, process_time
from typing import Any

from bench.systems.base import System, Unsupported
from bench.track import TRACKER

Figures = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Params:
    """Settings of one measurement, with durations in seconds."""

    jobs: int = 20_000
    workers: int = 8
    producers: int = 4
    rate: float = 500.0
    seconds: float = 4.0
    delay: int = 2
    cpu_iterations: int = 0
    routed: int = 5_000
    timeout: float = 240.0
    options: dict[str, Any] = field(default_factory=dict)


def warm_up(system: System, count: int) -> None:
    """Run ``count`` no-op jobs so lazy thread and import costs are paid."""
    TRACKER.reset(count)
    for i in range(count):
        system.insert({"i": i})
    TRACKER.wait(60)


def b1_throughput(system: System, params: Params) -> Figures:
    """Insert jobs one by one from one thread and time them to the last finish."""
    system.start()
    warm_up(system, params.workers * 4)
    TRACKER.reset(params.jobs, params.cpu_iterations)

    began = perf_counter()
    for i in range(params.jobs):
        system.insert({"i": i})
    inserted = perf_counter()
    TRACKER.wait(params.timeout)

    elapsed = TRACKER.finished_at - began
    return {"jobs_per_s": params.jobs / elapsed, "insert_s": inserted - began}


def b2_producers(system: System, params: Params) -> Figures:
    """Insert jobs from ``params.producers`` threads at once."""
    system.start()
    warm_up(system, params.workers * 4)
    TRACKER.reset(params.jobs)
    barrier = threading.Barrier(params.producers)
    first_inserts = [0.0] * params.producers

    def produce(index: int) -> None:
        barrier.wait()
        first_inserts[index] = perf_counter()
        for i in range(index, params.jobs, params.producers):
            system.insert({"i": i})

    threads = [
        threading.Thread(target=produce, args=(n,)) for n in range(params.producers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    TRACKER.wait(params.timeout)

    elapsed = TRACKER.finished_at - min(first_inserts)
    return {"jobs_per_s": params.jobs / elapsed}


def b3_bulk(system: System, params: Params) -> Figures:
    """Insert all jobs with one bulk call and time them to the last finish."""
    system.start()
    warm_up(system, params.workers * 4)
    batch = [{"i": i} for i in range(params.jobs)]
    TRACKER.reset(params.jobs)

    began = perf_counter()
    system.insert_all(batch)
    inserted = perf_counter()
    TRACKER.wait(params.timeout)

    elapsed = TRACKER.finished_at - began
    return {"jobs_per_s": params.jobs / elapsed, "insert_s": inserted - began}


def b4_latency(system: System, params: Params) -> Figures:
    """Insert at a steady rate and measure insert-to-start latency."""
    system.start()
    warm_up(system, params.workers * 4)
    count = int(params.rate * params.seconds)
    sent = [0.0] * count
    TRACKER.reset(count)

    began = perf_counter()
    for i in range(count):
        pause = began + i / params.rate - perf_counter()
        if pause > 0:
            time.sleep(pause)
        sent[i] = perf_counter()
        system.insert({"i": i})
    TRACKER.wait(params.timeout)

    latencies = sorted(
        (start - at) * 1e6 for start, at in zip(TRACKER.starts, sent, strict=True)
    )
    return {
        "p50_us": percentile(latencies, 0.50),
        "p99_us": percentile(latencies, 0.99),
        "max_us": latencies[-1],
    }


def b5_memory(system: System, params: Params) -> Figures:
    """Queue jobs that do not run and measure the memory each one takes."""
    system.start_paused()
    gc.collect()
    rss_before = resident_bytes()
    outside_before = system.queued_bytes()

    for i in range(params.jobs):
        system.insert({"id": i, "email": "user@example.com"})

    gc.collect()
    outside_after = system.queued_bytes()
    if outside_before is None or outside_after is None:
        growth = resident_bytes() - rss_before
        return {"bytes_per_job": growth / params.jobs}
    growth = outside_after - outside_before
    note = "growth of redis-server's used_memory: the jobs are stored in Redis"
    return {"bytes_per_job": growth / params.jobs, "notes": {"bytes_per_job": note}}


def b6_scheduled(system: System, params: Params) -> Figures:
    """Schedule jobs ``params.delay`` s ahead and measure lateness and CPU."""
    system.start()
    warm_up(system, params.workers * 4)
    due = [0.0] * params.jobs
    TRACKER.reset(params.jobs)

    began = perf_counter()
    for i in range(params.jobs):
        due[i] = perf_counter() + params.delay
        system.insert_in({"i": i}, params.delay)
    inserted = perf_counter()
    cpu_before = process_time()
    TRACKER.first_started.wait(params.timeout)
    waited_cpu = process_time() - cpu_before
    waited = perf_counter() - inserted
    TRACKER.wait(params.timeout)

    return {
        "first_late_ms": (min(TRACKER.starts) - due[0]) * 1e3,
        "last_late_ms": (max(TRACKER.starts) - due[-1]) * 1e3,
        "wait_cpu_s": waited_cpu,
        "wait_s": waited,
        "insert_s": inserted - began,
    }


def b7_cpu(system: System, params: Params) -> Figures:
    """Run jobs that each spin for about 1 ms of pure Python."""
    if params.cpu_iterations <= 0:
        raise ValueError("b7 needs --cpu-iterations > 0, calibrated by the parent")
    return b1_throughput(system, params)


def b8_idle(system: System, params: Params) -> Figures:
    """Measure CPU of a started, idle system, then with one job a day ahead."""
    system.start()
    warm_up(system, params.workers * 4)
    time.sleep(0.2)
    figures: Figures = {"idle_pct": cpu_percent(params.seconds)}

    try:
        system.insert_in({"i": 0}, 86_400)
    except Unsupported as error:
        figures["due_pct"] = None
        figures["notes"] = {"due_pct": str(error)}
        return figures
    time.sleep(0.1)
    figures["due_pct"] = cpu_percent(params.seconds)
    return figures


def cpu_percent(seconds: float) -> float:
    """Sleep ``seconds`` and return this process's CPU use, in % of one core."""
    cpu_before = process_time()
    began = perf_counter()
    time.sleep(seconds)
    return 100 * (process_time() - cpu_before) / (perf_counter() - began)


def percentile(ordered: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def resident_bytes() -> int:
    """Return this process's resident set size in bytes."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def b9_cluster(system: System, params: Params) -> Figures:
    """Route unique inserts to a remote peer, then hand jobs over on stop."""
    return system.cluster(params.routed, params.jobs, params.timeout)


BENCHES: dict[str, Callable[[System, Params], Figures]] = {
    "b1": b1_throughput,
    "b2": b2_producers,
    "b3": b3_bulk,
    "b4": b4_latency,
    "b5": b5_memory,
    "b6": b6_scheduled,
    "b7": b7_cpu,
    "b8": b8_idle,
    "b9": b9_cluster,
}

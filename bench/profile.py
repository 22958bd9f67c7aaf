"""Profile Stagehand's hot path and print where the time goes.

Run from the repository root: ``python3 -m bench.profile``. With py-spy on
PATH (``pip install py-spy``), it samples the thread that py-spy reads as
holding the GIL while 8 worker threads run jobs inserted one by one, as in
B1, and prints each part's share of the samples. Without py-spy it prints
the functions that take the most time in a cProfile run of the same steps
in one thread.
Nothing here fails on a slow result.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

import stagehand
from bench.systems.stagehand_runner import NoopWorker
from bench.track import TRACKER
from stagehand import JobState

WORKERS = 8
JOBS = 300_000
# py-spy samples per second. The default of 100 gives too few samples for
# the smaller parts of a run that lasts a few seconds.
RATE = 1000

# Each part, and how its frame appears in py-spy's folded stacks:
# "Class.function (path:line)". A sample counts for a part when any frame of its
# stack matches, so the shares include callees and overlap.
PARTS = (
    ("insert(job)", "insert (stagehand/_instance.py"),
    ("  of which the push", "_push_unlocked (stagehand/_queue.py"),
    ("one attempt (Executor.run)", "run (stagehand/_execute.py"),
    ("  of which retention", "add (stagehand/_retention.py"),
    ("Worker.new(args)", "new (stagehand/_worker.py"),
    ("the benchmark's tracker", "record (bench/track.py"),
    ("idle threads waiting for work", "_wait_for_work (stagehand/_queue.py"),
)


def run_workload(jobs: int) -> None:
    """Insert ``jobs`` no-op jobs one by one into 8 threads and wait for them."""
    instance = stagehand.Stagehand(name="profile", queues={"default": WORKERS})
    instance.start()
    TRACKER.reset(jobs)
    insert = instance.insert
    new = NoopWorker.new
    for index in range(jobs):
        insert(new({"i": index}))
    TRACKER.wait(timeout=600)
    instance.stop()


def shares(folded: str) -> tuple[int, list[tuple[str, int]]]:
    """Return the sample total and each part's samples from folded stacks.

    ``folded`` is py-spy's raw output: one line per distinct stack, frames
    joined by ";", then a space and the number of samples.
    """
    total = 0
    counts: Counter[str] = Counter()
    for line in folded.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        samples = int(number)
        total += samples
        for label, frame in PARTS:
            if frame in stack:
                counts[label] += samples
    return total, [(label, counts[label]) for label, _ in PARTS]


def profile_with_py_spy(py_spy: str, jobs: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "stacks.txt"
        command = [
            py_spy,
            "record",
            "--gil",
            "--rate",
            str(RATE),
            "--format",
            "raw",
            "--output",
            str(output),
            "--",
            sys.executable,
            "-m",
            "bench.profile",
            "--workload",
            "--jobs",
            str(jobs),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        total, parts = shares(output.read_text())
    print(
        f"py-spy, {jobs:,} jobs inserted one by one into {WORKERS} threads, "
        f"{total:,} samples of the thread holding the GIL"
    )
    print(f"  {'part':34s} {'share':>6s}")
    for label, samples in parts:
        share = samples / total * 100 if total else 0.0
        print(f"  {label:34s} {share:5.0f}%")


def profile_with_cprofile(jobs: int) -> None:
    # cProfile profiles only the thread that enabled it, so the attempts run here
    # through the executor, the way a worker thread runs them.
    instance = stagehand.Stagehand(name="profile", queues={"default": 1})
    instance.start()
    instance.pause_queue("default")
    queue = instance._queues["default"]
    TRACKER.reset(jobs)
    me = threading.get_ident()
    profiler = cProfile.Profile()
    profiler.enable()
    inserted = [instance.insert(NoopWorker.new({"i": index})) for index in range(jobs)]
    for job in inserted:
        queue.remove(job)
        job._claim = [me]
        job.state = JobState.EXECUTING
        instance._executor.run(job, queue)
    profiler.disable()
    instance.stop()
    print(f"cProfile, {jobs:,} jobs inserted and run in one thread (py-spy not found)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench.profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=JOBS, help="jobs to run")
    parser.add_argument(
        "--workload", action="store_true", help="run the jobs only (for py-spy)"
    )
    options = parser.parse_args(argv)
    if options.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {options.jobs}")
    if options.workload:
        run_workload(options.jobs)
        return
    py_spy = shutil.which("py-spy") or _beside_python("py-spy")
    if py_spy:
        profile_with_py_spy(py_spy, options.jobs)
    else:
        profile_with_cprofile(min(options.jobs, 100_000))


def _beside_python(name: str) -> str | None:
    # A virtual environment's scripts are beside its python, which need not
    # be on PATH.
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


if __name__ == "__main__":
    main()

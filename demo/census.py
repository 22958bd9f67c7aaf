"""A census of the Python standard library, run as Stagehand jobs.

One job per module of the standard library installed on this machine reads
the file, counts its lines, hashes it and parses it for imports. Modules
that cannot be parsed (the library ships some on purpose, such as test data
in Python 2 syntax) fail for real, are retried and then discarded. Large
modules are cancelled by their worker, a cleanup job is cancelled through
the API, and a report job snoozes until the analysis is done.

Run it with ``make demo`` or ``python demo/census.py [--limit N]``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import logging
import sys
import sysconfig
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import stagehand
from stagehand import Cancel, Job, JobState, Snooze, Worker, events

LARGE_MODULE_BYTES = 400_000


class AnalyzeModule(Worker):
    """Count the lines of one module, hash it and list its imports."""

    queue = "analysis"
    max_attempts = 3

    def backoff(self, job: Job) -> float:
        return 0.1 * job.attempt

    def perform(self, job: Job) -> Any:
        path = Path(job.args["path"])
        data = path.read_bytes()
        if len(data) > LARGE_MODULE_BYTES:
            return Cancel(f"{len(data):,} bytes is over the {LARGE_MODULE_BYTES:,} byte limit")
        tree = ast.parse(data, filename=str(path))
        lines = data.decode("utf-8", errors="replace").splitlines()
        return {
            "lines": len(lines),
            "blank": sum(1 for line in lines if not line.strip()),
            "sha256": hashlib.sha256(data).hexdigest(),
            "imports": sorted(_imports(tree)),
        }


class WriteReport(Worker):
    """Snooze until the analysis queue is empty, then report."""

    queue = "reports"

    def perform(self, job: Job) -> Any:
        instance = stagehand.default_instance()
        assert instance is not None
        stats = instance.check_queue("analysis")
        if stats["available"] + stats["executing"] + stats["retryable"]:
            return Snooze(0.2)
        return {"ready_after_attempts": job.attempt}


class Cleanup(Worker):
    """Scheduled for later and cancelled through the API before it runs."""

    queue = "reports"

    def perform(self, job: Job) -> None:
        raise AssertionError("the cleanup job is cancelled before it is due")


def _imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def stdlib_modules(limit: int | None) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        path
        for path in root.rglob("*.py")
        if "site-packages" not in path.parts and "dist-packages" not in path.parts
    )
    return paths[:limit] if limit else paths


def priority_for(path: Path) -> int:
    """Top-level modules first, tests last: 0 to 9, lower runs first."""
    if "test" in path.parts or "tests" in path.parts or "idle_test" in path.parts:
        return 9
    return min(len(path.parts) - len(Path(sysconfig.get_paths()["stdlib"]).parts) - 1, 8)


class Progress:
    """Counts job outcomes from events and redraws one progress line."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.retries = 0
        self.cond = threading.Condition()
        self.tty = sys.stdout.isatty()
        self._last_draw = 0.0

    def on_event(self, event: str, measurements: Any, metadata: Any) -> None:
        job = metadata["job"]
        if job.queue != "analysis":
            return
        with self.cond:
            if metadata["state"] is JobState.RETRYABLE:
                self.retries += 1
            elif job.is_final:
                self.done += 1
            self.cond.notify_all()

    def wait(self) -> None:
        with self.cond:
            while self.done < self.total:
                self.cond.wait(0.1 if self.tty else 1.0)
                self.draw()
        self.draw(final=True)

    def draw(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_draw < (0.1 if self.tty else 2.0):
            return
        self._last_draw = now
        width = 30
        filled = width * self.done // max(self.total, 1)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"modules, {self.retries} retries"
        )
        if self.tty:
            print("\r" + line, end="\n" if final else "", flush=True)
        else:
            print(line, flush=True)


def summarize(jobs: list[Job], report: Job, cleanup: Job, elapsed: float) -> None:
    states = Counter(job.state.value for job in jobs)
    completed = [job for job in jobs if job.state is JobState.COMPLETED]
    lines = sum(job.result["lines"] for job in completed)
    imports = Counter(name for job in completed for name in job.result["imports"])
    largest = sorted(completed, key=lambda job: job.result["lines"], reverse=True)[:5]

    print(f"\nAnalysed {len(jobs)} modules in {elapsed:.2f} s ({len(jobs) / elapsed:,.0f} jobs/s)")
    print("Analysis jobs by state:")
    for state in JobState:
        print(f"  {state.value:<10} {states.get(state.value, 0):>6}")
    priorities = Counter(job.priority for job in jobs)
    print(
        "Analysis jobs by priority (0 ran first): "
        + ", ".join(f"{priority}: {priorities[priority]}" for priority in sorted(priorities))
    )
    print(f"Lines of Python: {lines:,} ({sum(j.result['blank'] for j in completed):,} blank)")
    print("Most imported modules: " + ", ".join(f"{name} ({count})" for name, count in imports.most_common(8)))
    print("Largest modules:")
    for job in largest:
        print(f"  {job.result['lines']:>7,} lines  {job.args['path']}  sha256 {job.result['sha256'][:12]}")
    discarded = [job for job in jobs if job.state is JobState.DISCARDED]
    print(f"Discarded after {AnalyzeModule.max_attempts} attempts (real parse failures):")
    for job in discarded[:5]:
        last_error = job.errors[-1]["error"].strip().splitlines()[-1]
        print(f"  {job.args['path']}: {last_error}")
    if len(discarded) > 5:
        print(f"  ... and {len(discarded) - 5} more")
    for job in [job for job in jobs if job.state is JobState.CANCELLED][:3]:
        reason = job.errors[-1]["error"].removeprefix("cancelled: ")
        print(f"Cancelled by its worker: {job.args['path']} ({reason})")
    print(
        f"Report job: {report.state.value} after snoozing {report.attempt - 1} times "
        "while the analysis ran"
    )
    print(f"Cleanup job: {cleanup.state.value} through cancel_job() before it was due")


class OneLineErrors(logging.Filter):
    """Show failed attempts as one log line; the summary lists the errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.msg}: {record.exc_info[1]!r}"
            record.exc_info = None
        return True


class ProgressAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Write log lines to stdout below the progress line, not glued to it."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.tty = sys.stdout.isatty()

    def emit(self, record: logging.LogRecord) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        super().emit(record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="analyse only the first N modules")
    parser.add_argument("--threads", type=int, default=8, help="worker threads for the analysis queue")
    options = parser.parse_args(argv)
    handler = ProgressAwareHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(OneLineErrors())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])

    paths = stdlib_modules(options.limit)
    print(f"Stagehand {stagehand.__version__}: analysing {len(paths)} standard library modules "
          f"of Python {sys.version.split()[0]} with {options.threads} threads")
    progress = Progress(len(paths))
    events.attach("census-progress", ["job.stop"], progress.on_event)
    instance = stagehand.start(queues={"analysis": options.threads, "reports": 1})
    try:
        started = time.perf_counter()
        cleanup = Cleanup.new({}, schedule_in=(1, "hours")).insert()
        jobs = instance.insert_all(
            AnalyzeModule.new({"path": str(path)}, priority=priority_for(path)) for path in paths
        )
        report = WriteReport.new({}).insert()
        instance.cancel_job(cleanup.id)
        progress.wait()
        elapsed = time.perf_counter() - started
        with progress.cond:
            progress.cond.wait_for(lambda: report.is_final, timeout=30)
    finally:
        stagehand.stop()
        events.detach("census-progress")
    summarize(jobs, report, cleanup, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

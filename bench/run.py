"""Run the benchmark suite: ``python3 -m bench`` from the repository root.

Every measurement runs in a fresh ``python -m bench.child`` process, so one
system's threads, imports and memory cannot affect another's figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python3 bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import machine
from bench.catalog import BENCHMARKS, Benchmark, Variant, find
from bench.redis_server import RedisServer
from bench.report import METHOD, Run, Suite, render_markdown, render_text
from bench.systems import REDIS_SYSTEMS, SYSTEMS
from bench.track import spin

ROOT = Path(__file__).resolve().parent.parent
REPORT_PATH = ROOT / "docs" / "benchmarks.md"
RAW_PATH = ROOT / "bench" / "results" / "latest.json"
WORKERS = 8


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="fewer jobs and 1 run, for smoke tests"
    )
    parser.add_argument("--only", help="comma-separated systems, e.g. heapq,huey")
    parser.add_argument("--bench", help="comma-separated benchmarks, e.g. b1,b4")
    parser.add_argument(
        "--runs", type=int, help="runs per figure (default 3, or 1 with --quick)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help=f"do not write {REPORT_PATH.name}"
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds before a child run is killed"
    )
    return parser.parse_args(argv)


def choose_systems(only: str | None) -> list[str]:
    """Return the selected system names in registry order.

    Raises:
        SystemExit: ``only`` names an unknown system.
    """
    if not only:
        return list(SYSTEMS)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SYSTEMS]
    if unknown:
        raise SystemExit(
            f"unknown system {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}"
        )
    return [name for name in SYSTEMS if name in wanted]


def choose_benchmarks(keys: str | None) -> list[Benchmark]:
    if not keys:
        return list(BENCHMARKS)
    try:
        return find([key.strip().lower() for key in keys.split(",") if key.strip()])
    except ValueError as error:
        raise SystemExit(str(error)) from None


def calibrate_spin(target: float = 0.001) -> int:
    """Return the :func:`spin` iteration count that takes ``target`` seconds."""
    iterations = 20_000
    for _ in range(3):
        best = min(_time_spin(iterations) for _ in range(25))
        iterations = max(1, int(iterations * target / best))
    return iterations


def _time_spin(iterations: int) -> float:
    began = time.perf_counter()
    spin(iterations)
    return time.perf_counter() - began


def run_child(arguments: list[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m bench.child ARGUMENTS`` and return its JSON line."""
    command = [sys.executable, "-m", "bench.child", *arguments]
    try:
        completed = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            if result.get("status") == "error":
                _echo(completed.stderr.strip()[-2000:])
            return result
    tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
    return {
        "status": "error",
        "error": f"child exited with {completed.returncode}: {tail[0]}",
    }


def child_arguments(settings: dict[str, float], options: dict[str, Any]) -> list[str]:
    arguments: list[str] = []
    for name, value in {**settings, **options}.items():
        if value is None:
            continue
        arguments += [f"--{name.replace('_', '-')}", str(value)]
    return arguments


def merge(bench: Benchmark, variant: Variant, line: dict[str, Any], run: Run) -> None:
    """Add one child's figures, or its n/a reason, to ``run`` under the prefix."""
    prefix = f"{variant.prefix}." if variant.prefix else ""
    keys = [m.key for m in bench.metrics if m.key.startswith(prefix)]
    status = line.get("status")
    if status == "ok":
        for key, value in line["figures"].items():
            run["figures"][prefix + key] = value
        for key, note in line.get("notes", {}).items():
            missing = line["figures"].get(key) is None
            run["notes"][prefix + key] = f"n/a: {note}" if missing else note
        return
    if status == "na":
        reason = f"n/a: {line['reason']}"
    else:
        reason = f"error: {line.get('error') or line.get('reason')}"
    for key in keys:
        run["notes"][key] = reason


def summary_of(line: dict[str, Any]) -> str:
    took = f"{line.get('took_s', 0.0):5.1f}s"
    if line.get("status") != "ok":
        reason = line.get("reason") or line.get("error")
        return f"{took}  {line.get('status')}: {reason}"
    parts = [took, ""]
    for key, value in line["figures"].items():
        if isinstance(value, float):
            parts.append(
                f"{key}={value:,.3g}" if value < 100 else f"{key}={value:,.0f}"
            )
    return " ".join(parts)


def _echo(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def probe_systems(
    suite: Suite, names: list[str], redis: RedisServer | None, redis_error: str
) -> None:
    """Fill ``suite.versions`` and ``suite.skipped`` from each system's probe."""
    for name in names:
        if name in REDIS_SYSTEMS and redis is None:
            suite.skipped[name] = redis_error
            _echo(f"skipped {name}: {redis_error}")
            continue
        line = run_child([name, "probe"], timeout=120)
        if line.get("status") != "ok":
            suite.skipped[name] = line.get("reason") or line.get("error") or "?"
            _echo(f"skipped {name}: {suite.skipped[name]}")
            continue
        suite.versions[name] = line["version"]
        if name in REDIS_SYSTEMS and redis is not None:
            suite.versions[name] += f", redis-server {redis.version()}"


def measure_all(suite: Suite, options: dict[str, Any], timeout: float) -> None:
    """Run every selected benchmark for every available system, run by run."""
    for number in range(1, suite.runs + 1):
        for bench in suite.benchmarks:
            if bench.skip_reason:
                continue
            for system in suite.systems:
                run: Run = {"figures": {}, "notes": {}}
                for variant in bench.variants:
                    line = measure_variant(
                        suite, bench, variant, system, options, timeout
                    )
                    merge(bench, variant, line, run)
                    label = bench.key + (f"/{variant.prefix}" if variant.prefix else "")
                    progress = f"run {number}/{suite.runs} {label:6} {system:12}"
                    _echo(f"{progress} {summary_of(line)}")
                suite.results.setdefault((system, bench.key), []).append(run)


def measure_variant(
    suite: Suite,
    bench: Benchmark,
    variant: Variant,
    system: str,
    options: dict[str, Any],
    timeout: float,
) -> dict[str, Any]:
    """Run one child for one variant of a benchmark and return its line."""
    settings = {**(bench.quick if suite.quick else bench.full)}
    settings.update(variant.settings)
    settings.setdefault("workers", WORKERS)
    if bench.key == "b7":
        settings["cpu_iterations"] = suite.cpu_iterations
    arguments = [system, bench.key, *child_arguments(settings, options)]
    began = time.monotonic()
    line = run_child(arguments, timeout)
    line["took_s"] = time.monotonic() - began
    return line


def start_redis(names: list[str]) -> tuple[RedisServer | None, str]:
    """Start redis-server if a selected system needs it.

    Returns:
        The server, or None with the reason the Redis systems are skipped.
    """
    if not any(name in REDIS_SYSTEMS for name in names):
        return None, ""
    try:
        return RedisServer(), ""
    except RuntimeError as error:
        return None, f"{error} (RQ and Celery need a redis-server)"


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print the tables and write docs/benchmarks.md."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    names = choose_systems(args.only)
    benchmarks = choose_benchmarks(args.bench)
    runs = args.runs or (1 if args.quick else 3)
    timeout = args.timeout or (90.0 if args.quick else 900.0)

    suite = Suite(
        command=" ".join(["python3 -m bench", *argv]),
        started=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine.describe(),
        load_before=machine.load_average(),
        runs=runs,
        quick=args.quick,
        benchmarks=benchmarks,
    )
    if any(bench.key == "b7" for bench in benchmarks):
        suite.cpu_iterations = calibrate_spin()

    redis, redis_error = start_redis(names)
    try:
        probe_systems(suite, names, redis, redis_error)
        options = {
            "timeout": timeout - 30,
            "redis_url": redis.url if redis else None,
        }
        measure_all(suite, options, timeout)
    finally:
        if redis is not None:
            redis.stop()
    suite.load_after = machine.load_average()

    sys.stderr.flush()
    print(render_text(suite), flush=True)
    save(suite, write_report=not args.no_write)
    return 0


def save(suite: Suite, write_report: bool) -> None:
    """Write the raw runs to bench/results/ and, if asked, the Markdown page."""
    RAW_PATH.parent.mkdir(parents=True, exist_ok=True)
    raw = {
        "command": suite.command,
        "machine": suite.machine,
        "versions": suite.versions,
        "skipped": suite.skipped,
        "results": {f"{s}/{b}": runs for (s, b), runs in suite.results.items()},
    }
    RAW_PATH.write_text(json.dumps(raw, indent=1) + "\n")
    if write_report:
        REPORT_PATH.parent.mkdir(parents=True, exist_ok=True)
        REPORT_PATH.write_text(render_markdown(suite, METHOD))
        _echo(f"wrote {REPORT_PATH.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())

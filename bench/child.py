"""Run one measurement in this process and print one JSON line.

Usage::

    python -m bench.child SYSTEM probe
    python -m bench.child SYSTEM BENCH [--jobs N] [--workers W] ...

The line has ``status``: ``ok`` with ``figures`` (or ``version`` for a
probe), ``na`` or ``skipped`` with ``reason``, or ``error`` with ``error``.
Anything the system under test prints goes to stderr, so stdout carries only
that line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import traceback
from typing import Any, TextIO

from bench.benches import BENCHES, Params
from bench.systems import SYSTEMS, Unsupported, load


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.child")
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("bench", choices=["probe", *sorted(BENCHES)])
    parser.add_argument("--jobs", type=int, default=20_000, help="number of jobs")
    parser.add_argument("--workers", type=int, default=8, help="worker threads")
    parser.add_argument("--producers", type=int, default=4, help="B2 threads")
    parser.add_argument("--rate", type=float, default=500.0, help="B4 jobs/s")
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="B4 and B8 duration, seconds"
    )
    parser.add_argument(
        "--delay", type=int, default=2, help="B6 delay before jobs are due, seconds"
    )
    parser.add_argument(
        "--cpu-iterations", type=int, default=0, help="B7 loop count per job"
    )
    parser.add_argument(
        "--routed", type=int, default=5_000, help="B9 routed unique inserts"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=240.0,
        help="seconds to wait for the jobs to finish",
    )
    parser.add_argument("--redis-url", default=None, help="redis://127.0.0.1:PORT/0")
    return parser.parse_args(argv)


def probe(name: str) -> dict[str, Any]:
    """Import the system and report its version, or why it cannot run."""
    try:
        return {"status": "ok", "version": load(name).probe()}
    except Exception as error:
        reason = str(error) or type(error).__name__
        if isinstance(error, ImportError):
            reason = f"not installed: {reason}"
        return {"status": "skipped", "reason": reason}


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Run one benchmark and return the result line and the system to stop."""
    params = Params(
        jobs=args.jobs,
        workers=args.workers,
        producers=args.producers,
        rate=args.rate,
        seconds=args.seconds,
        delay=args.delay,
        cpu_iterations=args.cpu_iterations,
        routed=args.routed,
        timeout=args.timeout,
        options={"redis_url": args.redis_url},
    )
    system = None
    try:
        system = load(args.system)(params.workers, params.options)
        figures = BENCHES[args.bench](system, params)
    except Unsupported as error:
        return {"status": "na", "reason": str(error)}, system
    except Exception as error:
        traceback.print_exc()
        return {"status": "error", "error": f"{type(error).__name__}: {error}"}, system
    notes = figures.pop("notes", {})
    return {"status": "ok", "figures": figures, "notes": notes}, system


def stop_quietly(system: Any, timeout: float = 0.5) -> None:
    """Stop the system in a helper thread, giving up after ``timeout`` s."""
    if system is None:
        return

    def stop() -> None:
        try:
            system.stop()
        except Exception:
            traceback.print_exc()

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    thread.join(timeout)


def emit(line: dict[str, Any], stream: TextIO) -> None:
    stream.write(json.dumps(line) + "\n")
    stream.flush()


def main(argv: list[str] | None = None) -> None:
    """Run the requested probe or measurement, print its line, and exit."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    stdout = sys.stdout
    sys.stdout = sys.stderr

    if args.bench == "probe":
        emit(probe(args.system), stdout)
        os._exit(0)

    line, system = measure(args)
    emit(line, stdout)
    stop_quietly(system)
    sys.stderr.flush()
    # Worker threads of some systems are not daemons and block in the broker,
    # so the process exits without waiting for them.
    os._exit(0)


if __name__ == "__main__":
    main()

"""Stagehand's performance targets, checked against one run's medians.

Each target compares Stagehand's median with a fixed limit or with another
system's median from the same run. A target whose inputs were not measured
in this run (a system or benchmark left out with --only or --bench) is
reported as not checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.catalog import Metric
from bench.report import Suite, summarize

# The Elixir original's end-to-end throughput on the BEAM, from its README.
ELIXIR_JOBS_PER_S = 81_000


@dataclass(frozen=True, slots=True)
class Verdict:
    """One target, the figures it compared, and whether it was met."""

    target: str
    measured: str
    met: bool | None  # None: not checked in this run


def median(suite: Suite, system: str, bench: str, key: str) -> float | None:
    """Return the median of one figure, or None if it was not measured."""
    runs = suite.results.get((system, bench), [])
    return summarize(runs, Metric(key=key, label=key)).median


def _huey(suite: Suite, bench: str) -> tuple[str, float | None]:
    # The faster of Huey's two configurations, so the target is not eased.
    figures = {
        name: median(suite, name, bench, "jobs_per_s") for name in ("huey", "huey-1ms")
    }
    measured = {name: value for name, value in figures.items() if value is not None}
    if not measured:
        return "huey", None
    best = max(measured, key=measured.__getitem__)
    return best, measured[best]


def _ratio(
    target: str, ours: float | None, theirs: float | None, name: str, least: float
) -> Verdict:
    if ours is None or theirs is None or theirs == 0:
        return Verdict(
            target, f"not measured: {name} or stagehand did not run (see --only)", None
        )
    ratio = ours / theirs
    measured = f"{ours:,.0f} / {theirs:,.0f} ({name}) = {ratio:.3f}x"
    return Verdict(target, measured, ratio >= least)


def _at_most(
    target: str,
    ours: float | None,
    theirs: float | None,
    factor: float,
    unit: str,
    digits: int = 1,
) -> Verdict:
    # Stagehand's figure against `factor` times the heapq pool's, where
    # smaller is better.
    if ours is None or theirs is None:
        return Verdict(target, "not measured: heapq or stagehand did not run", None)
    measured = f"{ours:,.{digits}f} {unit} against {theirs:,.{digits}f} {unit} (heapq)"
    return Verdict(target, measured, ours <= factor * theirs)


def _limit(
    target: str,
    value: float | None,
    unit: str,
    ok: Callable[[float], bool],
    digits: int = 0,
) -> Verdict:
    if value is None:
        return Verdict(target, "not measured", None)
    return Verdict(target, f"{value:,.{digits}f} {unit}", ok(value))


def check(suite: Suite) -> list[Verdict]:
    """Return one verdict per target, in benchmark order."""
    verdicts: list[Verdict] = []
    for bench in ("b1", "b2"):
        ours = median(suite, "stagehand", bench, "jobs_per_s")
        huey_name, huey = _huey(suite, bench)
        heap = median(suite, "heapq", bench, "jobs_per_s")
        label = bench.upper()
        verdicts.append(_ratio(f"{label} >= 2x Huey", ours, huey, huey_name, 2.0))
        verdicts.append(_ratio(f"{label} >= 0.3x heapq pool", ours, heap, "heapq", 0.3))
    verdicts.append(
        _limit(
            f"B1 >= {ELIXIR_JOBS_PER_S:,} jobs/s (the Elixir original)",
            median(suite, "stagehand", "b1", "jobs_per_s"),
            "jobs/s",
            lambda value: value >= ELIXIR_JOBS_PER_S,
        )
    )
    verdicts.append(
        _ratio(
            "B3 >= heapq pool's B1",
            median(suite, "stagehand", "b3", "jobs_per_s"),
            median(suite, "heapq", "b1", "jobs_per_s"),
            "heapq B1",
            1.0,
        )
    )
    p50 = median(suite, "stagehand", "b4", "p50_us")
    p99 = median(suite, "stagehand", "b4", "p99_us")
    verdicts.append(_limit("B4 p50 <= 100 us", p50, "us", lambda v: v <= 100))
    verdicts.append(_limit("B4 p99 <= 500 us", p99, "us", lambda v: v <= 500))
    memory = median(suite, "stagehand", "b5", "bytes_per_job")
    verdicts.append(_limit("B5 <= 500 bytes/job", memory, "bytes", lambda v: v <= 500))
    first = median(suite, "stagehand", "b6", "first_late_ms")
    verdicts.append(
        _limit("B6 first start <= 5 ms late", first, "ms", lambda v: v <= 5, 1)
    )
    verdicts.append(
        _at_most(
            "B6 last start <= 1.2x as late as the heapq pool's",
            median(suite, "stagehand", "b6", "last_late_ms"),
            median(suite, "heapq", "b6", "last_late_ms"),
            1.2,
            "ms",
        )
    )
    verdicts.append(
        _at_most(
            "B6 CPU while waiting <= the heapq pool's",
            median(suite, "stagehand", "b6", "wait_cpu_s"),
            median(suite, "heapq", "b6", "wait_cpu_s"),
            1.0,
            "s",
            digits=3,
        )
    )
    for variant in ("w8", "w1"):
        verdicts.append(
            _ratio(
                f"B7 {variant[1:]} thread(s) within 5% of heapq pool",
                median(suite, "stagehand", "b7", f"{variant}.jobs_per_s"),
                median(suite, "heapq", "b7", f"{variant}.jobs_per_s"),
                "heapq",
                0.95,
            )
        )
    for key, label in (("idle_pct", "idle"), ("due_pct", "1 job due in a day")):
        verdicts.append(
            _limit(
                f"B8 {label} < 0.01% of a core",
                median(suite, "stagehand", "b8", key),
                "% of a core",
                lambda v: v < 0.01,
                4,
            )
        )
    return verdicts


def render(verdicts: list[Verdict]) -> list[str]:
    """Return the verdicts as the lines of a Markdown table."""
    words = {True: "met", False: "NOT met", None: "not checked"}
    lines = ["| target | measured (medians) | result |", "| --- | --- | --- |"]
    lines += [f"| {v.target} | {v.measured} | {words[v.met]} |" for v in verdicts]
    return lines

"""The benchmark's target check, on made-up medians: no timing is measured."""

from __future__ import annotations

from typing import Any

from bench.report import Suite
from bench.targets import check


def _suite(figures: dict[tuple[str, str], dict[str, Any]]) -> Suite:
    suite = Suite(
        command="test", started="now", machine={}, load_before="", runs=1, quick=False
    )
    for key, values in figures.items():
        suite.results[key] = [{"figures": values, "notes": {}}]
    return suite


def _verdicts(suite: Suite) -> dict[str, tuple[str, bool | None]]:
    return {verdict.target: (verdict.measured, verdict.met) for verdict in check(suite)}


def test_b6_compares_with_heapq_pool() -> None:
    suite = _suite(
        {
            ("stagehand", "b6"): {
                "first_late_ms": 1.5,
                "last_late_ms": 30.0,
                "wait_cpu_s": 0.004,
            },
            ("heapq", "b6"): {"last_late_ms": 25.0, "wait_cpu_s": 0.005},
        }
    )

    verdicts = _verdicts(suite)

    assert verdicts["B6 first start <= 5 ms late"] == ("1.5 ms", True)
    assert verdicts["B6 last start <= 1.2x as late as the heapq pool's"] == (
        "30.0 ms against 25.0 ms (heapq)",
        True,
    )
    assert verdicts["B6 CPU while waiting <= the heapq pool's"] == (
        "0.004 s against 0.005 s (heapq)",
        True,
    )


def test_b6_later_than_allowed_not_met() -> None:
    suite = _suite(
        {
            ("stagehand", "b6"): {"last_late_ms": 31.0, "wait_cpu_s": 0.006},
            ("heapq", "b6"): {"last_late_ms": 25.0, "wait_cpu_s": 0.005},
        }
    )

    verdicts = _verdicts(suite)

    assert verdicts["B6 last start <= 1.2x as late as the heapq pool's"][1] is False
    assert verdicts["B6 CPU while waiting <= the heapq pool's"][1] is False


def test_missing_system_not_checked() -> None:
    verdicts = _verdicts(_suite({("stagehand", "b1"): {"jobs_per_s": 90_000.0}}))

    assert verdicts["B1 >= 0.3x heapq pool"] == (
        "not measured: heapq or stagehand did not run (see --only)",
        None,
    )
    assert verdicts["B1 >= 81,000 jobs/s (the Elixir original)"] == (
        "90,000 jobs/s",
        True,
    )

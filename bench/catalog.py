"""Names, descriptions, reported figures and settings of the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, kw_only=True)
class Metric:
    """One reported figure: the key in the child's output and its label."""

    key: str
    label: str
    digits: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Variant:
    """One child run of a benchmark, whose figure keys get ``prefix``."""

    prefix: str = ""
    settings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Benchmark:
    """A benchmark, its figures and its child settings in full and quick mode."""

    key: str
    title: str
    measures: str
    metrics: tuple[Metric, ...]
    full: dict[str, float] = field(default_factory=dict)
    quick: dict[str, float] = field(default_factory=dict)
    variants: tuple[Variant, ...] = (Variant(),)
    skip_reason: str | None = None


THROUGHPUT = (Metric(key="jobs_per_s", label="jobs/s"),)

BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        key="b1",
        title="B1 end-to-end throughput, 1 inserting thread",
        measures="20,000 no-op jobs inserted one by one from one thread. Jobs "
        "per second from the first insert to the last completion.",
        metrics=THROUGHPUT,
        full={"jobs": 20_000},
        quick={"jobs": 500},
    ),
    Benchmark(
        key="b2",
        title="B2 end-to-end throughput, 4 inserting threads",
        measures="As B1, with the jobs inserted by 4 threads at once.",
        metrics=THROUGHPUT,
        full={"jobs": 20_000, "producers": 4},
        quick={"jobs": 500, "producers": 4},
    ),
    Benchmark(
        key="b3",
        title="B3 bulk insert, then completion",
        measures="20,000 jobs passed to the system's bulk insert API in one call "
        "(a loop of single inserts where it has none). Jobs per second until "
        "the last completion.",
        metrics=THROUGHPUT,
        full={"jobs": 20_000},
        quick={"jobs": 500},
    ),
    Benchmark(
        key="b4",
        title="B4 latency at 500 jobs/s",
        measures="Jobs inserted at a steady 500 per second for 4 s, each at its "
        "send time. Microseconds from the insert call to the start of the job.",
        metrics=(
            Metric(key="p50_us", label="p50 µs"),
            Metric(key="p99_us", label="p99 µs"),
            Metric(key="max_us", label="max µs"),
        ),
        full={"rate": 500, "seconds": 4},
        quick={"rate": 500, "seconds": 1},
    ),
    Benchmark(
        key="b5",
        title="B5 memory per queued job",
        measures='100,000 jobs with args {"id": i, "email": "user@example.com"} '
        "in a queue that does not run them. Growth of the process's resident "
        "memory (after gc.collect()) divided by the job count.",
        metrics=(Metric(key="bytes_per_job", label="bytes/job"),),
        full={"jobs": 100_000},
        quick={"jobs": 2_000},
    ),
    Benchmark(
        key="b6",
        title="B6 scheduled jobs, 2 s ahead",
        measures="20,000 jobs each due 2 s after its insert. Lateness of the "
        "first start (against the first due time) and of the last start "
        "(against the last due time), and the CPU time the process used "
        "between the end of the inserts and the first start.",
        metrics=(
            Metric(key="first_late_ms", label="first late ms", digits=1),
            Metric(key="last_late_ms", label="last late ms", digits=1),
            Metric(key="wait_cpu_s", label="wait CPU s", digits=3),
            Metric(key="wait_s", label="wait s", digits=2),
        ),
        full={"jobs": 20_000, "delay": 2},
        quick={"jobs": 500, "delay": 2},
    ),
    Benchmark(
        key="b7",
        title="B7 CPU-bound jobs (about 1 ms of pure Python each)",
        measures="2,000 jobs that each run the same calibrated loop, inserted "
        "one by one. Jobs per second with 8 worker threads and with 1.",
        metrics=(
            Metric(key="w8.jobs_per_s", label="8 threads jobs/s"),
            Metric(key="w1.jobs_per_s", label="1 thread jobs/s"),
        ),
        full={"jobs": 2_000},
        quick={"jobs": 200},
        variants=(
            Variant(prefix="w8", settings={"workers": 8}),
            Variant(prefix="w1", settings={"workers": 1}),
        ),
    ),
    Benchmark(
        key="b8",
        title="B8 idle CPU",
        measures="CPU time used by a started system over 10 s (2 s with --quick) "
        "with nothing due, then over as long again with one job due in a day, "
        "in percent of one core.",
        metrics=(
            Metric(key="idle_pct", label="idle % core", digits=2),
            Metric(key="due_pct", label="1 due in a day % core", digits=2),
        ),
        full={"seconds": 10},
        quick={"seconds": 2},
    ),
    Benchmark(
        key="b9",
        title="B9 cluster",
        measures="Three peers on 127.0.0.1, two of them in child processes with "
        "paused queues. First, unique inserts per second of 5,000 jobs inserted "
        "one by one, whose fingerprints a child peer owns, so that each insert "
        "is a round trip. Then the time that stop() of the measuring peer takes "
        "to hand 100,000 queued jobs to the two others, and how many they "
        "received.",
        metrics=(
            Metric(key="routed_per_s", label="routed inserts/s"),
            Metric(key="handoff_s", label="hand-off s", digits=2),
            Metric(key="received", label="jobs received"),
        ),
        full={"jobs": 100_000, "routed": 5_000},
        quick={"jobs": 2_000, "routed": 200},
    ),
)


def find(keys: list[str]) -> list[Benchmark]:
    """Return the benchmarks named by ``keys`` (such as ``b1``), in order.

    Raises:
        ValueError: a key names no benchmark.
    """
    known = {bench.key: bench for bench in BENCHMARKS}
    unknown = [key for key in keys if key not in known]
    if unknown:
        raise ValueError(
            f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    return [bench for bench in BENCHMARKS if bench.key in keys]

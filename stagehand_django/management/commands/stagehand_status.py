"""``manage.py stagehand_status``: the live state of this project's processes."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from stagehand_django import conf
from stagehand_django.control import Survey, query_all

# Bounds of --watch in seconds: faster than 0.1 s only burns CPU, and
# Event.wait() overflows on huge values.
MIN_WATCH = 0.1
MAX_WATCH = 86_400.0

COLUMNS = (
    "queue",
    "limit",
    "paused",
    "available",
    "scheduled",
    "executing",
    "retryable",
    "completed",
    "discarded",
    "cancelled",
    "stuck",
)


class Command(BaseCommand):
    help = (
        "Show the queues of every running Stagehand process of this project "
        "(runserver, gunicorn or uWSGI workers, stagehand_worker), read from "
        "their control sockets. Exits with status 1 when none answers."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print JSON.")
        parser.add_argument(
            "--watch",
            type=float,
            metavar="SECONDS",
            help="Refresh every SECONDS seconds until Ctrl-C.",
        )
        parser.add_argument(
            "--runtime-dir",
            help="Control socket directory (default: STAGEHAND_RUNTIME_DIR).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        watch = options["watch"]
        if watch is not None and not MIN_WATCH <= watch <= MAX_WATCH:
            raise CommandError(
                f"--watch must be a number of seconds from {MIN_WATCH} to "
                f"{MAX_WATCH:.0f} (one day); got {watch}"
            )
        directory = options["runtime_dir"] or conf.runtime_dir()
        pause = threading.Event()
        try:
            while True:
                try:
                    self._show(query_all(directory), as_json=options["json"])
                except CommandError as error:
                    if watch is None:
                        raise
                    # Watching goes on, so that it reports the processes
                    # again after a restart.
                    self.stderr.write(str(error))
                if watch is None:
                    return
                pause.wait(watch)
        except KeyboardInterrupt:
            return

    def _show(self, survey: Survey, *, as_json: bool) -> None:
        if not survey.reports:
            if as_json:
                # Scripts read the JSON on stdout, and the exit status stays 1.
                document = {**_as_document(survey), "error": _no_answer(survey)}
                self.stdout.write(json.dumps(document, indent=2))
                self.stdout.flush()
            raise CommandError(_nothing_found(survey))
        if as_json:
            self.stdout.write(json.dumps(_as_document(survey), indent=2))
        else:
            self.stdout.write(_as_text(survey))
        self.stdout.flush()


def _no_answer(survey: Survey) -> str:
    return f"no running Stagehand process answered in {survey.directory}"


def _nothing_found(survey: Survey) -> str:
    lines = [f"{_no_answer(survey)}."]
    for failure in survey.failures:
        lines.append(f"  tried {failure}")
    if survey.removed:
        lines.append(f"  removed {len(survey.removed)} socket(s) of exited processes")
    if not survey.failures and not survey.removed:
        lines.append("  no control socket was found there")
    lines.append(
        "Start one with manage.py runserver or manage.py stagehand_worker (with "
        "STAGEHAND['testing'] = 'disabled'), or pass --runtime-dir."
    )
    return "\n".join(lines)


def _as_document(survey: Survey) -> dict[str, Any]:
    leaders = [report["pid"] for report in survey.reports if report.get("leader")]
    return {
        "directory": survey.directory,
        "processes": survey.reports,
        "leaders": leaders,
        "failures": survey.failures,
        "removed": survey.removed,
    }


def _as_text(survey: Survey) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    count = len(survey.reports)
    lines = [f"Stagehand: {count} process(es) in {survey.directory} at {now}"]
    for report in survey.reports:
        role = "cron leader" if report.get("leader") else "follower"
        state = "running" if report.get("running") else "stopping"
        lines.append("")
        peer = report.get("cluster") or {}
        lines.append(
            f"pid {report['pid']} on {report['host']} ({report['command']}): "
            f"{state}, {role}"
            + (f", cluster peer {peer['peer']}" if peer else "")
            + f", peers: {', '.join(report['peers']) or 'none'}"
        )
        lines.extend(_table(report["queues"]))
    lines.extend(_cluster_lines(survey))
    for failure in survey.failures:
        lines.append(f"unreachable: {failure}")
    return "\n".join(lines)


def _cluster_lines(survey: Survey) -> list[str]:
    # Every peer of a cluster reports the whole cluster, so the first report
    # that has one is shown.
    cluster = next(
        (report["cluster"] for report in survey.reports if report.get("cluster")),
        None,
    )
    if cluster is None:
        return []
    peers = cluster.get("survey", [])
    lines = [
        "",
        f"Cluster {cluster['name']!r}: {len(peers)} peer(s), leader "
        f"{cluster['leader']}",
    ]
    for peer in peers:
        lines.append("")
        if "error" in peer:
            lines.append(f"peer {peer['peer']}: unreachable: {peer['error']}")
            continue
        role = "cron leader" if peer.get("leader") else "follower"
        lines.append(f"peer {peer['peer']} (instance {peer['instance']!r}): {role}")
        lines.extend(_table(peer["queues"]))
    return lines


def _table(queues: list[dict[str, Any]]) -> list[str]:
    rows = [list(COLUMNS)]
    for queue in queues:
        rows.append([_cell(queue.get(column, "")) for column in COLUMNS])
    widths = [max(len(row[index]) for row in rows) for index in range(len(COLUMNS))]
    return [
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    ]


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)

"""Worker threads close stale database connections (real threads, SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings
from django_project.shop.workers import ConnectionProbe, probes
from django_project.support import job_stops

import stagehand
from stagehand_django import lifecycle

pytestmark = pytest.mark.django_db(
    transaction=True, databases=["default", "persistent"]
)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[stagehand.Stagehand]:
    # One thread on "mailers", so successive probes share a thread.
    settings = {"queues": {"default": 1, "mailers": 1}}
    with override_settings(STAGEHAND=settings, STAGEHAND_RUNTIME_DIR=str(tmp_path)):
        yield lifecycle.start()
        lifecycle.stop()


def probe(**args: Any) -> dict[str, Any]:
    with job_stops() as stops:
        job = ConnectionProbe.new(args).insert()
        stops.wait(1)
    assert job.state is stagehand.JobState.COMPLETED, job.errors
    return probes.pop(job.id)


def test_connection_is_closed_after_each_job(running: stagehand.Stagehand) -> None:
    seen = probe(alias="default")
    assert seen["opened_before"] is False
    assert seen["thread"].name.startswith("stagehand-mailers-")
    assert seen["wrapper"].connection is None


def test_persistent_connection_is_reused_then_closed_at_stop(
    running: stagehand.Stagehand,
) -> None:
    first = probe(alias="persistent")
    second = probe(alias="persistent")
    assert second["thread"] is first["thread"]
    assert second["opened_before"] is True
    assert second["raw"] is first["raw"]
    assert first["wrapper"].connection is not None

    lifecycle.stop()

    assert not first["thread"].is_alive()
    assert first["wrapper"].connection is None


def test_broken_connection_is_not_reused(running: stagehand.Stagehand) -> None:
    broken = probe(alias="persistent", break_autocommit=True)
    after = probe(alias="persistent")
    assert after["thread"] is broken["thread"]
    assert after["opened_before"] is False
    assert after["raw"] is not broken["raw"]
    assert broken["wrapper"].connection is after["raw"]

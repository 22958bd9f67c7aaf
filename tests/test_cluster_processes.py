"""Cluster peers in separate processes, found over real mDNS on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import stagehand
from stagehand import JobState
from tests.support import HANG_GUARD, unique_name, wait_until
from tests.workers import EchoWorker

ROOT = Path(__file__).resolve().parent.parent
SECRET = "a test secret of enough length"

CHILD = """
import sys
import stagehand
stagehand_instance = stagehand.Stagehand(
    name="child",
    queues={"default": {"limit": 1, "paused": True}},
    cluster={
        "name": sys.argv[1],
        "secret": sys.argv[2],
        "discovery": "zeroconf",
        "bind": "127.0.0.1:0",
    },
)
stagehand_instance.start()
print(stagehand_instance._cluster.peer_id, flush=True)
sys.stdin.read()
stagehand_instance.stop()
"""


@pytest.fixture
def cluster_name() -> str:
    return unique_name("processes")


@pytest.fixture
def parent(cluster_name: str) -> Iterator[stagehand.Stagehand]:
    instance = stagehand.Stagehand(
        name=unique_name("parent"),
        queues={"default": 2},
        cluster={
            "name": cluster_name,
            "secret": SECRET,
            "discovery": "zeroconf",
            "bind": "127.0.0.1:0",
        },
    )
    instance.start()
    yield instance
    instance.stop()


def test_child_peer_hands_jobs_back(
    parent: stagehand.Stagehand, cluster_name: str
) -> None:
    assert parent._cluster is not None
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, cluster_name, SECRET],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        child_id = child.stdout.readline().strip()
        wait_until(lambda: parent._cluster.members() == [child_id])  # type: ignore[union-attr]

        jobs = [
            EchoWorker.new({"value": n}, unique={"period": 600}).insert(parent)
            for n in range(20)
        ]
        # Jobs the child owns wait in its paused queue; the rest run here.
        remote = [job for job in jobs if parent.get_job(job.id) is None]  # type: ignore[arg-type]
        assert 0 < len(remote) < 20
        assert all(job.state is JobState.AVAILABLE for job in remote)
        assert all(job.id and not job.conflict for job in jobs)

        child.stdin.close()  # the child stops, handing its jobs back
        assert child.wait(HANG_GUARD) == 0
        wait_until(lambda: parent._cluster.members() == [])  # type: ignore[union-attr]
        for job in remote:
            wait_until(
                lambda job=job: (
                    (found := parent.get_job(job.id)) is not None  # type: ignore[arg-type]
                    and found.state is JobState.COMPLETED
                )
            )
        results = {parent.get_job(job.id).result for job in remote}  # type: ignore[arg-type, union-attr]
        assert results == {job.args["value"] for job in remote}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None and not stream.closed:
                stream.close()

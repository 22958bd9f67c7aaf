"""The hand-over of jobs from a stopping peer: bugs a review found, fixed.

Each test guards one of them.
Peers run in this process on 127.0.0.1 with static address lists, as in
tests/test_cluster.py.
"""

from __future__ import annotations

from typing import Any

import stagehand
from stagehand import InvalidOption
from tests.support import PAUSED, Peers, wait_until
from tests.test_cluster import WhereWorker, members, peer_id


def two_peers(peers: Peers) -> tuple[stagehand.Stagehand, stagehand.Stagehand]:
    """Start a peer that will leave and a survivor, both with paused queues."""
    leaving = peers.start(queues=PAUSED)
    staying = peers.start(leaving, queues=PAUSED)
    wait_until(lambda: members(leaving) == [peer_id(staying)])
    wait_until(lambda: members(staying) == [peer_id(leaving)])
    return leaving, staying


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"k": value}
    return value


def deepest_accepted_args() -> int:
    """Return the deepest nesting of args that Worker.new accepts here."""
    low, high = 1, 5000
    while low < high:
        middle = (low + high + 1) // 2
        try:
            WhereWorker.new(nested(middle))
        except InvalidOption:
            high = middle - 1
        else:
            low = middle
    return low


def test_deep_args_keep_stop_working(peers: Peers) -> None:
    leaving, staying = two_peers(peers)
    # The deepest args that the insert accepts, from this same thread: the
    # hand-over encodes them a few frames and three JSON levels deeper.
    deep = WhereWorker.new(nested(deepest_accepted_args())).insert(leaving)
    plain = WhereWorker.new({"n": 1}).insert(leaving)
    try:
        leaving.stop()
        assert staying.get_job(plain.id) is not None  # type: ignore[arg-type]
        assert deep.id is not None
    finally:
        # When stop() raised, it skipped stopping the scheduler thread.
        if leaving._scheduler is not None:
            leaving._scheduler.stop()


def test_jobs_orders_handed_job_by_insert(peers: Peers) -> None:
    leaving, staying = two_peers(peers)
    older = WhereWorker.new({"n": "older"}).insert(leaving)
    newer = WhereWorker.new({"n": "newer"}).insert(staying)
    assert older.inserted_at <= newer.inserted_at  # type: ignore[operator]

    leaving.stop()

    handed = staying.get_job(older.id)  # type: ignore[arg-type]
    assert handed is not None and handed.inserted_at == older.inserted_at
    # guide.md: jobs() lists "live and retained jobs, oldest insert first".
    assert [job.id for job in staying.jobs()] == [older.id, newer.id]


def test_huge_max_attempts_handed_over(peers: Peers) -> None:
    leaving, staying = two_peers(peers)
    try:
        job = WhereWorker.new({}, max_attempts=10**5000).insert(leaving)
    except InvalidOption:
        return  # A fix may instead reject the value at the insert.
    leaving.stop()
    assert staying.get_job(job.id) is not None  # type: ignore[arg-type]

"""Peers of a cluster in one process, talking over real sockets on loopback.

Each instance here is a full peer with its own channel on 127.0.0.1. Most
tests list the other peers' addresses instead of using mDNS, which keeps
them fast; one test uses real zeroconf on loopback.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

import pytest

import stagehand
from stagehand import InvalidOption, JobState
from stagehand._execute import current_instance
from tests.support import HANG_GUARD, SECRET, Peers, unique_name, wait_until

RAN_ON: dict[str, list[str]] = {}
RAN_LOCK = threading.Lock()


class WhereWorker(stagehand.Worker):
    """Records the name of the instance that ran each job."""

    def perform(self, job: stagehand.Job) -> None:
        instance = current_instance()
        assert instance is not None
        with RAN_LOCK:
            RAN_ON.setdefault(job.id, []).append(instance.name)  # type: ignore[arg-type]


class FailOnceWorker(stagehand.Worker):
    max_attempts = 3

    def backoff(self, job: stagehand.Job) -> float:
        return 3600.0

    def perform(self, job: stagehand.Job) -> None:
        raise RuntimeError("first attempt fails")


def ran_on(job_id: str) -> list[str]:
    with RAN_LOCK:
        return list(RAN_ON.get(job_id, []))


def peer_id(instance: stagehand.Stagehand) -> str:
    assert instance._cluster is not None
    return instance._cluster.peer_id


def members(instance: stagehand.Stagehand) -> list[str]:
    assert instance._cluster is not None
    return instance._cluster.members()


def test_two_peers_see_each_other(peers: Peers) -> None:
    first = peers.start()
    second = peers.start(first)

    wait_until(lambda: members(first) == [peer_id(second)])
    assert members(second) == [peer_id(first)]
    leader = min(peer_id(first), peer_id(second))
    assert first._cluster.leader() == leader  # type: ignore[union-attr]
    assert second._cluster.leader() == leader  # type: ignore[union-attr]
    wait_until(
        lambda: (
            [first.leadership.is_leader, second.leadership.is_leader].count(True) == 1
        )
    )
    assert first.leadership.is_leader is (peer_id(first) == leader)


def test_third_peer_learns_the_others_from_one(peers: Peers) -> None:
    first = peers.start()
    second = peers.start(first)
    third = peers.start(first)

    everyone = sorted(map(peer_id, (first, second, third)))
    for instance in (first, second, third):
        wait_until(
            lambda instance=instance: (
                sorted([peer_id(instance), *members(instance)]) == everyone
            )
        )


def test_unique_jobs_run_on_their_owner(peers: Peers) -> None:
    first = peers.start()
    second = peers.start(first)
    wait_until(lambda: len(members(first)) == 1)

    jobs = [
        WhereWorker.new({"n": n}, unique={"period": 300}).insert(first)
        for n in range(20)
    ]
    for job in jobs:
        wait_until(lambda job=job: len(ran_on(job.id)) == 1)  # type: ignore[arg-type]

    names = {peer_id(first): first.name, peer_id(second): second.name}
    from stagehand._rendezvous import owner
    from stagehand._unique import fingerprint

    owners = [owner(fingerprint(job), list(names)) for job in jobs]
    assert [ran_on(job.id) for job in jobs] == [[names[o]] for o in owners]  # type: ignore[arg-type]
    # Both peers own some of 20 fingerprints; the chance of one owning all
    # is 2 in a million.
    assert set(owners) == set(names)


def test_duplicate_from_either_peer_conflicts(peers: Peers) -> None:
    first = peers.start(queues={"default": {"limit": 1, "paused": True}})
    second = peers.start(first, queues={"default": {"limit": 1, "paused": True}})
    wait_until(lambda: len(members(first)) == 1)

    original = WhereWorker.new({"n": 1}, unique={"period": 300}).insert(first)
    again_first = WhereWorker.new({"n": 1}, unique={"period": 300}).insert(first)
    again_second = WhereWorker.new({"n": 1}, unique={"period": 300}).insert(second)

    assert original.conflict is False
    assert again_first.conflict is True
    assert again_second.conflict is True
    assert again_first.id == original.id
    assert again_second.id == original.id


def test_stop_hands_queued_jobs_to_survivor(peers: Peers) -> None:
    leaving = peers.start(queues={"default": {"limit": 1, "paused": True}})
    staying = peers.start(leaving)
    wait_until(lambda: len(members(leaving)) == 1)
    jobs = [WhereWorker.new({"n": n}).insert(leaving) for n in range(50)]

    leaving.stop()

    for job in jobs:
        wait_until(lambda job=job: len(ran_on(job.id)) == 1)  # type: ignore[arg-type]
    assert {ran_on(job.id)[0] for job in jobs} == {staying.name}  # type: ignore[arg-type]
    assert all(staying.get_job(job.id).state is JobState.COMPLETED for job in jobs)  # type: ignore[arg-type, union-attr]


def test_stop_hands_retryable_job_with_history(peers: Peers) -> None:
    leaving = peers.start()
    staying = peers.start(leaving, queues={"default": {"limit": 1, "paused": True}})
    wait_until(lambda: len(members(leaving)) == 1)
    job = FailOnceWorker.new({}).insert(leaving)
    wait_until(lambda: job.state is JobState.RETRYABLE)
    scheduled = WhereWorker.new({}, schedule_in=3600).insert(leaving)

    leaving.stop()

    moved = staying.get_job(job.id)  # type: ignore[arg-type]
    assert moved is not None and moved is not job
    assert moved.state is JobState.RETRYABLE
    assert moved.attempt == 1
    assert [error["attempt"] for error in moved.errors] == [1]
    assert moved.scheduled_at == job.scheduled_at
    later = staying.get_job(scheduled.id)  # type: ignore[arg-type]
    assert later is not None
    assert later.state is JobState.SCHEDULED
    assert later.scheduled_at == scheduled.scheduled_at


def test_stop_without_survivor_logs_lost_jobs(
    peers: Peers, caplog: pytest.LogCaptureFixture
) -> None:
    alone = peers.start(queues={"default": {"limit": 1, "paused": True}})
    for n in range(3):
        WhereWorker.new({"n": n}).insert(alone)

    with caplog.at_level(logging.WARNING, logger="stagehand"):
        alone.stop()

    assert any(
        "3 jobs could not be handed to other peers" in record.getMessage()
        for record in caplog.records
    )


def test_leader_stops_and_other_leads(peers: Peers) -> None:
    first = peers.start()
    second = peers.start(first)
    wait_until(lambda: len(members(first)) == 1 and len(members(second)) == 1)
    leader, other = (
        (first, second) if peer_id(first) < peer_id(second) else (second, first)
    )
    wait_until(lambda: leader.leadership.is_leader)
    assert other.leadership.is_leader is False

    leader.stop()

    wait_until(lambda: other.leadership.is_leader)
    assert members(other) == []


def test_joining_peer_receives_the_entries_it_owns(peers: Peers) -> None:
    first = peers.start(queues={"default": {"limit": 1, "paused": True}})
    jobs = [
        WhereWorker.new({"n": n}, unique={"period": 300}).insert(first)
        for n in range(20)
    ]
    second = peers.start(first, queues={"default": {"limit": 1, "paused": True}})

    # Each duplicate is checked on its owner, which is now sometimes the
    # new peer, and every one of them conflicts.
    for job in jobs:
        duplicate = WhereWorker.new(job.args, unique={"period": 300}).insert(second)
        assert duplicate.conflict is True
        assert duplicate.id == job.id
    assert len(second._unique) > 0
    assert len(first._unique) + len(second._unique) == 20


def test_peer_with_wrong_secret_stays_alone(
    peers: Peers, caplog: pytest.LogCaptureFixture
) -> None:
    first = peers.start()
    with caplog.at_level(logging.WARNING):
        stranger = peers.start(first, secret="another secret of enough length")

    assert members(stranger) == []
    assert members(first) == []
    assert any(
        "does not know the cluster secret" in record.getMessage()
        for record in caplog.records
    )


def test_peers_find_each_other_over_mdns(peers: Peers) -> None:
    first = peers.start(discovery="zeroconf")
    second = peers.start(discovery="zeroconf")

    wait_until(lambda: members(first) == [peer_id(second)])
    wait_until(lambda: members(second) == [peer_id(first)])


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ("shop", "cluster must be a dict"),
        ({"name": "shop"}, "cluster secret must be a str or bytes of at least 16"),
        ({"name": "", "secret": SECRET}, "cluster name must be a printable"),
        ({"name": "shop", "secret": "short"}, "at least 16 characters"),
        ({"name": "shop", "secret": SECRET, "color": 1}, "unknown cluster keys"),
        (
            {"name": "shop", "secret": SECRET, "discovery": "mdns"},
            "must be 'zeroconf' or a list",
        ),
        (
            {"name": "shop", "secret": SECRET, "discovery": ["localhost:80"]},
            "with an IPv4 host",
        ),
        (
            {"name": "shop", "secret": SECRET, "discovery": ["10.0.0.1:0"]},
            "with an IPv4 host",
        ),
        ({"name": "shop", "secret": SECRET, "bind": "0.0.0.0"}, "cluster bind"),
        (
            {"name": "shop", "secret": SECRET, "join_timeout": 0},
            "join_timeout must be seconds > 0",
        ),
    ],
)
def test_bad_cluster_setting_raises(cluster: Any, message: str) -> None:
    with pytest.raises(InvalidOption, match=message):
        stagehand.Stagehand(name=unique_name("bad"), cluster=cluster)


def test_cluster_with_testing_mode_raises() -> None:
    with pytest.raises(InvalidOption, match="needs testing='disabled'"):
        stagehand.Stagehand(
            name=unique_name("bad"),
            testing="manual",
            cluster={"name": "shop", "secret": SECRET},
        )


def test_cluster_with_leader_lock_raises(tmp_path: Any) -> None:
    with pytest.raises(InvalidOption, match="cluster or leader_lock, not both"):
        stagehand.Stagehand(
            name=unique_name("bad"),
            leader_lock=tmp_path / "lock",
            cluster={"name": "shop", "secret": SECRET},
        )


def test_scheduled_time_is_kept_exactly(peers: Peers) -> None:
    leaving = peers.start()
    staying = peers.start(leaving)
    wait_until(lambda: len(members(leaving)) == 1)
    job = WhereWorker.new({}, schedule_in=timedelta(hours=2)).insert(leaving)

    leaving.stop()

    moved = staying.get_job(job.id)  # type: ignore[arg-type]
    assert moved is not None
    assert moved.scheduled_at == job.scheduled_at
    assert moved.inserted_at == job.inserted_at


def test_stop_splits_batches_that_exceed_a_frame(
    peers: Peers, caplog: pytest.LogCaptureFixture
) -> None:
    leaving = peers.start(queues={"default": {"limit": 1, "paused": True}})
    staying = peers.start(leaving, queues={"default": {"limit": 1, "paused": True}})
    wait_until(lambda: len(members(leaving)) == 1)
    # Three of these fit in one 1 MiB frame only one at a time.
    fitting = [
        WhereWorker.new({"n": n, "text": "x" * 400_000}).insert(leaving)
        for n in range(3)
    ]
    too_large = WhereWorker.new({"text": "x" * 1_100_000}).insert(leaving)

    with caplog.at_level(logging.ERROR, logger="stagehand"):
        leaving.stop()

    assert [staying.get_job(job.id) is not None for job in fitting] == [True] * 3  # type: ignore[arg-type]
    assert staying.get_job(too_large.id) is None  # type: ignore[arg-type]
    assert any(
        f"job {too_large.id} is too large" in record.getMessage()
        for record in caplog.records
    )


def test_check_cluster_reports_peers_and_leader(peers: Peers) -> None:
    first = peers.start()
    second = peers.start(first)
    wait_until(lambda: len(members(first)) == 1)

    status = first.check_cluster()

    assert status is not None
    assert status["name"] == peers.cluster
    assert status["peer"] == peer_id(first)
    assert status["address"] == "{}:{}".format(*first._cluster.address)  # type: ignore[union-attr]
    assert status["peers"] == [peer_id(second)]
    assert status["leader"] == min(peer_id(first), peer_id(second))
    assert stagehand.Stagehand(name=unique_name("solo")).check_cluster() is None


def cron_jobs(*instances: stagehand.Stagehand) -> list[str]:
    """Return the cron slots of the jobs on all the given peers, sorted."""
    return sorted(
        job.meta["cron_slot"] for instance in instances for job in instance.jobs()
    )


def test_cron_fires_once_per_cluster(peers: Peers) -> None:
    from datetime import UTC, datetime

    from stagehand import FakeClock
    from stagehand.plugins import Cron

    start = datetime(2026, 3, 1, 11, 59, 30, tzinfo=UTC)
    clock = FakeClock(start)
    config: dict[str, Any] = {
        "clock": clock,
        "queues": {"default": {"limit": 1, "paused": True}},
        "plugins": [(Cron, {"crontab": [("* * * * *", WhereWorker)]})],
    }
    first = peers.start(**config)
    second = peers.start(first, **config)
    wait_until(lambda: len(members(first)) == 1 and len(members(second)) == 1)
    leader, other = (
        (first, second) if peer_id(first) < peer_id(second) else (second, first)
    )
    wait_until(lambda: leader.leadership.is_leader)
    crons = {instance: instance.plugin(Cron) for instance in (first, second)}

    clock.advance(30)
    for instance in (first, second):
        assert crons[instance].wait_caught_up(HANG_GUARD)
    assert cron_jobs(first, second) == ["2026-03-01T12:00:00+00:00"]

    # The leader leaves; its job moves to the other peer, which now leads.
    leader.stop()
    wait_until(lambda: other.leadership.is_leader)
    clock.advance(60)
    assert crons[other].wait_caught_up(HANG_GUARD)
    assert cron_jobs(other) == [
        "2026-03-01T12:00:00+00:00",
        "2026-03-01T12:01:00+00:00",
    ]


def test_peer_events_are_emitted(peers: Peers) -> None:
    from stagehand import events

    seen: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def record(event: str, measurements: Any, metadata: Any) -> None:
        value = metadata.get("peer") or metadata.get("leader")
        with lock:
            seen.append((event, metadata["instance"], value))

    events.attach(
        "cluster-events", ["peer.join", "peer.leave", "leader.change"], record
    )
    try:
        first = peers.start()
        second = peers.start(first)
        wait_until(lambda: members(first) == [peer_id(second)])
        second.stop()
        wait_until(lambda: members(first) == [])
        wait_until(lambda: first.check_cluster()["leader"] == peer_id(first))  # type: ignore[index]
    finally:
        events.detach("cluster-events")

    with lock:
        on_first = [(event, value) for event, name, value in seen if name == first.name]
    assert ("peer.join", peer_id(second)) in on_first
    assert ("peer.leave", peer_id(second)) in on_first
    changes = [value for event, value in on_first if event == "leader.change"]
    # Alone at first, then led by the smaller id of the two, then alone.
    expected = [peer_id(first)]
    if peer_id(second) < peer_id(first):
        expected += [peer_id(second), peer_id(first)]
    assert changes == expected


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_listed_peer_that_restarts_is_joined_again(peers: Peers) -> None:
    port = free_port()
    anchor = peers.start(discovery=[], bind_port=port)
    other = peers.start(anchor)
    wait_until(lambda: members(other) == [peer_id(anchor)])

    anchor.stop()
    wait_until(lambda: members(other) == [])
    restarted = peers.start(discovery=[], bind_port=port)

    # The other peer lists the anchor's address and tries it again.
    wait_until(lambda: members(other) == [peer_id(restarted)])
    wait_until(lambda: members(restarted) == [peer_id(other)])


def test_unreachable_address_warns_after_a_while(
    peers: Peers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A listed peer that has not started yet is normal: INFO first, then a
    # WARNING once the address has kept failing, then nothing above DEBUG.
    import socket

    import stagehand._cluster as cluster_module

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.DEBUG, logger="stagehand._cluster")
    instance = peers.start(discovery=[f"127.0.0.1:{port}"])
    cluster = instance._cluster
    assert cluster is not None
    monkeypatch.setattr(cluster_module, "_WARN_UNREACHABLE", 0.0)
    cluster._connect(("127.0.0.1", port))
    cluster._connect(("127.0.0.1", port))

    levels = [
        record.levelname
        for record in caplog.records
        if record.getMessage().startswith(f"cannot reach the peer at 127.0.0.1:{port}")
    ]
    assert levels[0] == "INFO"
    assert levels.count("WARNING") == 1
    assert set(levels[1:]) == {"WARNING", "DEBUG"}

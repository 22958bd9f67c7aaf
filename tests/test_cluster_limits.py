"""Cluster mode at its edges: large entries and jobs, joins and stops that
race, peers that send odd state, and unique entries that outlive a peer.

Peers run in this process on 127.0.0.1, as in tests/test_cluster.py. Where
a race decides the outcome, a hook sets the order of events.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import stagehand
import stagehand._cluster as cluster_module
from stagehand._rendezvous import owner
from stagehand._unique import fingerprint
from tests.support import HANG_GUARD, PAUSED, SECRET, Peers, wait_until
from tests.test_cluster import WhereWorker, members, peer_id
from tests.test_cluster_races import RECONNECT_WAIT, new_peer

# Each job of this test file carries this much padding in its args, so that
# a few hundred unique entries make more JSON than one frame (1 MiB) allows.
PAD = "x" * 3000
ALL_STATES = [state.value for state in stagehand.JobState]


def ids_of(*instances: stagehand.Stagehand) -> list[str]:
    return [peer_id(instance) for instance in instances]


def unique_job(n: int, **args: Any) -> stagehand.Job:
    return WhereWorker.new({"n": n, **args}, unique={"period": 300})


def find_job(test: Callable[[str], bool]) -> stagehand.Job:
    """Return a unique job whose fingerprint passes `test`."""
    for n in range(10_000):
        job = unique_job(n)
        if test(fingerprint(job)):
            return job
    raise AssertionError("no fingerprint passes the test")


def copies(job_args: dict[str, Any], *instances: stagehand.Stagehand) -> int:
    """Count the jobs with these args on the given peers."""
    return sum(
        found.args == job_args
        for instance in instances
        for found in instance.jobs(worker=WhereWorker)
    )


def test_join_keeps_oversized_entries(peers: Peers) -> None:
    first = peers.start(queues=PAUSED)
    jobs = [unique_job(n, pad=PAD).insert(first) for n in range(800)]
    second = peers.start(first, queues=PAUSED)
    # Whatever happened to the first join, the peers are connected again
    # within the attempts to join again.
    wait_until(
        lambda: (
            members(second) == [peer_id(first)] and members(first) == [peer_id(second)]
        ),
        timeout=RECONNECT_WAIT,
    )

    duplicates = [unique_job(n, pad=PAD).insert(second) for n in range(800)]

    assert [duplicate.conflict for duplicate in duplicates] == [True] * 800
    assert len(first.jobs(worker=WhereWorker)) == 800
    assert second.jobs(worker=WhereWorker) == []
    assert jobs[0].id == duplicates[0].id


def test_stop_hands_oversized_entries(peers: Peers) -> None:
    first = peers.start(queues={"default": 4})
    second = peers.start(first, queues={"default": 4})
    ids = ids_of(first, second)
    # Completed jobs on the first peer: their entries outlive them, and
    # they block duplicates in every state.
    jobs = [
        WhereWorker.new(
            {"n": n, "pad": PAD}, unique={"period": 300, "states": ALL_STATES}
        )
        for n in range(2000)
    ]
    first_owned = [
        job for job in jobs if owner(fingerprint(job), ids) == peer_id(first)
    ][:500]
    inserted = [first.insert(job) for job in first_owned]
    for job in inserted:
        wait_until(lambda job=job: job.state is stagehand.JobState.COMPLETED)

    try:
        first.stop()
        closed = first._cluster._closed  # type: ignore[union-attr]
    finally:
        first._cluster.close()  # type: ignore[union-attr]

    assert closed is True
    duplicates = [
        second.insert(
            WhereWorker.new(job.args, unique={"period": 300, "states": ALL_STATES})
        )
        for job in first_owned
    ]
    assert [duplicate.conflict for duplicate in duplicates] == [True] * 500


def test_rejoin_moves_entries_to_owner(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = peers.start(queues=PAUSED)
    second = peers.start(first, queues=PAUSED)
    wait_until(lambda: members(first) == [peer_id(second)])
    cluster = first._cluster
    assert cluster is not None
    # The first peer tries to join again only after the test releases it.
    release = threading.Event()
    rejoin = cluster._rejoin

    def rejoin_when_released(lost: Any) -> None:
        release.wait(HANG_GUARD)
        rejoin(lost)

    monkeypatch.setattr(cluster, "_rejoin", rejoin_when_released)
    # This acts like a broken TCP connection that the first peer notices.
    cluster._members[peer_id(second)].connection.close()
    wait_until(lambda: members(first) == [])
    ids = ids_of(first, second)
    job = find_job(lambda key: owner(key, ids) == peer_id(second))
    # Alone, the first peer owns every fingerprint.
    inserted = first.insert(job)
    release.set()
    wait_until(lambda: members(first) == [peer_id(second)], timeout=RECONNECT_WAIT)
    # The entry moves right after the join; a duplicate inserted before it
    # arrives is not caught, which docs/cluster.md lists among the limits.
    wait_until(lambda: second._unique.peek(fingerprint(job)) is not None)

    duplicate = second.insert(unique_job(job.args["n"]))

    assert duplicate.conflict is True
    assert duplicate.id == inserted.id
    assert copies(job.args, first, second) == 1


def test_stale_routed_insert_reaches_owner(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = peers.start(queues=PAUSED)
    second = peers.start(first, queues=PAUSED)
    wait_until(lambda: members(first) == [peer_id(second)])
    # A short join_timeout: the routed insert below waits for the third
    # peer's join, which the test blocks until the insert has returned.
    third = new_peer(peers, first, cluster={"join_timeout": 2})
    # The third peer lists only the first one and learns of the second one
    # from the join reply. It joins the second one after the test releases it.
    real_connect = cluster_module.connect
    holding = threading.Event()
    release = threading.Event()
    second_address = second._cluster.address  # type: ignore[union-attr]

    def connect_when_released(
        address: tuple[str, int], *args: Any, **kwargs: Any
    ) -> Any:
        if address == second_address and threading.current_thread().name.startswith(
            "stagehand-cluster-join-"
        ):
            holding.set()
            release.wait(HANG_GUARD)
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(cluster_module, "connect", connect_when_released)
    starting = threading.Thread(target=third.start)
    starting.start()
    try:
        assert holding.wait(HANG_GUARD)
        assert members(second) == [peer_id(first)]
        everyone = ids_of(first, second, third)
        job = find_job(
            lambda key: (
                owner(key, everyone) == peer_id(third)
                and owner(key, ids_of(first, second)) == peer_id(first)
            )
        )
        # The second peer has only the first as a member, so it routes the
        # job there.
        inserted = second.insert(job)
    finally:
        release.set()
        starting.join(HANG_GUARD)
    assert not starting.is_alive()
    wait_until(lambda: members(second) == sorted(ids_of(first, third)))

    duplicate = third.insert(unique_job(job.args["n"]))

    assert duplicate.conflict is True
    assert duplicate.id == inserted.id
    assert copies(job.args, first, second, third) == 1


def test_simultaneous_stop_reaches_survivor(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = peers.start(queues=PAUSED)
    second = peers.start(first, queues=PAUSED)
    third = peers.start(first, queues=PAUSED)
    for instance in (first, second, third):
        wait_until(lambda instance=instance: len(members(instance)) == 2)
    jobs = [WhereWorker.new({"n": n}).insert(first) for n in range(10)]
    cluster = first._cluster
    assert cluster is not None
    connection = cluster._members[peer_id(second)].connection
    request = connection.request

    def second_stops_first(message: dict[str, Any], timeout: float) -> Any:
        # The second peer stops at the same moment as the first one: after
        # the first peer chose it for a batch and before the batch goes out.
        if message.get("type") == "adopt":
            second.stop()
            wait_until(lambda: connection._error is not None)
        return request(message, timeout)

    monkeypatch.setattr(connection, "request", second_stops_first)

    first.stop()

    assert sorted(job.id for job in third.jobs(worker=WhereWorker)) == sorted(
        job.id for job in jobs
    )


def test_refused_unique_job_follows_rendezvous(peers: Peers) -> None:
    mailers = {"default": 1, "mailers": {"limit": 1, "paused": True}}
    first = peers.start(queues=mailers)
    without_queue = peers.start(first, queues={"default": 1})
    others = [peers.start(first, queues=mailers) for _ in range(2)]
    for instance in (first, without_queue, *others):
        wait_until(lambda instance=instance: len(members(instance)) == 3)
    survivors = ids_of(without_queue, *others)
    everyone = [peer_id(first), *survivors]
    larger_id = max(ids_of(*others))

    def has_expected_order(key: str) -> bool:
        # The first peer owns it now, and the peer without the queue owns it
        # after the first one stops. The next in rendezvous order is then
        # the peer with the larger id, not the one that sorts first.
        order = cluster_module.ranked(key, everyone)
        return order[:3] == [peer_id(first), peer_id(without_queue), larger_id]

    for n in range(10_000):
        job = WhereWorker.new({"n": n}, queue="mailers", unique={"period": 300})
        if has_expected_order(fingerprint(job)):
            break
    else:
        raise AssertionError("no fingerprint has the expected order")
    inserted = first.insert(job)
    assert first.get_job(inserted.id) is not None  # type: ignore[arg-type]

    first.stop()

    duplicate = others[0].insert(
        WhereWorker.new(job.args, queue="mailers", unique={"period": 300})
    )
    assert duplicate.conflict is True
    assert duplicate.id == inserted.id
    assert copies(job.args, without_queue, *others) == 1


def test_survey_lists_member_with_error(
    peers: Peers, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from stagehand_django.control import ControlServer
    from tests.test_django_control import ask

    first = peers.start()
    second = peers.start(first)
    wait_until(lambda: members(first) == [peer_id(second)])
    server = ControlServer(str(tmp_path / "run"), first)
    try:

        def raise_error() -> dict[str, Any]:
            raise RuntimeError("status is not available")

        monkeypatch.setattr(second._cluster, "local_status", raise_error)
        try:
            report = ask(server.path, b'{"op": "status"}\n')
        except ValueError:
            report = {}
        monkeypatch.undo()
        survey = report.get("cluster", {}).get("survey", [])
        assert [entry["peer"] for entry in survey] == sorted(ids_of(first, second))
        assert ["error" in entry for entry in survey] == [
            entry["peer"] == peer_id(second) for entry in survey
        ]
    finally:
        server.close()


def test_naive_cron_cursor_keeps_cron(peers: Peers) -> None:
    from datetime import UTC, datetime

    from stagehand import FakeClock
    from stagehand._channel import ChannelServer, connect
    from stagehand.plugins import Cron
    from tests.test_cluster import cron_jobs

    clock = FakeClock(datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC))
    first = peers.start(
        clock=clock,
        queues=PAUSED,
        plugins=[(Cron, {"crontab": [("* * * * *", WhereWorker)]})],
    )
    assert first.leadership.is_leader is True
    # A peer whose id sorts first sends the bad cursor and joins, so it
    # leads. Then it closes, and the first peer leads again.
    smallest = "0" * 10
    with ChannelServer(
        SECRET, peers.cluster, smallest, lambda peer, message: {}, host="127.0.0.1"
    ) as fake:
        with connect(
            first._cluster.address,  # type: ignore[union-attr]
            SECRET,
            peers.cluster,
            smallest,
        ) as connection:
            for request in (
                {"type": "state", "key": "cron.cursor", "value": "2026-03-01T12:00:00"},
                {"type": "join", "address": list(fake.address)},
            ):
                assert "error" not in connection.request(request, HANG_GUARD)
        wait_until(lambda: first.leadership.is_leader is False)
    wait_until(lambda: first.leadership.is_leader is True)

    clock.advance(60)
    assert first.plugin(Cron).wait_caught_up(HANG_GUARD)
    assert cron_jobs(first) == ["2026-03-01T12:01:00+00:00"]


def test_completed_entry_outlives_its_peer(
    peers: Peers,
) -> None:
    first = peers.start(queues={"default": 1})
    second = peers.start(first, queues={"default": 1})
    wait_until(lambda: members(first) == [peer_id(second)])
    ids = ids_of(first, second)
    unique = {"period": None, "states": ALL_STATES}
    job = next(
        candidate
        for candidate in (
            WhereWorker.new({"n": n}, unique=unique) for n in range(10_000)
        )
        if owner(fingerprint(candidate), ids) == peer_id(first)
    )
    inserted = first.insert(job)
    wait_until(lambda: inserted.state is stagehand.JobState.COMPLETED)

    first.stop()

    duplicate = second.insert(WhereWorker.new(job.args, unique=unique))
    assert duplicate.conflict is True
    assert duplicate.id == inserted.id
    assert second.jobs(worker=WhereWorker) == []


def test_handed_over_job_keeps_period(peers: Peers) -> None:
    from datetime import UTC, datetime

    from stagehand import FakeClock

    clock = FakeClock(datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC))
    first = peers.start(clock=clock, queues=PAUSED)
    second = peers.start(first, clock=clock, queues=PAUSED)
    wait_until(lambda: members(first) == [peer_id(second)])
    ids = ids_of(first, second)
    unique = {"period": 60, "states": ALL_STATES}
    job = next(
        candidate
        for candidate in (
            WhereWorker.new({"n": n}, unique=unique) for n in range(10_000)
        )
        if owner(fingerprint(candidate), ids) == peer_id(first)
    )
    inserted = first.insert(job)
    clock.advance(50)
    first.stop()
    moved = second.get_job(inserted.id)  # type: ignore[arg-type]
    assert moved is not None
    second.cancel_job(moved.id)  # type: ignore[arg-type]
    # 70 s after the insert: the period of 60 s has ended.
    clock.advance(20)

    again = second.insert(WhereWorker.new(job.args, unique=unique))

    assert again.conflict is False
    assert again.id != inserted.id


def test_django_cluster_none_keeps_lock(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from stagehand._leadership import FileLockLeadership
    from stagehand_django import conf, lifecycle

    # What conf.instance_kwargs returns for these settings, without
    # configuring Django in this module.
    monkeypatch.setattr(
        conf,
        "instance_kwargs",
        lambda: {"queues": {"default": 1}, "cluster": None, "name": "default"},
    )
    monkeypatch.setattr(conf, "runtime_dir", lambda: str(tmp_path / "run"))
    instance = lifecycle._build()
    try:
        assert isinstance(instance.leadership, FileLockLeadership)
    finally:
        instance.stop()


def test_routed_insert_near_frame_limit(peers: Peers) -> None:
    import json

    from stagehand._channel import MAX_FRAME

    first = peers.start(queues=PAUSED)
    second = peers.start(first, queues=PAUSED)
    wait_until(lambda: members(first) == [peer_id(second)])
    ids = ids_of(first, second)

    def request_size(job: stagehand.Job) -> int:
        request = {
            "type": "insert",
            "job": cluster_module._new_job_to_wire(job),
            "rid": 1,
        }
        return len(json.dumps(request, separators=(",", ":")))

    def near_the_limit(n: int) -> stagehand.Job:
        # A job whose insert request is 100 bytes under the limit of a frame.
        size = request_size(
            WhereWorker.new({"n": n, "pad": ""}, unique={"period": 300})
        )
        pad = "x" * (MAX_FRAME - 100 - size)
        return WhereWorker.new({"n": n, "pad": pad}, unique={"period": 300})

    job = next(
        candidate
        for candidate in map(near_the_limit, range(10_000))
        if owner(fingerprint(candidate), ids) == peer_id(second)
    )
    assert request_size(job) == MAX_FRAME - 100

    try:
        inserted: stagehand.Job | None = first.insert(job)
    except stagehand.StagehandError:
        inserted = None

    on_owner = [found.id for found in second.jobs(worker=WhereWorker)]
    assert len(on_owner) == 1
    assert inserted is not None
    assert inserted.id == on_owner[0]


def test_join_keeps_no_record_of_moved_entries(peers: Peers) -> None:
    # Only stop() sends entries of running jobs a second time, so a join
    # that moves them must not keep them.
    first = peers.start(queues=PAUSED)
    for n in range(20):
        unique_job(n).insert(first)
    second = peers.start(first, queues=PAUSED)
    wait_until(lambda: members(first) == [peer_id(second)])

    assert len(second._unique) > 0
    assert first._cluster._sent_running == []  # type: ignore[union-attr]

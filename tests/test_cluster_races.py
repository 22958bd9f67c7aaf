"""Cluster mode in races, lost connections and bad input from peers.

Peers run in this process on 127.0.0.1, as in tests/test_cluster.py. Where
a race decides the outcome, the test sets the order of events with a hook
instead of waiting for the race to go one way.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import stagehand
import stagehand._cluster as cluster_module
from stagehand._channel import ChannelError, connect
from stagehand._rendezvous import owner
from stagehand._unique import fingerprint
from stagehand.plugins import Cron
from tests.support import HANG_GUARD, SECRET, Peers, unique_name, wait_until
from tests.test_cluster import WhereWorker, members, peer_id

# Seconds to wait for peers to find each other again after a lost
# connection. This is far longer than a reconnect needs.
RECONNECT_WAIT = 20.0


def new_peer(
    peers: Peers, *join: stagehand.Stagehand, **config: Any
) -> stagehand.Stagehand:
    """Build a peer that joins `join`, registered for cleanup but not started."""
    cluster = {
        "name": peers.cluster,
        "secret": SECRET,
        "discovery": ["{}:{}".format(*peer._cluster.address) for peer in join],  # type: ignore[union-attr]
        "bind": "127.0.0.1:0",
        "join_timeout": HANG_GUARD,
    }
    cluster.update(config.pop("cluster", {}))
    config.setdefault("queues", {"default": {"limit": 1, "paused": True}})
    instance = stagehand.Stagehand(name=unique_name("peer"), cluster=cluster, **config)
    peers.started.append(instance)
    return instance


def start_while_discovered(
    monkeypatch: pytest.MonkeyPatch,
    known: stagehand.Stagehand,
    joining: stagehand.Stagehand,
) -> None:
    """Start `joining` while `known` discovers it, as mDNS makes both do.

    `known` joins `joining` right after `joining` has connected to it and
    before `joining` records that connection: the order in which two peers
    that discover each other at the same moment can run.
    """
    real_connect = cluster_module.connect
    done = threading.Event()

    def connect_then_get_discovered(*args: Any, **kwargs: Any) -> Any:
        connection = real_connect(*args, **kwargs)
        joining_thread = threading.current_thread().name.startswith(
            "stagehand-cluster-join-"
        )
        if (
            joining_thread
            and not done.is_set()
            and connection.remote_peer_id == peer_id(known)
        ):
            done.set()
            known._cluster._join(joining._cluster.address)  # type: ignore[union-attr]
        return connection

    monkeypatch.setattr(cluster_module, "connect", connect_then_get_discovered)
    thread = threading.Thread(target=joining.start, name="joiner")
    thread.start()
    thread.join(HANG_GUARD)
    monkeypatch.setattr(cluster_module, "connect", real_connect)
    assert done.is_set()
    assert not thread.is_alive()


def test_join_race_moves_entries(peers: Peers, monkeypatch: pytest.MonkeyPatch) -> None:
    first = peers.start(queues={"default": {"limit": 1, "paused": True}})
    jobs = [
        WhereWorker.new({"n": n}, unique={"period": 300}).insert(first)
        for n in range(20)
    ]
    second = new_peer(peers, first)

    start_while_discovered(monkeypatch, first, second)

    assert members(first) == [peer_id(second)]
    assert members(second) == [peer_id(first)]
    ids = [peer_id(first), peer_id(second)]
    # Both own some of 20 fingerprints. The chance of one owning all is
    # 2 * 0.5**20, about 2 in a million.
    assert {owner(fingerprint(job), ids) for job in jobs} == set(ids)
    duplicates = [
        WhereWorker.new(job.args, unique={"period": 300}).insert(second) for job in jobs
    ]
    assert [duplicate.conflict for duplicate in duplicates] == [True] * 20
    assert [duplicate.id for duplicate in duplicates] == [job.id for job in jobs]


def test_join_race_meshes_third_peer(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = peers.start()
    third = peers.start(first)
    second = new_peer(peers, first)

    start_while_discovered(monkeypatch, first, second)

    everyone = sorted(map(peer_id, (first, second, third)))
    for instance in (first, second, third):
        wait_until(
            lambda instance=instance: (
                sorted([peer_id(instance), *members(instance)]) == everyone
            ),
            timeout=RECONNECT_WAIT,
        )
    leaders = [p.leadership.is_leader for p in (first, second, third)]
    assert leaders.count(True) == 1


def test_moved_entry_stops_blocking_after_completion(
    peers: Peers,
) -> None:
    first = peers.start(queues={"default": {"limit": 1, "paused": True}})
    jobs = [
        WhereWorker.new({"n": n}, unique={"period": None}).insert(first)
        for n in range(20)
    ]
    second = peers.start(first, queues={"default": {"limit": 1, "paused": True}})
    ids = [peer_id(first), peer_id(second)]
    assert {owner(fingerprint(job), ids) for job in jobs} == set(ids)

    first.resume_queue("default")
    for job in jobs:
        wait_until(lambda job=job: job.state is stagehand.JobState.COMPLETED)

    # A completed job blocks no duplicate (the default states), so each of
    # these is a new job, as it is in a single process.
    again = [
        WhereWorker.new(job.args, unique={"period": None}).insert(second)
        for job in jobs
    ]
    assert [job.conflict for job in again] == [False] * 20


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """Yield a listener on 127.0.0.1 that accepts connections and never replies."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(HANG_GUARD)
    yield listener
    listener.close()


def test_stop_during_start_leaves_no_cron_thread(
    peers: Peers, silent_listener: socket.socket
) -> None:
    host, port = silent_listener.getsockname()
    instance = new_peer(
        peers,
        plugins=[(Cron, {"crontab": [("* * * * *", "tests.workers.EchoWorker", {})]})],
        cluster={"discovery": [f"{host}:{port}"], "request_timeout": 2},
    )
    plugin = instance.plugin(Cron)
    starting = threading.Thread(target=instance.start)
    starting.start()
    # Once accepted, the peer waits for a handshake that never comes.
    accepted, _ = silent_listener.accept()
    try:
        instance.stop()
        starting.join(HANG_GUARD)
        assert not starting.is_alive()
        cron_threads = [
            thread.name
            for thread in threading.enumerate()
            if thread.name == f"stagehand-cron-{instance.name}"
        ]
        assert cron_threads == []
    finally:
        accepted.close()
        plugin.stop()


def test_dropped_connection_is_made_again(peers: Peers) -> None:
    first = peers.start()
    second = peers.start(first)
    wait_until(lambda: len(members(first)) == 1 and len(members(second)) == 1)
    smaller, larger = sorted((first, second), key=peer_id)
    wait_until(lambda: smaller.leadership.is_leader)

    # This acts like a broken TCP connection. Both peers keep running.
    larger._cluster._members[peer_id(smaller)].connection.close()  # type: ignore[union-attr]

    wait_until(lambda: members(larger) == [peer_id(smaller)], timeout=RECONNECT_WAIT)
    assert members(smaller) == [peer_id(larger)]
    wait_until(lambda: not larger.leadership.is_leader)
    assert smaller.leadership.is_leader is True


def test_invalid_entry_skipped(peers: Peers) -> None:
    first = peers.start()
    # stop() hands unique entries over only when another member is left.
    peers.start(first)
    wait_until(lambda: len(members(first)) == 1)
    entry_job = {
        "worker": WhereWorker._stagehand_path,  # type: ignore[attr-defined]
        "args": {},
        "queue": "default",
        "meta": {},
        "tags": [],
        "priority": 0,
        "max_attempts": 20,
        "attempt": 0,
        "state": "available",
        "id": "from-a-peer-1",
        "inserted_at": "2026-01-01T00:00:00+00:00",
        "scheduled_at": None,
        "unique": None,
    }
    with connect(
        first._cluster.address,  # type: ignore[union-attr]
        SECRET,
        peers.cluster,
        "a-peer",
    ) as connection:
        connection.request(
            {
                "type": "entries",
                "entries": [
                    {"fingerprint": "f" * 64, "expires_in": 100, "job": entry_job}
                ],
            },
            HANG_GUARD,
        )

    try:
        first.stop()
        closed = first._cluster._closed  # type: ignore[union-attr]
    finally:
        first._cluster.close()  # type: ignore[union-attr]
    assert closed is True


def test_malformed_requests_rejected(
    peers: Peers, caplog: pytest.LogCaptureFixture
) -> None:
    first = peers.start()
    requests = [
        {"type": "join", "address": "127.0.0.1"},
        {"type": "insert", "job": {}},
        {"type": "adopt", "jobs": 5},
        {"type": "entries", "entries": 5},
        {"type": "state"},
    ]
    with (
        caplog.at_level(logging.WARNING, logger="stagehand"),
        connect(
            first._cluster.address,  # type: ignore[union-attr]
            SECRET,
            peers.cluster,
            "a-peer",
        ) as connection,
    ):
        replies = [connection.request(request, HANG_GUARD) for request in requests]

    assert ["error" in reply for reply in replies] == [True] * len(requests)
    tracebacks = [record.getMessage() for record in caplog.records if record.exc_info]
    assert tracebacks == []


def test_wildcard_bind_sends_reachable_address(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = peers.start()
    second = new_peer(peers, first)
    cluster = second._cluster
    assert cluster is not None
    # The server listens on 127.0.0.1 but reports what a server bound to
    # 0.0.0.0 reports, so that nothing here binds the wildcard address.
    cluster.settings = dataclasses.replace(cluster.settings, bind=("0.0.0.0", 0))
    server = cluster._server
    real_start = server.start

    def start_as_wildcard() -> None:
        real_start()
        server._address = ("0.0.0.0", server._address[1])  # type: ignore[index]

    monkeypatch.setattr(server, "start", start_as_wildcard)
    # Connections go to 127.0.0.0/8 only, and any other address is rejected.
    real_connect = cluster_module.connect
    rejected: list[tuple[str, int]] = []

    def loopback_only(address: tuple[str, int], *args: Any, **kwargs: Any) -> Any:
        if not ipaddress.IPv4Address(address[0]).is_loopback:
            rejected.append(address)
            raise ChannelError(
                f"connection to {address[0]} rejected: this test connects only "
                "to 127.0.0.0/8"
            )
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(cluster_module, "connect", loopback_only)

    second.start()

    assert members(second) == [peer_id(first)]
    assert rejected == []
    assert members(first) == [peer_id(second)]


def test_joining_owner_inserts_once(
    peers: Peers, silent_listener: socket.socket
) -> None:
    first = new_peer(peers, cluster={"request_timeout": 1})
    first.start()
    host, port = silent_listener.getsockname()
    # The second peer joins the first, then waits on a peer that never
    # replies, so its join is not finished until the test closes that socket.
    second = new_peer(
        peers,
        first,
        cluster={
            "discovery": [
                "{}:{}".format(*first._cluster.address),  # type: ignore[union-attr]
                f"{host}:{port}",
            ],
            "request_timeout": HANG_GUARD,
            "join_timeout": 2,
        },
    )
    starting = threading.Thread(target=second.start)
    starting.start()
    accepted, _ = silent_listener.accept()
    try:
        wait_until(lambda: members(first) == [peer_id(second)])
        ids = [peer_id(first), peer_id(second)]
        job = next(
            candidate
            for candidate in (
                WhereWorker.new({"n": n}, unique={"period": 300}) for n in range(100)
            )
            if owner(fingerprint(candidate), ids) == peer_id(second)
        )
        inserted = first.insert(job)
    finally:
        accepted.close()
        starting.join(HANG_GUARD)
    assert not starting.is_alive()
    # Replies on one connection come in the order of the requests, so this
    # reply comes after the second peer has handled the insert.
    first._cluster._members[peer_id(second)].connection.request(  # type: ignore[union-attr]
        {"type": "barrier"}, HANG_GUARD
    )

    copies = [
        found.id
        for instance in (first, second)
        for found in instance.jobs(worker=WhereWorker)
    ]
    assert copies == [inserted.id]


def test_unique_insert_skips_owner_without_the_queue(peers: Peers) -> None:
    first = peers.start(queues={"default": 1, "mailers": {"limit": 1, "paused": True}})
    second = peers.start(first, queues={"default": 1})
    wait_until(lambda: len(members(first)) == 1)
    ids = [peer_id(first), peer_id(second)]
    job = next(
        candidate
        for candidate in (
            WhereWorker.new({"n": n}, queue="mailers", unique={"period": 300})
            for n in range(100)
        )
        if owner(fingerprint(candidate), ids) == peer_id(second)
    )

    inserted = first.insert(job)

    assert inserted.conflict is False
    assert first.get_job(inserted.id) is not None  # type: ignore[arg-type]


def test_unanswered_routed_insert_raises(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick = {"request_timeout": 0.5, "join_timeout": 0.5}
    first = new_peer(peers, cluster=quick)
    first.start()
    second = new_peer(peers, first, cluster=quick)
    second.start()
    wait_until(lambda: members(first) == [peer_id(second)])
    ids = [peer_id(first), peer_id(second)]
    job = next(
        candidate
        for candidate in (
            WhereWorker.new({"n": n}, unique={"period": 300}) for n in range(100)
        )
        if owner(fingerprint(candidate), ids) == peer_id(second)
    )
    # The owner takes the request and replies only after the sender has timed out.
    release = threading.Event()
    handle = second._cluster._on_insert  # type: ignore[union-attr]

    def slow_insert(message: dict[str, Any]) -> dict[str, Any]:
        release.wait(HANG_GUARD)
        return handle(message)

    monkeypatch.setattr(second._cluster, "_on_insert", slow_insert)

    with pytest.raises(stagehand.StagehandError, match="which did not answer"):
        first.insert(job)

    assert first.jobs(worker=WhereWorker) == []
    release.set()
    wait_until(lambda: len(second.jobs(worker=WhereWorker)) == 1)

"""Races in unique ownership changes and in the pool of request threads.

Covers the duplicate check that re-routes a job when a peer joined since
the owner was chosen (`Cluster.insert_owned`), the entries that a peer
receives while another peer joins or crashes (`Cluster._receive_entries`),
and the request threads of `ChannelServer`. Each test sets the order of
events with a hook, as tests/test_unique_ownership.py does.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any

import pytest

import stagehand
import stagehand._cluster as cluster_module
from stagehand._channel import ChannelServer, connect
from stagehand._rendezvous import owner
from stagehand._unique import fingerprint
from stagehand.exceptions import StagehandError
from tests.support import HANG_GUARD, PAUSED, SECRET, Gate, Peers, wait_until
from tests.test_cluster import WhereWorker, members, peer_id
from tests.test_cluster_races import new_peer
from tests.test_cluster_seventh_review import run


def job_with_owners(
    before: list[stagehand.Stagehand],
    first_owner: stagehand.Stagehand,
    after: list[stagehand.Stagehand],
    later_owner: stagehand.Stagehand,
) -> stagehand.Job:
    """Return a unique job that `first_owner` owns among `before`, and `later_owner` among `after`."""
    early = [peer_id(peer) for peer in before]
    late = [peer_id(peer) for peer in after]
    return next(
        candidate
        for candidate in (
            WhereWorker.new({"n": n}, unique={"period": 300}) for n in range(5000)
        )
        if owner(fingerprint(candidate), early) == peer_id(first_owner)
        and owner(fingerprint(candidate), late) == peer_id(later_owner)
    )


def copy_of(job: stagehand.Job) -> stagehand.Job:
    return WhereWorker.new(job.args, unique={"period": 300})


def jobs_for(key: str, *instances: stagehand.Stagehand) -> list[str]:
    """Return the ids of the live jobs with fingerprint `key` on `instances`."""
    return [
        job.id  # type: ignore[misc]
        for instance in instances
        for job in list(instance._live.values())
        if job.unique is not None and fingerprint(job) == key
    ]


def test_rerouted_insert_timeout_raises(
    peers: Peers, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    inserting = peers.start(queues=PAUSED)
    chosen = peers.start(inserting, queues=PAUSED)
    wait_until(lambda: members(inserting) == [peer_id(chosen)])
    joining = new_peer(peers, chosen, queues=PAUSED)
    job = job_with_owners(
        [inserting, chosen], chosen, [inserting, chosen, joining], joining
    )
    key = fingerprint(job)
    cluster = chosen._cluster
    assert cluster is not None

    # `chosen` takes the routed insert as its owner and stops before the check.
    check = Gate()
    cleanup.append(check.release.set)
    real_wait = cluster._await_hand_overs

    def held() -> None:
        if not check.entered.is_set():
            check.hold()
        real_wait()

    monkeypatch.setattr(cluster, "_await_hand_overs", held)
    # The peer that joins meanwhile gets the re-routed insert, and its reply
    # arrives after the request timed out.
    slow = Gate()
    cleanup.append(slow.release.set)
    outcome = run(cleanup, lambda: inserting.insert(job))
    assert check.entered.wait(HANG_GUARD)
    joining.start()
    wait_until(lambda: peer_id(joining) in members(chosen))
    late = joining._cluster
    assert late is not None
    real_on_insert = late._on_insert

    def answer_late(message: dict[str, Any]) -> dict[str, Any]:
        slow.hold()
        return real_on_insert(message)

    monkeypatch.setattr(late, "_on_insert", answer_late)
    monkeypatch.setattr(
        cluster,
        "settings",
        dataclasses.replace(cluster.settings, request_timeout=0.5, join_timeout=0.5),
    )
    check.release.set()
    wait_until(lambda: outcome != [])
    # The insert on `joining` completes once its handler is released.
    slow.release.set()
    wait_until(lambda: jobs_for(key, joining) != [])

    # `chosen` could not know whether `joining` inserted the job, so the
    # insert must fail rather than insert it on another peer as well.
    assert isinstance(outcome[0], StagehandError), outcome
    assert len(jobs_for(key, inserting, chosen, joining)) == 1


def test_entry_received_during_join_moves(
    peers: Peers, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = peers.start(queues=PAUSED)
    receiver = peers.start(sender, queues=PAUSED)
    wait_until(lambda: members(sender) == [peer_id(receiver)])
    joining = new_peer(peers, receiver, queues=PAUSED)
    job = job_with_owners(
        [sender, receiver], receiver, [sender, receiver, joining], joining
    )
    key = fingerprint(job)
    cluster = sender._cluster
    assert cluster is not None
    # `sender` hands the entry of its job over, as a leaving peer or a peer
    # that joins does, to the owner it knows of.
    original = cluster.insert_owned(job, sender._insert_unique_here, check=False)
    assert sender._unique.take(lambda taken: taken == key) != []
    entry = cluster_module._entry_to_wire(
        key, original, peer_id(sender), sender.clock.now()
    )

    # `receiver` has read its members, and stops before it stores the entry.
    gate = Gate()
    cleanup.append(gate.release.set)
    real_from_wire = cluster_module._entry_from_wire

    def held(data: Any, from_peer: str) -> Any:
        if data.get("fingerprint") == key and not gate.entered.is_set():
            gate.hold()
        return real_from_wire(data, from_peer)

    monkeypatch.setattr(cluster_module, "_entry_from_wire", held)
    link = cluster._members[peer_id(receiver)].connection
    sent = run(
        cleanup,
        lambda: link.request({"type": "entries", "entries": [entry]}, HANG_GUARD),
    )
    assert gate.entered.wait(HANG_GUARD)
    # `joining` joins `receiver`, which moves the entries it owns now.
    joining.start()
    wait_until(lambda: peer_id(joining) in members(receiver))
    gate.release.set()
    wait_until(lambda: sent != [])
    assert sent == [{}]

    duplicate = joining.insert(copy_of(job))
    assert (duplicate.conflict, duplicate.id) == (True, original.id)


def test_forward_to_lost_owner_returns(
    peers: Peers, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = peers.start(queues=PAUSED)
    receiver = peers.start(sender, queues=PAUSED)
    newest = new_peer(peers, receiver, queues=PAUSED)
    newest.start()
    for instance in (sender, receiver):
        wait_until(lambda instance=instance: peer_id(newest) in members(instance))
    # Among the first two peers `receiver` owns the job, and among all three
    # `newest` does: `sender` hands it to `receiver` as a peer that has not
    # seen `newest` yet would, and `receiver` sends it on to `newest`.
    job = job_with_owners(
        [sender, receiver], receiver, [sender, receiver, newest], newest
    )
    key = fingerprint(job)
    cluster = sender._cluster
    assert cluster is not None
    original = cluster.insert_owned(job, sender._insert_unique_here, check=False)
    assert sender._unique.take(lambda taken: taken == key) != []
    entry = cluster_module._entry_to_wire(
        key, original, peer_id(sender), sender.clock.now()
    )
    # `newest` crashes while it handles the entry, so it never replies.
    crashing_cluster = newest._cluster
    assert crashing_cluster is not None
    gate = Gate()
    cleanup.append(gate.release.set)
    real_receive = crashing_cluster._receive_entries

    def crashing(*args: Any, **kwargs: Any) -> None:
        gate.hold()
        real_receive(*args, **kwargs)

    monkeypatch.setattr(crashing_cluster, "_receive_entries", crashing)
    link = cluster._members[peer_id(receiver)].connection
    sent = run(
        cleanup,
        lambda: link.request({"type": "entries", "entries": [entry]}, HANG_GUARD),
    )
    assert gate.entered.wait(HANG_GUARD)
    # Its connections close, so `receiver` owns the fingerprint again.
    crashing_cluster._server.close(timeout=0.1)
    wait_until(lambda: peer_id(newest) not in members(receiver))
    wait_until(lambda: sent != [])
    assert sent == [{}]
    assert owner(key, [peer_id(sender), peer_id(receiver)]) == peer_id(receiver)

    duplicate = receiver.insert(copy_of(job))
    assert (duplicate.conflict, duplicate.id) == (True, original.id)


def test_idle_thread_serves_one_request(cleanup: list[Any]) -> None:
    fast_done = threading.Event()
    cleanup.append(fast_done.set)

    def handler(peer_id: str, message: dict[str, Any]) -> dict[str, Any]:
        if message["type"] == "slow":
            # Like a routed insert that waits for another peer's reply.
            return {"waited": fast_done.wait(HANG_GUARD)}
        if message["type"] == "fast":
            fast_done.set()
        return {}

    # A thread switch just after the idle thread takes a request from the
    # queue lets the reader thread run. This queue blocks the thread there.
    real: queue.SimpleQueue[Any] = queue.SimpleQueue()
    woke = Gate()
    cleanup.append(woke.release.set)
    armed = threading.Event()

    class Switched:
        """A request queue whose get() blocks the thread once, after the get."""

        def put(self, item: Any) -> None:
            real.put(item)

        def get(self) -> Any:
            item = real.get()
            if item is not None and armed.is_set() and not woke.entered.is_set():
                woke.hold()
            return item

    server = ChannelServer(
        SECRET.encode(),
        "shop",
        "server",
        handler,
        host="127.0.0.1",
        port=0,
        concurrent=lambda message: True,
    )
    server._requests = Switched()  # type: ignore[assignment]
    cleanup.append(server.close)
    server.start()
    conn = connect(server.address, SECRET.encode(), "shop", "client")
    cleanup.append(conn.close)
    assert conn.request({"type": "warm"}, HANG_GUARD) == {}
    wait_until(lambda: server._idle_request_threads == 1)
    armed.set()

    slow = run(cleanup, lambda: conn.request({"type": "slow"}, HANG_GUARD))
    assert woke.entered.wait(HANG_GUARD)
    fast = run(cleanup, lambda: conn.request({"type": "fast"}, 10.0))
    # At cleanup, the slow handler stops waiting before the threads are joined.
    cleanup.append(fast_done.set)
    # Queued behind the slow request, or handled by a thread of its own.
    wait_until(lambda: real.qsize() == 1 or fast_done.is_set())
    woke.release.set()
    wait_until(lambda: fast != [])

    assert fast == [{}]
    wait_until(lambda: slow != [])
    assert slow == [{"waited": True}]

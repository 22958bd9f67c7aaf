"""Unique checks in a cluster while the owner of a fingerprint changes.

Each test uses a hook or a flag to set up the moment a membership change
reaches a peer that is about to check a duplicate. In one, a peer joins
between the choice of the owner and the check. In another, the owner has
begun to leave before its leave request arrives. In a third, a peer hands
an entry to a peer that no longer owns it. In each case the duplicate must
be caught.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

import stagehand
import stagehand._cluster as cluster_module
from stagehand._rendezvous import owner, ranked
from stagehand._unique import RemoteEntry, fingerprint
from tests.support import HANG_GUARD, PAUSED, Peers, wait_until, watching
from tests.test_cluster import WhereWorker, members, peer_id
from tests.test_cluster_races import new_peer


def job_owned_by(
    chosen: stagehand.Stagehand, *others: stagehand.Stagehand
) -> stagehand.Job:
    """Return a new unique job whose fingerprint `chosen` owns among all the peers."""
    ids = [peer_id(chosen), *map(peer_id, others)]
    return next(
        candidate
        for candidate in (
            WhereWorker.new({"n": n}, unique={"period": 300}) for n in range(1000)
        )
        if owner(fingerprint(candidate), ids) == peer_id(chosen)
    )


def two_peers(peers: Peers) -> tuple[stagehand.Stagehand, stagehand.Stagehand]:
    """Start two peers with paused queues, and wait until they have joined."""
    first = peers.start(queues=PAUSED)
    second = peers.start(first, queues=PAUSED)
    wait_until(lambda: members(first) == [peer_id(second)])
    return first, second


def copy_of(job: stagehand.Job) -> stagehand.Job:
    return WhereWorker.new(job.args, unique={"period": 300})


def send_entry(
    holder: stagehand.Stagehand,
    to: stagehand.Stagehand,
    job: stagehand.Job,
) -> stagehand.Job:
    """Insert `job` on `holder`, even if another peer owns it, and send its entry to `to`."""
    cluster = holder._cluster
    assert cluster is not None
    inserted = cluster.insert_owned(job, holder._insert_unique_here, check=False)
    entry = cluster_module._entry_to_wire(
        fingerprint(job), inserted, peer_id(holder), holder.clock.now()
    )
    cluster._members[peer_id(to)].connection.request(
        {"type": "entries", "entries": [entry]}, HANG_GUARD
    )
    return inserted


def test_owner_joining_during_a_check_gets_the_job(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = peers.start(queues=PAUSED)
    second = new_peer(peers, first, queues=PAUSED)
    cluster = first._cluster
    assert cluster is not None
    # The job's fingerprint belongs to `second` once it has joined; until
    # then `first` is the only peer and owns it.
    job = job_owned_by(second, first)
    entered = threading.Event()
    release = threading.Event()
    real_wait = cluster._await_hand_overs

    def held() -> None:
        entered.set()
        release.wait(HANG_GUARD)
        real_wait()

    monkeypatch.setattr(cluster, "_await_hand_overs", held)
    inserted: list[stagehand.Job] = []
    inserting = threading.Thread(target=lambda: inserted.append(first.insert(job)))
    inserting.start()
    assert entered.wait(HANG_GUARD)
    # `first` chose itself as the owner; `second` joins before the check.
    second.start()
    assert members(first) == [peer_id(second)]
    release.set()
    inserting.join(HANG_GUARD)
    assert not inserting.is_alive()

    [result] = inserted
    assert result.id is not None
    assert first.get_job(result.id) is None
    assert second.get_job(result.id) is not None
    duplicate = second.insert(copy_of(job))
    assert (duplicate.conflict, duplicate.id) == (True, result.id)


def test_leaving_owner_hands_over_first(peers: Peers) -> None:
    first, second = two_peers(peers)
    leaving = second._cluster
    assert leaving is not None
    job = job_owned_by(second, first)
    original = second.insert(job)
    assert second.get_job(original.id) is not None  # type: ignore[arg-type]

    # stop() has begun on `second`, and its leave request has not reached
    # `first` yet, so `second` replies "leaving" to routed inserts.
    with leaving._lock:
        leaving._leaving = True
    results: list[stagehand.Job] = []
    inserting = threading.Thread(
        target=lambda: results.append(first.insert(copy_of(job)))
    )
    inserting.start()
    # `first` takes that reply as notice of the leave, and its check waits
    # for the entries that `second` hands over.
    wait_until(lambda: peer_id(second) in first._cluster._departing)  # type: ignore[union-attr]
    assert results == []
    leaving.hand_over_entries()
    leaving.handed()
    inserting.join(HANG_GUARD)
    assert not inserting.is_alive()

    [duplicate] = results
    assert (duplicate.conflict, duplicate.id) == (True, original.id)


def test_entry_goes_on_to_newer_owner(peers: Peers) -> None:
    first = peers.start(queues=PAUSED)
    second = peers.start(first, queues=PAUSED)
    third = peers.start(first, second, queues=PAUSED)
    everyone = sorted(map(peer_id, (first, second, third)))
    for instance in (first, second, third):
        wait_until(
            lambda instance=instance: (
                sorted([peer_id(instance), *members(instance)]) == everyone
            )
        )
    # Among the first two peers `first` owns the fingerprint, and among all
    # three `third` does. `second` has the job, and hands its entry to
    # `first` as a peer that has not seen `third` join would.
    ids = list(map(peer_id, (first, second, third)))
    job = next(
        candidate
        for candidate in (
            WhereWorker.new({"n": n}, unique={"period": 300}) for n in range(1000)
        )
        if owner(fingerprint(candidate), ids[:2]) == ids[0]
        and owner(fingerprint(candidate), ids) == ids[2]
    )
    original = send_entry(second, first, job)

    key = fingerprint(job)
    assert first._unique.peek(key) is None
    moved: Any = third._unique.peek(key)
    assert isinstance(moved, RemoteEntry)
    assert (moved.id, moved.holder) == (original.id, ids[1])
    duplicate = first.insert(copy_of(job))
    assert (duplicate.conflict, duplicate.id) == (True, original.id)


def test_entry_owned_by_sender_stays(peers: Peers) -> None:
    first, second = two_peers(peers)
    job = job_owned_by(second, first)
    # In the view of `first`, `second` owns the fingerprint, so it sends
    # the entry only because it is leaving, before `first` has heard of it.
    # `first` keeps the entry rather than send it back.
    original = send_entry(second, first, job)

    stored: Any = first._unique.peek(fingerprint(job))
    assert isinstance(stored, RemoteEntry)
    assert stored.id == original.id


def test_entry_that_came_back_leaves_with_final_state(peers: Peers) -> None:
    # The entry of a job moves to a peer that joins, comes back to the
    # job's peer when that one stops, and the job completes. When the job's
    # peer stops in turn, the entry must leave with the completed state: the
    # next owner cannot ask a stopped peer for it.
    first, second = two_peers(peers)
    third = new_peer(peers, first, second, queues=PAUSED)
    fourth = new_peer(peers, first, second, queues=PAUSED)
    ids = [peer_id(p) for p in (first, second, third, fourth)]
    blocks_completed = {"period": 300, "states": ["available", "completed"]}
    # The third peer scores highest for the fingerprint, then the first,
    # and the second and fourth lower.
    job = next(
        candidate
        for candidate in (
            WhereWorker.new({"n": n}, unique=blocks_completed) for n in range(5000)
        )
        if ranked(fingerprint(candidate), ids)[:2] == [ids[2], ids[0]]
    )
    original = first.insert(job)
    assert first.get_job(original.id) is original  # type: ignore[arg-type]

    third.start()  # the entry moves to the third peer
    third.stop()  # and comes back to the first, as "available"
    assert isinstance(first._unique.peek(fingerprint(job)), RemoteEntry)
    with watching() as watcher:
        first.resume_queue("default")
        watcher.wait_final(original)
    fourth.start()  # a join, which drops the record that the job had moved
    first.stop()

    duplicate = second.insert(WhereWorker.new(job.args, unique=blocks_completed))
    assert duplicate.conflict is True
    assert duplicate.id == original.id
    assert duplicate.state is stagehand.JobState.COMPLETED


class WatchedEvent(threading.Event):
    """An event that reports when a thread starts to wait on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def test_close_ends_insert_waiting_for_join(peers: Peers) -> None:
    first, second = two_peers(peers)
    cluster = first._cluster
    assert cluster is not None
    # As if `first` were still joining: routed inserts wait for the end of
    # its join, up to join_timeout (HANG_GUARD here).
    synced = WatchedEvent()
    cluster._synced = synced
    job = job_owned_by(first, second)
    outcome: list[Any] = []

    def insert() -> None:
        try:
            outcome.append(second.insert(job))
        except stagehand.StagehandError as error:
            outcome.append(error)

    inserting = threading.Thread(target=insert)
    inserting.start()
    assert synced.waiting.wait(HANG_GUARD)

    cluster.close()

    threads = cluster._server._request_threads
    assert [thread.is_alive() for thread in threads] == [False] * len(threads)
    inserting.join(HANG_GUARD)
    assert not inserting.is_alive()
    assert len(outcome) == 1


def test_failed_entries_store_is_retried(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two_peers(peers)
    third = peers.start(first, second, queues=PAUSED)
    for instance in (first, second):
        wait_until(lambda instance=instance: peer_id(third) in members(instance))
    ids = [peer_id(p) for p in (first, second, third)]
    job = next(
        candidate
        for candidate in (
            WhereWorker.new({"n": n}, unique={"period": 300}) for n in range(1000)
        )
        if ranked(fingerprint(candidate), ids) == [ids[1], ids[2], ids[0]]
    )
    holder = first._cluster
    assert holder is not None
    original = holder.insert_owned(job, first._insert_unique_here, check=False)
    key = fingerprint(job)
    entry = cluster_module._entry_to_wire(
        key, original, peer_id(first), first.clock.now()
    )
    failing = second._cluster
    assert failing is not None
    real_receive = failing._receive_entries
    calls: list[int] = []

    def fail_once(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("store failed")
        real_receive(*args, **kwargs)

    monkeypatch.setattr(failing, "_receive_entries", fail_once)
    # `second` fails to store the entry, so `first` sends it to `third`,
    # the next in line, which sends it on to `second`, its owner.
    holder._send_entries(peer_id(second), [entry])

    assert len(calls) == 2
    assert third._unique.peek(key) is None
    stored: Any = second._unique.peek(key)
    assert isinstance(stored, RemoteEntry)
    assert stored.id == original.id

"""Unique jobs stay unique while peers join and leave.

The reliability soak (bench/soak.py) found each of these cases by chance;
each test forces its order with hooks on the peers' own methods. Peers run
in this process on 127.0.0.1, as in tests/test_cluster.py.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

import stagehand
from stagehand._rendezvous import owner
from stagehand._unique import fingerprint
from tests.support import (
    HANG_GUARD,
    PAUSED,
    Gate,
    Peers,
    run_in_thread,
    wait_until,
    watching,
)
from tests.test_cluster import WhereWorker, members, peer_id
from tests.test_cluster_races import new_peer

UNIQUE = {"period": 300}
# Completed jobs block duplicates too.
UNIQUE_DONE = {
    "period": 300,
    "states": ["available", "scheduled", "executing", "retryable", "completed"],
}


def args_owned_by(owner_id: str, peer_ids: list[str]) -> dict[str, Any]:
    """Return args whose unique fingerprint `owner_id` owns among `peer_ids`."""
    for n in range(1000):
        job = WhereWorker.new({"n": n}, unique=UNIQUE)
        if owner(fingerprint(job), peer_ids) == owner_id:
            return {"n": n}
    raise AssertionError(f"no fingerprint of 1,000 is owned by {owner_id}")


def test_duplicate_during_graceful_leave(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    leaving = peers.start(queues=PAUSED)
    survivor = peers.start(leaving, queues=PAUSED)
    wait_until(lambda: members(leaving) == [peer_id(survivor)])
    args = args_owned_by(peer_id(leaving), [peer_id(leaving), peer_id(survivor)])
    original = WhereWorker.new(args, unique=UNIQUE).insert(leaving)
    assert not original.conflict

    # stop() waits after its leave message, before it hands over its
    # waiting jobs and then its unique entries.
    gate = Gate()
    cluster = leaving._cluster
    assert cluster is not None
    real_hand_over = cluster.hand_over

    def held_hand_over(jobs: list[stagehand.Job]) -> int:
        gate.hold()
        return real_hand_over(jobs)

    monkeypatch.setattr(cluster, "hand_over", held_hand_over)

    # The survivor's unique check reports when it starts to wait for the
    # hand-over; the leaving peer is then let go.
    survivor_cluster = survivor._cluster
    assert survivor_cluster is not None
    waiting = threading.Event()
    real_await = survivor_cluster._await_hand_overs

    def await_hand_overs() -> None:
        waiting.set()
        real_await()

    monkeypatch.setattr(survivor_cluster, "_await_hand_overs", await_hand_overs)
    stopper = threading.Thread(target=leaving.stop, name="leaving-stop")
    stopper.start()
    cleanup: list[Any] = []
    try:
        assert gate.entered.wait(HANG_GUARD)
        wait_until(lambda: members(survivor) == [])
        _, outcome = run_in_thread(
            cleanup, lambda: WhereWorker.new(args, unique=UNIQUE).insert(survivor)
        )
        assert waiting.wait(HANG_GUARD)
    finally:
        gate.release.set()
        stopper.join(HANG_GUARD)
        for step in cleanup:
            step()
    [duplicate] = outcome

    assert duplicate.conflict
    assert duplicate.id == original.id


def test_routed_insert_during_join_sees_moved_entry(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = peers.start(queues=PAUSED)
    joining = new_peer(peers, existing, queues=PAUSED, cluster={"join_timeout": 2.0})
    args = args_owned_by(peer_id(joining), [peer_id(existing), peer_id(joining)])
    original = WhereWorker.new(args, unique=UNIQUE).insert(existing)
    assert not original.conflict

    # The joining peer's insert handler reports when a routed insert
    # reaches it; it then waits for the join to finish.
    joining_cluster = joining._cluster
    existing_cluster = existing._cluster
    assert joining_cluster is not None and existing_cluster is not None
    insert_arrived = threading.Event()
    real_on_insert = joining_cluster._on_insert

    def on_insert(message: dict[str, Any]) -> dict[str, Any]:
        insert_arrived.set()
        return real_on_insert(message)

    monkeypatch.setattr(joining_cluster, "_on_insert", on_insert)

    # The existing peer inserts a duplicate, routed to the joining peer that
    # now owns it, before it sends that peer the entries it owns.
    cleanup: list[Any] = []
    outcome: list[Any] = []
    real_move = existing_cluster._move_entries_to

    def move_after_insert(member: Any) -> None:
        if member.peer_id == peer_id(joining) and not outcome:
            _, result = run_in_thread(
                cleanup,
                lambda: WhereWorker.new(args, unique=UNIQUE).insert(existing),
            )
            outcome.append(result)
            assert insert_arrived.wait(HANG_GUARD)
        real_move(member)

    monkeypatch.setattr(existing_cluster, "_move_entries_to", move_after_insert)
    try:
        joining.start()
    finally:
        for step in cleanup:
            step()

    [result] = outcome
    [duplicate] = result
    assert isinstance(duplicate, stagehand.Job), duplicate
    assert duplicate.conflict
    assert duplicate.id == original.id


def moved_then_completed(
    peers: Peers,
) -> tuple[stagehand.Stagehand, stagehand.Stagehand, dict[str, Any], stagehand.Job]:
    """Return (holder, owner, args, job): a join moved the entry of the
    holder's queued job to the owner, and the job then completed on the
    holder. The owner's entry still records it as available."""
    holder = peers.start(queues=PAUSED)
    owner = new_peer(peers, holder)
    args = args_owned_by(peer_id(owner), [peer_id(holder), peer_id(owner)])
    original = WhereWorker.new(args, unique=UNIQUE_DONE).insert(holder)
    owner.start()
    with watching() as watcher:
        holder.resume_queue("default")
        watcher.wait_final(original)
    return holder, owner, args, original


def test_entry_back_at_its_holder_blocks(peers: Peers) -> None:
    # The owner's stop sends the stale entry back: the holder must read the
    # job's state itself.
    holder, owner, args, original = moved_then_completed(peers)
    owner.stop()

    duplicate = WhereWorker.new(args, unique=UNIQUE_DONE).insert(holder)

    assert duplicate.conflict
    assert duplicate.id == original.id


def test_stopping_holder_sends_final_state(peers: Peers) -> None:
    # The holder stops instead: it must send the job's final state, which
    # the owner can no longer ask it for.
    holder, owner, args, original = moved_then_completed(peers)
    holder.stop()

    duplicate = WhereWorker.new(args, unique=UNIQUE_DONE).insert(owner)

    assert duplicate.conflict
    assert duplicate.id == original.id


def test_next_join_sends_final_state(peers: Peers) -> None:
    # The holder keeps a job whose entry a join moved only while the job
    # waits or runs: the next join sends its final state to the owner.
    holder, owner, args, original = moved_then_completed(peers)
    holder_cluster = holder._cluster
    assert holder_cluster is not None
    peers.start(holder, owner, queues=PAUSED)
    wait_until(lambda: len(members(holder)) == 2)

    duplicate = WhereWorker.new(args, unique=UNIQUE_DONE).insert(owner)

    assert holder_cluster._moved_live == {}
    assert duplicate.conflict
    assert duplicate.id == original.id

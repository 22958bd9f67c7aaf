"""A fifth review: insert_all's batch path and the cluster's leave protocol.

Each test forces its interleaving with hooks on the peers' own methods and
waits on events, never on bare sleeps. Peers run in this process on
127.0.0.1, as in tests/test_cluster.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import pytest

import stagehand
from stagehand import events
from stagehand._rendezvous import owner
from stagehand._unique import fingerprint
from tests.support import HANG_GUARD, Gate, Peers, unique_name, wait_until
from tests.test_cluster import members, peer_id
from tests.test_cluster_races import new_peer
from tests.workers import BlockingWorker, EchoWorker

UNIQUE = {"period": 300}


def blocking_args_owned_by(
    gate: str, rankings: list[tuple[str, list[str]]]
) -> dict[str, Any]:
    """Return BlockingWorker args whose owner among each list is as given."""
    for n in range(5000):
        key = fingerprint(BlockingWorker.new({"gate": gate, "n": n}, unique=UNIQUE))
        if all(owner(key, ids) == wanted for wanted, ids in rankings):
            return {"gate": gate, "n": n}
    raise AssertionError(f"no fingerprint of 5,000 is owned as {rankings}")


class PeerEvents:
    """Records peer.join and peer.leave events of one instance, by peer id."""

    def __init__(self, instance_name: str) -> None:
        self.instance_name = instance_name
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str]] = []
        self.handler_id = unique_name("fifth-peer-events")

    def __call__(self, event: str, measurements: Any, metadata: Any) -> None:
        if metadata["instance"] == self.instance_name:
            with self.lock:
                self.seen.append((event, metadata["peer"]))

    def events_of(self, peer: str) -> list[str]:
        with self.lock:
            return [event for event, seen in self.seen if seen == peer]


# insert_all


def test_insert_all_stopped_non_job() -> None:
    instance = stagehand.Stagehand(name=unique_name("fifth"), queues={"default": 1})
    instance.start()
    instance.stop()

    # insert() on the same instance raises TypeError; insert_all() must not
    # raise an error that the specification does not name.
    with pytest.raises(TypeError):
        instance.insert("not a job")  # type: ignore[arg-type]
    with pytest.raises((TypeError, stagehand.ShuttingDown)):
        instance.insert_all(["not a job"])  # type: ignore[list-item]


def test_insert_all_stopped_job() -> None:
    # With a Job, the same call raises ShuttingDown; only a non-Job fails.
    instance = stagehand.Stagehand(name=unique_name("fifth"), queues={"default": 1})
    instance.start()
    instance.stop()
    with pytest.raises(stagehand.ShuttingDown):
        instance.insert_all([EchoWorker.new({})])


# The leave protocol


def test_departing_peer_is_not_joined_again(peers: Peers) -> None:
    leaving = peers.start(shutdown_grace_period=HANG_GUARD)
    # Lists the leaving peer's address, so its _watch_list tries that address
    # again soon after the peer stops counting as a member.
    survivor = peers.start(leaving)
    wait_until(lambda: members(leaving) == [peer_id(survivor)])
    wait_until(lambda: members(survivor) == [peer_id(leaving)])
    leaving_id = peer_id(leaving)
    address = leaving._cluster.address  # type: ignore[union-attr]
    survivor_cluster = survivor._cluster
    assert survivor_cluster is not None

    # A job that runs keeps the leaving peer in its grace period, with its
    # channel open.
    gate = unique_name("fifth-hold")
    entered, release = BlockingWorker.gate(gate)
    BlockingWorker.new({"gate": gate}).insert(leaving)
    assert entered.wait(HANG_GUARD)

    recorder = PeerEvents(survivor.name)
    events.attach(recorder.handler_id, ["peer.join", "peer.leave"], recorder)
    stopper = threading.Thread(target=leaving.stop, name="fifth-leaving-stop")
    try:
        stopper.start()
        wait_until(lambda: leaving_id in survivor_cluster._departing)
        wait_until(lambda: survivor_cluster._departing[leaving_id].handed.is_set())
        # What the survivor's _watch_list does about a second after the
        # leave, and what each _rejoin attempt does.
        survivor_cluster._join(address)
        seen = recorder.events_of(leaving_id)
    finally:
        release.set()
        stopper.join(HANG_GUARD)
        events.detach(recorder.handler_id)

    assert seen == ["peer.leave"]


@pytest.mark.parametrize("noticed", [True, False], ids=["noticed", "unnoticed"])
def test_entries_skip_owner_that_left(
    peers: Peers, monkeypatch: pytest.MonkeyPatch, noticed: bool
) -> None:
    # `noticed`: the first peer has seen the second one's connection close
    # before it sends the entries; otherwise only the send finds out.
    first = peers.start(shutdown_grace_period=HANG_GUARD)
    second = peers.start(first)
    survivor = peers.start(first)
    everyone = sorted(map(peer_id, (first, second, survivor)))
    for instance in (first, second, survivor):
        wait_until(
            lambda instance=instance: (
                sorted([peer_id(instance), *members(instance)]) == everyone
            )
        )
    first_id, second_id, survivor_id = map(peer_id, (first, second, survivor))

    # The job runs on `first`, which owns its fingerprint; once `first`
    # leaves, `second` owns it, and once both leave, `survivor` does.
    gate = unique_name("fifth-two-leave")
    args = blocking_args_owned_by(
        gate,
        [(first_id, everyone), (second_id, [second_id, survivor_id])],
    )
    entered, release = BlockingWorker.gate(gate)
    original = BlockingWorker.new(args, unique=UNIQUE).insert(survivor)
    assert not original.conflict
    assert entered.wait(HANG_GUARD)
    assert first.get_job(original.id) is not None  # type: ignore[arg-type]

    # `first` stops; it waits just before it sends the entries, grouped by
    # their owners, while `second` stops as well.
    first_cluster = first._cluster
    survivor_cluster = survivor._cluster
    assert first_cluster is not None and survivor_cluster is not None
    hold = Gate()
    real_send = first_cluster._send_entries

    def held_send(peer: str, entries: list[dict[str, Any]], **options: Any) -> None:
        if entries and not hold.entered.is_set():
            hold.hold()
        real_send(peer, entries, **options)

    monkeypatch.setattr(first_cluster, "_send_entries", held_send)
    stopper = threading.Thread(target=first.stop, name="fifth-first-stop")
    try:
        stopper.start()
        assert hold.entered.wait(HANG_GUARD)
        if not noticed:
            monkeypatch.setattr(first_cluster, "_lost", lambda member: None)
        second.stop()
        wait_until(lambda: second_id not in survivor_cluster._departing)
        hold.release.set()
        wait_until(lambda: survivor_cluster._departing[first_id].handed.is_set())

        # The job still runs on `first`, so the survivor, its owner now,
        # must see the duplicate.
        duplicate = BlockingWorker.new(args, unique=UNIQUE).insert(survivor)
    finally:
        hold.release.set()
        release.set()
        stopper.join(HANG_GUARD)

    assert duplicate.conflict
    assert duplicate.id == original.id


def test_stop_closes_cluster_on_unencodable_job(peers: Peers) -> None:
    paused = {"default": {"limit": 1, "paused": True}}
    leaving = peers.start(queues=paused)
    survivor = peers.start(leaving, queues=paused)
    wait_until(lambda: members(leaving) == [peer_id(survivor)])
    leaving_cluster = leaving._cluster
    assert leaving_cluster is not None

    # A worker, or the code that inserted the job, put a value that JSON
    # cannot encode into the live job's meta.
    job = EchoWorker.new({}).insert(leaving)
    job.meta["seen"] = {1, 2}
    try:
        # The bug raises TypeError here; the assertion shows what it leaves.
        with contextlib.suppress(TypeError):
            leaving.stop()
        closed = leaving_cluster._closed
    finally:
        # Ends the survivor's wait for the hand-over, and its attempts to
        # join the peer again.
        leaving_cluster.close()

    assert closed


def test_slow_leaver_delays_one_check(
    peers: Peers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    paused = {"default": {"limit": 1, "paused": True}}
    leaving = peers.start(queues=paused)
    survivor = new_peer(peers, leaving, queues=paused, cluster={"join_timeout": 0.2})
    survivor.start()
    wait_until(lambda: members(leaving) == [peer_id(survivor)])
    survivor_cluster = survivor._cluster
    leaving_cluster = leaving._cluster
    assert survivor_cluster is not None and leaving_cluster is not None

    # The leaving peer's stop() waits after its leave message, before its
    # hand-over, far longer than the survivor's join_timeout.
    gate = Gate()
    real_hand_over = leaving_cluster.hand_over

    def held_hand_over(jobs: list[stagehand.Job]) -> int:
        gate.hold()
        return real_hand_over(jobs)

    monkeypatch.setattr(leaving_cluster, "hand_over", held_hand_over)
    stopper = threading.Thread(target=leaving.stop, name="fifth-slow-stop")
    caplog.set_level(logging.WARNING, logger="stagehand._cluster")
    try:
        stopper.start()
        assert gate.entered.wait(HANG_GUARD)
        wait_until(lambda: peer_id(leaving) in survivor_cluster._departing)
        for n in range(3):
            EchoWorker.new({"n": n}, unique=UNIQUE).insert(survivor)
    finally:
        gate.release.set()
        stopper.join(HANG_GUARD)

    waits = [
        record
        for record in caplog.records
        if "before leaving peer" in record.getMessage()
    ]
    assert len(waits) == 1

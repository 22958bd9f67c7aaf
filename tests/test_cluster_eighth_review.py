"""Unique entries that go on between peers whose views differ.

Covers `Cluster._receive_entries` and `Cluster._send_entries` while peers
leave and join. A leaving peer takes no entries. A sender that owns an
entry in the receiver's view counts as leaving. Entries that a crashed
joiner did not store go back only to a peer that is not leaving. Each test
sets the order of events with hooks, as tests/test_cluster_seventh_review.py
does.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pytest

import stagehand
import stagehand._cluster as cluster_module
from stagehand._channel import ChannelError
from stagehand._unique import fingerprint
from tests.support import HANG_GUARD, PAUSED, Gate, Peers, wait_until
from tests.test_cluster import members, peer_id
from tests.test_cluster_races import new_peer
from tests.test_cluster_seventh_review import (
    copy_of,
    held_entry,
    job_ranked,
    run,
    send_as_owner_stops,
)


def cluster_of(instance: stagehand.Stagehand) -> Any:
    cluster = instance._cluster
    assert cluster is not None
    return cluster


def all_joined(*instances: stagehand.Stagehand) -> None:
    everyone = sorted(map(peer_id, instances))
    for instance in instances:
        wait_until(
            lambda instance=instance: (
                sorted([peer_id(instance), *members(instance)]) == everyone
            )
        )


def count_hops(
    instances: tuple[stagehand.Stagehand, ...],
    key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> list[str]:
    """Record each peer that receives the entry for `key`, and drop the entry after 12 steps."""
    hops: list[str] = []
    lock = threading.Lock()
    for instance in instances:
        cluster = cluster_of(instance)
        real = cluster._receive_entries

        def counted(
            sender: str,
            entries: list[Any],
            *,
            keep: bool = False,
            real: Any = real,
            name: str = peer_id(instance),
        ) -> None:
            if any(entry.get("fingerprint") == key for entry in entries):
                with lock:
                    hops.append(name)
                    if len(hops) > 12:
                        return
            real(sender, entries, keep=keep)

        monkeypatch.setattr(cluster, "_receive_entries", counted)
    return hops


def test_entry_ends_while_peers_stop(
    peers: Peers, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = peers.start(queues=PAUSED)
    first = peers.start(origin, queues=PAUSED)
    second = peers.start(origin, first, queues=PAUSED)
    bystander = peers.start(origin, first, second, queues=PAUSED)
    all_joined(origin, first, second, bystander)
    # `origin` owns the fingerprint, then `second`, `first` and `bystander`.
    job = job_ranked([origin, second, first, bystander])
    key = fingerprint(job)
    original = bystander.insert(job)
    assert origin.get_job(original.id) is not None  # type: ignore[arg-type]

    # The whole cluster stops at once. `first` has begun to send its leave
    # requests and waits on the first one.
    first_gate = Gate()
    first_cluster = cluster_of(first)
    real_first = first_cluster.broadcast

    def first_broadcast(message: dict[str, Any]) -> None:
        if message.get("type") == "leave":
            first_gate.hold()
        real_first(message)

    monkeypatch.setattr(first_cluster, "broadcast", first_broadcast)
    run(cleanup, first_cluster.withdraw)
    cleanup.append(first_gate.release.set)
    assert first_gate.entered.wait(HANG_GUARD)

    # `second` has sent its leave request to `origin` and `first`, and is
    # about to send it to `bystander`.
    second_gate = Gate()
    second_cluster = cluster_of(second)
    real_second = second_cluster.broadcast

    def second_broadcast(message: dict[str, Any]) -> None:
        if message.get("type") != "leave":
            real_second(message)
            return
        # Like Cluster.broadcast, it tolerates a member that has closed: at
        # teardown, stop() sends the leave request through this hook again.
        for member in list(second_cluster._members.values()):
            if member.peer_id != peer_id(bystander):
                with contextlib.suppress(ChannelError):
                    member.connection.request(message, HANG_GUARD)
        second_gate.hold()
        member = second_cluster._members.get(peer_id(bystander))
        if member is not None:
            with contextlib.suppress(ChannelError):
                member.connection.request(message, HANG_GUARD)

    monkeypatch.setattr(second_cluster, "broadcast", second_broadcast)
    run(cleanup, second_cluster.withdraw)
    cleanup.append(second_gate.release.set)
    assert second_gate.entered.wait(HANG_GUARD)
    assert peer_id(second) not in members(first)
    assert peer_id(second) not in members(origin)
    assert peer_id(second) in members(bystander)

    # `origin` has sent its leave requests, which every peer has handled, and
    # hands over its unique entries, as stop() does.
    hops = count_hops((first, second, bystander), key, monkeypatch)
    origin_cluster = cluster_of(origin)
    origin_cluster.withdraw()
    done = run(cleanup, origin_cluster.hand_over_entries)
    wait_until(lambda: len(hops) > 12 or done != [])
    wait_until(lambda: done != [])
    # The entry should reach `bystander`, the one owner left, in three
    # steps at most.
    assert len(hops) <= 3, hops


def test_leaving_peer_refuses_late_entry(
    peers: Peers, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = peers.start(queues=PAUSED)
    leaving = peers.start(sender, queues=PAUSED)
    successor = peers.start(sender, leaving, queues=PAUSED)
    all_joined(sender, leaving, successor)
    # `leaving` owns the fingerprint, `sender` is next, `successor` last:
    # once `leaving` is gone, `sender` owns it.
    job = job_ranked([leaving, sender, successor])
    entry = held_entry(successor, job)
    original_id = entry["job"]["id"]
    sending = cluster_of(sender)

    # `sender` picks `leaving` as the owner (as it does when it sends on an
    # entry from a hand-over or a join) and is about to send the entry
    # when `leaving` begins to stop.
    send_gate, sent = send_as_owner_stops(cleanup, monkeypatch, sending, leaving, entry)
    assert sending._departing[peer_id(leaving)].handed.is_set()

    # The entry reaches `leaving` now, during its grace period.
    send_gate.release.set()
    wait_until(lambda: sent != [])
    assert sent == [None]

    # `sender` owns the fingerprint now and must see the entry.
    duplicate = sender.insert(copy_of(job))
    assert (duplicate.conflict, duplicate.id) == (True, original_id)


def test_returned_entry_skips_stopping_peer(
    peers: Peers, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = peers.start(queues=PAUSED)
    successor = peers.start(first, queues=PAUSED)
    all_joined(first, successor)
    joining = new_peer(peers, first, queues=PAUSED)
    # `joining` owns the fingerprint once it joins, then `first`, then
    # `successor`.
    job = job_ranked([joining, first, successor])
    key = fingerprint(job)
    # The table of `first` contains the entry of a job on `successor`, as
    # after a hand-over.
    entry = held_entry(successor, job)
    original_id = entry["job"]["id"]
    _, remote, expires_in = cluster_module._entry_from_wire(entry, peer_id(successor))
    assert first._unique.put(key, remote, first.clock.monotonic() + expires_in)

    # `joining` waits while it receives the entries that `first` moves to
    # it. Meanwhile `first` begins to stop and waits in its grace period.
    crashing = cluster_of(joining)
    receive_gate = Gate()
    real_receive = crashing._receive_entries

    def crash_while_receiving(*args: Any, **kwargs: Any) -> None:
        receive_gate.hold()
        real_receive(*args, **kwargs)

    monkeypatch.setattr(crashing, "_receive_entries", crash_while_receiving)
    run(cleanup, joining.start)
    cleanup.append(receive_gate.release.set)
    assert receive_gate.entered.wait(HANG_GUARD)
    assert first._unique.peek(key) is None

    grace = Gate()
    real_wait = first._wait_for_executing

    def held_wait() -> list[stagehand.Job]:
        grace.hold()
        return real_wait()

    monkeypatch.setattr(first, "_wait_for_executing", held_wait)
    run(cleanup, first.stop)
    cleanup.append(grace.release.set)
    assert grace.entered.wait(HANG_GUARD)
    assert cluster_of(successor)._departing[peer_id(first)].handed.is_set()

    # Now `joining` crashes, so the entry does not reach it.
    crashing._server.close(timeout=0.1)
    # The entry is no longer on its way: it is back on `first` or with
    # `successor`.
    wait_until(
        lambda: (
            first._unique.peek(key) is not None
            or successor._unique.peek(key) is not None
        )
    )

    # `successor` owns the fingerprint now and must see the entry.
    duplicate = successor.insert(copy_of(job))
    assert (duplicate.conflict, duplicate.id) == (True, original_id)


def test_entry_reaches_member_sender_missed(
    peers: Peers, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    leaving = peers.start(queues=PAUSED)
    receiver = peers.start(leaving, queues=PAUSED)
    origin = peers.start(leaving, receiver, queues=PAUSED)
    all_joined(leaving, receiver, origin)

    # `leaving` begins to stop, and its leave requests are still under way.
    leave_gate = Gate()
    leaving_cluster = cluster_of(leaving)
    real_broadcast = leaving_cluster.broadcast

    def held_broadcast(message: dict[str, Any]) -> None:
        if message.get("type") == "leave":
            leave_gate.hold()
        real_broadcast(message)

    monkeypatch.setattr(leaving_cluster, "broadcast", held_broadcast)
    run(cleanup, leaving_cluster.withdraw)
    cleanup.append(leave_gate.release.set)
    assert leave_gate.entered.wait(HANG_GUARD)

    # A new peer starts meanwhile: `leaving` declines its join, the others
    # take it.
    newcomer = peers.start(leaving, receiver, origin, queues=PAUSED)
    wait_until(lambda: peer_id(newcomer) in members(receiver))
    wait_until(lambda: peer_id(newcomer) in members(origin))
    assert peer_id(newcomer) not in members(leaving)
    # `leaving` owns the fingerprint, then `newcomer`, `receiver`, `origin`.
    job = job_ranked([leaving, newcomer, receiver, origin])
    key = fingerprint(job)
    entry = held_entry(origin, job)
    original_id = entry["job"]["id"]
    _, remote, expires_in = cluster_module._entry_from_wire(entry, peer_id(origin))
    assert origin._unique.put(key, remote, origin.clock.monotonic() + expires_in)

    # `origin` stops too: its leave requests reach everyone, and it hands
    # the entry to `leaving`, the owner in its view.
    origin_cluster = cluster_of(origin)
    origin_cluster.withdraw()
    origin_cluster.hand_over_entries()
    origin_cluster.handed()

    # Now the leave requests of `leaving` arrive.
    leave_gate.release.set()
    wait_until(lambda: peer_id(leaving) not in members(receiver))
    wait_until(lambda: peer_id(leaving) not in members(newcomer))

    # `newcomer` owns the fingerprint among the peers that stay, and must
    # see the entry.
    duplicate = newcomer.insert(copy_of(job))
    assert (duplicate.conflict, duplicate.id) == (True, original_id)

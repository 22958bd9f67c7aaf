"""Unique entries that reach a peer while it leaves or joins.

Covers three paths of the ownership changes in cluster mode. A stopping
peer sends on the entries that arrive after its hand-over
(`Cluster._receive_entries`, `Cluster._owns`). A peer takes back the
entries that it sent to a joining member that crashed
(`Cluster._send_entries`). A forwarded entry gets the ownership check
while another peer joins. Each test sets the order of events with a hook,
as tests/test_ownership_break.py does, and checks that the duplicate is
caught.
"""

from __future__ import annotations

from typing import Any

import pytest

import stagehand
import stagehand._cluster as cluster_module
from stagehand._rendezvous import ranked
from stagehand._unique import fingerprint
from tests.support import HANG_GUARD, PAUSED, Gate, Peers, run_in_thread, wait_until
from tests.test_cluster import WhereWorker, members, peer_id
from tests.test_cluster_races import new_peer


def job_ranked(order: list[stagehand.Stagehand]) -> stagehand.Job:
    """Return a new unique job whose fingerprint ranks the peers as `order` does."""
    ids = [peer_id(peer) for peer in order]
    return next(
        candidate
        for candidate in (
            WhereWorker.new({"n": n}, unique={"period": 300}) for n in range(5000)
        )
        if ranked(fingerprint(candidate), ids) == ids
    )


def copy_of(job: stagehand.Job) -> stagehand.Job:
    return WhereWorker.new(job.args, unique={"period": 300})


def run(cleanup: list[Any], target: Any) -> list[Any]:
    """Run `target()` in a thread joined at cleanup; return the list for its outcome."""
    return run_in_thread(cleanup, target)[1]


def held_entry(holder: stagehand.Stagehand, job: stagehand.Job) -> dict[str, Any]:
    """Insert `job` on `holder`, take its entry out of the table, and return it as sent."""
    cluster = holder._cluster
    assert cluster is not None
    original = cluster.insert_owned(job, holder._insert_unique_here, check=False)
    key = fingerprint(job)
    assert holder._unique.take(lambda taken: taken == key) != []
    entry = cluster_module._entry_to_wire(
        key, original, peer_id(holder), holder.clock.now()
    )
    assert entry is not None
    return entry


def send_as_owner_stops(
    cleanup: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    sending: Any,
    leaving: stagehand.Stagehand,
    entry: dict[str, Any],
) -> tuple[Gate, list[Any]]:
    """Start sending `entry` to `leaving`, then stop `leaving` before it arrives.

    Returns the gate that holds the request, to release once `leaving` waits
    in its grace period (as if a job still ran), and the list that gets the
    result of the send.
    """
    link = sending._members[peer_id(leaving)].connection
    real_request = link.request
    send_gate = Gate()

    def held_request(message: dict[str, Any], timeout: float) -> dict[str, Any]:
        if message.get("type") == "entries" and not send_gate.entered.is_set():
            send_gate.hold()
        return real_request(message, timeout)

    monkeypatch.setattr(link, "request", held_request)
    sent = run(cleanup, lambda: sending._send_entries(peer_id(leaving), [entry]))
    # Released before the thread is joined: cleanup runs last first.
    cleanup.append(send_gate.release.set)
    assert send_gate.entered.wait(HANG_GUARD)

    grace = Gate()
    real_wait = leaving._wait_for_executing

    def held_wait() -> list[stagehand.Job]:
        grace.hold()
        return real_wait()

    monkeypatch.setattr(leaving, "_wait_for_executing", held_wait)
    run(cleanup, leaving.stop)
    cleanup.append(grace.release.set)
    assert grace.entered.wait(HANG_GUARD)
    return send_gate, sent


def test_leaving_peer_sends_late_entry_on(
    peers: Peers, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = peers.start(queues=PAUSED)
    leaving = peers.start(sender, queues=PAUSED)
    successor = peers.start(sender, leaving, queues=PAUSED)
    everyone = sorted(map(peer_id, (sender, leaving, successor)))
    for instance in (sender, leaving, successor):
        wait_until(
            lambda instance=instance: (
                sorted([peer_id(instance), *members(instance)]) == everyone
            )
        )
    # `leaving` owns the fingerprint, `successor` is next, `sender` last.
    job = job_ranked([leaving, successor, sender])
    entry = held_entry(sender, job)
    original_id = entry["job"]["id"]
    sending = sender._cluster
    assert sending is not None

    # `sender` picks `leaving` as the owner (as a hand-over or a join does)
    # and is about to send the entry when `leaving` begins to stop.
    send_gate, sent = send_as_owner_stops(cleanup, monkeypatch, sending, leaving, entry)
    successor_cluster = successor._cluster
    assert successor_cluster is not None
    departing = successor_cluster._departing[peer_id(leaving)]
    assert departing.handed.is_set()

    # The entry reaches `leaving` now, during its grace period.
    send_gate.release.set()
    wait_until(lambda: sent != [])
    assert sent == [None]

    duplicate = successor.insert(copy_of(job))
    assert (duplicate.conflict, duplicate.id) == (True, original_id)


def test_entries_to_crashed_joiner_return(
    peers: Peers, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = peers.start(queues=PAUSED)
    joining = new_peer(peers, first, queues=PAUSED)
    # Alone, `first` owns the fingerprint, and `joining` owns it once it joins.
    job = job_ranked([joining, first])
    original = first.insert(job)
    assert first.get_job(original.id) is original  # type: ignore[arg-type]

    # `joining` crashes while it receives the entries that `first` moves to it.
    crashing = joining._cluster
    assert crashing is not None
    gate = Gate()
    real_receive = crashing._receive_entries

    def crash_while_receiving(*args: Any, **kwargs: Any) -> None:
        gate.hold()
        real_receive(*args, **kwargs)

    monkeypatch.setattr(crashing, "_receive_entries", crash_while_receiving)
    run(cleanup, joining.start)
    cleanup.append(gate.release.set)
    assert gate.entered.wait(HANG_GUARD)
    crashing._server.close(timeout=0.1)
    wait_until(lambda: members(first) == [])

    # The job still waits on `first`, which owns its fingerprint again.
    assert first.get_job(original.id) is original  # type: ignore[arg-type]
    duplicate = first.insert(copy_of(job))
    assert (duplicate.conflict, duplicate.id) == (True, original.id)


def test_forwarded_entry_follows_join(
    peers: Peers, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = peers.start(queues=PAUSED)
    receiver = peers.start(sender, queues=PAUSED)
    wait_until(lambda: members(sender) == [peer_id(receiver)])
    joining = new_peer(peers, receiver, queues=PAUSED)
    # Among the first two peers `receiver` owns the fingerprint, and among
    # all three `joining` does.
    job = next(
        candidate
        for candidate in (
            WhereWorker.new({"n": n}, unique={"period": 300}) for n in range(5000)
        )
        if ranked(fingerprint(candidate), [peer_id(sender), peer_id(receiver)])[0]
        == peer_id(receiver)
        and ranked(
            fingerprint(candidate),
            [peer_id(sender), peer_id(receiver), peer_id(joining)],
        )[0]
        == peer_id(joining)
    )
    key = fingerprint(job)
    entry = held_entry(sender, job)
    original_id = entry["job"]["id"]
    sending = sender._cluster
    assert sending is not None

    # `receiver` gets the entry sent on by a peer that saw it as the owner,
    # and stops before it stores the entry.
    gate = Gate()
    real_from_wire = cluster_module._entry_from_wire

    def held(data: Any, from_peer: str) -> Any:
        if data.get("fingerprint") == key and not gate.entered.is_set():
            gate.hold()
        return real_from_wire(data, from_peer)

    monkeypatch.setattr(cluster_module, "_entry_from_wire", held)
    link = sending._members[peer_id(receiver)].connection
    sent = run(
        cleanup,
        lambda: link.request(
            {"type": "entries", "entries": [entry], "forwarded": True}, HANG_GUARD
        ),
    )
    cleanup.append(gate.release.set)
    assert gate.entered.wait(HANG_GUARD)
    # `joining` joins `receiver`, which moves the entries that it owns now.
    joining.start()
    wait_until(lambda: peer_id(joining) in members(receiver))
    gate.release.set()
    wait_until(lambda: sent != [])
    assert sent == [{}]

    duplicate = joining.insert(copy_of(job))
    assert (duplicate.conflict, duplicate.id) == (True, original_id)

"""The stop() sequence of a cluster peer while other peers join or send entries.

Covers two paths. A peer that begins to stop while it stores entries must
not count their sender as leaving (`Cluster._receive_entries`), or it
hands its jobs to no peer. A peer that joins a peer in its grace period is
declined, and must count that peer as leaving rather than lost
(`Cluster._join_one`, `Cluster._lost`), or it tries to join it again and
again. Each test sets the order of events with hooks, as
tests/test_cluster_eighth_review.py does.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

import stagehand
from tests.support import HANG_GUARD, PAUSED, Gate, Peers, wait_until
from tests.test_cluster import WhereWorker, members, peer_id
from tests.test_cluster_races import new_peer
from tests.test_cluster_seventh_review import held_entry, job_ranked, run


def cluster_of(instance: stagehand.Stagehand) -> Any:
    cluster = instance._cluster
    assert cluster is not None
    return cluster


def test_stopping_receiver_keeps_its_sender(
    peers: Peers, cleanup: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = peers.start(queues=PAUSED)
    receiver = peers.start(sender, queues=PAUSED)
    wait_until(lambda: members(sender) == [peer_id(receiver)])
    wait_until(lambda: members(receiver) == [peer_id(sender)])
    # `receiver` owns the fingerprint, and `sender` is next.
    unique = job_ranked([receiver, sender])
    entry = held_entry(sender, unique)
    # A job that waits on `receiver`, which its stop() hands to `sender`.
    waiting = receiver.insert(WhereWorker.new({"n": -1}))

    # The entries request has passed the leaving check in _dispatch, and
    # has not yet begun to store the entries.
    receiving = cluster_of(receiver)
    real_receive = receiving._receive_entries
    store_gate = Gate()

    def held_receive(*args: Any, **kwargs: Any) -> None:
        store_gate.hold()
        real_receive(*args, **kwargs)

    monkeypatch.setattr(receiving, "_receive_entries", held_receive)
    sent = run(
        cleanup,
        lambda: cluster_of(sender)._send_entries(peer_id(receiver), [entry]),
    )
    cleanup.append(store_gate.release.set)
    assert store_gate.entered.wait(HANG_GUARD)

    # `receiver` begins to stop now; the entries are stored once its leave
    # request is out, before it hands its jobs over.
    real_withdraw = receiving.withdraw

    def withdraw_then_store() -> None:
        real_withdraw()
        store_gate.release.set()
        wait_until(lambda: sent != [])

    monkeypatch.setattr(receiving, "withdraw", withdraw_then_store)
    receiver.stop()
    assert sent == [None]

    # `sender` stays, so the waiting job should have moved to it.
    adopted = sender.get_job(waiting.id)  # type: ignore[arg-type]
    assert adopted is not None, "the job of the stopping peer was lost"


def test_declined_join_is_not_lost(
    peers: Peers,
    cleanup: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stopping = peers.start(queues=PAUSED)
    # `stopping` waits in its grace period, as if a job still ran, with its
    # server still open.
    grace = Gate()
    real_wait = stopping._wait_for_executing

    def held_wait() -> list[stagehand.Job]:
        grace.hold()
        return real_wait()

    monkeypatch.setattr(stopping, "_wait_for_executing", held_wait)
    run(cleanup, stopping.stop)
    cleanup.append(grace.release.set)
    assert grace.entered.wait(HANG_GUARD)

    joining = new_peer(peers, stopping)
    joining_cluster = cluster_of(joining)
    caplog.set_level(logging.INFO, logger="stagehand")
    joining.start()
    # The declined join keeps the connection, with the stopping peer counted
    # as leaving until it closes, so its address is not joined again.
    assert members(joining) == []
    assert peer_id(stopping) in joining_cluster._departing

    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.WARNING and "join it again" in record.getMessage()
    ]
    rejoins = [
        thread.name
        for thread in threading.enumerate()
        if thread.name == f"stagehand-cluster-rejoin-{peer_id(stopping)}"
    ]
    assert warnings == []
    assert rejoins == []

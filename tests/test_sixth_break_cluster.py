"""A sixth review: cron and leadership in a cluster, its events and status.

Peers run in this process on 127.0.0.1 with listed addresses, as in
tests/test_cluster.py. Peer ids are fixed where the leader matters, and
hooks on methods set the order of events. Each test guards a bug that a
review found, now fixed.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

import stagehand
import stagehand._cluster as cluster_module
from stagehand import FakeClock, InvalidOption, events
from stagehand._rendezvous import owner
from stagehand._unique import fingerprint
from stagehand.plugins import Cron
from tests.support import (
    HANG_GUARD,
    PAUSED,
    SECRET,
    Gate,
    Peers,
    run_in_thread,
    unique_name,
    wait_until,
)
from tests.test_cluster import WhereWorker, members, peer_id
from tests.test_cluster_races import new_peer


def fix_peer_ids(monkeypatch: pytest.MonkeyPatch, ids: list[str]) -> None:
    """Give the next peers built the peer ids in `ids`, in order.

    The list may grow after this call, until a peer finds it used up.
    """
    remaining = iter(ids)
    monkeypatch.setattr(
        cluster_module, "secrets", SimpleNamespace(token_hex=lambda _: next(remaining))
    )


def cron_slots(*instances: stagehand.Stagehand) -> list[str]:
    return sorted(
        job.meta["cron_slot"] for instance in instances for job in instance.jobs()
    )


def record_leaders(handler_id: str, instance: stagehand.Stagehand) -> list[str]:
    """Attach a leader.change handler; return the list of leaders it records."""
    seen: list[str] = []

    def record(event: str, measurements: Any, metadata: Any) -> None:
        if metadata["instance"] == instance.name:
            seen.append(metadata["leader"])

    events.attach(handler_id, ["leader.change"], record)
    return seen


def test_stale_leader_update_loses(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first peer leads. One peer leaves while another, with the smallest
    # id, joins. The first peer handles the leave first and computes that it
    # still leads, but applies that only after the join has made the joiner
    # the leader. A rolling restart can interleave a leave and a join so.
    fix_peer_ids(monkeypatch, ["5000000000", "9000000000", "0000000000"])
    slow = {"request_timeout": HANG_GUARD}
    first = new_peer(peers, cluster=slow)
    first.start()
    leaving = new_peer(peers, first, cluster=slow)
    leaving.start()
    wait_until(lambda: members(first) == [peer_id(leaving)])
    assert first.leadership.is_leader

    assert first._cluster is not None
    leadership = first._cluster.leadership
    real_set_leader = leadership.set_leader
    gate = Gate()

    def set_leader_after_the_join(leader: bool) -> None:
        # Frame 1 is _update_leader, and frame 2 the request it runs for.
        caller = sys._getframe(2).f_code.co_name
        if caller == "_on_leave" and not gate.entered.is_set():
            gate.hold()
        real_set_leader(leader)

    monkeypatch.setattr(leadership, "set_leader", set_leader_after_the_join)
    seen = record_leaders("sixth-leader", first)
    cleanup: list[Any] = []
    try:
        run_in_thread(cleanup, leaving.stop)
        assert gate.entered.wait(HANG_GUARD)
        joiner = new_peer(peers, first, cluster=slow)
        run_in_thread(cleanup, joiner.start)
        # The join's leader update has run, or waits for the leave's.
        wait_until(lambda: not first.leadership.is_leader or _join_updating())
        gate.release.set()
        for step in cleanup:
            step()
        wait_until(lambda: leaving._stopped.is_set())
        wait_until(lambda: joiner.leadership.is_leader)
    finally:
        gate.release.set()
        events.detach("sixth-leader")

    assert first.check_cluster()["leader"] == peer_id(joiner)  # type: ignore[index]
    assert joiner.leadership.is_leader
    assert not first.leadership.is_leader
    assert seen[-1:] == [peer_id(joiner)]


def _join_updating() -> bool:
    # True while some thread is inside _update_leader called by _on_join.
    for frame in sys._current_frames().values():
        current: Any = frame
        while current is not None:
            caller = current.f_back
            if (
                current.f_code.co_name == "_update_leader"
                and caller is not None
                and caller.f_code.co_name == "_on_join"
            ):
                return True
            current = caller
    return False


def test_slot_during_join_runs_once(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(datetime(2026, 3, 1, 11, 59, 30, tzinfo=UTC))
    config: dict[str, Any] = {
        "clock": clock,
        "queues": PAUSED,
        "plugins": [(Cron, {"crontab": [("* * * * *", WhereWorker)]})],
    }
    fix_peer_ids(monkeypatch, ["5000000000", "0000000000"])
    old = new_peer(peers, **config)
    old.start()
    assert old.leadership.is_leader
    # A listed address that accepts the connection and never sends a reply
    # keeps the new peer's start() waiting until the listener closes.
    silent = socket.create_server(("127.0.0.1", 0))
    joining = new_peer(
        peers,
        old,
        cluster={
            "discovery": [
                "{}:{}".format(*old._cluster.address),  # type: ignore[union-attr]
                "{}:{}".format(*silent.getsockname()),
            ],
            "request_timeout": HANG_GUARD,
        },
        **config,
    )
    cleanup: list[Any] = []
    try:
        thread, outcome = run_in_thread(cleanup, joining.start)
        wait_until(lambda: not old.leadership.is_leader)
        assert thread.is_alive()
        clock.advance(60)  # the 12:00 slot passes while the join goes on
        assert old.plugin(Cron).wait_caught_up(HANG_GUARD)
    finally:
        silent.close()
        for step in cleanup:
            step()
    assert outcome == [joining]
    wait_until(lambda: joining.leadership.is_leader)
    assert joining.plugin(Cron).wait_caught_up(HANG_GUARD)

    assert cron_slots(old, joining) == ["2026-03-01T12:00:00+00:00"]


def test_cron_tick_keeps_join_fast(
    peers: Peers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(datetime(2026, 3, 1, 11, 59, 30, tzinfo=UTC))
    config: dict[str, Any] = {
        "clock": clock,
        "queues": PAUSED,
        "plugins": [(Cron, {"crontab": [("* * * * *", WhereWorker)]})],
    }
    ids = ["5000000000"]
    fix_peer_ids(monkeypatch, ids)
    old = new_peer(peers, **config)
    old.start()
    assert old.leadership.is_leader
    # The joining peer has a smaller id, and owns the 12:00 slot's job.
    slot = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    key = fingerprint(old.plugin(Cron)._entries[0].build(slot))
    ids.append(
        next(
            candidate
            for candidate in (f"{n:010x}" for n in range(256))
            if owner(key, [candidate, peer_id(old)]) == candidate
        )
    )
    joining = new_peer(peers, old, cluster={"join_timeout": 2.0}, **config)
    assert joining._cluster is not None and old._cluster is not None
    routed = threading.Event()
    real_on_insert = joining._cluster._on_insert

    def note_routed_insert(message: dict[str, Any]) -> dict[str, Any]:
        routed.set()
        return real_on_insert(message)

    monkeypatch.setattr(joining._cluster, "_on_insert", note_routed_insert)
    real_move = old._cluster._move_entries_to

    def slot_comes_during_the_join(member: Any) -> None:
        # The old leader has connected back to the joining peer, which is
        # now a member, and has not yet handed over leadership.
        if not routed.is_set():
            clock.advance(30)
            assert routed.wait(HANG_GUARD)
        real_move(member)

    monkeypatch.setattr(old._cluster, "_move_entries_to", slot_comes_during_the_join)
    caplog.set_level(logging.WARNING, logger="stagehand._cluster")

    joining.start()

    assert old.plugin(Cron).wait_caught_up(HANG_GUARD)
    assert cron_slots(old, joining) == ["2026-03-01T12:00:00+00:00"]
    assert [
        record.getMessage()
        for record in caplog.records
        if "before its join finished" in record.getMessage()
        or "still joining" in record.getMessage()
    ] == []


class HeldWorker(stagehand.Worker):
    """Runs until the test releases `GATE`."""

    GATE = Gate()

    def perform(self, job: stagehand.Job) -> None:
        self.GATE.hold()


def test_stopping_peer_not_reported_leader(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    fix_peer_ids(monkeypatch, ["5000000000", "0000000000"])
    stopping = new_peer(peers, queues={"default": 1})
    stopping.start()
    leader = new_peer(peers, stopping)
    leader.start()
    wait_until(lambda: members(stopping) == [peer_id(leader)])
    HeldWorker.GATE = Gate()
    HeldWorker.new({}).insert(stopping)
    assert HeldWorker.GATE.entered.wait(HANG_GUARD)
    seen = record_leaders("sixth-stopping", stopping)
    cleanup: list[Any] = []
    try:
        # The peer stops and waits for its job. Meanwhile the leader stops.
        run_in_thread(cleanup, stopping.stop)
        assert stopping._cluster is not None
        wait_until(lambda: peer_id(stopping) in leader._cluster._departing)  # type: ignore[union-attr]
        leader.stop()
        wait_until(lambda: members(stopping) == [])
    finally:
        HeldWorker.GATE.release.set()
        for step in cleanup:
            step()
        events.detach("sixth-stopping")

    assert peer_id(stopping) not in seen


def test_status_lists_a_slow_peer(peers: Peers, tmp_path: Any) -> None:
    from stagehand_django.control import CLIENT_TIMEOUT, ControlServer, _query

    # The default request_timeout of 5 s fails too, but only usually,
    # because the client starts its timer first. With 8 s it always fails.
    first = new_peer(peers, cluster={"request_timeout": 8})
    first.start()
    second = new_peer(peers, first)
    second.start()
    wait_until(lambda: members(first) == [peer_id(second)])
    assert second._cluster is not None
    gate = Gate()

    def slow_status() -> dict[str, Any]:
        gate.hold()
        return {}

    second._cluster.local_status = slow_status  # type: ignore[method-assign]
    server = ControlServer(str(tmp_path / "run"), first)
    try:
        # The request that query_all sends to each process. query_all itself
        # skips the socket of the process that runs it.
        report = _query(server.path, CLIENT_TIMEOUT)
    finally:
        gate.release.set()
        server.close()

    listed = {entry["peer"]: entry for entry in report["cluster"]["survey"]}
    assert sorted(listed) == sorted([peer_id(first), peer_id(second)])
    assert "error" in listed[peer_id(second)]


def test_short_str_secret_raises() -> None:
    with pytest.raises(InvalidOption, match="at least 16 characters"):
        stagehand.Stagehand(
            name=unique_name("bad"), cluster={"name": "shop", "secret": "é" * 8}
        )


@pytest.mark.parametrize(
    "key", ["discovery_timeout", "join_timeout", "request_timeout"]
)
def test_huge_timeout_raises(key: str) -> None:
    with pytest.raises(InvalidOption, match=key):
        stagehand.Stagehand(
            name=unique_name("bad"),
            cluster={"name": "shop", "secret": SECRET, key: 1e12},
        )


@pytest.mark.parametrize("bind", ["127.0.0.1:8_0", "127.0.0.1: 80", "127.0.0.1:+80"])
def test_bind_with_odd_port_raises(bind: str) -> None:
    with pytest.raises(InvalidOption, match="cluster bind"):
        stagehand.Stagehand(
            name=unique_name("bad"),
            cluster={"name": "shop", "secret": SECRET, "bind": bind},
        )

"""The control socket: permissions, size limit, bad requests, stale files."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import stagehand
from stagehand_django.control import MAX_REQUEST, ControlServer, query_all


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    instance = stagehand.Stagehand(testing="manual", name="control-test").start()
    control = ControlServer(str(tmp_path / "run"), instance)
    yield control
    control.close()
    instance.stop()


def ask(path: str, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(30)
        client.connect(path)
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    return json.loads(data)


def test_directory_and_socket_are_private(
    server: ControlServer, tmp_path: Path
) -> None:
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert Path(server.path).name == f"{os.getpid()}.sock"


def test_status_reply_is_json(server: ControlServer) -> None:
    reply = ask(server.path, b'{"op": "status"}\n')
    assert (reply["pid"], reply["instance"], reply["testing"]) == (
        os.getpid(),
        "control-test",
        "manual",
    )
    assert [queue["queue"] for queue in reply["queues"]] == ["default"]


def test_oversized_request_is_refused(server: ControlServer) -> None:
    reply = ask(server.path, b"x" * (MAX_REQUEST + 1))
    assert reply == {"error": f"message longer than the limit of {MAX_REQUEST} bytes"}
    assert ask(server.path, b'{"op": "status"}\n')["pid"] == os.getpid()


def test_unknown_and_malformed_requests_get_errors(server: ControlServer) -> None:
    assert "unknown request" in ask(server.path, b'{"op": "shutdown"}\n')["error"]
    assert "Expecting value" in ask(server.path, b"not json\n")["error"]


def test_close_removes_the_socket(server: ControlServer) -> None:
    server.close()
    assert not os.path.exists(server.path)
    server.close()


def test_sockets_of_exited_processes_are_removed(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(30)
    stale = tmp_path / f"{child.pid}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(stale))
    survey = query_all(str(tmp_path))
    assert (survey.reports, survey.failures) == ([], [])
    assert survey.removed == [str(stale)]
    assert not stale.exists()


def test_missing_directory_is_reported(tmp_path: Path) -> None:
    survey = query_all(str(tmp_path / "absent"))
    assert (survey.reports, survey.removed, survey.failures) == ([], [], [])


def test_status_shows_every_peer_of_a_cluster(tmp_path: Path) -> None:
    from stagehand_django.control import Survey
    from stagehand_django.management.commands.stagehand_status import _as_text

    cluster = {
        "name": "status-test",
        "secret": "a secret of enough length",
        "bind": "127.0.0.1:0",
        "discovery": [],
    }
    first = stagehand.Stagehand(name="status-first", cluster=cluster).start()
    second = stagehand.Stagehand(
        name="status-second",
        cluster={**cluster, "discovery": [first.check_cluster()["address"]]},  # type: ignore[index]
    ).start()
    control = ControlServer(str(tmp_path / "run"), first)
    try:
        reply = ask(control.path, b'{"op": "status"}\n')
    finally:
        control.close()
        second.stop()
        first.stop()

    ids = sorted([reply["cluster"]["peer"], *reply["peers"]])
    assert reply["cluster"]["name"] == "status-test"
    assert [peer["peer"] for peer in reply["cluster"]["survey"]] == ids
    assert sorted(peer["instance"] for peer in reply["cluster"]["survey"]) == [
        "status-first",
        "status-second",
    ]
    text = _as_text(Survey(directory=str(tmp_path), reports=[reply]))
    assert f"Cluster 'status-test': 2 peer(s), leader {min(ids)}" in text
    assert "(instance 'status-second')" in text

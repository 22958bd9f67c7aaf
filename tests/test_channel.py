"""The authenticated peer channel (stagehand._channel), over real sockets.

Everything binds and connects on 127.0.0.1 only. Tests wait on events and
joins with generous timeouts and never sleep to synchronise. What they
assert follows from the order of events, so a slow machine cannot fail them.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stagehand._channel import (
    MAX_FRAME,
    AuthenticationFailed,
    ChannelError,
    ChannelServer,
    Connection,
    connect,
)
from stagehand.exceptions import InvalidOption, StagehandError
from tests.support import wait_until

SECRET = b"correct horse battery staple"
CLUSTER = "shop"
WAIT = 30.0  # generous bound for anything that should happen at once
LOGGER = "stagehand._channel"


def channel_threads() -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name.startswith("stagehand-channel")
    ]


@pytest.fixture(autouse=True)
def _no_threads_left(cleanup: list[Any]) -> Iterator[None]:
    # Torn down after `cleanup` has closed everything that the test opened.
    yield
    for call in reversed(cleanup):
        call()
    cleanup.clear()
    assert channel_threads() == []


def echo(peer_id: str, message: dict[str, Any]) -> dict[str, Any]:
    return message


def start_server(
    cleanup: list[Any],
    handler: Callable[[str, dict[str, Any]], dict[str, Any] | None] = echo,
    **options: Any,
) -> ChannelServer:
    server = ChannelServer(SECRET, CLUSTER, "server", handler, **options)
    cleanup.append(server.close)
    server.start()
    return server


def open_connection(
    cleanup: list[Any], server: ChannelServer, peer_id: str = "client", **options: Any
) -> Connection:
    conn = connect(server.address, SECRET, CLUSTER, peer_id, **options)
    cleanup.append(conn.close)
    return conn


def raw_socket(cleanup: list[Any], server: ChannelServer) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=WAIT)
    cleanup.append(sock.close)
    return sock


def local(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def remote(server: ChannelServer) -> str:
    host, port = server.address
    return f"{host}:{port}"


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed in the middle of a frame"
        data += chunk
    return data


def read_frame(sock: socket.socket) -> dict[str, Any]:
    (size,) = struct.unpack(">I", recv_exact(sock, 4))
    message: dict[str, Any] = json.loads(recv_exact(sock, size))
    return message


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def assert_closed_by_peer(sock: socket.socket) -> None:
    assert sock.recv(1) == b""


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING
    ]


# Round trips ----------------------------------------------------------------


def test_round_trip(cleanup: list[Any]) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def handler(peer_id: str, message: dict[str, Any]) -> dict[str, Any]:
        seen.append((peer_id, message))
        return {"sum": message["a"] + message["b"], "from": "server"}

    server = start_server(cleanup, handler)
    conn = open_connection(cleanup, server, "alpha")
    assert conn.remote_peer_id == "server"
    assert conn.request({"a": 2, "b": 3}, timeout=WAIT) == {"sum": 5, "from": "server"}
    assert seen == [("alpha", {"a": 2, "b": 3})]


def test_handler_none_gives_empty_reply(cleanup: list[Any]) -> None:
    server = start_server(cleanup, lambda peer_id, message: None)
    conn = open_connection(cleanup, server)
    assert conn.request({"ping": True}, timeout=WAIT) == {}


def test_concurrent_requests_on_one_connection(cleanup: list[Any]) -> None:
    def handler(peer_id: str, message: dict[str, Any]) -> dict[str, Any]:
        return {"thread": message["thread"], "square": message["i"] ** 2}

    server = start_server(cleanup, handler)
    conn = open_connection(cleanup, server)
    results: dict[int, list[dict[str, Any]]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def run(thread: int) -> None:
        try:
            barrier.wait(WAIT)
            results[thread] = [
                conn.request({"thread": thread, "i": i}, timeout=WAIT)
                for i in range(100)
            ]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert errors == []
    assert results == {
        n: [{"thread": n, "square": i**2} for i in range(100)] for n in range(8)
    }


def test_several_clients_at_once(cleanup: list[Any]) -> None:
    def handler(peer_id: str, message: dict[str, Any]) -> dict[str, Any]:
        return {"peer": peer_id, "n": message["n"]}

    server = start_server(cleanup, handler)
    conns = {
        f"peer-{n}": open_connection(cleanup, server, f"peer-{n}") for n in range(4)
    }
    replies: dict[str, list[dict[str, Any]]] = {}
    barrier = threading.Barrier(len(conns))

    def run(peer_id: str) -> None:
        barrier.wait(WAIT)
        replies[peer_id] = [
            conns[peer_id].request({"n": n}, timeout=WAIT) for n in range(20)
        ]

    threads = [threading.Thread(target=run, args=(peer,)) for peer in conns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert replies == {
        peer: [{"peer": peer, "n": n} for n in range(20)] for peer in conns
    }
    assert {conn.remote_peer_id for conn in conns.values()} == {"server"}


def test_context_managers(cleanup: list[Any]) -> None:
    with ChannelServer(SECRET, CLUSTER, "server", echo) as server:
        with connect(server.address, SECRET, CLUSTER, "client") as conn:
            assert conn.request({"x": [1, "two", None]}, timeout=WAIT) == {
                "x": [1, "two", None]
            }
        with pytest.raises(ChannelError):
            conn.request({}, timeout=WAIT)
    assert channel_threads() == []


def test_str_secret_equals_its_utf8_bytes(cleanup: list[Any]) -> None:
    server = ChannelServer("sécret", CLUSTER, "server", echo)
    cleanup.append(server.close)
    server.start()
    conn = connect(server.address, "sécret".encode(), CLUSTER, "client")
    cleanup.append(conn.close)
    assert conn.request({"ok": 1}, timeout=WAIT) == {"ok": 1}


# Authentication ---------------------------------------------------------------


def test_wrong_secret_rejected(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = start_server(cleanup)
    with pytest.raises(AuthenticationFailed) as info:
        connect(server.address, b"wrong secret", CLUSTER, "intruder")
    assert str(info.value) == (
        f"peer 'server' at {remote(server)} rejected this peer: "
        "check that both use the same cluster secret"
    )
    [warning] = warnings(caplog)
    assert re.fullmatch(
        r"rejected peer 'intruder' at 127\.0\.0\.1:\d+: "
        r"it does not know the cluster secret",
        warning,
    )
    assert "wrong secret" not in caplog.text
    assert SECRET.decode() not in caplog.text
    # The server goes on serving peers that know the secret.
    assert open_connection(cleanup, server).request({"n": 1}, timeout=WAIT) == {"n": 1}


def test_different_cluster_rejected(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = start_server(cleanup)
    with pytest.raises(AuthenticationFailed) as info:
        connect(server.address, SECRET, "warehouse", "client")
    assert str(info.value) == (
        f"peer 'server' at {remote(server)} belongs to cluster 'shop', not 'warehouse'"
    )
    [warning] = warnings(caplog)
    assert re.fullmatch(
        r"rejected peer 'client' at 127\.0\.0\.1:\d+: "
        r"it belongs to cluster 'warehouse', not 'shop'",
        warning,
    )


def test_client_rejects_server_without_secret(
    cleanup: list[Any],
) -> None:
    # A fake server that accepts any client but does not know the secret.
    listener = socket.create_server(("127.0.0.1", 0))
    cleanup.append(listener.close)
    got_auth: list[dict[str, Any]] = []

    def fake_server() -> None:
        sock, _ = listener.accept()
        with sock:
            hello = {
                "type": "hello",
                "cluster": CLUSTER,
                "peer": "fake",
                "nonce": "ab" * 32,
            }
            sock.sendall(frame(json.dumps(hello).encode()))
            got_auth.append(read_frame(sock))
            welcome = {"type": "welcome", "mac": "00" * 32}
            sock.sendall(frame(json.dumps(welcome).encode()))
            assert_closed_by_peer(sock)

    thread = threading.Thread(target=fake_server)
    thread.start()
    cleanup.append(lambda: thread.join(WAIT))
    host, port = listener.getsockname()
    with pytest.raises(AuthenticationFailed) as info:
        connect((host, port), SECRET, CLUSTER, "client")
    assert str(info.value) == (
        f"peer 'fake' at {host}:{port} did not prove that it knows the cluster secret"
    )
    thread.join(WAIT)
    [auth] = got_auth
    assert sorted(auth) == ["cluster", "mac", "nonce", "peer", "type"]
    assert auth["type"] == "auth"
    assert auth["cluster"] == CLUSTER
    assert auth["peer"] == "client"
    assert re.fullmatch(r"[0-9a-f]{64}", auth["nonce"])


def test_silent_client_does_not_block_others(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = start_server(cleanup, handshake_timeout=WAIT * 2)
    silent = raw_socket(cleanup, server)
    hello = read_frame(silent)
    assert hello["type"] == "hello"
    assert hello["cluster"] == CLUSTER
    assert hello["peer"] == "server"
    # Had the accept loop waited for the silent client, this handshake
    # would run out of its own, shorter, time.
    conn = open_connection(cleanup, server, timeout=WAIT)
    assert conn.request({"n": 1}, timeout=WAIT) == {"n": 1}
    assert warnings(caplog) == []


def test_silent_client_dropped_after_timeout(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = start_server(cleanup, handshake_timeout=0.2)
    silent = raw_socket(cleanup, server)
    assert read_frame(silent)["type"] == "hello"
    assert_closed_by_peer(silent)
    assert warnings(caplog) == [
        f"handshake with {local(silent)} failed: no answer within 0.2 seconds"
    ]
    assert open_connection(cleanup, server).request({"n": 2}, timeout=WAIT) == {"n": 2}


# Framing ----------------------------------------------------------------------


def test_oversize_handshake_frame_closes_connection(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = start_server(cleanup)
    sock = raw_socket(cleanup, server)
    assert read_frame(sock)["type"] == "hello"
    # Only the header: a server that tried to read the body would wait
    # for it instead of closing.
    sock.sendall(struct.pack(">I", 0xFFFFFFFF))
    assert_closed_by_peer(sock)
    assert warnings(caplog) == [
        f"handshake with {local(sock)} failed: frame of 4294967295 bytes announced, "
        f"more than the limit of {MAX_FRAME} bytes"
    ]


def _decode_error(body: bytes) -> str:
    try:
        json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return f"frame is not valid UTF-8: {exc}"
    except ValueError as exc:
        return f"frame is not valid JSON: {exc}"
    raise AssertionError("body decodes")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(
            struct.pack(">I", 4096 + 1),
            "frame of 4097 bytes announced, more than the limit of 4096 bytes",
            id="oversize",
        ),
        pytest.param(frame(b'{"a": 1'), _decode_error(b'{"a": 1'), id="malformed-json"),
        pytest.param(
            frame(b'{"a": "\xff"}'), _decode_error(b'{"a": "\xff"}'), id="invalid-utf8"
        ),
        pytest.param(
            frame(b"[1, 2]"), "frame contains a JSON list, not an object", id="list"
        ),
        pytest.param(
            frame(b'{"a": NaN}'),
            "frame is not valid JSON: NaN is not valid JSON",
            id="nan",
        ),
        pytest.param(frame(b'{"a": 1}'), "request has no integer 'rid'", id="no-rid"),
    ],
)
def test_bad_frame_closes_connection(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture, data: bytes, reason: str
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = start_server(cleanup, max_frame=4096)
    conn = open_connection(cleanup, server, max_frame=4096)
    client_address = local(conn._link.sock)
    conn._link.send_frame(data)
    # The reader thread ends when the server hangs up.
    conn._reader.join(WAIT)
    assert not conn._reader.is_alive()
    assert warnings(caplog) == [
        f"dropping connection from peer 'client' at {client_address}: {reason}"
    ]
    with pytest.raises(ChannelError) as info:
        conn.request({"n": 1}, timeout=WAIT)
    assert str(info.value) == (
        f"connection to peer 'server' at {remote(server)} lost: "
        "the peer closed the connection"
    )
    assert open_connection(cleanup, server, "other").request(
        {"n": 2}, timeout=WAIT
    ) == {"n": 2}


def test_client_rejects_oversize_reply(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = start_server(cleanup, lambda peer_id, message: {"data": "x" * 5000})
    conn = open_connection(cleanup, server, max_frame=4096)
    with pytest.raises(ChannelError) as info:
        conn.request({}, timeout=WAIT)
    reason = "frame of 5019 bytes announced, more than the limit of 4096 bytes"
    where = f"peer 'server' at {remote(server)}"
    assert str(info.value) == f"connection to {where} closed: {reason}"
    assert f"closing connection to {where}: {reason}" in warnings(caplog)


def test_unencodable_message_sends_nothing(cleanup: list[Any]) -> None:
    server = start_server(cleanup, max_frame=4096)
    conn = open_connection(cleanup, server, max_frame=4096)
    hint = "send only str keys, dicts, lists, str, int, finite float, bool and None"
    for value, error in [({1, 2}, TypeError), (float("nan"), ValueError)]:
        # json's own wording differs between Python versions.
        with pytest.raises(error) as json_error:
            json.dumps(value, allow_nan=False)
        with pytest.raises(error) as info:
            conn.request({"x": value}, timeout=WAIT)
        assert type(info.value) is error
        assert str(info.value) == (
            f"message cannot be sent as JSON: {json_error.value}; {hint}"
        )
    with pytest.raises(ValueError) as too_big:
        conn.request({"x": "y" * 4096}, timeout=WAIT)
    assert str(too_big.value) == (
        "message is 4112 bytes of JSON, more than max_frame=4096; send less per message"
    )
    with pytest.raises(InvalidOption) as reserved:
        conn.request({"rid": 7}, timeout=WAIT)
    assert (
        str(reserved.value) == "message must not have a 'rid' key; the channel sets it"
    )
    with pytest.raises(TypeError) as not_dict:
        conn.request(["x"], timeout=WAIT)  # type: ignore[arg-type]
    assert str(not_dict.value) == "message must be a dict, not list"
    # Nothing half-sent: the connection still works.
    assert conn.request({"n": 1}, timeout=WAIT) == {"n": 1}


# Handler errors, timeouts and closing -----------------------------------------


def test_handler_exception_gives_an_error_reply(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    def handler(peer_id: str, message: dict[str, Any]) -> Any:
        if message.get("boom"):
            raise RuntimeError(
                "boom" if message["boom"] == "short" else "\U0001f600" * 1000
            )
        if message.get("bad"):
            return ["not", "a", "dict"]
        return message

    server = start_server(cleanup, handler, max_frame=1024)
    conn = open_connection(cleanup, server, max_frame=1024)
    assert conn.request({"boom": "short"}, timeout=WAIT) == {
        "error": "RuntimeError: boom"
    }
    # Cut to (1024 - 64) // 12 = 80 characters, so that the reply fits in a
    # 1024-byte frame even when every character is escaped as a surrogate pair.
    long_error = "RuntimeError: " + "\U0001f600" * 1000
    assert conn.request({"boom": "long"}, timeout=WAIT) == {"error": long_error[:80]}
    assert conn.request({"bad": True}, timeout=WAIT) == {
        "error": "TypeError: handler returned list; return a dict or None"
    }
    assert conn.request({"n": 3}, timeout=WAIT) == {"n": 3}
    errors = [
        r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR
    ]
    assert [r.getMessage() for r in errors] == [
        "channel handler failed on a request from peer 'client'"
    ] * 3
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], RuntimeError)


def test_request_timeout(cleanup: list[Any]) -> None:
    release = threading.Event()

    def handler(peer_id: str, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("slow"):
            release.wait(WAIT)
        return message

    server = start_server(cleanup, handler)
    cleanup.append(release.set)
    conn = open_connection(cleanup, server)
    with pytest.raises(ChannelError) as info:
        conn.request({"slow": True}, timeout=0.2)
    assert str(info.value) == (
        f"request to peer 'server' at {remote(server)} timed out after 0.2 seconds"
    )
    release.set()
    # The late reply to the first request is dropped, not mistaken for this one.
    assert conn.request({"n": 4}, timeout=WAIT) == {"n": 4}


def test_server_close_fails_waiting_request(cleanup: list[Any]) -> None:
    entered, release, failed = threading.Event(), threading.Event(), threading.Event()

    def handler(peer_id: str, message: dict[str, Any]) -> dict[str, Any]:
        entered.set()
        release.wait(WAIT)
        return message

    server = start_server(cleanup, handler)
    cleanup.append(release.set)
    conn = open_connection(cleanup, server)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            conn.request({"n": 5}, timeout=WAIT * 10)
        except BaseException as exc:
            errors.append(exc)
        failed.set()

    caller = threading.Thread(target=call)
    caller.start()
    assert entered.wait(WAIT)
    closer = threading.Thread(target=server.close)
    closer.start()
    assert failed.wait(WAIT)
    # Still inside the handler: the request failed before any reply or timeout.
    assert not release.is_set()
    release.set()
    closer.join(WAIT)
    caller.join(WAIT)
    [error] = errors
    assert isinstance(error, ChannelError)
    assert str(error) == (
        f"connection to peer 'server' at {remote(server)} lost: "
        "the peer closed the connection"
    )
    with pytest.raises(ChannelError) as later:
        conn.request({"n": 6}, timeout=WAIT)
    assert str(later.value) == str(error)


def test_client_close_fails_waiting_requests(cleanup: list[Any]) -> None:
    entered, release = threading.Event(), threading.Event()

    def handler(peer_id: str, message: dict[str, Any]) -> dict[str, Any]:
        entered.set()
        release.wait(WAIT)
        return message

    server = start_server(cleanup, handler)
    cleanup.append(release.set)
    conn = open_connection(cleanup, server)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            conn.request({}, timeout=WAIT * 10)
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert entered.wait(WAIT)
    conn.close()
    caller.join(WAIT)
    assert not release.is_set()
    expected = f"connection to peer 'server' at {remote(server)} is closed"
    assert [str(e) for e in errors] == [expected]
    with pytest.raises(ChannelError, match=f"^{re.escape(expected)}$"):
        conn.request({}, timeout=WAIT)


def test_close_idempotent_leaves_no_threads(cleanup: list[Any]) -> None:
    server = start_server(cleanup, handshake_timeout=WAIT * 2)
    conns = [open_connection(cleanup, server, f"peer-{n}") for n in range(3)]
    silent = raw_socket(cleanup, server)
    assert read_frame(silent)["type"] == "hello"
    assert conns[0].request({"n": 1}, timeout=WAIT) == {"n": 1}
    names = channel_threads()
    assert sum(name.startswith("stagehand-channel-accept-") for name in names) == 1
    assert sum(name.startswith("stagehand-channel-serve-") for name in names) == 4
    assert sum(name.startswith("stagehand-channel-client-") for name in names) == 3
    server.close()
    server.close()
    assert_closed_by_peer(silent)
    for conn in conns:
        conn.close()
        conn.close()
    assert channel_threads() == []
    with pytest.raises(ChannelError) as info:
        server.start()
    assert str(info.value) == "start() was called already; create a new ChannelServer"


def test_connect_to_closed_port(cleanup: list[Any]) -> None:
    server = start_server(cleanup)
    address = server.address
    server.close()
    with pytest.raises(ChannelError, match=r"^cannot connect to 127\.0\.0\.1:\d+: "):
        connect(address, SECRET, CLUSTER, "client")


# Argument validation ----------------------------------------------------------


SERVER_ARGS: dict[str, Any] = {
    "secret": SECRET,
    "cluster": CLUSTER,
    "peer_id": "server",
    "handler": echo,
}


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        (
            {"secret": b""},
            InvalidOption,
            "secret must not be empty; pass the cluster's shared secret",
        ),
        (
            {"secret": ""},
            InvalidOption,
            "secret must not be empty; pass the cluster's shared secret",
        ),
        (
            {"secret": 42},
            TypeError,
            "secret must be bytes or str, not int; pass the cluster's shared secret",
        ),
        ({"cluster": 5}, TypeError, "cluster must be a str, not int"),
        (
            {"cluster": ""},
            InvalidOption,
            "cluster must not be empty; pass a non-empty str",
        ),
        ({"peer_id": None}, TypeError, "peer_id must be a str, not NoneType"),
        ({"handler": "echo"}, TypeError, "handler must be callable, not 'echo'"),
        (
            {"max_frame": 1023},
            InvalidOption,
            "max_frame must be between 1024 and 4294967295 bytes, not 1023; "
            "the default is 1048576",
        ),
        (
            {"max_frame": 2.5},
            TypeError,
            "max_frame must be an int number of bytes, not 2.5",
        ),
        (
            {"handshake_timeout": 0},
            InvalidOption,
            "handshake_timeout must be a positive number of seconds, not 0",
        ),
        (
            {"handshake_timeout": -1.5},
            InvalidOption,
            "handshake_timeout must be a positive number of seconds, not -1.5",
        ),
        (
            {"handshake_timeout": float("nan")},
            InvalidOption,
            "handshake_timeout must be a positive number of seconds, not nan",
        ),
        (
            {"handshake_timeout": True},
            TypeError,
            "handshake_timeout must be a number of seconds, not True",
        ),
        ({"port": 65536}, InvalidOption, "port must be between 0 and 65535, not 65536"),
        ({"port": -1}, InvalidOption, "port must be between 0 and 65535, not -1"),
        ({"port": "80"}, TypeError, "port must be an int, not '80'"),
    ],
)
def test_server_argument_validation(
    changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    args = {**SERVER_ARGS, **changes}
    options = {k: args.pop(k) for k in list(args) if k not in SERVER_ARGS}
    with pytest.raises(error) as info:
        ChannelServer(
            args["secret"], args["cluster"], args["peer_id"], args["handler"], **options
        )
    assert str(info.value) == message
    if error is InvalidOption:
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, StagehandError)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: connect(("127.0.0.1", 0), SECRET, CLUSTER, "c"),
            InvalidOption,
            "port must be between 1 and 65535, not 0",
        ),
        (
            lambda: connect("127.0.0.1:80", SECRET, CLUSTER, "c"),  # type: ignore[arg-type]
            TypeError,
            "address must be a (host, port) tuple, not '127.0.0.1:80'",
        ),
        (
            lambda: connect(("127.0.0.1", 1), b"", CLUSTER, "c"),
            InvalidOption,
            "secret must not be empty; pass the cluster's shared secret",
        ),
        (
            lambda: connect(("127.0.0.1", 1), SECRET, b"shop", "c"),  # type: ignore[arg-type]
            TypeError,
            "cluster must be a str, not bytes",
        ),
        (
            lambda: connect(("127.0.0.1", 1), SECRET, CLUSTER, 7),  # type: ignore[arg-type]
            TypeError,
            "peer_id must be a str, not int",
        ),
        (
            lambda: connect(("127.0.0.1", 1), SECRET, CLUSTER, "c", timeout=0),
            InvalidOption,
            "timeout must be a positive number of seconds, not 0",
        ),
        (
            lambda: connect(("127.0.0.1", 1), SECRET, CLUSTER, "c", max_frame=100),
            InvalidOption,
            "max_frame must be between 1024 and 4294967295 bytes, not 100; "
            "the default is 1048576",
        ),
    ],
)
def test_connect_argument_validation(
    call: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        call()
    assert str(info.value) == message


def test_request_and_address_validation(cleanup: list[Any]) -> None:
    server = ChannelServer(SECRET, CLUSTER, "server", echo)
    cleanup.append(server.close)
    with pytest.raises(ChannelError) as not_started:
        server.address  # noqa: B018
    assert str(not_started.value) == "the server is not listening; call start() first"
    server.start()
    conn = open_connection(cleanup, server)
    for timeout, error, message in [
        (0, InvalidOption, "timeout must be a positive number of seconds, not 0"),
        (-3, InvalidOption, "timeout must be a positive number of seconds, not -3"),
        (
            float("inf"),
            InvalidOption,
            "timeout must be a positive number of seconds, not inf",
        ),
        (None, TypeError, "timeout must be a number of seconds, not None"),
    ]:
        with pytest.raises(error) as info:
            conn.request({}, timeout=timeout)  # type: ignore[arg-type]
        assert str(info.value) == message
    assert conn.request({"n": 1}, timeout=WAIT) == {"n": 1}


def test_connect_handshake_timeout(cleanup: list[Any]) -> None:
    # The kernel completes the TCP connection although the test never calls accept().
    listener = socket.create_server(("127.0.0.1", 0))
    cleanup.append(listener.close)
    host, port = listener.getsockname()
    with pytest.raises(ChannelError) as info:
        connect((host, port), SECRET, CLUSTER, "client", timeout=0.2)
    assert str(info.value) == (
        f"handshake with {host}:{port} failed: no answer within 0.2 seconds"
    )


def test_on_close_runs_once_when_server_closes(cleanup: list[Any]) -> None:
    server = start_server(cleanup)
    closed: list[str] = []
    done = threading.Event()

    def on_close() -> None:
        closed.append(threading.current_thread().name)
        done.set()

    conn = open_connection(cleanup, server, on_close=on_close)
    assert conn.request({"n": 1}, timeout=WAIT) == {"n": 1}
    server.close()

    assert done.wait(WAIT)
    conn.close()
    assert len(closed) == 1
    assert closed[0].startswith("stagehand-channel-client-")


def test_on_close_runs_when_client_closes(cleanup: list[Any]) -> None:
    server = start_server(cleanup)
    done = threading.Event()
    conn = open_connection(cleanup, server, on_close=done.set)

    conn.close()

    assert done.is_set()  # close() joins the reader, which calls on_close


def test_client_socket_has_keepalive(cleanup: list[Any]) -> None:
    server = start_server(cleanup)
    conn = open_connection(cleanup, server)
    sock = conn._link.sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3


def test_concurrent_request_leaves_reader_free(cleanup: list[Any]) -> None:
    # The slow request waits until the fast one, sent after it on the same
    # connection, has its reply: only a thread of its own lets it end.
    slow_arrived = threading.Event()
    fast_answered = threading.Event()

    def handler(peer_id: str, message: dict[str, Any]) -> dict[str, Any]:
        if message["type"] == "slow":
            slow_arrived.set()
            return {"waited": fast_answered.wait(WAIT)}
        return {"fast": True}

    server = start_server(
        cleanup, handler, concurrent=lambda message: message["type"] == "slow"
    )
    conn = open_connection(cleanup, server)
    replies: list[dict[str, Any]] = []
    slow = threading.Thread(
        target=lambda: replies.append(conn.request({"type": "slow"}, WAIT))
    )
    slow.start()
    cleanup.append(lambda: slow.join(WAIT))
    assert slow_arrived.wait(WAIT)

    fast = conn.request({"type": "fast"}, WAIT)
    fast_answered.set()
    slow.join(WAIT)

    assert fast == {"fast": True}
    assert replies == [{"waited": True}]


def test_concurrent_requests_share_bounded_threads(cleanup: list[Any]) -> None:
    # Twenty slow requests on one connection: sixteen run at once in the
    # request threads, and the other four wait in the queue for a free one.
    gate = threading.Event()
    lock = threading.Lock()
    running = [0]
    peak = [0]

    def handler(peer_id: str, message: dict[str, Any]) -> dict[str, Any]:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(WAIT)
        with lock:
            running[0] -= 1
        return {"n": message["n"]}

    server = start_server(cleanup, handler, concurrent=lambda message: True)
    conn = open_connection(cleanup, server)
    replies: list[dict[str, Any]] = []
    senders = [
        threading.Thread(
            target=lambda n=n: replies.append(conn.request({"n": n}, WAIT))
        )
        for n in range(20)
    ]
    for sender in senders:
        sender.start()
        cleanup.append(lambda sender=sender: sender.join(WAIT))
    wait_until(lambda: running[0] == 16 and server._requests.qsize() == 4)
    gate.set()
    for sender in senders:
        sender.join(WAIT)

    assert sorted(reply["n"] for reply in replies) == list(range(20))
    assert peak[0] == 16
    assert len(server._request_threads) == 16

"""The authenticated channel that cluster peers talk over.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON whose top level is an object. Frames carry JSON, never pickle, so
decoding a frame cannot run code that a peer chose.

Before any other frame, both sides prove that they know the cluster's
shared secret::

    server -> client  {"type": "hello", "cluster", "peer", "nonce"}
    client -> server  {"type": "auth", "cluster", "peer", "nonce", "mac"}
    server -> client  {"type": "welcome", "mac"}  or  {"type": "rejected"}

Each MAC is HMAC-SHA256 keyed with the secret over `_mac`'s input, which
binds the role, the cluster name, both nonces and both peer ids. The role
label differs between the two MACs, so neither side can pass by echoing
the other's proof.

After the handshake the client sends requests and the server replies to
each one. This module adds an integer ``"rid"`` field to each request and
its reply to pair them up, and strips it before either reaches the caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import queue
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn, Self

from stagehand.exceptions import InvalidOption, StagehandError

__all__ = [
    "AuthenticationFailed",
    "ChannelError",
    "NotDelivered",
    "ChannelServer",
    "Connection",
    "Handler",
    "connect",
    "HANDSHAKE_TIMEOUT",
    "MAX_FRAME",
]

logger = logging.getLogger(__name__)

MAX_FRAME = 1024 * 1024
HANDSHAKE_TIMEOUT = 5.0
_MIN_FRAME = 1024
_HEADER = struct.Struct(">I")
_NONCE_BYTES = 32
_PROTOCOL = "stagehand-channel/1"
_THREAD_PREFIX = "stagehand-channel"
_JOIN_TIMEOUT = 5.0
# Threads per server for the requests that `concurrent` selects. Starting a
# thread for each request costs about 90 µs, a third of a routed insert's
# round trip. Past this many busy threads, requests wait for a free one.
_REQUEST_THREADS = 16

Message = dict[str, Any]
Handler = Callable[[str, Message], Message | None]


class ChannelError(StagehandError):
    """A peer connection failed, was closed, or timed out waiting for a reply."""


class AuthenticationFailed(ChannelError):
    """The remote peer has a different cluster name or secret."""


class NotDelivered(ChannelError):
    """A request was not sent, because the connection had failed or closed.

    Any other `ChannelError` from `Connection.request` leaves it unknown
    whether the peer received and handled the request.
    """


class _ProtocolError(ChannelError):
    """The peer broke the protocol, so the receiver logs a warning and disconnects."""


# Argument checks ------------------------------------------------------------


def _check_secret(secret: bytes | str) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    elif not isinstance(secret, bytes):
        raise TypeError(
            f"secret must be bytes or str, not {type(secret).__name__}; "
            "pass the cluster's shared secret"
        )
    if not secret:
        raise InvalidOption(
            "secret must not be empty; pass the cluster's shared secret"
        )
    return secret


def _check_name(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidOption(f"{name} must not be empty; pass a non-empty str")
    return value


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise InvalidOption(
            f"{name} must be a positive number of seconds, not {value!r}"
        )
    return float(value)


def _check_max_frame(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_frame must be an int number of bytes, not {value!r}")
    if not _MIN_FRAME <= value <= 0xFFFFFFFF:
        raise InvalidOption(
            f"max_frame must be between {_MIN_FRAME} and {0xFFFFFFFF} bytes, "
            f"not {value}; the default is {MAX_FRAME}"
        )
    return value


def _check_port(value: object, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"port must be an int, not {value!r}")
    if not lowest <= value <= 65535:
        raise InvalidOption(f"port must be between {lowest} and 65535, not {value}")
    return value


# Framing --------------------------------------------------------------------


def _encode(message: Message, max_frame: int) -> bytes:
    if not isinstance(message, dict):
        raise TypeError(f"a message must be a dict, not {type(message).__name__}")
    hint = "send only str keys, dicts, lists, str, int, finite float, bool and None"
    try:
        body = json.dumps(message, allow_nan=False, separators=(",", ":"))
    except TypeError as exc:
        raise TypeError(f"message cannot be sent as JSON: {exc}; {hint}") from None
    except ValueError as exc:
        raise ValueError(f"message cannot be sent as JSON: {exc}; {hint}") from None
    except RecursionError:
        raise ValueError(
            "message cannot be sent as JSON: it is nested too deeply; send flatter data"
        ) from None
    data = body.encode("utf-8")
    if len(data) > max_frame:
        raise ValueError(
            f"message is {len(data)} bytes of JSON, more than max_frame={max_frame}; "
            "send less per message"
        )
    return _HEADER.pack(len(data)) + data


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


class _Link:
    """A connected socket that carries frames both ways.

    Only the thread that reads a link closes its socket, and only after
    shutting it down and taking the send lock, so that no other thread is
    inside a socket call when the descriptor goes away.
    """

    def __init__(self, sock: socket.socket, remote: str, max_frame: int) -> None:
        self.sock = sock
        self.local_host = sock.getsockname()[0]
        self.remote = remote
        self.max_frame = max_frame
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._open = True

    def send(self, message: Message) -> None:
        self.send_frame(_encode(message, self.max_frame))

    def send_frame(self, frame: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(frame)

    def receive(self, deadline: float | None = None) -> Message:
        (size,) = _HEADER.unpack(self._read(_HEADER.size, deadline))
        # Checked before reading, so an announced size never costs memory.
        if size > self.max_frame:
            raise _ProtocolError(
                f"frame of {size} bytes announced, "
                f"more than the limit of {self.max_frame} bytes"
            )
        body = self._read(size, deadline)
        try:
            message = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError as exc:
            raise _ProtocolError(f"frame is not valid UTF-8: {exc}") from None
        except (ValueError, RecursionError) as exc:
            raise _ProtocolError(f"frame is not valid JSON: {exc}") from None
        if not isinstance(message, dict):
            raise _ProtocolError(
                f"frame contains a JSON {type(message).__name__}, not an object"
            )
        return message

    def _read(self, size: int, deadline: float | None) -> bytearray:
        buffer = bytearray(size)
        done = 0
        with memoryview(buffer) as view:
            while done < size:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    self.sock.settimeout(left)
                count = self.sock.recv_into(view[done:])
                if count == 0:
                    raise ChannelError("the peer closed the connection")
                done += count
        return buffer

    def shutdown(self) -> None:
        """Wake the reader and make sends fail. Safe from any thread, more than once."""
        with self._state_lock:
            if self._open:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.shutdown()
        with self._send_lock, self._state_lock:
            self._open = False
            self.sock.close()


# Handshake ------------------------------------------------------------------


def _mac(
    secret: bytes,
    role: str,
    cluster: str,
    server_nonce: str,
    client_nonce: str,
    server_id: str,
    client_id: str,
) -> str:
    # A JSON array of strings encodes each tuple of fields in exactly one way,
    # so no two different handshakes share a MAC input.
    fields = [
        _PROTOCOL,
        role,
        cluster,
        server_nonce,
        client_nonce,
        server_id,
        client_id,
    ]
    data = json.dumps(fields, separators=(",", ":")).encode("ascii")
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def _expect(message: Message, kind: str) -> None:
    if message.get("type") != kind:
        raise _ProtocolError(
            f"expected a {kind!r} handshake message, got {message.get('type')!r}"
        )


def _text(message: Message, key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value:
        raise _ProtocolError(f"handshake message has no valid {key!r}")
    return value


def _hex64(message: Message, key: str) -> str:
    # Nonces and SHA-256 MACs are both 32 bytes, sent as 64 lowercase hex digits.
    value = _text(message, key)
    if len(value) != 64 or value.strip("0123456789abcdef"):
        raise _ProtocolError(f"handshake message has no valid {key!r}")
    return value


def _client_handshake(
    link: _Link, secret: bytes, cluster: str, peer_id: str, deadline: float
) -> str:
    hello = link.receive(deadline)
    _expect(hello, "hello")
    server_cluster = _text(hello, "cluster")
    server_id = _text(hello, "peer")
    server_nonce = _hex64(hello, "nonce")

    nonce = secrets.token_bytes(_NONCE_BYTES).hex()
    link.send(
        {
            "type": "auth",
            "cluster": cluster,
            "peer": peer_id,
            "nonce": nonce,
            "mac": _mac(
                secret, "client", cluster, server_nonce, nonce, server_id, peer_id
            ),
        }
    )

    answer = link.receive(deadline)
    where = f"peer {server_id!r} at {link.remote}"
    if answer.get("type") == "rejected":
        if server_cluster != cluster:
            raise AuthenticationFailed(
                f"{where} belongs to cluster {server_cluster!r}, not {cluster!r}"
            )
        raise AuthenticationFailed(
            f"{where} rejected this peer: check that both use the same cluster secret"
        )
    _expect(answer, "welcome")
    expected = _mac(secret, "server", cluster, server_nonce, nonce, server_id, peer_id)
    if not hmac.compare_digest(_hex64(answer, "mac"), expected):
        raise AuthenticationFailed(
            f"{where} did not prove that it knows the cluster secret"
        )
    return server_id


# Client ---------------------------------------------------------------------


class _Pending:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Message | None = None  # stays None if the connection fails


class Connection:
    """An authenticated connection to a peer's `ChannelServer`.

    Made by `connect`. Any number of threads may call `request` at once; a
    reader thread hands each reply to the request with the same rid.
    """

    def __init__(
        self,
        link: _Link,
        remote_peer_id: str,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._link = link
        self._on_close = on_close
        self._remote_peer_id = remote_peer_id
        self._where = f"peer {remote_peer_id!r} at {link.remote}"
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._last_rid = 0
        self._error: str | None = None  # the reason the connection failed, once it has
        self._reader = threading.Thread(
            target=self._read_replies,
            name=f"{_THREAD_PREFIX}-client-{link.remote}",
            daemon=True,
        )
        self._reader.start()

    @property
    def remote_peer_id(self) -> str:
        """The peer id that the server proved during the handshake."""
        return self._remote_peer_id

    @property
    def local_host(self) -> str:
        """The local host address of this connection, which the peer connects from."""
        return str(self._link.local_host)

    def request(self, message: Message, timeout: float) -> Message:
        """Send `message` and wait for the peer's reply.

        Args:
            message: A dict that JSON can encode. The key ``"rid"`` is reserved.
            timeout: Seconds to wait for the reply.

        Returns:
            The reply, without the ``"rid"`` field.

        Raises:
            TypeError, ValueError: `message` cannot be sent; nothing was sent.
            ChannelError: No reply within `timeout`, or the connection is closed
                or was lost.
        """
        timeout = _check_seconds("timeout", timeout)
        if not isinstance(message, dict):
            raise TypeError(f"message must be a dict, not {type(message).__name__}")
        if "rid" in message:
            raise InvalidOption(
                "message must not have a 'rid' key; the channel sets it"
            )
        with self._lock:
            self._last_rid += 1
            rid = self._last_rid
        frame = _encode({**message, "rid": rid}, self._link.max_frame)
        pending = _Pending()
        with self._lock:
            if self._error is not None:
                raise NotDelivered(self._error)
            self._pending[rid] = pending
        try:
            self._link.send_frame(frame)
        except OSError as exc:
            # This fails this request too, and the shutdown wakes the reader.
            self._fail(f"connection to {self._where} lost: {exc}")
            self._link.shutdown()
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending.pop(rid, None)
                answered = pending.done.is_set()
            if not answered:
                raise ChannelError(
                    f"request to {self._where} timed out after {timeout:g} seconds"
                )
        if pending.reply is None:
            raise ChannelError(self._error)
        return pending.reply

    def close(self) -> None:
        """Close the connection and fail every waiting request. Safe to call again."""
        self._fail(f"connection to {self._where} is closed")
        self._link.shutdown()
        if threading.current_thread() is not self._reader:
            self._reader.join(_JOIN_TIMEOUT)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._error is None:
                self._error = reason
            for pending in self._pending.values():
                pending.done.set()
            self._pending.clear()

    def _read_replies(self) -> None:
        reason = f"connection to {self._where} lost"
        try:
            while True:
                reply = self._link.receive()
                rid = reply.pop("rid", None)
                if isinstance(rid, bool) or not isinstance(rid, int):
                    raise _ProtocolError("reply has no integer 'rid'")
                with self._lock:
                    # No waiter means that the request has timed out already.
                    pending = self._pending.pop(rid, None)
                    if pending is not None:
                        pending.reply = reply
                        pending.done.set()
        except _ProtocolError as exc:
            logger.warning("closing connection to %s: %s", self._where, exc)
            reason = f"connection to {self._where} closed: {exc}"
        except (ChannelError, OSError) as exc:
            reason = f"connection to {self._where} lost: {exc}"
        except Exception:
            logger.exception("reader of the connection to %s failed", self._where)
        finally:
            self._fail(reason)
            self._link.close()
            if self._on_close is not None:
                try:
                    self._on_close()
                except Exception:
                    logger.exception(
                        "on_close of the connection to %s failed", self._where
                    )


def connect(
    address: tuple[str, int],
    secret: bytes | str,
    cluster: str,
    peer_id: str,
    *,
    timeout: float = 5.0,
    max_frame: int = MAX_FRAME,
    on_close: Callable[[], None] | None = None,
) -> Connection:
    """Connect to a peer's `ChannelServer` and authenticate both sides.

    Args:
        address: The server's ``(host, port)``.
        secret: The cluster's shared secret.
        cluster: The cluster name, which must match the server's.
        peer_id: This peer's id, as the server's handler will see it.
        timeout: Seconds allowed for connecting and the handshake together.
        max_frame: Largest frame, in bytes, that this side sends or accepts.
        on_close: Called once, in the connection's reader thread, when the
            connection closes or is lost.

    Returns:
        An open `Connection`.

    Raises:
        AuthenticationFailed: The peers differ in cluster name or secret.
        ChannelError: The server cannot be reached or broke the handshake.
    """
    if not (
        isinstance(address, tuple) and len(address) == 2 and isinstance(address[0], str)
    ):
        raise TypeError(f"address must be a (host, port) tuple, not {address!r}")
    host, port = address[0], _check_port(address[1], 1)
    key = _check_secret(secret)
    cluster = _check_name("cluster", cluster)
    peer_id = _check_name("peer_id", peer_id)
    timeout = _check_seconds("timeout", timeout)
    max_frame = _check_max_frame(max_frame)
    deadline = time.monotonic() + timeout
    remote = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ChannelError(f"cannot connect to {remote}: {exc}") from exc
    _keep_alive(sock)
    link = _Link(sock, remote, max_frame)
    try:
        server_id = _client_handshake(link, key, cluster, peer_id, deadline)
        sock.settimeout(None)
    except BaseException as exc:
        link.close()
        if isinstance(exc, AuthenticationFailed) or not isinstance(
            exc, ChannelError | OSError
        ):
            raise
        reason = (
            f"no answer within {timeout:g} seconds"
            if isinstance(exc, TimeoutError)
            else exc
        )
        raise ChannelError(f"handshake with {remote} failed: {reason}") from None
    return Connection(link, server_id, on_close)


def _keep_alive(sock: socket.socket) -> None:
    # A peer whose host dies or drops off the network sends no FIN. With
    # these settings Linux probes an idle connection after 5 s and closes
    # it after 3 unanswered probes 2 s apart, about 11 s in all, so the
    # reader sees the loss without any polling in Python.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", 5),
        ("TCP_KEEPINTVL", 2),
        ("TCP_KEEPCNT", 3),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


# Server ---------------------------------------------------------------------


class ChannelServer:
    """Accepts authenticated peer connections and replies to their requests.

    Each connection has its own thread, which does the handshake and then
    calls `handler(peer_id, message)` for each request, one at a time,
    except that a request for which `concurrent(message)` is true goes to
    a pool of request threads, and one for which `threaded(message)` is true
    gets a thread of its own, so a handler that waits does not hold up the
    requests behind it. The dict that the handler returns is the
    reply (None replies ``{}``); an exception in the handler is logged and
    replies ``{"error": "..."}``.

    Args:
        secret: The cluster's shared secret.
        cluster: The cluster name; clients must use the same.
        peer_id: This peer's id, as clients see it.
        handler: Called with the client's peer id and each request.
        host: Address to listen on.
        port: Port to listen on; 0 picks a free one (see `address`).
        max_frame: Largest frame, in bytes, that this side sends or accepts.
        handshake_timeout: Seconds a client has to authenticate.
        concurrent: Tells which requests go to the request threads; None
            handles every request in turn.
        threaded: Tells which requests get a thread of their own, for
            requests that must not wait for a free request thread.
    """

    def __init__(
        self,
        secret: bytes | str,
        cluster: str,
        peer_id: str,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_frame: int = MAX_FRAME,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        concurrent: Callable[[Message], bool] | None = None,
        threaded: Callable[[Message], bool] | None = None,
    ) -> None:
        self._secret = _check_secret(secret)
        self._cluster = _check_name("cluster", cluster)
        self._peer_id = _check_name("peer_id", peer_id)
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {handler!r}")
        self._handler = handler
        self._concurrent = concurrent
        self._threaded = threaded
        self._host = _check_name("host", host)
        self._port = _check_port(port, 0)
        self._max_frame = _check_max_frame(max_frame)
        self._handshake_timeout = _check_seconds("handshake_timeout", handshake_timeout)
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._address: tuple[str, int] | None = None
        self._accepter: threading.Thread | None = None
        self._links: dict[_Link, threading.Thread] = {}
        # The pool for concurrent requests: threads start as requests need
        # them, up to _REQUEST_THREADS, and take requests from the queue.
        self._requests: queue.SimpleQueue[tuple[_Link, str, Message, int] | None]
        self._requests = queue.SimpleQueue()
        self._request_threads: list[threading.Thread] = []
        # Request threads waiting for a request that no _submit has claimed.
        self._idle_request_threads = 0
        # Threads of requests that `threaded` selects, until they end.
        self._own_threads: set[threading.Thread] = set()
        self._closing = False
        self._closed = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` that the server listens on."""
        if self._address is None:
            raise ChannelError("the server is not listening; call start() first")
        return self._address

    def start(self) -> None:
        """Listen and accept connections in a background thread.

        Raises:
            ChannelError: Already started or closed, or the address is taken.
        """
        with self._lock:
            if self._closing or self._listener is not None:
                raise ChannelError(
                    "start() was called already; create a new ChannelServer"
                )
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            try:
                # socket.create_server sets SO_REUSEADDR on POSIX (Python docs).
                listener = socket.create_server((self._host, self._port), family=family)
            except OSError as exc:
                raise ChannelError(
                    f"cannot listen on {self._host}:{self._port}: {exc}"
                ) from exc
            self._listener = listener
            host, port = listener.getsockname()[:2]
            self._address = (host, port)
            self._accepter = threading.Thread(
                target=self._accept,
                args=(listener,),
                name=f"{_THREAD_PREFIX}-accept-{port}",
                daemon=True,
            )
            self._accepter.start()

    def close(self, timeout: float = _JOIN_TIMEOUT) -> None:
        """Stop accepting, close every connection and wait for the threads.

        Args:
            timeout: Seconds to wait for all threads together. A handler
                still running after that is logged and left running.
        """
        timeout = _check_seconds("timeout", timeout)
        with self._lock:
            self._closing = True
            listener, self._listener = self._listener, None
            links = dict(self._links)
            request_threads = list(self._request_threads)
            own_threads = list(self._own_threads)
        for _ in request_threads:
            self._requests.put(None)
        self._closed.set()
        if listener is not None:
            # On Linux this makes the blocked accept() fail, which ends the loop.
            # NOTE: macOS and the BSDs may not wake accept() this way (untested).
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
        for link in links:
            link.shutdown()
        deadline = time.monotonic() + timeout
        threads = [*links.values(), *request_threads, *own_threads]
        if listener is not None and self._accepter is not None:
            threads.append(self._accepter)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        if listener is not None:
            listener.close()
        current = threading.current_thread()
        stuck = [t.name for t in threads if t.is_alive() and t is not current]
        if stuck:
            logger.warning("channel threads still running after close(): %s", stuck)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _warn(self, message: str, *args: object) -> None:
        # Connections that close() cuts short are expected, not worth a warning.
        logger.log(logging.DEBUG if self._closing else logging.WARNING, message, *args)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except OSError as exc:
                if self._closing:
                    return
                logger.error("accepting a peer connection failed: %s", exc)
                # Errors such as EMFILE (too many open files) recur at once,
                # so pause instead of spinning.
                if self._closed.wait(0.5):
                    return
                continue
            link = _Link(sock, f"{addr[0]}:{addr[1]}", self._max_frame)
            thread = threading.Thread(
                target=self._serve,
                args=(link,),
                name=f"{_THREAD_PREFIX}-serve-{link.remote}",
                daemon=True,
            )
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                self._links[link] = thread
                thread.start()

    def _serve(self, link: _Link) -> None:
        try:
            peer_id = self._handshake(link)
            if peer_id is not None:
                self._answer(link, peer_id)
        except Exception:
            logger.exception("connection from %s failed", link.remote)
        finally:
            link.close()
            with self._lock:
                self._links.pop(link, None)

    def _handshake(self, link: _Link) -> str | None:
        link.sock.settimeout(self._handshake_timeout)
        deadline = time.monotonic() + self._handshake_timeout
        nonce = secrets.token_bytes(_NONCE_BYTES).hex()
        try:
            link.send(
                {
                    "type": "hello",
                    "cluster": self._cluster,
                    "peer": self._peer_id,
                    "nonce": nonce,
                }
            )
            auth = link.receive(deadline)
            _expect(auth, "auth")
            cluster, peer_id = _text(auth, "cluster"), _text(auth, "peer")
            client_nonce, mac = _hex64(auth, "nonce"), _hex64(auth, "mac")
        except TimeoutError:
            self._warn(
                "handshake with %s failed: no answer within %g seconds",
                link.remote,
                self._handshake_timeout,
            )
            return None
        except (ChannelError, OSError) as exc:
            self._warn("handshake with %s failed: %s", link.remote, exc)
            return None
        values = (self._cluster, nonce, client_nonce, self._peer_id, peer_id)
        if cluster != self._cluster:
            reason = f"it belongs to cluster {cluster!r}, not {self._cluster!r}"
        elif not hmac.compare_digest(mac, _mac(self._secret, "client", *values)):
            reason = "it does not know the cluster secret"
        else:
            try:
                link.send(
                    {"type": "welcome", "mac": _mac(self._secret, "server", *values)}
                )
                link.sock.settimeout(None)
            except OSError:
                return None
            return peer_id
        # Log before sending the rejection, so the warning exists once the client raises.
        self._warn("rejected peer %r at %s: %s", peer_id, link.remote, reason)
        with contextlib.suppress(OSError):
            link.send({"type": "rejected"})
        return None

    def _answer(self, link: _Link, peer_id: str) -> None:
        while True:
            try:
                request = link.receive()
            except _ProtocolError as exc:
                self._warn(
                    "dropping connection from peer %r at %s: %s",
                    peer_id,
                    link.remote,
                    exc,
                )
                return
            except (ChannelError, OSError):
                return  # the peer left, or close() shut the socket down
            rid = request.pop("rid", None)
            if isinstance(rid, bool) or not isinstance(rid, int):
                self._warn(
                    "dropping connection from peer %r at %s: request has no integer 'rid'",
                    peer_id,
                    link.remote,
                )
                return
            if self._threaded is not None and self._threaded(request):
                self._start_own_thread(link, peer_id, request, rid)
                continue
            if self._concurrent is not None and self._concurrent(request):
                self._submit(link, peer_id, request, rid)
                continue
            if not self._reply_and_send(link, peer_id, request, rid):
                return

    def _submit(self, link: _Link, peer_id: str, request: Message, rid: int) -> None:
        # Queues a request for the request threads. It claims an idle thread,
        # or starts one more if none is idle and the pool is not full, so two
        # requests never count on the same idle thread.
        with self._lock:
            if self._closing:
                return  # the connection closes, which fails the request
            count = len(self._request_threads)
            if self._idle_request_threads > 0:
                self._idle_request_threads -= 1
            elif count < _REQUEST_THREADS:
                thread = threading.Thread(
                    target=self._serve_requests,
                    name=f"{_THREAD_PREFIX}-request-{count}",
                    daemon=True,
                )
                self._request_threads.append(thread)
                thread.start()
        self._requests.put((link, peer_id, request, rid))

    def _serve_requests(self) -> None:
        # The loop of one request thread. close() ends it by queuing None.
        while True:
            item = self._requests.get()
            if item is None:
                return
            try:
                self._reply_and_send(*item)
            except Exception:
                # _reply catches the handler's errors, so an error here is a bug
                # in this module.
                logger.exception("channel request thread failed on a request")
            with self._lock:
                self._idle_request_threads += 1

    def _start_own_thread(
        self, link: _Link, peer_id: str, request: Message, rid: int
    ) -> None:
        def serve() -> None:
            try:
                self._reply_and_send(link, peer_id, request, rid)
            finally:
                with self._lock:
                    self._own_threads.discard(thread)

        thread = threading.Thread(
            target=serve, name=f"{_THREAD_PREFIX}-request-{peer_id}", daemon=True
        )
        with self._lock:
            if self._closing:
                return  # the connection closes, which fails the request
            self._own_threads.add(thread)
        thread.start()

    def _reply_and_send(
        self, link: _Link, peer_id: str, request: Message, rid: int
    ) -> bool:
        # False when the connection is gone.
        frame = self._reply(peer_id, request, rid)
        try:
            link.send_frame(frame)
        except OSError:
            return False
        return True

    def _reply(self, peer_id: str, request: Message, rid: int) -> bytes:
        try:
            reply = self._handler(peer_id, request)
            if reply is None:
                reply = {}
            elif not isinstance(reply, dict):
                raise TypeError(
                    f"handler returned {type(reply).__name__}; return a dict or None"
                )
            return _encode({**reply, "rid": rid}, self._max_frame)
        except Exception as exc:
            logger.exception(
                "channel handler failed on a request from peer %r", peer_id
            )
            # json.dumps escapes one character in at most 12 bytes (a surrogate
            # pair), so this cut keeps the reply within the smallest max_frame.
            error = f"{type(exc).__name__}: {exc}"[: (self._max_frame - 64) // 12]
            return _encode({"error": error, "rid": rid}, self._max_frame)

"""A local control channel: one Unix socket per running process.

Each process that runs jobs (``testing="disabled"``) listens on
``<directory>/<pid>.sock``. A client connects, sends one JSON request of at
most `MAX_REQUEST` bytes ending in a newline, and reads one JSON reply
ending in a newline; the server then closes the connection. JSON only,
never pickle. The directory is created with mode 0700 and each socket gets
mode 0600, so only the owning user can connect.

Requests: ``{"op": "status"}`` returns `status_report` of the instance.

This module does not import Django: `ControlPlugin` is a plain Stagehand
plugin that starts and stops with its instance.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import stagehand
from stagehand.exceptions import InvalidOption
from stagehand.plugins import Plugin

if TYPE_CHECKING:
    from stagehand import Stagehand

__all__ = [
    "MAX_REQUEST",
    "ControlPlugin",
    "ControlServer",
    "Survey",
    "query_all",
    "status_report",
]

logger = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # bytes
MAX_REPLY = 16 * 1024 * 1024  # bytes
CLIENT_TIMEOUT = 5.0  # seconds a connected peer has to send or read a message

_servers: list[ControlServer] = []


def _close_inherited() -> None:
    # A forked child has no accept thread; it closes its copy of the parent's
    # listening sockets and leaves the files to the parent.
    for server in _servers:
        server._listener.close()
    _servers.clear()


os.register_at_fork(after_in_child=_close_inherited)


def status_report(instance: Stagehand) -> dict[str, Any]:
    """Return the live state of `instance` and its process, as JSON values."""
    cluster = instance.check_cluster()
    report: dict[str, Any] = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv[:2]),
        "instance": instance.name,
        "running": instance.running,
        "testing": instance.testing,
        "leader": instance.leadership.is_leader,
        "peers": [] if cluster is None else cluster["peers"],
        "version": stagehand.__version__,
        "queues": [instance.check_queue(name) for name in instance.queues],
        "cluster": cluster,
    }
    if cluster is not None and instance._cluster is not None:
        # The live state of every peer of the cluster, on any host. A slow
        # peer is listed with an error well before the client gives up on
        # this whole report.
        cluster["survey"] = instance._cluster.survey(
            timeout=min(instance._cluster.settings.request_timeout, CLIENT_TIMEOUT / 2)
        )
    return report


def prepare_directory(directory: str) -> None:
    """Create `directory` with mode 0700, or check an existing one.

    Raises:
        InvalidOption: The directory belongs to another user, or others may
            write to it.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.stat(directory)
    if info.st_uid != os.getuid():
        raise InvalidOption(
            f"control directory {directory!r} belongs to uid {info.st_uid}, not to "
            f"this user ({os.getuid()}); choose another STAGEHAND_RUNTIME_DIR"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(directory, 0o700)


class ControlServer:
    """Serves status requests on a Unix socket from one daemon thread.

    The thread blocks in ``accept()``; `close` wakes it by connecting once.
    """

    def __init__(self, directory: str, instance: Stagehand):
        prepare_directory(directory)
        self.path = os.path.join(directory, f"{os.getpid()}.sock")
        self._instance = instance
        self._closing = False
        self._pid = os.getpid()
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        os.chmod(self.path, 0o600)
        self._listener.listen(16)
        self._thread = threading.Thread(
            target=self._serve, name="stagehand-control", daemon=True
        )
        _servers.append(self)
        self._thread.start()
        logger.debug("control socket listening at %s", self.path)

    def close(self) -> None:
        """Stop serving and remove the socket file; calling it again does nothing."""
        if self._closing or os.getpid() != self._pid:
            return
        self._closing = True
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waker:
                waker.connect(self.path)
        except OSError:
            pass
        self._thread.join(CLIENT_TIMEOUT * 2)
        self._listener.close()
        if self in _servers:
            _servers.remove(self)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _serve(self) -> None:
        try:
            while True:
                client, _ = self._listener.accept()
                with client:
                    if self._closing:
                        return
                    self._answer(client)
        except OSError:
            if not self._closing:
                logger.critical("control socket %s failed", self.path, exc_info=True)
        except Exception:
            logger.critical("control socket %s crashed", self.path, exc_info=True)

    def _answer(self, client: socket.socket) -> None:
        client.settimeout(CLIENT_TIMEOUT)
        try:
            request = json.loads(_read_line(client, MAX_REQUEST))
            reply = self._reply(request)
        except (ValueError, OSError) as error:
            reply = {"error": str(error)}
        try:
            client.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            logger.debug("control client left before the reply")

    def _reply(self, request: object) -> dict[str, Any]:
        if not isinstance(request, Mapping) or request.get("op") != "status":
            return {"error": f'unknown request {request!r}; send {{"op": "status"}}'}
        return status_report(self._instance)


def _read_line(client: socket.socket, limit: int) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = client.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError(f"message longer than the limit of {limit} bytes")
    return bytes(data)


class ControlPlugin(Plugin):
    """Runs a `ControlServer` while its instance runs.

    Options: ``{"directory": "/absolute/path"}``, required.
    """

    def __init__(self, instance: Stagehand, options: Mapping[str, Any]):
        super().__init__(instance, options)
        self.server: ControlServer | None = None

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> Mapping[str, Any]:
        directory = options.get("directory")
        if set(options) != {"directory"} or not isinstance(directory, str):
            raise InvalidOption(
                "ControlPlugin options must be {'directory': '/absolute/path'}; "
                f"got {dict(options)!r}"
            )
        if not os.path.isabs(directory):
            raise InvalidOption(
                f"ControlPlugin directory must be an absolute path; got {directory!r}"
            )
        return options

    def start(self) -> None:
        self.server = ControlServer(self.options["directory"], self.instance)

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@dataclass(slots=True)
class Survey:
    """The result of `query_all`: the replies, the failures and the removed sockets."""

    directory: str
    reports: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def query_all(directory: str, timeout: float = CLIENT_TIMEOUT) -> Survey:
    """Ask every process with a socket in `directory` for its status.

    Sockets whose process has exited are removed and reported in
    ``removed``; other failures are described in ``failures``.

    Args:
        directory: The control directory.
        timeout: Seconds to wait for each process. Defaults to 5.
    """
    survey = Survey(directory=directory)
    try:
        paths = sorted(Path(directory).glob("*.sock"))
    except OSError as error:
        survey.failures.append(f"{directory}: {error}")
        return survey
    own = f"{os.getpid()}.sock"
    for path in paths:
        if path.name == own:
            continue
        try:
            survey.reports.append(_query(str(path), timeout))
        except (ConnectionRefusedError, FileNotFoundError):
            if _remove_if_dead(path):
                survey.removed.append(str(path))
            else:
                survey.failures.append(f"{path}: connection refused")
        except (OSError, ValueError) as error:
            survey.failures.append(f"{path}: {error}")
    return survey


def _query(path: str, timeout: float) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(path)
        client.sendall(b'{"op": "status"}\n')
        reply = json.loads(_read_line(client, MAX_REPLY))
    if not isinstance(reply, dict) or "error" in reply:
        raise ValueError(f"bad reply {reply!r}")
    reply["queried_at"] = datetime.now(UTC).isoformat()
    return reply


def _remove_if_dead(path: Path) -> bool:
    try:
        pid = int(path.stem)
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return True
    except PermissionError:
        return False
    return False

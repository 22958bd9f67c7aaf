"""Start and stop under a real uWSGI: a master and two forked workers.

Each test runs uWSGI on tests/django_project in a subprocess bound to
127.0.0.1 and follows its log output. The app is loaded in the master and
then forked (``lazy-apps = false``, the default). A job blocks on a FIFO
until the test releases it, which shows that a worker's exit waits for
executing jobs.

Signals to the master in uWSGI 2.0, from "Managing the uWSGI server" in its
docs and from its core/master.c:

- SIGHUP reloads gracefully and sends SIGHUP to the workers.
- SIGTERM reloads "brutally" and sends SIGTERM to the workers. With
  ``die-on-term`` it stops instead, as SIGINT does.
- SIGINT and SIGQUIT stop at once and send SIGINT to the workers. With
  ``die-on-term``, SIGQUIT reloads brutally.
- ``q`` written to the master FIFO stops gracefully and sends SIGHUP to the
  workers.

A worker calls exit() on each of these signals (on SIGHUP, once its current
request is done), which runs Python's atexit and so stops the instance
gracefully. "Brutal" only affects requests: a worker that gets SIGINT or
SIGTERM before it has finished a request exits without running atexit. The
master kills a worker still running after ``worker-reload-mercy`` (60 s by
default).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from django_project.support import WAIT, Process, free_port

UWSGI = Path(sys.executable).parent / "uwsgi"

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets"),
    pytest.mark.skipif(not UWSGI.exists(), reason=f"{UWSGI} is not installed"),
]

STARTED = "stagehand instance 'default' started"
APP = "django_project.uwsgi_app:application"
POLL = 0.01  # seconds between two reads of uWSGI's stats


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


class Server:
    """uWSGI with a master and two workers that accept on one HTTP socket."""

    def __init__(
        self,
        tmp_path: Path,
        runtime: Path,
        *options: str,
        app: str = APP,
        postfork: bool = False,
    ):
        self.port = free_port()
        self.stats = tmp_path / "stats.sock"
        self.master_fifo = tmp_path / "master.fifo"
        argv = [
            str(UWSGI),
            "--http-socket",
            f"127.0.0.1:{self.port}",
            "--master",
            "--processes",
            "2",
            "--enable-threads",
            "--need-app",
            "--module",
            app,
            "--stats",
            str(self.stats),
            "--master-fifo",
            str(self.master_fifo),
            *options,
        ]
        env = {"STAGEHAND_TEST_RUNTIME_DIR": str(runtime)}
        if postfork:
            env["STAGEHAND_TEST_UWSGI_POSTFORK"] = "true"
        self.process = Process(argv, env)
        self.master = self.process.popen.pid

    def ready(self) -> set[int]:
        """Wait until the master loaded the app and forked two workers, and
        its stats server and FIFO are open; return the worker pids."""
        (line,) = self.process.expect("(default app)")
        assert line.endswith(f"pid: {self.master} (default app)")
        lines = self.process.expect("spawned uWSGI worker", count=2)
        self.process.expect("Stats server enabled")
        return {int(line.split("(pid: ")[1].split(",")[0]) for line in lines}

    def get(self, path: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def worker_status(self, pid: int) -> str | None:
        """The status ("idle", "busy", ...) uWSGI's stats give worker `pid`."""
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(WAIT)
            client.connect(str(self.stats))
            data = b""
            while chunk := client.recv(65536):
                data += chunk
        for worker in json.loads(data)["workers"]:
            if worker["pid"] == pid:
                return worker["status"]  # type: ignore[no-any-return]
        return None

    def wait_until_idle(self, pid: int) -> None:
        """Poll the stats until worker `pid` has left its last request.

        uWSGI logs a request before the worker leaves it, and logs nothing
        once it has, so no output line shows that the worker is idle.
        """
        deadline = time.monotonic() + WAIT
        while (found := self.worker_status(pid)) != "idle":
            assert time.monotonic() < deadline, f"worker {pid} is still {found}"
            time.sleep(POLL)

    def stop_gracefully(self) -> None:
        """Write ``q`` to the master FIFO: uWSGI's graceful shutdown."""
        with open(self.master_fifo, "w") as fifo:
            fifo.write("q")


class Request:
    """A GET made from a daemon thread, for a request that blocks its worker."""

    def __init__(self, server: Server, path: str):
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(server, path), daemon=True
        )
        self._thread.start()

    def _run(self, server: Server, path: str) -> None:
        try:
            self.reply = server.get(path)
        except BaseException as error:
            self.error = error

    def wait(self) -> None:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), f"no answer in {WAIT} s"


def pid_of(line: str) -> int:
    return int(line.split()[0])


def instance_log(pid: int, event: str) -> str:
    """The line that process `pid` logs when its instance is `event`."""
    return f"{pid} stagehand._instance stagehand instance 'default' {event}"


def job_log(pid: int, job_id: str, event: str) -> str:
    return f"{pid} django_project.shop.workers job {job_id} {event}"


def assert_single_threaded(pid: int) -> None:
    """Check that process `pid` runs one thread, where /proc lists them."""
    tasks = Path(f"/proc/{pid}/task")
    if Path("/proc/self/task").is_dir():
        assert len(list(tasks.iterdir())) == 1


def make_fifo(tmp_path: Path, name: str = "release") -> Path:
    fifo = tmp_path / name
    os.mkfifo(fifo)
    return fifo


def release(fifo: Path) -> None:
    with open(fifo, "w") as writer:
        writer.write("go")


def status(runtime: Path) -> dict[str, Any]:
    out = StringIO()
    call_command(
        "stagehand_status", "--json", "--runtime-dir", str(runtime), stdout=out
    )
    return json.loads(out.getvalue())  # type: ignore[no-any-return]


def start_a_job_in_each_worker(
    server: Server, tmp_path: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Insert a job through each worker, wait until both finished and return
    the two replies (job id and worker pid).

    The first request keeps its worker busy, so the second one goes to the
    other worker.
    """
    fifo, first_out, second_out = make_fifo(tmp_path), tmp_path / "a", tmp_path / "b"
    blocked = Request(server, f"/start_job/?path={first_out}&request_fifo={fifo}")
    (line,) = server.process.expect(f"request holding on {fifo}")
    busy = pid_of(line)
    second = server.get(f"/start_job/?path={second_out}")
    release(fifo)
    blocked.wait()
    assert blocked.error is None
    assert blocked.reply is not None
    first = blocked.reply
    assert first["pid"] == busy
    assert second["pid"] != busy
    for reply, out in ((first, first_out), (second, second_out)):
        server.process.expect(job_log(reply["pid"], reply["id"], "finished"))
        pid = reply["pid"]
        assert out.read_text() == f"started {pid}\nfinished {pid}\n"
    return first, second


def test_postfork_starts_workers_not_master(
    tmp_path: Path, runtime: Path, processes: list[Process]
) -> None:
    server = Server(tmp_path, runtime, postfork=True)
    processes.append(server.process)
    spawned = server.ready()
    lines = server.process.expect(STARTED, count=2)
    assert {pid_of(line) for line in lines} == spawned
    assert server.master not in spawned
    assert {p["pid"] for p in status(runtime)["processes"]} == spawned
    assert {path.stem for path in runtime.glob("*.sock")} == {str(p) for p in spawned}
    assert_single_threaded(server.master)

    first, second = start_a_job_in_each_worker(server, tmp_path)
    assert {first["pid"], second["pid"]} == spawned
    assert_single_threaded(server.master)

    server.stop_gracefully()
    assert server.process.wait() == 0
    for pid in spawned:
        server.process.expect(instance_log(pid, "stopped"))
    assert list(runtime.glob("*.sock")) == []


@pytest.mark.parametrize(
    "options",
    [
        pytest.param([], id="default"),
        pytest.param(
            ["--py-call-osafterfork"],
            marks=pytest.mark.skipif(
                sys.version_info >= (3, 13),
                reason="uWSGI 2.0.31 workers abort with py-call-osafterfork on "
                "Python 3.13 ('Fatal Python error: _PyRecursiveMutex_Unlock'), "
                "without Stagehand involved",
            ),
            id="py-call-osafterfork",
        ),
    ],
)
def test_workers_draw_distinct_job_ids(
    tmp_path: Path, runtime: Path, processes: list[Process], options: list[str]
) -> None:
    server = Server(tmp_path, runtime, *options, postfork=True)
    processes.append(server.process)
    server.ready()
    server.process.expect(STARTED, count=2)
    first, second = start_a_job_in_each_worker(server, tmp_path)
    assert first["id"].split("-")[0] != second["id"].split("-")[0]


def test_first_request_starts_worker_not_master(
    tmp_path: Path, runtime: Path, processes: list[Process]
) -> None:
    server = Server(tmp_path, runtime, app="django_project.wsgi:application")
    processes.append(server.process)
    spawned = server.ready()
    assert list(runtime.glob("*.sock")) == []

    reply = server.get("/status/")
    assert reply["running"] is True
    assert reply["pid"] in spawned
    (line,) = server.process.expect(STARTED)
    assert pid_of(line) == reply["pid"]
    assert [p["pid"] for p in status(runtime)["processes"]] == [reply["pid"]]
    assert_single_threaded(server.master)

    server.stop_gracefully()
    assert server.process.wait() == 0
    (line,) = server.process.expect("'default' stopped")
    assert pid_of(line) == reply["pid"]
    assert list(runtime.glob("*.sock")) == []


# Each case: extra options, then what ends the worker (a signal to the master,
# "q" for the master FIFO, or None when the worker ends itself), then whether
# uWSGI exits instead of starting new workers.
EXITS = [
    # min-worker-lifetime (10 s by default) keeps a younger worker running.
    pytest.param(
        ["--max-requests", "1", "--min-worker-lifetime", "0"],
        None,
        False,
        id="max-requests",
    ),
    pytest.param([], signal.SIGHUP, False, id="SIGHUP-graceful-reload"),
    pytest.param([], signal.SIGTERM, False, id="SIGTERM-brutal-reload"),
    pytest.param([], "q", True, id="master-fifo-q-graceful-stop"),
    pytest.param([], signal.SIGINT, True, id="SIGINT-stop"),
    pytest.param([], signal.SIGQUIT, True, id="SIGQUIT-stop"),
    pytest.param(["--die-on-term"], signal.SIGTERM, True, id="die-on-term-SIGTERM"),
]


@pytest.mark.parametrize(("options", "trigger", "stops"), EXITS)
def test_idle_worker_exit_finishes_job(
    tmp_path: Path,
    runtime: Path,
    processes: list[Process],
    options: list[str],
    trigger: signal.Signals | str | None,
    stops: bool,
) -> None:
    server = Server(tmp_path, runtime, *options)
    processes.append(server.process)
    spawned = server.ready()

    fifo, out = make_fifo(tmp_path), tmp_path / "out"
    reply = server.get(f"/start_job/?path={out}&job_fifo={fifo}")
    pid = reply["pid"]
    assert pid in spawned
    server.process.expect(job_log(pid, reply["id"], "waiting"))
    if trigger == "q":
        server.stop_gracefully()
    elif trigger is not None:
        server.wait_until_idle(pid)
        server.process.signal(trigger)
    server.process.expect(instance_log(pid, "stopping"))
    release(fifo)
    server.process.expect(job_log(pid, reply["id"], "finished"))
    server.process.expect(instance_log(pid, "stopped"))
    assert out.read_text() == f"started {pid}\nfinished {pid}\n"

    if stops:
        assert server.process.wait() == 0
        assert list(runtime.glob("*.sock")) == []
    else:
        # A new worker has taken the old one's place and serves requests.
        after = server.get("/status/")
        assert after["running"] is True
        assert after["pid"] != pid
        assert not (runtime / f"{pid}.sock").exists()


@pytest.mark.parametrize(
    ("trigger", "graceful"),
    [
        pytest.param(signal.SIGINT, False, id="SIGINT-kills-the-job"),
        pytest.param(signal.SIGHUP, True, id="SIGHUP-waits-for-the-request"),
        pytest.param("q", True, id="master-fifo-q-waits-for-the-request"),
    ],
)
def test_busy_worker_exit(
    tmp_path: Path,
    runtime: Path,
    processes: list[Process],
    trigger: signal.Signals | str,
    graceful: bool,
) -> None:
    """Signal a worker in the middle of a request. On SIGINT it exits at once
    without running atexit. On a graceful reload or stop it finishes the
    request, then stops its instance gracefully."""
    server = Server(tmp_path, runtime)
    processes.append(server.process)
    server.ready()

    job_fifo, request_fifo = make_fifo(tmp_path), make_fifo(tmp_path, "request")
    out = tmp_path / "out"
    blocked = Request(
        server,
        f"/start_job/?path={out}&job_fifo={job_fifo}&request_fifo={request_fifo}",
    )
    (line,) = server.process.expect(f"waiting on {job_fifo}")
    pid = pid_of(line)
    server.process.expect(f"{pid} django_project.uwsgi_app request holding on")
    if trigger == "q":
        server.stop_gracefully()
    else:
        server.process.signal(trigger)

    if graceful:
        killing = server.process.expect("Gracefully killing worker", count=2)
        assert any(f"(pid: {pid})" in line for line in killing)
        release(request_fifo)
        blocked.wait()
        assert blocked.error is None
        assert blocked.reply is not None
        assert blocked.reply["pid"] == pid
        server.process.expect(instance_log(pid, "stopping"))
        release(job_fifo)
        server.process.expect(instance_log(pid, "stopped"))
        assert out.read_text() == f"started {pid}\nfinished {pid}\n"
    else:
        blocked.wait()
        assert blocked.error is not None
        assert server.process.wait() == 0
        lines = server.process.lines
        assert not any(instance_log(pid, "stopping") in line for line in lines)
        assert out.read_text() == f"started {pid}\n"
        # The killed worker left its control socket behind.
        assert (runtime / f"{pid}.sock").exists()

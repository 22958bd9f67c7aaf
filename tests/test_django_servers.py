"""Start and stop in real servers: runserver, gunicorn, stagehand_worker.

Each test runs a server of tests/django_project in a subprocess bound to
127.0.0.1 and follows its log output. A job blocks on a FIFO until the test
releases it, which shows that a stop waits for executing jobs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from django_project.support import TESTS_DIR, WAIT, Process, free_port, manage

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets")

STARTED = "stagehand instance 'default' started"


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


def pid_of(line: str) -> int:
    return int(line.split()[0])


def make_fifo(tmp_path: Path) -> Path:
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    return fifo


def release(fifo: Path) -> None:
    with open(fifo, "w") as writer:
        writer.write("go")


def status(runtime: Path) -> dict:
    out = StringIO()
    call_command(
        "stagehand_status", "--json", "--runtime-dir", str(runtime), stdout=out
    )
    return json.loads(out.getvalue())


def get(port: int, path: str) -> dict:
    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        return json.loads(response.read())


def test_runserver_starts_in_the_child_and_stops_on_ctrl_c(
    tmp_path: Path, runtime: Path, processes: list[Process]
) -> None:
    port = free_port()
    server = Process(
        manage("runserver", f"127.0.0.1:{port}"),
        {"STAGEHAND_TEST_RUNTIME_DIR": str(runtime)},
    )
    processes.append(server)
    (line,) = server.expect(STARTED)
    child = pid_of(line)
    assert child != server.popen.pid
    server.expect("Quit the server with")
    assert [p["pid"] for p in status(runtime)["processes"]] == [child]

    fifo, out = make_fifo(tmp_path), tmp_path / "out"
    reply = get(port, f"/enqueue/?path={out}&fifo={fifo}")
    assert reply["pid"] == child
    server.expect(f"job {reply['id']} waiting")

    server.signal(signal.SIGINT, group=True)
    server.expect("stagehand instance 'default' stopping")
    release(fifo)
    server.expect("stagehand instance 'default' stopped")
    server.wait()
    assert out.read_text() == f"started {child}\nfinished {child}\n"
    assert list(runtime.glob("*.sock")) == []
    assert len(server.expect(STARTED)) == 1


def gunicorn(port: int, runtime: Path, *options: str) -> Process:
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "django_project.wsgi:application",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        "--graceful-timeout",
        "60",
        *options,
    ]
    return Process(argv, {"STAGEHAND_TEST_RUNTIME_DIR": str(runtime)})


def test_gunicorn_preload_starts_each_worker_after_fork_never_the_master(
    tmp_path: Path, runtime: Path, processes: list[Process]
) -> None:
    config = tmp_path / "gunicorn.conf.py"
    config.write_text("from stagehand_django.lifecycle import post_worker_init\n")
    port = free_port()
    server = gunicorn(port, runtime, "--preload", "--config", str(config))
    processes.append(server)
    lines = server.expect(STARTED, count=2)
    workers = {pid_of(line) for line in lines}
    master = server.popen.pid
    assert len(workers) == 2
    assert master not in workers
    assert {p["pid"] for p in status(runtime)["processes"]} == workers
    assert {path.stem for path in runtime.glob("*.sock")} == {str(p) for p in workers}

    fifo, out = make_fifo(tmp_path), tmp_path / "out"
    reply = get(port, f"/enqueue/?path={out}&fifo={fifo}")
    assert reply["pid"] in workers
    server.expect(f"job {reply['id']} waiting")

    server.signal(signal.SIGTERM)
    server.expect("stagehand instance 'default' stopping", count=2)
    server.expect("stagehand instance 'default' stopped", count=1)
    release(fifo)
    server.expect("stagehand instance 'default' stopped", count=2)
    assert server.wait() == 0
    assert out.read_text() == f"started {reply['pid']}\nfinished {reply['pid']}\n"
    assert list(runtime.glob("*.sock")) == []


def test_gunicorn_without_preload_starts_lazily_on_the_first_request(
    runtime: Path, processes: list[Process]
) -> None:
    port = free_port()
    server = gunicorn(port, runtime)
    processes.append(server)
    server.expect("Booting worker with pid", count=2)
    server.expect("Listening at")
    reply = get(port, "/status/")
    assert reply["running"] is True
    (line,) = server.expect(STARTED)
    assert pid_of(line) == reply["pid"]
    assert [p["pid"] for p in status(runtime)["processes"]] == [reply["pid"]]

    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert len(server.expect("stagehand instance 'default' stopped")) == 1
    assert list(runtime.glob("*.sock")) == []


def worker(runtime: Path, fifo: Path) -> Process:
    return Process(
        manage("stagehand_worker"),
        {
            "STAGEHAND_TEST_RUNTIME_DIR": str(runtime),
            "STAGEHAND_TEST_STARTUP_JOB": str(fifo),
        },
    )


def test_stagehand_worker_runs_jobs_reports_status_and_stops_on_sigterm(
    tmp_path: Path, runtime: Path, processes: list[Process]
) -> None:
    fifo = make_fifo(tmp_path)
    process = worker(runtime, fifo)
    processes.append(process)
    process.expect("running queues default, mailers")
    process.expect("waiting on")

    (report,) = status(runtime)["processes"]
    assert report["pid"] == process.popen.pid
    assert report["command"].endswith("manage.py stagehand_worker")
    assert (report["running"], report["leader"], report["peers"]) == (True, True, [])
    default, mailers = report["queues"]
    assert (default["queue"], default["limit"], default["executing"]) == (
        "default",
        4,
        1,
    )
    assert (mailers["queue"], mailers["executing"], mailers["available"]) == (
        "mailers",
        0,
        0,
    )

    out = StringIO()
    call_command("stagehand_status", "--runtime-dir", str(runtime), stdout=out)
    text = out.getvalue()
    assert f"pid {process.popen.pid} on " in text
    assert re.search(r"^default\s+4\s+no\s+0\s+0\s+1\s+0\s+0\s+0\s+0\s+0$", text, re.M)

    process.signal(signal.SIGTERM)
    process.expect("Stopping gracefully")
    release(fifo)
    process.expect(f"Stagehand worker {process.popen.pid} stopped.")
    assert process.wait() == 0
    assert (
        (tmp_path / "release.log")
        .read_text()
        .endswith(f"finished {process.popen.pid}\n")
    )
    assert list(runtime.glob("*.sock")) == []

    after = Process(manage("stagehand_status", "--runtime-dir", str(runtime)), {})
    processes.append(after)
    assert after.wait() == 1
    assert f"no running Stagehand process answered in {runtime}" in "\n".join(
        after.lines
    )


def test_status_json_without_processes(runtime: Path) -> None:
    out = StringIO()
    with pytest.raises(CommandError) as raised:
        call_command(
            "stagehand_status", "--json", "--runtime-dir", str(runtime), stdout=out
        )
    assert json.loads(out.getvalue()) == {
        "directory": str(runtime),
        "processes": [],
        "leaders": [],
        "failures": [],
        "removed": [],
        "error": f"no running Stagehand process answered in {runtime}",
    }
    assert str(raised.value).startswith(
        f"no running Stagehand process answered in {runtime}."
    )


def test_status_json_exit_status_without_processes(runtime: Path) -> None:
    # Process merges stderr into stdout; this test reads them apart.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("STAGEHAND_TEST_")
    }
    env["DJANGO_SETTINGS_MODULE"] = "django_project.settings"
    env["PYTHONPATH"] = str(TESTS_DIR)
    result = subprocess.run(
        manage("stagehand_status", "--json", "--runtime-dir", str(runtime)),
        cwd=TESTS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"] == (
        f"no running Stagehand process answered in {runtime}"
    )
    assert result.stderr.startswith(
        f"CommandError: no running Stagehand process answered in {runtime}.\n"
    )


def test_second_signal_exits_without_waiting(
    tmp_path: Path, runtime: Path, processes: list[Process]
) -> None:
    fifo = make_fifo(tmp_path)
    process = worker(runtime, fifo)
    processes.append(process)
    process.expect("waiting on")
    process.signal(signal.SIGINT)
    process.expect("Stopping gracefully")
    process.signal(signal.SIGTERM)
    assert process.wait() == 1
    process.expect("received SIGTERM again, exiting without waiting for jobs")
    assert "finished" not in (tmp_path / "release.log").read_text()


def test_status_watch_outlasts_no_process(
    runtime: Path, processes: list[Process]
) -> None:
    watch = Process(
        manage("stagehand_status", "--watch", "0.1", "--runtime-dir", str(runtime)),
        {},
    )
    processes.append(watch)
    watch.expect("no running Stagehand process answered", count=2)
    watch.signal(signal.SIGINT)
    assert watch.wait() == 0


def test_status_watch_refreshes_until_ctrl_c(
    tmp_path: Path, runtime: Path, processes: list[Process]
) -> None:
    fifo = make_fifo(tmp_path)
    process = worker(runtime, fifo)
    processes.append(process)
    process.expect("waiting on")
    watch = Process(
        manage("stagehand_status", "--watch", "0.1", "--runtime-dir", str(runtime)),
        {},
    )
    processes.append(watch)
    watch.expect("Stagehand: 1 process(es)", count=3)
    watch.signal(signal.SIGINT)
    assert watch.wait() == 0
    release(fifo)
    process.signal(signal.SIGTERM)
    assert process.wait() == 0

"""Helpers of the Django tests: job waiters and subprocess servers."""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stagehand import Job, events

TESTS_DIR = Path(__file__).resolve().parent.parent
MANAGE = str(Path(__file__).resolve().parent / "manage.py")
WAIT = 60.0  # seconds; a hang guard, never an expected duration

_ids = itertools.count()


class StopWaiter:
    """Collects the jobs whose job.stop event fired, and wakes waiters."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self._cond = threading.Condition()

    def handler(
        self, event: str, measurements: Any, metadata: Mapping[str, Any]
    ) -> None:
        with self._cond:
            self.jobs.append(metadata["job"])
            self._cond.notify_all()

    def wait(self, count: int) -> list[Job]:
        with self._cond:
            reached = self._cond.wait_for(lambda: len(self.jobs) >= count, WAIT)
        assert reached, f"only {len(self.jobs)} of {count} jobs stopped in {WAIT} s"
        return list(self.jobs)


@contextmanager
def job_stops() -> Iterator[StopWaiter]:
    """Attach a job.stop handler after the app's own, for the block."""
    waiter = StopWaiter()
    handler_id = f"tests-stop-{next(_ids)}"
    events.attach(handler_id, ["job.stop"], waiter.handler)
    try:
        yield waiter
    finally:
        events.detach(handler_id)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and a child
    # inherits that; Python then installs no KeyboardInterrupt handler, so
    # the Ctrl-C tests would wait forever. Children start with the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Process:
    """A subprocess whose merged output lines are read by a thread."""

    def __init__(self, argv: list[str], env: Mapping[str, str]):
        full_env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("STAGEHAND_TEST_")
        }
        full_env.update(env)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env["DJANGO_SETTINGS_MODULE"] = "django_project.settings"
        full_env["PYTHONPATH"] = str(TESTS_DIR)
        self.popen = subprocess.Popen(
            argv,
            cwd=TESTS_DIR,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, text: str, count: int = 1) -> list[str]:
        """Wait until `count` output lines contain `text`; return them."""
        found = [line for line in self.lines if text in line]
        while len(found) < count:
            try:
                line = self._queue.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(self._report(f"no line with {text!r}")) from None
            if line is None:
                raise AssertionError(self._report(f"exited before {text!r}"))
            self.lines.append(line)
            if text in line:
                found.append(line)
        return found

    def wait(self) -> int:
        code = self.popen.wait(WAIT)
        self._reader.join(WAIT)
        while not self._queue.empty():
            line = self._queue.get_nowait()
            if line is not None:
                self.lines.append(line)
        return code

    def signal(self, number: int, group: bool = False) -> None:
        if group:
            os.killpg(self.popen.pid, number)
        else:
            self.popen.send_signal(number)

    def kill(self) -> None:
        """Kill the process group (leftover children included) and clean up."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(WAIT)
        self._reader.join(WAIT)
        assert self.popen.stdout is not None
        self.popen.stdout.close()

    def _report(self, what: str) -> str:
        return f"{what}; output so far:\n" + "\n".join(self.lines)


def manage(*args: str) -> list[str]:
    return [sys.executable, MANAGE, *args]

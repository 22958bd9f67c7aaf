"""Leadership: a solo process leads; processes sharing a lock file elect one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import stagehand
from support import running

# Each child prints "leader" when it leads, stops on a line on stdin and
# prints "stopped".
CHILD = textwrap.dedent(
    """
    import sys, threading
    import stagehand

    lock_path = sys.argv[1]
    instance = stagehand.Stagehand(name="child", leader_lock=lock_path).start()
    leading = threading.Event()
    instance.leadership.subscribe(lambda leader: leader and leading.set())
    if leading.wait(0 if sys.argv[2] == "follower" else 30):
        print("leader", flush=True)
    else:
        print("follower", flush=True)
    if sys.argv[2] == "follower":
        leading.wait(60)
        print("leader", flush=True)
    sys.stdin.readline()
    instance.stop()
    print("stopped", flush=True)
    """
)


def start_child(lock: Path, role: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(lock), role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()))
    reader.start()
    reader.join(60)
    assert result, "the child printed nothing within 60 s"
    return result[0].strip()


def test_solo_instance_leads() -> None:
    with running() as instance:
        assert instance.leadership.is_leader is True


def test_lock_file_elects_one_leader(tmp_path: Path) -> None:
    lock = tmp_path / "leader.lock"
    first = start_child(lock, "leader")
    second = None
    try:
        assert read_line(first) == "leader"
        second = start_child(lock, "follower")
        assert read_line(second) == "follower"

        first.communicate("stop\n", timeout=60)
        assert first.returncode == 0

        assert read_line(second) == "leader"
        second.communicate("stop\n", timeout=60)
        assert second.returncode == 0
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(30)


def test_lock_leadership_released_on_stop(tmp_path: Path) -> None:
    lock = tmp_path / "leader.lock"
    leading = threading.Event()
    instance = stagehand.Stagehand(name="lock-local", leader_lock=lock).start()
    instance.leadership.subscribe(lambda leader: leader and leading.set())
    try:
        assert leading.wait(30)
        assert instance.leadership.is_leader is True
    finally:
        instance.stop()

    assert instance.leadership.is_leader is False
    assert oct(lock.stat().st_mode & 0o777) == "0o600"

"""The reliability soak (bench/soak.py), run briefly with fixed seeds."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Seconds a soak may take in all: its run, the wait for its last jobs and,
# in cluster mode, the restarts of its peers.
LIMIT = 600


def run_soak(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.soak", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )


def loopback_available() -> bool:
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
    except OSError:
        return False
    return True


def test_single_process_soak() -> None:
    result = run_soak("--seconds", "10", "--seed", "11")
    assert "violations: 0" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    not loopback_available(), reason="cannot bind a TCP port on 127.0.0.1"
)
def test_cluster_soak() -> None:
    # Every job runs exactly once. A unique key that runs as two jobs is
    # counted apart: docs/cluster.md lists the windows, around joins and
    # leaves, in which a duplicate can slip through, and the soak restarts
    # peers every few seconds.
    result = run_soak("--cluster", "--seconds", "20", "--seed", "12")
    output = result.stdout + result.stderr
    violations = re.search(r"violations: (\d+)", result.stdout)
    twice = re.search(r"unique keys that ran as two jobs: (\d+)", result.stdout)
    assert violations is not None, output
    assert twice is not None, output
    assert int(violations[1]) == int(twice[1]), output

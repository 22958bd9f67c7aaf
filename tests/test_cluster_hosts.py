"""Two cluster peers on two network hosts, made of namespaces and a veth pair.

The test creates two network namespaces joined by a veth pair with the
addresses 10.231.0.1 and 10.231.0.2, runs one peer in each, and removes the
namespaces afterwards. The peers find each other with real mDNS over that
link, and no packet leaves the namespaces. It needs root and iproute2, and
is skipped without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import HANG_GUARD, unique_name

ROOT = Path(__file__).resolve().parent.parent
SECRET = "a test secret of enough length"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 to create network namespaces",
)

# One peer that handles commands read from stdin, and prints one JSON line
# for each.
PEER = """
import json, sys
import stagehand
from tests.workers import EchoWorker

peer = stagehand.Stagehand(
    name=sys.argv[1],
    queues={"default": {"limit": 1, "paused": True}},
    cluster={"name": sys.argv[2], "secret": sys.argv[3], "discovery": "zeroconf",
             "bind": sys.argv[4] + ":0"},
)
peer.start()
print(json.dumps(peer.check_cluster()), flush=True)
for line in sys.stdin:
    command = line.split()
    if command[0] == "status":
        print(json.dumps(peer.check_cluster()), flush=True)
    elif command[0] == "insert":
        jobs = [EchoWorker.new({"value": n}, unique={"period": 600}).insert(peer)
                for n in range(int(command[1]))]
        local = [job.id for job in jobs if peer.get_job(job.id) is not None]
        print(json.dumps({"ids": [job.id for job in jobs], "local": local}), flush=True)
    elif command[0] == "ids":
        print(json.dumps(sorted(job.id for job in peer.jobs())), flush=True)
    elif command[0] == "stop":
        peer.stop()
        print(json.dumps("stopped"), flush=True)
        break
"""


def ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[list[tuple[str, str]]]:
    """Yield two (namespace, address) pairs joined by a veth pair."""
    subnet = 231
    suffix = f"{os.getpid() % 100000}"
    names = [f"sh-a-{suffix}", f"sh-b-{suffix}"]
    links = [f"sha{suffix}", f"shb{suffix}"]
    addresses = [f"10.{subnet}.0.1", f"10.{subnet}.0.2"]
    created: list[str] = []
    try:
        for name in names:
            try:
                ip("netns", "add", name)
            except subprocess.CalledProcessError as error:
                pytest.skip(f"cannot create a network namespace: {error.stderr!r}")
            created.append(name)
        ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for name, link, address in zip(names, links, addresses, strict=True):
            ip("link", "set", link, "netns", name)
            ip("-n", name, "addr", "add", f"{address}/24", "dev", link)
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "link", "set", link, "up")
        yield list(zip(names, addresses, strict=True))
    finally:
        # Deleting a namespace deletes its end of the veth pair, and the
        # pair goes with it.
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Peer:
    """A peer process in one namespace, driven over its stdin and stdout."""

    def __init__(self, namespace: str, address: str, cluster: str) -> None:
        self.process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                namespace,
                sys.executable,
                "-c",
                PEER,
                unique_name("host"),
                cluster,
                SECRET,
                address,
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.status = self.read()

    def read(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the peer process exited; see its stderr above"
        return json.loads(line)

    def ask(self, command: str) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def wait_for_peers(self, count: int) -> None:
        # No event crosses the process boundary, so this checks again every
        # 10 ms, as tests.support.wait_until does within a process.
        deadline = time.monotonic() + HANG_GUARD
        while len(self.ask("status")["peers"]) != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"peer did not see {count} peer(s)")
            time.sleep(0.01)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(HANG_GUARD)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


def test_two_hosts_share_jobs(
    hosts: list[tuple[str, str]],
) -> None:
    cluster = unique_name("hosts")
    peers: list[Peer] = []
    try:
        for namespace, address in hosts:
            peers.append(Peer(namespace, address, cluster))
        first, second = peers
        first.wait_for_peers(1)
        second.wait_for_peers(1)
        assert first.status["address"].startswith(hosts[0][1] + ":")
        assert second.ask("status")["peers"] == [first.status["peer"]]

        inserted = first.ask("insert 20")
        remote = sorted(set(inserted["ids"]) - set(inserted["local"]))
        # The second host owns some of the 20 fingerprints.
        assert 0 < len(remote) < 20
        assert second.ask("ids") == remote

        assert second.ask("stop") == "stopped"
        assert second.process.wait(HANG_GUARD) == 0
        first.wait_for_peers(0)
        assert first.ask("ids") == sorted(inserted["ids"])
    finally:
        for peer in peers:
            peer.close()

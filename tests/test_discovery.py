"""Peers of a cluster find each other over real mDNS on loopback.

Every discovery here binds to 127.0.0.1, so its multicast stays on the
loopback interface. Registering a service takes about a second of mDNS
probing, so these tests start few peers.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from zeroconf import ServiceInfo

from stagehand._discovery import SERVICE_TYPE, PeerAddress, ZeroconfDiscovery

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0


class Seen:
    """Collects a discovery's callbacks and lets a test wait for one."""

    def __init__(self) -> None:
        self.added: dict[str, PeerAddress] = {}
        self.removed: list[str] = []
        self._changed = threading.Condition()

    def add(self, peer: PeerAddress) -> None:
        with self._changed:
            self.added[peer.peer_id] = peer
            self._changed.notify_all()

    def remove(self, peer_id: str) -> None:
        with self._changed:
            self.removed.append(peer_id)
            self._changed.notify_all()

    def wait_added(self, peer_id: str) -> PeerAddress:
        with self._changed:
            assert self._changed.wait_for(lambda: peer_id in self.added, WAIT)
            return self.added[peer_id]

    def wait_removed(self, peer_id: str) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: peer_id in self.removed, WAIT)


@pytest.fixture
def peers() -> Iterator[list[tuple[ZeroconfDiscovery, Seen]]]:
    started: list[tuple[ZeroconfDiscovery, Seen]] = []
    yield started
    for discovery, _ in started:
        discovery.close()


def start_peer(
    started: list[tuple[ZeroconfDiscovery, Seen]], cluster: str, port: int
) -> tuple[ZeroconfDiscovery, Seen]:
    seen = Seen()
    discovery = ZeroconfDiscovery(
        cluster,
        secrets.token_hex(5),
        "127.0.0.1",
        port,
        on_added=seen.add,
        on_removed=seen.remove,
    )
    discovery.start()
    started.append((discovery, seen))
    return discovery, seen


def test_discovery_finds_own_cluster_only(
    peers: list[tuple[ZeroconfDiscovery, Seen]],
) -> None:
    cluster = f"shop-{secrets.token_hex(3)}"
    # Started first, so its announcements reach `first` before `second`'s.
    other, _ = start_peer(peers, f"other-{secrets.token_hex(3)}", 7001)
    first, first_seen = start_peer(peers, cluster, 7002)
    second, second_seen = start_peer(peers, cluster, 7003)

    assert first_seen.wait_added(second.peer_id) == PeerAddress(
        second.peer_id, "127.0.0.1", 7003
    )
    assert second_seen.wait_added(first.peer_id) == PeerAddress(
        first.peer_id, "127.0.0.1", 7002
    )
    assert other.peer_id not in first_seen.added
    assert [peer.peer_id for peer in first.peers()] == [second.peer_id]


def test_discovery_drops_closed_peer(
    peers: list[tuple[ZeroconfDiscovery, Seen]],
) -> None:
    cluster = f"shop-{secrets.token_hex(3)}"
    staying, seen = start_peer(peers, cluster, 7011)
    leaving, _ = start_peer(peers, cluster, 7012)
    seen.wait_added(leaving.peer_id)

    leaving.close()

    seen.wait_removed(leaving.peer_id)
    assert staying.peers() == []
    leaving.close()  # a second close does nothing


CHILD = """
import sys
from stagehand._discovery import ZeroconfDiscovery
discovery = ZeroconfDiscovery(
    sys.argv[1], sys.argv[2], "127.0.0.1", 7021,
    on_added=lambda peer: None, on_removed=lambda peer_id: None,
)
discovery.start()
print("ready", flush=True)
sys.stdin.read()
discovery.close()
"""


def test_discovery_follows_peer_process(
    peers: list[tuple[ZeroconfDiscovery, Seen]],
) -> None:
    cluster = f"shop-{secrets.token_hex(3)}"
    child_id = secrets.token_hex(5)
    _, seen = start_peer(peers, cluster, 7020)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, cluster, child_id],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "ready\n"
        assert seen.wait_added(child_id) == PeerAddress(child_id, "127.0.0.1", 7021)
        child.stdin.close()  # the child closes its discovery and exits
        assert child.wait(WAIT) == 0
        seen.wait_removed(child_id)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_discovery_start_twice_raises() -> None:
    discovery = ZeroconfDiscovery(
        "shop",
        secrets.token_hex(5),
        "127.0.0.1",
        7030,
        on_added=lambda peer: None,
        on_removed=lambda peer_id: None,
    )
    discovery.start()
    try:
        with pytest.raises(RuntimeError, match="started already"):
            discovery.start()
    finally:
        discovery.close()


@pytest.mark.parametrize(
    ("cluster", "peer_id", "host", "port", "error", "message"),
    [
        ("", "a1", "127.0.0.1", 7000, TypeError, "cluster must be a non-empty str"),
        ("shop", 5, "127.0.0.1", 7000, TypeError, "peer_id must be a non-empty str"),
        ("shop", "a1.eu", "127.0.0.1", 7000, ValueError, "without dots"),
        ("shop", "x" * 64, "127.0.0.1", 7000, ValueError, "at most 63 bytes"),
        ("x" * 201, "a1", "127.0.0.1", 7000, ValueError, "at most 200 bytes"),
        ("shop\n", "a1", "127.0.0.1", 7000, ValueError, "printable"),
        ("shop", "a1", "localhost", 7000, ValueError, "IPv4 address such as"),
        ("shop", "a1", None, 7000, TypeError, "host must be an IPv4 address str"),
        ("shop", "a1", "127.0.0.1", 0, ValueError, "from 1 to 65535"),
        ("shop", "a1", "127.0.0.1", True, ValueError, "from 1 to 65535"),
    ],
)
def test_discovery_bad_arguments_raise(
    cluster: object,
    peer_id: object,
    host: object,
    port: object,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        ZeroconfDiscovery(
            cluster,  # type: ignore[arg-type]
            peer_id,  # type: ignore[arg-type]
            host,  # type: ignore[arg-type]
            port,  # type: ignore[arg-type]
            on_added=lambda peer: None,
            on_removed=lambda peer_id: None,
        )


def service(properties: dict[str, str], addresses: list[str]) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        f"b2.{SERVICE_TYPE}",
        addresses=[socket.inet_aton(address) for address in addresses],
        port=7040,
        properties=properties,
    )


GOOD = {"v": "1", "cluster": "shop", "peer": "b2"}


@pytest.mark.parametrize(
    ("host", "properties", "addresses", "expected"),
    [
        ("127.0.0.1", GOOD, ["127.0.0.1"], "127.0.0.1"),
        # A peer announced on every interface is reached at the address
        # this peer listens on, if it lists it, else at one not loopback.
        ("127.0.0.1", GOOD, ["192.0.2.7", "127.0.0.1"], "127.0.0.1"),
        ("192.0.2.1", GOOD, ["127.0.0.1", "192.0.2.7"], "192.0.2.7"),
        ("127.0.0.1", {**GOOD, "v": "2"}, ["127.0.0.1"], None),
        ("127.0.0.1", {**GOOD, "cluster": "other"}, ["127.0.0.1"], None),
        ("127.0.0.1", {**GOOD, "peer": "a1"}, ["127.0.0.1"], None),
        ("127.0.0.1", {"v": "1", "cluster": "shop"}, ["127.0.0.1"], None),
        ("127.0.0.1", GOOD, [], None),
    ],
)
def test_discovery_service_filter(
    host: str, properties: dict[str, str], addresses: list[str], expected: str | None
) -> None:
    # Built but not started: nothing touches the network.
    discovery = ZeroconfDiscovery(
        "shop",
        "a1",
        host,
        7000,
        on_added=lambda peer: None,
        on_removed=lambda peer_id: None,
    )
    peer = discovery._peer_from(service(properties, addresses))
    assert peer == (None if expected is None else PeerAddress("b2", expected, 7040))

"""Finding the other peers of a cluster on the local network, over mDNS.

Each peer registers one service of type ``_stagehand._tcp.local.``, named
after its peer id, whose TXT record gives its cluster name and peer id and
whose address and port are those of its peer channel. It browses for the
same type and reports the peers of its own cluster as they come and go.

Discovery only proposes peers. A process that dies without saying goodbye
stays in the others' mDNS caches until its records expire, after
`RECORD_TTL` seconds here, so the peer channel must check that a peer is
alive. A peer that closes its discovery sends goodbye packets, and the
others see it leave at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import ifaddr
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

__all__ = ["RECORD_TTL", "SERVICE_TYPE", "PeerAddress", "ZeroconfDiscovery"]

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_stagehand._tcp.local."
# Seconds a peer's records stay in the others' caches if it dies without a
# goodbye. zeroconf's default for the pointer and TXT records is 4,500.
RECORD_TTL = 60
# Seconds to wait for mDNS probing to finish when registering.
_REGISTER_TIMEOUT = 10.0
# The version of the TXT record's layout. Peers skip other versions.
_PROTOCOL = b"1"


@dataclass(frozen=True)
class PeerAddress:
    """A peer found by discovery: its id and the address of its channel."""

    peer_id: str
    host: str
    port: int


class ZeroconfDiscovery:
    """Registers this peer over mDNS and reports the peers of its cluster.

    `on_added` is called with a `PeerAddress` when a peer of the same cluster
    appears or its address changes, and `on_removed` with the peer id when
    it leaves. Both run in zeroconf's browser thread, one call at a time, so
    they must return quickly.

    Args:
        cluster: The cluster's name; peers of other clusters are ignored.
        peer_id: This peer's id, unique in the cluster.
        host: The IPv4 address that this peer's channel listens on.
            ``"0.0.0.0"`` announces every address of the machine and
            browses on every interface. Any other address announces only
            itself and uses only its own interface, so ``"127.0.0.1"``
            keeps all traffic on loopback.
        port: The port of this peer's channel.
    """

    def __init__(
        self,
        cluster: str,
        peer_id: str,
        host: str,
        port: int,
        *,
        on_added: Callable[[PeerAddress], None],
        on_removed: Callable[[str], None],
    ):
        self.cluster = _check_label("cluster", cluster)
        self.peer_id = _check_label("peer_id", peer_id)
        self.host = _check_host(host)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(
                f"port must be the channel's bound port, an int from 1 to 65535; "
                f"got {port!r}"
            )
        self.port = port
        self._on_added = on_added
        self._on_removed = on_removed
        self._lock = threading.Lock()
        # Service name -> the peer it announced.
        self._peers: dict[str, PeerAddress] = {}
        self._zeroconf: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._info: ServiceInfo | None = None

    @property
    def service_name(self) -> str:
        """This peer's mDNS service name."""
        return f"{self.peer_id}.{SERVICE_TYPE}"

    def peers(self) -> list[PeerAddress]:
        """Return the peers of this cluster seen so far, sorted by id."""
        with self._lock:
            return sorted(self._peers.values(), key=lambda peer: peer.peer_id)

    def start(self) -> None:
        """Announce this peer and begin browsing for the others.

        Raises:
            RuntimeError: Discovery was started before.
            OSError: No multicast socket could be opened on the interface.
        """
        if self._zeroconf is not None:
            raise RuntimeError("discovery was started already; build a new one")
        wildcard = self.host == "0.0.0.0"
        interfaces: Any = InterfaceChoice.All if wildcard else [self.host]
        zeroconf = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        try:
            addresses = _announced_addresses(self.host)
            info = ServiceInfo(
                SERVICE_TYPE,
                self.service_name,
                addresses=[socket.inet_aton(address) for address in addresses],
                port=self.port,
                properties={
                    "v": _PROTOCOL,
                    "cluster": self.cluster,
                    "peer": self.peer_id,
                },
                server=f"stagehand-{self.peer_id}.local.",
            )
            # Waits for the probes that check that the name is free (about
            # a second here), not for the announcements that follow them.
            assert zeroconf.loop is not None  # set once the instance is built
            registered = asyncio.run_coroutine_threadsafe(
                zeroconf.async_register_service(info, ttl=RECORD_TTL),
                zeroconf.loop,
            )
            registered.result(timeout=_REGISTER_TIMEOUT)
            self._info = info
            self._zeroconf = zeroconf
            self._browser = ServiceBrowser(
                zeroconf, SERVICE_TYPE, handlers=[self._changed]
            )
        except BaseException:
            zeroconf.close()
            self._zeroconf = None
            raise

    def close(self) -> None:
        """Say goodbye, so that the other peers drop this one at once, and stop."""
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is None:
            return
        try:
            if self._browser is not None:
                self._browser.cancel()
            if self._info is not None:
                zeroconf.unregister_service(self._info)
        finally:
            zeroconf.close()
            with self._lock:
                self._peers.clear()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _changed(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Runs in the browser's thread. zeroconf logs and swallows what a
        # handler raises, so errors are logged here with their context.
        try:
            if state_change is ServiceStateChange.Removed:
                self._removed(name)
            else:
                self._seen(zeroconf, service_type, name)
        except Exception:
            logger.exception("discovery failed to handle %s of %s", state_change, name)

    def _seen(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        if name == self.service_name:
            return
        info = zeroconf.get_service_info(service_type, name, timeout=3000)
        if info is None:
            logger.debug("no details for mDNS service %s; skipped", name)
            return
        peer = self._peer_from(info)
        if peer is None:
            return
        with self._lock:
            known = self._peers.get(name)
            if known == peer:
                return
            self._peers[name] = peer
        logger.info(
            "discovered peer %s of cluster %r at %s:%d",
            peer.peer_id,
            self.cluster,
            peer.host,
            peer.port,
        )
        self._on_added(peer)

    def _removed(self, name: str) -> None:
        with self._lock:
            peer = self._peers.pop(name, None)
        if peer is None:
            return
        logger.info("peer %s of cluster %r left discovery", peer.peer_id, self.cluster)
        self._on_removed(peer.peer_id)

    def _peer_from(self, info: ServiceInfo) -> PeerAddress | None:
        # None for a service of another cluster, of another layout version,
        # or without an IPv4 address and port.
        properties = info.properties
        if properties.get(b"v") != _PROTOCOL:
            return None
        if properties.get(b"cluster") != self.cluster.encode():
            return None
        peer = properties.get(b"peer")
        if not peer or peer.decode(errors="replace") == self.peer_id:
            return None
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or not info.port:
            return None
        # A peer announced on every interface lists all its addresses, and
        # its loopback one is reachable only from its own machine.
        host = next(
            (a for a in addresses if a == self.host),
            next(
                (a for a in addresses if not ipaddress.ip_address(a).is_loopback),
                addresses[0],
            ),
        )
        return PeerAddress(peer.decode(errors="replace"), host, info.port)


def _check_label(name: str, value: object) -> str:
    # Both go into the TXT record, whose strings take at most 255 bytes. The
    # peer id also names the service, a DNS label of at most 63 bytes.
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty str; got {value!r}")
    if name == "peer_id":
        if len(value.encode()) > 63 or not value.isprintable() or "." in value:
            raise ValueError(
                "peer_id must be printable, without dots, and at most 63 bytes "
                f"in UTF-8; got {value!r}"
            )
    elif len(value.encode()) > 200 or not value.isprintable():
        raise ValueError(
            f"{name} must be printable and at most 200 bytes in UTF-8; got {value!r}"
        )
    return value


def _check_host(host: object) -> str:
    if not isinstance(host, str):
        raise TypeError(f"host must be an IPv4 address str; got {host!r}")
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(
            f"host must be an IPv4 address such as '127.0.0.1', or '0.0.0.0' "
            f"for every interface; got {host!r}"
        ) from None
    return str(address)


def _announced_addresses(host: str) -> list[str]:
    if host != "0.0.0.0":
        return [host]
    # Every address of the machine, loopback last, so that a peer on
    # another host finds a reachable one first.
    found = {
        ip.ip
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str)  # IPv6 addresses are tuples
    }
    addresses = sorted(found, key=lambda a: (ipaddress.ip_address(a).is_loopback, a))
    return addresses or ["127.0.0.1"]

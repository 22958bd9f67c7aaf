"""Cluster mode: peers that find each other, share unique jobs and hand on work.

Each instance with ``cluster=...`` is one peer. It listens on a peer
channel (`stagehand._channel`), finds the other peers by mDNS or from a
list of addresses, and keeps one outgoing connection to each peer it has
found. A peer is a member while that connection is open.

- Leader: the member with the smallest peer id, counting this peer. Cron
  runs on the leader only, and its inserts are unique per entry and
  minute, so two peers that both lead for a moment insert one job.
- Unique jobs: each fingerprint belongs to one peer, chosen among the
  members by rendezvous hashing (`stagehand._rendezvous`). An insert of a
  unique job runs its duplicate check, and the job itself, on that peer.
- Joining: a new peer sends ``join`` to each peer it finds. Each one
  first sends it the unique entries that it now owns, then replies with
  the peers it is connected to. Unique inserts routed to the new peer wait
  until those replies are in, for at most ``join_timeout`` seconds.
- Leaving: a stopping peer withdraws from discovery and sends ``leave``,
  so no new work is routed to it. It then hands its available, scheduled
  and retryable jobs, and its unique entries, to the other members.

A job moves with its id, attempt, errors and times. The receiver refuses
an id it already has, so a retry after a lost reply cannot run a job
twice, and a job whose delivery is in doubt is never sent to a second
peer: it is logged as possibly lost instead.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from stagehand import _options, events
from stagehand._channel import (
    ChannelError,
    ChannelServer,
    Connection,
    NotDelivered,
    connect,
)
from stagehand._job import Job, JobState
from stagehand._leadership import Leadership
from stagehand._rendezvous import owner as rendezvous_owner
from stagehand._rendezvous import ranked
from stagehand._unique import RemoteEntry, fingerprint
from stagehand._wire import job_from_wire, job_to_wire
from stagehand.exceptions import (
    InvalidOption,
    NotRunning,
    ShuttingDown,
    StagehandError,
)

if TYPE_CHECKING:
    from stagehand._discovery import PeerAddress, ZeroconfDiscovery
    from stagehand._instance import Stagehand

__all__ = ["Cluster", "ClusterSettings", "check_cluster"]

logger = logging.getLogger(__name__)

_KEYS = frozenset(
    {
        "name",
        "secret",
        "discovery",
        "bind",
        "discovery_timeout",
        "join_timeout",
        "request_timeout",
    }
)
# The maximum wait, in seconds, before a listed address that is not a
# member is tried again.
_LIST_RETRY_MAX = 30.0
# The maximum discovery, join or request timeout, in seconds.
_MAX_TIMEOUT = 3600.0
# Seconds an address must keep failing before the failure is a WARNING.
_WARN_UNREACHABLE = 60.0
# Seconds between the attempts to join a peer again after its connection
# was lost; about 7.6 s in all.
_REJOIN_DELAYS = (0.1, 0.5, 1.0, 2.0, 4.0)
# Entries per entries request: each is about 500 bytes in JSON, and a
# larger batch is split in two until it fits in a frame.
_ENTRY_BATCH = 1000
# Jobs per adopt request: about 300 bytes each in JSON, well under the
# channel's frame limit of 1 MiB.
_BATCH = 1000
# Inserts a unique job on this peer, given a test of whether this peer owns
# a fingerprint: `Stagehand._insert_unique_here`.
InsertHere = Callable[[Job, Callable[[str], bool] | None], Job | None]


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """The checked ``cluster`` setting of an instance."""

    name: str
    secret: bytes
    # "zeroconf", or the (host, port) addresses of peers to join.
    discovery: str | tuple[tuple[str, int], ...]
    bind: tuple[str, int]
    discovery_timeout: float = 1.0
    join_timeout: float = 5.0
    request_timeout: float = 5.0


def check_cluster(value: object) -> ClusterSettings:
    """Check the ``cluster`` setting and return it as `ClusterSettings`.

    Raises:
        InvalidOption: A key is missing, unknown or invalid.
    """
    if not isinstance(value, Mapping):
        raise InvalidOption(
            "cluster must be a dict such as {'name': 'shop', 'secret': '...'}; "
            f"got {value!r}"
        )
    unknown = set(value) - _KEYS
    if unknown:
        raise InvalidOption(
            f"unknown cluster keys {sorted(unknown)}; valid keys are {sorted(_KEYS)}"
        )
    name = value.get("name")
    if not isinstance(name, str) or not name or not name.isprintable():
        raise InvalidOption(
            f"cluster name must be a printable, non-empty string, the same on "
            f"every peer; got {name!r}"
        )
    if len(name.encode()) > 200:
        raise InvalidOption(f"cluster name must be at most 200 bytes; got {name!r}")
    secret = value.get("secret")
    if isinstance(secret, str):
        # Counted in characters, as the error message states, before encoding.
        short = len(secret) < 16
        try:
            secret = secret.encode()
        except UnicodeEncodeError:
            secret = None
    else:
        short = isinstance(secret, bytes) and len(secret) < 16
    if not isinstance(secret, bytes) or short:
        raise InvalidOption(
            "cluster secret must be a str or bytes of at least 16 characters, the "
            "same on every peer; generate one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    discovery = value.get("discovery", "zeroconf")
    if discovery != "zeroconf":
        if isinstance(discovery, str) or not isinstance(discovery, Iterable):
            raise InvalidOption(
                "cluster discovery must be 'zeroconf' or a list of 'host:port' "
                f"peer addresses; got {discovery!r}"
            )
        discovery = tuple(
            _address(f"cluster discovery entry {entry!r}", entry, port_zero=False)
            for entry in discovery
        )
    bind = _address("cluster bind", value.get("bind", "0.0.0.0:0"), port_zero=True)
    return ClusterSettings(
        name=name,
        secret=secret,
        discovery=discovery,
        bind=bind,
        discovery_timeout=_seconds(value, "discovery_timeout", 1.0),
        join_timeout=_seconds(value, "join_timeout", 5.0),
        request_timeout=_seconds(value, "request_timeout", 5.0),
    )


def _address(name: str, value: object, *, port_zero: bool) -> tuple[str, int]:
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    try:
        ipaddress.IPv4Address(host)
        # int() would also take "8_0", " 80" and "+80".
        number = int(port) if port.isascii() and port.isdigit() else -1
    except ValueError:
        number = -1
    if not (0 if port_zero else 1) <= number <= 65535:
        raise InvalidOption(
            f"{name} must be 'host:port' with an IPv4 host, such as "
            f"'192.168.1.20:7600'; got {value!r}"
        )
    return host, number


def _seconds(value: Mapping[str, Any], key: str, default: float) -> float:
    seconds = value.get(key, default)
    # An int compares exactly, so a huge one fails here without overflowing.
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not 0 < seconds <= _MAX_TIMEOUT
        or not math.isfinite(seconds)
    ):
        raise InvalidOption(
            f"cluster {key} must be seconds > 0 and at most {_MAX_TIMEOUT:.0f} "
            f"(one hour); got {seconds!r}"
        )
    return float(seconds)


class _Member:
    """A peer this one has a connection to."""

    __slots__ = ("address", "connection", "peer_id")

    def __init__(self, peer_id: str, address: tuple[str, int], connection: Connection):
        self.peer_id = peer_id
        self.address = address
        self.connection = connection


class _Departing:
    """A member that sent a leave request and is handing over its work."""

    __slots__ = ("deadline", "handed", "member")

    def __init__(self, member: _Member, deadline: float):
        self.member = member
        # Set when its queued jobs and unique entries have arrived, when its
        # connection closes, or when a unique check gave up waiting.
        self.handed = threading.Event()
        # time.monotonic() after which unique checks no longer wait for it.
        self.deadline = deadline


class ClusterLeadership(Leadership):
    """Leadership by the smallest peer id among the members."""

    def __init__(self, cluster: Cluster):
        super().__init__()
        self._cluster = cluster
        self._state: dict[str, Any] = {}
        # Values saved and not yet sent to the members, by key.
        self._outgoing: dict[str, Any] = {}
        self._outgoing_lock = threading.Lock()

    def load_state(self, key: str) -> Any:
        return self._state.get(key)

    def save_state(self, key: str, value: Any) -> None:
        self._state[key] = value
        # Sent by a thread of its own, because the caller (cron) holds its
        # lock and a slow member would hold it up. Only the latest value of
        # each key is sent, so an older one cannot arrive after a newer.
        with self._outgoing_lock:
            start = not self._outgoing
            self._outgoing[key] = value
        if start:
            threading.Thread(
                target=self._send_states, name="stagehand-cluster-state", daemon=True
            ).start()

    def _send_states(self) -> None:
        while True:
            with self._outgoing_lock:
                if not self._outgoing:
                    return
                key, value = next(iter(self._outgoing.items()))
            self._cluster.broadcast({"type": "state", "key": key, "value": value})
            with self._outgoing_lock:
                if self._outgoing.get(key) is value:
                    del self._outgoing[key]

    def receive_state(self, key: str, value: Any) -> None:
        self._state[key] = value

    def state(self) -> dict[str, Any]:
        """Return a copy of every saved value, for a peer that joins."""
        return dict(self._state)


class Cluster:
    """This instance's membership in a cluster; see the module docstring."""

    def __init__(self, instance: Stagehand, settings: ClusterSettings):
        self.instance = instance
        self.settings = settings
        self.peer_id = secrets.token_hex(5)
        self.leadership = ClusterLeadership(self)
        self._lock = threading.Lock()
        # Held by _update_leader from reading the members to applying the
        # result.
        self._leader_lock = threading.Lock()
        self._members: dict[str, _Member] = {}
        # Members that are leaving, until their connection closes. Their
        # unique entries arrive after the leave request, so unique checks
        # wait for them; and they still report the state of their jobs.
        self._departing: dict[str, _Departing] = {}
        # Addresses being joined, so that two discoveries of one peer make
        # one connection.
        self._joining: set[tuple[str, int]] = set()
        self._joins_done = threading.Condition(self._lock)
        self._leaving = False
        self._synced = threading.Event()
        self._closed = False
        # Set when a member is lost, so that listed addresses are tried
        # again soon.
        self._list_lost = False
        # Listed addresses that turned out to be this peer's own.
        self._own_addresses: set[tuple[str, int]] = set()
        # Listed addresses of members that joined under another address.
        self._aliases: dict[tuple[str, int], str] = {}
        # Addresses that could not be reached, with the time.monotonic() of
        # the first failure since the last success, and whether a warning
        # has been logged for them.
        self._unreachable: dict[tuple[str, int], list[Any]] = {}
        # Set by withdraw() and close(): ends the waits of reconnections.
        self._stopping = threading.Event()
        host, port = settings.bind
        self._server = ChannelServer(
            settings.secret,
            settings.name,
            self.peer_id,
            self._handle,
            host=host,
            port=port,
            # A routed insert may wait for this peer's join to finish, and
            # the entries that finish it can come on the same connection.
            concurrent=lambda message: message.get("type") == "insert",
            # Entries that belong to a newer member go on to it before the
            # reply, so they must not wait for the reader or for a request
            # thread: those may wait for this very request.
            threaded=lambda message: message.get("type") == "entries",
        )
        self._discovery: ZeroconfDiscovery | None = None
        self._round_robin = itertools.count()
        # Entries of jobs running here that moved to another owner during
        # stop(), sent again once the jobs have ended.
        self._sent_running: list[tuple[str, Job]] = []
        # Entries of jobs of this peer that were waiting or running when a
        # join moved them to another owner, by job id. stop() sends their
        # final states, which the owner cannot ask for once this peer is gone.
        self._moved_live: dict[str, tuple[str, Job]] = {}
        # The leader last reported by a leader.change event.
        self._reported_leader: str | None = None

    # Membership

    @property
    def address(self) -> tuple[str, int]:
        """The address of this peer's channel, as bound (host may be 0.0.0.0)."""
        return self._server.address

    def status(self) -> dict[str, Any]:
        """Return the dict that `Stagehand.check_cluster` describes."""
        try:
            address: str | None = "{}:{}".format(*self.address)
        except ChannelError:
            address = None  # not listening yet
        return {
            "name": self.settings.name,
            "peer": self.peer_id,
            "address": address,
            "leader": self.leader(),
            "peers": self.members(),
        }

    def local_status(self) -> dict[str, Any]:
        """Return this peer's id, instance name, leadership and queues."""
        instance = self.instance
        return {
            "peer": self.peer_id,
            "instance": instance.name,
            "leader": instance.leadership.is_leader,
            "queues": [instance.check_queue(name) for name in instance.queues],
        }

    def survey(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Ask every member for its `local_status`; add this peer's own.

        The members are asked at once. A member that does not reply within
        `timeout` seconds (default `request_timeout`), or replies with an
        error, is listed with its ``error``.
        """
        wait = self.settings.request_timeout if timeout is None else timeout
        with self._lock:
            members = list(self._members.values())
        statuses = [self.local_status()]
        replies: dict[str, dict[str, Any]] = {}

        def ask(member: _Member) -> None:
            try:
                reply = member.connection.request({"type": "status"}, wait)
            except ChannelError as error:
                reply = {"error": str(error)}
            if not isinstance(reply.get("queues"), list):
                reply = {"error": str(reply.get("error", "no status in the reply"))}
            replies[member.peer_id] = {**reply, "peer": member.peer_id}

        threads = [
            threading.Thread(target=ask, args=(member,), daemon=True)
            for member in members
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(wait + 1)
        for member in members:
            statuses.append(
                replies.get(member.peer_id)
                or {"peer": member.peer_id, "error": "no reply in time"}
            )
        return sorted(statuses, key=lambda status: status["peer"])

    def members(self) -> list[str]:
        """Return the peer ids of the members, not counting this peer."""
        with self._lock:
            return sorted(self._members)

    def leader(self) -> str:
        """Return the peer id of the current leader.

        A peer that is leaving leads nothing: it reports the smallest member,
        or itself when none is left.
        """
        with self._lock:
            if self._leaving and self._members:
                return min(self._members)
            return min([self.peer_id, *self._members])

    def start(self) -> None:
        """Listen, find the peers, join them, and take part in leadership."""
        self._server.start()
        settings = self.settings
        if settings.discovery == "zeroconf":
            from stagehand._discovery import ZeroconfDiscovery

            host, port = self._server.address
            self._discovery = ZeroconfDiscovery(
                settings.name,
                self.peer_id,
                host,
                port,
                on_added=self._discovered,
                on_removed=self._undiscovered,
            )
            self._discovery.start()
            # mDNS gives no signal that everyone has answered, so the first
            # round lasts a fixed time; joins it triggers are waited for below.
            threading.Event().wait(settings.discovery_timeout)
        else:
            assert not isinstance(settings.discovery, str)
            for address in settings.discovery:
                self._join_in_background(address, "{}:{}".format(*address))
            threading.Thread(
                target=self._watch_list,
                name=f"stagehand-cluster-list-{self.peer_id}",
                daemon=True,
            ).start()
        deadline = time.monotonic() + settings.join_timeout
        with self._joins_done:
            while self._joining:
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning(
                        "peer %s still joining %s after %g s; starting anyway",
                        self.peer_id,
                        sorted(self._joining),
                        settings.join_timeout,
                    )
                    break
                self._joins_done.wait(left)
        self._synced.set()
        self._update_leader()
        logger.info(
            "peer %s of cluster %r listening on %s:%d with members %s; leader %s",
            self.peer_id,
            settings.name,
            *self.address,
            self.members(),
            self.leader(),
        )

    def _watch_list(self) -> None:
        # A listed peer that did not respond, or left, may start later, and
        # nothing else would report it. Listed addresses that are not
        # members are tried again, first after 1 s, then less and less
        # often, up to every _LIST_RETRY_MAX seconds. A lost member makes
        # the tries frequent again.
        assert not isinstance(self.settings.discovery, str)
        listed = self.settings.discovery
        delay = 1.0
        while not self._stopping.wait(delay):
            with self._lock:
                connected = {member.address for member in self._members.values()}
                connected.update(
                    address
                    for address, peer_id in self._aliases.items()
                    if peer_id in self._members or peer_id in self._departing
                )
                # A leaving member declines joins until it closes.
                connected.update(
                    departing.member.address for departing in self._departing.values()
                )
                lost = self._list_lost
                self._list_lost = False
            missing = [
                address
                for address in listed
                if address not in connected and address not in self._own_addresses
            ]
            for address in missing:
                self._join(address)
            delay = 1.0 if lost else min(delay * 2, _LIST_RETRY_MAX)

    def _discovered(self, peer: PeerAddress) -> None:
        # In zeroconf's browser thread, which must not block on a connect.
        self._join_in_background((peer.host, peer.port), peer.peer_id)

    def _undiscovered(self, peer_id: str) -> None:
        # The peer sent an mDNS goodbye. Its connection closes too, and
        # that removes it; the leave message usually comes first.
        logger.debug("peer %s left discovery", peer_id)

    def _join_in_background(self, address: tuple[str, int], label: str) -> None:
        # The address counts as being joined at once, so that start() waits
        # for it, and each join has its own thread, so that a slow peer
        # delays no other join and start() waits join_timeout at most.
        if self._claim(address):
            threading.Thread(
                target=self._join_claimed,
                args=(address,),
                name=f"stagehand-cluster-join-{label}",
                daemon=True,
            ).start()

    def _join(self, address: tuple[str, int]) -> None:
        # Connects to the peer at `address`, requests the unique entries this
        # peer owns now, and joins the peers on the list it returns.
        if self._claim(address):
            self._join_claimed(address)

    def _claim(self, address: tuple[str, int]) -> bool:
        with self._lock:
            if self._closed or self._leaving or address in self._joining:
                return False
            if any(member.address == address for member in self._members.values()):
                return False
            if any(
                departing.member.address == address
                for departing in self._departing.values()
            ):
                # It is leaving: a join would be declined.
                return False
            self._joining.add(address)
            return True

    def _join_claimed(self, address: tuple[str, int]) -> None:
        try:
            self._join_one(address)
        except Exception:
            logger.exception("joining the peer at %s:%d failed", *address)
        finally:
            with self._joins_done:
                self._joining.discard(address)
                self._joins_done.notify_all()

    def _join_one(self, address: tuple[str, int]) -> None:
        # The join goes over the member's connection even when the peer
        # connected to this one first, so that its entries and peers arrive.
        member = self._connect(address)
        if member is None:
            return
        host, port = self.address
        if host == "0.0.0.0":
            # The address this connection leaves from reaches this peer from
            # the other one.
            host = member.connection.local_host
        try:
            # The peer first connects back and sends the entries this peer
            # now owns, which can take more than one request.
            reply = member.connection.request(
                {"type": "join", "address": [host, port]},
                self.settings.request_timeout + self.settings.join_timeout,
            )
        except ChannelError as error:
            logger.warning("join request to peer %s failed: %s", member.peer_id, error)
            self._drop(member)
            return
        if reply.get("error") == "leaving":
            # It stops, and may still run jobs of a unique entry that this
            # peer owns. Kept as leaving until it closes, the connection
            # still reports their state, and the address is not joined again
            # meanwhile. It will not send this peer a hand-over to wait for.
            logger.info("peer %s declined the join: it is leaving", member.peer_id)
            with self._lock:
                declined = self._members.get(member.peer_id) is member
                if declined:
                    del self._members[member.peer_id]
                    departing = _Departing(member, time.monotonic())
                    departing.handed.set()
                    self._departing[member.peer_id] = departing
            if declined:
                self._emit_peer("peer.leave", member.peer_id)
                self._update_leader()
            return
        if "error" in reply:
            # The peer failed to handle the join.
            logger.info("peer %s declined the join: %s", member.peer_id, reply["error"])
            self._drop(member)
            return
        try:
            for key, value in _dict(reply, "state").items():
                if self.leadership.load_state(key) is None:
                    self.leadership.receive_state(key, value)
            peers = [_peer_entry(entry) for entry in _list(reply, "peers")]
        except _Malformed as error:
            logger.warning(
                "peer %s sent a malformed join reply: %s", member.peer_id, error
            )
            return
        # Entries this peer took while the other one was not a member, such
        # as during a lost connection, go back to their owner.
        self._move_entries_to(member)
        for peer_id, peer_address in peers:
            if peer_id != self.peer_id and peer_id not in self.members():
                self._join(peer_address)
        self._update_leader()

    def _connect(self, address: tuple[str, int]) -> _Member | None:
        # Returns the member at `address`, connecting to it if it is not a
        # member yet, or None when the address is this peer's own or
        # cannot be reached.
        holder: list[_Member] = []
        settings = self.settings

        def closed() -> None:
            if holder:
                self._lost(holder[0])

        try:
            connection = connect(
                address,
                settings.secret,
                settings.name,
                self.peer_id,
                timeout=settings.request_timeout,
                on_close=closed,
            )
        except ChannelError as error:
            # A listed peer that has not started yet, or has just left, is
            # normal: the first failure is logged at INFO, and a WARNING
            # follows once the address has failed for _WARN_UNREACHABLE
            # seconds. Listed addresses are tried repeatedly, so the other
            # failures are logged at DEBUG.
            now = time.monotonic()
            with self._lock:
                record = self._unreachable.get(address)
                if record is None:
                    level = logging.INFO
                    self._unreachable[address] = [now, False]
                elif not record[1] and now - record[0] >= _WARN_UNREACHABLE:
                    level = logging.WARNING
                    record[1] = True
                else:
                    level = logging.DEBUG
            logger.log(level, "cannot reach the peer at %s:%d: %s", *address, error)
            return None
        with self._lock:
            self._unreachable.pop(address, None)
        peer_id = connection.remote_peer_id
        member = _Member(peer_id, address, connection)
        with self._lock:
            existing = self._members.get(peer_id)
            if peer_id == self.peer_id:
                self._own_addresses.add(address)
            elif existing is not None:
                # A member known by another address, as its join gave it.
                self._aliases[address] = peer_id
            elif not self._closed:
                self._members[peer_id] = member
                holder.append(member)
        if not holder:
            connection.close()
            return existing
        logger.info("peer %s joined peer %s at %s:%d", self.peer_id, peer_id, *address)
        self._emit_peer("peer.join", peer_id)
        return member

    def _lost(self, member: _Member) -> None:
        # In the connection's reader thread, once it has closed. A member
        # that sent a leave request was removed before, so this one is gone
        # without notice: dead, or cut off. Joining it again shows which.
        with self._lock:
            departing = self._departing.get(member.peer_id)
            if departing is not None and departing.member is member:
                # A leaving member has closed: its hand-over is over.
                del self._departing[member.peer_id]
                departing.handed.set()
                return
            if self._members.get(member.peer_id) is not member:
                return
            del self._members[member.peer_id]
            stopping = self._closed or self._leaving
            self._list_lost = True
        self._emit_peer("peer.leave", member.peer_id)
        self._update_leader()
        if stopping:
            return
        logger.warning(
            "peer %s lost its connection to peer %s; trying to join it again",
            self.peer_id,
            member.peer_id,
        )
        threading.Thread(
            target=self._rejoin,
            args=(member,),
            name=f"stagehand-cluster-rejoin-{member.peer_id}",
            daemon=True,
        ).start()

    def _rejoin(self, lost: _Member) -> None:
        # A few attempts, further and further apart; a peer that has died
        # refuses them all.
        for delay in _REJOIN_DELAYS:
            if self._stopping.wait(delay):
                return
            with self._lock:
                if lost.peer_id in self._members:
                    return  # it joined this peer meanwhile
                if lost.peer_id in self._departing:
                    return  # it is leaving
            self._join(lost.address)
            with self._lock:
                if lost.peer_id in self._members:
                    return
        logger.warning(
            "peer %s gave up joining peer %s at %s:%d again; it counts as gone",
            self.peer_id,
            lost.peer_id,
            *lost.address,
        )

    def _drop(self, member: _Member) -> None:
        member.connection.close()  # its on_close removes it

    def _update_leader(self) -> None:
        # Several threads call this (joins, leaves, lost connections). One at
        # a time, so that a leader worked out earlier is never applied after
        # a later one.
        with self._leader_lock:
            # A leaving peer stepped down in withdraw() and reports nothing.
            if not self._synced.is_set() or self._closed or self._leaving:
                return
            leader = self.leader()
            self.leadership.set_leader(leader == self.peer_id and not self._leaving)
            with self._lock:
                changed = leader != self._reported_leader
                self._reported_leader = leader
            if changed and events.has_handlers("leader.change"):
                events.emit(
                    "leader.change",
                    {},
                    {"leader": leader, "instance": self.instance.name},
                )

    def _emit_peer(self, event: str, peer_id: str) -> None:
        if events.has_handlers(event):
            events.emit(event, {}, {"peer": peer_id, "instance": self.instance.name})

    def broadcast(self, message: dict[str, Any]) -> None:
        """Send `message` to every member, logging the ones that fail."""
        with self._lock:
            members = list(self._members.values())
        for member in members:
            try:
                member.connection.request(message, self.settings.request_timeout)
            except ChannelError as error:
                logger.warning(
                    "peer %s did not take %s: %s",
                    member.peer_id,
                    message.get("type"),
                    error,
                )

    # Unique jobs

    def insert_unique(self, job: Job, insert_here: InsertHere) -> Job:
        """Insert a validated unique job on the peer that owns its fingerprint.

        Falls back to the next peer in rendezvous order when the owner
        cannot be reached, and to this peer last.
        """
        key = fingerprint(job)
        candidates = self._owners()
        for index, owner in enumerate(ranked(key, candidates)):
            if owner == self.peer_id:
                # Past the first place, the peers ranked before this one
                # did not take the job. Unless they have left since, this
                # peer is not the owner, and inserts the job as the last
                # resort.
                check = index == 0 or self._owns(key)
                return self.insert_owned(job, insert_here, check=check)
            with self._lock:
                member = self._members.get(owner)
            if member is None:
                continue
            try:
                # The owner may wait up to join_timeout for its join to end.
                reply = member.connection.request(
                    {"type": "insert", "job": _new_job_to_wire(job)},
                    self.settings.request_timeout + self.settings.join_timeout,
                )
            except ValueError as error:
                # Nothing was sent: the job does not fit in one frame.
                logger.warning(
                    "unique job for %s inserted here, not on its owner %s: %s",
                    job.worker,
                    owner,
                    error,
                )
                return self.insert_owned(job, insert_here, check=False)
            except NotDelivered as error:
                logger.warning(
                    "unique job for %s not sent to its owner %s: %s",
                    job.worker,
                    owner,
                    error,
                )
                continue
            except ChannelError as error:
                # The owner may have inserted the job before the reply was
                # lost, so inserting it elsewhere could make two.
                raise _InsertInDoubt(
                    f"unique job for {job.worker} was sent to its owner peer "
                    f"{owner}, which did not answer: {error}. It may have been "
                    "inserted there, so it was not inserted on another peer; "
                    f"look for it on {owner} before inserting it again"
                ) from None
            if reply.get("error") == "leaving":
                # Its leave request may not have arrived yet. Noting it now
                # makes the next owner wait for the entries it hands over.
                self._on_leave(owner)
                continue
            if "refused" in reply:
                logger.warning(
                    "peer %s rejected unique job for %s: %s; trying the next peer",
                    owner,
                    job.worker,
                    reply["refused"],
                )
                continue
            if "error" in reply:
                raise _InsertInDoubt(
                    f"peer {owner} failed to insert the job: {reply['error']}"
                )
            return _apply_reply(job, reply)
        return self.insert_owned(job, insert_here, check=False)

    def insert_owned(
        self, job: Job, insert_here: InsertHere, *, check: bool = True
    ) -> Job:
        """Insert a unique job that this peer owns, with `insert_here`.

        Before the duplicate check, an entry for a job on another peer gets
        that job's current state from it. With `check`, the duplicate check
        also makes sure that this peer still owns the fingerprint, and
        sends the job to its owner if another peer has joined since.
        Without it, the job is inserted here as the last resort.
        """
        self._await_hand_overs()
        key = fingerprint(job)
        entry = self.instance._unique.peek(key)
        # A final state no longer changes, so only a waiting or executing
        # job is asked about.
        if isinstance(entry, RemoteEntry) and not entry.state.is_final:
            self._refresh(key, entry)
        inserted = insert_here(job, self._owns if check else None)
        if inserted is not None:
            return inserted
        # A peer that joined after this one was chosen now owns the
        # fingerprint, and this peer's entry for it has moved there.
        logger.debug("unique job for %s goes to the peer that just joined", job.worker)
        return self.insert_unique(job, insert_here)

    def _owns(self, key: str) -> bool:
        # Whether this peer owns fingerprint `key` among the members now.
        peers = self._owners()
        return bool(peers) and rendezvous_owner(key, peers) == self.peer_id

    def _owners(self) -> list[str]:
        # The peers that own fingerprints now: the members, and this peer
        # unless it is leaving.
        with self._lock:
            if self._leaving:
                return list(self._members)
            return [self.peer_id, *self._members]

    def _await_hand_overs(self) -> None:
        # Waits until each leaving member has handed over its unique entries,
        # some of which this peer may now own: at most until join_timeout
        # after its leave request. Later checks do not wait for it again.
        with self._lock:
            waits = list(self._departing.items())
        for peer_id, departing in waits:
            remaining = departing.deadline - time.monotonic()
            if departing.handed.wait(max(remaining, 0.0)):
                continue
            if not departing.handed.is_set():
                departing.handed.set()
                logger.warning(
                    "peer %s runs unique checks before leaving peer %s handed "
                    "over its unique entries",
                    self.peer_id,
                    peer_id,
                )

    def _refresh(self, key: str, entry: RemoteEntry) -> None:
        with self._lock:
            member = self._members.get(entry.holder)
            if member is None and entry.holder in self._departing:
                # It runs its last jobs during its grace period.
                member = self._departing[entry.holder].member
        state: object = None
        if entry.holder == self.peer_id:
            # The entry went to another owner while the job ran here, and
            # came back. A job that is no longer here has ended.
            job = None if entry.id is None else self.instance.get_job(entry.id)
            state = JobState.COMPLETED.value if job is None else job.state.value
        elif member is not None:
            try:
                reply = member.connection.request(
                    {"type": "job_state", "id": entry.id}, self.settings.request_timeout
                )
                # A job that the holder cannot find has ended and left its
                # retention, so it no longer waits or runs.
                state = reply.get("state") or JobState.COMPLETED.value
            except ChannelError as error:
                logger.warning(
                    "peer %s did not report the state of job %s: %s; its entry "
                    "keeps blocking duplicates",
                    entry.holder,
                    entry.id,
                    error,
                )
                return
        if state is None:
            # The holder is gone. A crash lost the job, and a graceful stop
            # handed a waiting job to its owner, which recorded it.
            self.instance._unique.discard(key, entry)
            return
        try:
            entry.state = JobState(str(state))
        except ValueError:
            logger.warning("peer %s reported an unknown state %r", entry.holder, state)

    def _receive_entries(
        self, sender: str, entries: list[Any], *, keep: bool = False
    ) -> None:
        # Stores the entries that this peer owns, or all of them with `keep`.
        # The sender may not know a member that joined lately, so an entry
        # that another member owns goes on to it before the reply, because a
        # leaving sender reports that it has handed everything over only
        # after the reply. A leaving peer takes no entries (see _dispatch),
        # so each step goes to a peer that ranks higher for the entry, or
        # drops one leaving peer from the sender's candidates: no loops.
        table = self.instance._unique
        timer = self.instance.clock.monotonic
        peers = self._owners()
        onward: dict[str, list[dict[str, Any]]] = {}
        for entry in entries:
            try:
                key, job, expires_in = _entry_from_wire(entry, sender)
            except (StagehandError, TypeError, ValueError) as error:
                logger.warning(
                    "peer %s sent an invalid unique entry, which was skipped: %s",
                    sender,
                    error,
                )
                continue
            if keep:
                table.put(key, job, timer() + expires_in)
                continue
            owner = rendezvous_owner(key, peers) if peers else self.peer_id
            if owner == sender and self.peer_id in peers:
                # A peer that is not leaving keeps the entries that it owns,
                # so the sender is leaving and its leave request has not
                # arrived yet. (If this peer has begun to leave meanwhile,
                # the entry goes back to the sender below.)
                self._on_leave(sender)
                peers = self._owners()
                owner = rendezvous_owner(key, peers) if peers else self.peer_id
            # The check runs again as the entry is stored, in case a peer has
            # joined since and taken the fingerprint over.
            if owner == self.peer_id and table.put(
                key, job, timer() + expires_in, self._owns
            ):
                continue
            peers = self._owners()
            if not peers:
                # This peer began to leave meanwhile and has no member left
                # to take the entry, so it keeps it as the last resort.
                table.put(key, job, timer() + expires_in)
                continue
            owner = rendezvous_owner(key, peers)
            onward.setdefault(owner, []).append({**entry, "holder": job.holder})
        for owner, group in onward.items():
            self._send_entries(owner, group)

    def _entries_owned_by(
        self, owners: list[str], keep: Callable[[str], bool], *, stopping: bool = False
    ) -> dict[str, list[dict[str, Any]]]:
        # Takes the unique entries whose owner among `owners` is not this
        # peer, grouped by owner, unless keep(owner) is true. During stop()
        # it also notes the entries of jobs still running here.
        table = self.instance._unique
        now = self.instance.clock.now()
        moving: dict[str, list[dict[str, Any]]] = {}
        for key, job in table.take(lambda key: not keep(ranked(key, owners)[0])):
            holder = job.holder if isinstance(job, RemoteEntry) else self.peer_id
            live: Job | None = job
            if isinstance(job, RemoteEntry) and holder == self.peer_id:
                # An entry that came back: its state dates from when it left,
                # and the job itself has the current one. A job that is no
                # longer here has ended, as in _refresh.
                live = None if job.id is None else self.instance.get_job(job.id)
                if live is None:
                    job.state = JobState.COMPLETED
            entry = _entry_to_wire(key, job if live is None else live, holder, now)
            if entry is None:
                continue
            if holder == self.peer_id and live is not None and not live.state.is_final:
                # Its state changes here still; see hand_over_entries.
                if stopping:
                    self._sent_running.append((key, live))
                else:
                    with self._lock:
                        self._moved_live[live.id] = (key, live)  # type: ignore[index]
            moving.setdefault(ranked(key, owners)[0], []).append(entry)
        return moving

    # Leaving

    def withdraw(self) -> None:
        """Stop taking new work: leave discovery and tell every member."""
        with self._lock:
            self._leaving = True
        self._stopping.set()
        self.leadership.set_leader(False)
        if self._discovery is not None:
            try:
                self._discovery.close()
            except Exception:
                logger.exception("withdrawing from mDNS discovery failed")
        self.broadcast({"type": "leave"})

    def handed(self) -> None:
        """Tell every member that this peer's queued jobs and entries are sent.

        stop() calls it after the first hand-over; the members hold their
        unique checks until it arrives.
        """
        self.broadcast({"type": "handed"})

    def hand_over(self, jobs: list[Job]) -> int:
        """Hand `jobs` to the members; return how many may be lost.

        A unique job goes to the new owner of its fingerprint, and another
        job to the members in turn. A job that a member refuses, or that
        could not be sent to it, goes to the next member in the same order
        that inserts follow. A batch whose delivery is in doubt is not sent
        again.
        """
        if not jobs:
            return 0
        with self._lock:
            order = sorted(self._members)
        if not order:
            return len(jobs)
        pending: list[tuple[Job, list[str]]] = []
        for job in jobs:
            if job.unique is not None:
                candidates = ranked(fingerprint(job), order)
            else:
                start = next(self._round_robin) % len(order)
                candidates = order[start:] + order[:start]
            pending.append((job, candidates))
        lost = 0
        while pending:
            groups: dict[str, list[tuple[Job, list[str]]]] = {}
            for job, candidates in pending:
                with self._lock:
                    while candidates and candidates[0] not in self._members:
                        del candidates[0]
                if not candidates:
                    logger.error("no peer took job %s; it is lost", job.id)
                    lost += 1
                    continue
                groups.setdefault(candidates[0], []).append((job, candidates))
            pending = []
            for peer_id, group in groups.items():
                for start in range(0, len(group), _BATCH):
                    batch = group[start : start + _BATCH]
                    retry, in_doubt = self._send_batch(peer_id, [j for j, _ in batch])
                    lost += in_doubt
                    for job, candidates in batch:
                        if job in retry:
                            del candidates[0]
                            pending.append((job, candidates))
        return lost

    def _send_batch(self, peer_id: str, batch: list[Job]) -> tuple[set[Job], int]:
        # Sends `batch` to one member. Returns the jobs to try on the next
        # member (refused, or certainly not sent) and the number of jobs
        # whose delivery is in doubt or that cannot be sent at all.
        with self._lock:
            member = self._members.get(peer_id)
        if member is None:
            return set(batch), 0
        try:
            reply = member.connection.request(
                {"type": "adopt", "jobs": [job_to_wire(job) for job in batch]},
                max(self.settings.request_timeout, 30.0),
            )
        except (TypeError, ValueError) as error:
            # Nothing was sent: the batch does not fit in one frame, or a
            # value in it cannot be encoded as JSON.
            if len(batch) == 1:
                logger.error(
                    "job %s is too large to hand to another peer, and is lost: %s",
                    batch[0].id,
                    error,
                )
                return set(), 1
            half = len(batch) // 2
            first_retry, first_lost = self._send_batch(peer_id, batch[:half])
            second_retry, second_lost = self._send_batch(peer_id, batch[half:])
            return first_retry | second_retry, first_lost + second_lost
        except NotDelivered as error:
            logger.warning(
                "%d jobs not sent to peer %s, which closed: %s; trying the next peer",
                len(batch),
                peer_id,
                error,
            )
            return set(batch), 0
        except ChannelError as error:
            logger.error(
                "handing %d jobs to peer %s failed, and they may be lost: %s; ids %s",
                len(batch),
                peer_id,
                error,
                [job.id for job in batch],
            )
            return set(), len(batch)
        results = reply.get("results")
        if not isinstance(results, list) or len(results) != len(batch):
            logger.error(
                "peer %s returned %r for the hand-over of %d jobs; they may be "
                "lost: ids %s",
                peer_id,
                reply.get("error", reply),
                len(batch),
                [job.id for job in batch],
            )
            return set(), len(batch)
        refused = {
            job
            for job, reason in zip(batch, results, strict=True)
            if reason is not None
        }
        for job, reason in zip(batch, results, strict=True):
            if reason is not None:
                logger.warning("peer %s rejected job %s: %s", peer_id, job.id, reason)
        logger.info("handed %d jobs to peer %s", len(batch) - len(refused), peer_id)
        return refused, 0

    def hand_over_entries(self) -> None:
        """Send the unique entries to their new owners among the members.

        stop() calls this twice: once before the grace period, so that the
        new owners check duplicates of the jobs still running here, and once
        after it. The second call also sends again the entries of jobs of
        this peer that ended meanwhile, with their final state.
        """
        with self._lock:
            order = sorted(self._members)
        if not order:
            return
        now = self.instance.clock.now()
        ended = [(key, job) for key, job in self._sent_running if job.state.is_final]
        self._sent_running = []
        with self._lock:
            for job_id, (key, job) in list(self._moved_live.items()):
                if job.state.is_final:
                    ended.append((key, job))
                    del self._moved_live[job_id]
        moving = self._entries_owned_by(order, lambda _: False, stopping=True)
        for key, job in ended:
            entry = _entry_to_wire(key, job, self.peer_id, now)
            if entry is not None:
                moving.setdefault(ranked(key, order)[0], []).append(entry)
        for owner, entries in moving.items():
            self._send_entries(owner, entries)

    def _send_entries(
        self,
        peer_id: str,
        entries: list[dict[str, Any]],
        *,
        tries: int = 3,
        failed: frozenset[str] = frozenset(),
    ) -> None:
        # In chunks that fit in a frame; an entry that fits in none is lost.
        # Entries whose owner has left, or closed before they reached it, go
        # to their owner among the members that remain. A peer that left
        # while this one was leaving sent it no leave message, so a closed
        # connection is how this peer learns of it.
        if not entries:
            return
        with self._lock:
            member = self._members.get(peer_id)
        undelivered: list[dict[str, Any]] = []
        if member is not None and peer_id not in failed:
            for start in range(0, len(entries), _ENTRY_BATCH):
                undelivered += self._send_entry_chunk(
                    member, entries[start : start + _ENTRY_BATCH]
                )
            if not undelivered:
                return
        else:
            undelivered = entries
        with self._lock:
            order = sorted(set(self._members) - failed - {peer_id})
            if not self._leaving:
                # Entries whose new owner has gone may belong here again.
                order.append(self.peer_id)
        if not order or tries == 0:
            logger.warning(
                "%d unique entries not handed to peer %s, which left",
                len(undelivered),
                peer_id,
            )
            return
        regrouped: dict[str, list[dict[str, Any]]] = {}
        for entry in undelivered:
            owner = ranked(entry["fingerprint"], order)[0]
            regrouped.setdefault(owner, []).append(entry)
        own = regrouped.pop(self.peer_id, None)
        if own is not None:
            self._receive_entries(self.peer_id, own, keep=True)
        for owner, group in regrouped.items():
            self._send_entries(owner, group, tries=tries - 1, failed=failed | {peer_id})

    def _send_entry_chunk(
        self, member: _Member, entries: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        # Returns the entries that may not have reached the member, because
        # its connection closed or it failed to store them.
        try:
            reply = member.connection.request(
                {"type": "entries", "entries": entries}, self.settings.request_timeout
            )
        except (TypeError, ValueError) as error:
            # Nothing was sent: too large, or not encodable as JSON.
            if len(entries) == 1:
                logger.warning(
                    "the unique entry of job %s is too large to hand to peer %s: %s",
                    entries[0]["job"]["id"],
                    member.peer_id,
                    error,
                )
                return []
            half = len(entries) // 2
            return self._send_entry_chunk(
                member, entries[:half]
            ) + self._send_entry_chunk(member, entries[half:])
        except ChannelError as error:
            # They may have arrived before the connection closed, but an
            # entry held by two peers is harmless, unlike a job run twice,
            # so they go to the next owner.
            logger.info(
                "%d unique entries may not have reached peer %s: %s",
                len(entries),
                member.peer_id,
                error,
            )
            return entries
        if reply.get("error") == "leaving":
            # Its leave request may not have arrived yet.
            self._on_leave(member.peer_id)
            return entries
        if "error" in reply:
            logger.warning(
                "peer %s failed to store %d unique entries: %s; they go to the "
                "next owner",
                member.peer_id,
                len(entries),
                reply["error"],
            )
            return entries
        return []

    def _move_entries_to(self, member: _Member) -> None:
        # Sends `member` the entries it owns now that it is a member.
        with self._lock:
            owners = [self.peer_id, *self._members]
        moving = self._entries_owned_by(owners, lambda owner: owner != member.peer_id)
        self._send_entries(member.peer_id, moving.get(member.peer_id, []))
        self._send_moved_ended(owners)

    def _send_moved_ended(self, owners: list[str]) -> None:
        # Sends the final state of each job in _moved_live that has ended to
        # the owner of its entry, so that _moved_live keeps only jobs that
        # still wait or run. An entry that this peer owns again needs none:
        # _refresh reads the job here.
        now = self.instance.clock.now()
        ended: dict[str, list[dict[str, Any]]] = {}
        with self._lock:
            for job_id, (key, job) in list(self._moved_live.items()):
                if not job.state.is_final:
                    continue
                del self._moved_live[job_id]
                owner = ranked(key, owners)[0]
                entry = _entry_to_wire(key, job, self.peer_id, now)
                if owner != self.peer_id and entry is not None:
                    ended.setdefault(owner, []).append(entry)
        for owner, entries in ended.items():
            self._send_entries(owner, entries)

    def close(self) -> None:
        """Close every connection and the channel server; again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            members = list(self._members.values())
            self._members.clear()
            departing = list(self._departing.values())
            self._departing.clear()
        for leaving in departing:
            leaving.handed.set()
            members.append(leaving.member)
        # Ends the waits of routed inserts that came before the join ended.
        self._synced.set()
        self._stopping.set()
        if self._discovery is not None:
            try:
                self._discovery.close()
            except Exception:
                logger.exception("closing mDNS discovery failed")
        for member in members:
            member.connection.close()
        self._server.close()

    # Requests from other peers

    def _handle(self, peer_id: str, message: dict[str, Any]) -> dict[str, Any] | None:
        kind = message.get("type")
        try:
            return self._dispatch(peer_id, kind, message)
        except _Malformed as error:
            # An authenticated peer that sends this runs another version or
            # has a bug; its request changes nothing here.
            logger.warning(
                "peer %s sent a malformed %r request: %s", peer_id, kind, error
            )
            return {"error": f"malformed {kind!r} request: {error}"}

    def _dispatch(
        self, peer_id: str, kind: object, message: dict[str, Any]
    ) -> dict[str, Any]:
        if kind == "join":
            return self._on_join(peer_id, message)
        if kind == "leave":
            return self._on_leave(peer_id)
        if kind == "handed":
            with self._lock:
                departing = self._departing.get(peer_id)
            if departing is not None:
                departing.handed.set()
            return {}
        if kind == "insert":
            return self._on_insert(message)
        if kind == "adopt":
            return self._on_adopt(message)
        if kind == "entries":
            with self._lock:
                leaving = self._leaving
            if leaving:
                # The sender passes them to the next owner instead.
                return {"error": "leaving"}
            self._receive_entries(peer_id, _list(message, "entries"))
            return {}
        if kind == "state":
            self.leadership.receive_state(_text(message, "key"), message.get("value"))
            return {}
        if kind == "status":
            return self.local_status()
        if kind == "job_state":
            job = self.instance.get_job(_text(message, "id"))
            return {"state": None if job is None else job.state.value}
        return {"error": f"unknown request type {kind!r}"}

    def _on_join(self, peer_id: str, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            leaving = self._leaving
        if leaving:
            return {"error": "leaving"}
        _, address = _peer_entry([peer_id, *_list(message, "address")])
        with self._lock:
            member = self._members.get(peer_id)
        if member is None:
            member = self._connect(address)
        if member is None:
            return {"error": "cannot connect back to the joining peer"}
        # Before the reply, so that the joining peer has its entries when
        # its start() returns. They go in requests of their own, because
        # together they may not fit in one frame.
        self._move_entries_to(member)
        with self._lock:
            peers = [
                [other.peer_id, *other.address]
                for other in self._members.values()
                if other.peer_id != peer_id
            ]
        self._update_leader()
        return {"peers": peers, "state": self.leadership.state()}

    def _on_leave(self, peer_id: str) -> dict[str, Any]:
        with self._lock:
            member = self._members.pop(peer_id, None)
            self._list_lost = True
            if member is not None and not self._closed:
                # Kept open until the leaving peer closes it: its entries
                # and jobs arrive after this request, and it still reports
                # the state of the jobs it finishes.
                self._departing[peer_id] = _Departing(
                    member, time.monotonic() + self.settings.join_timeout
                )
        if member is not None:
            logger.info("peer %s is leaving the cluster", peer_id)
            self._emit_peer("peer.leave", peer_id)
            self._update_leader()
        return {}

    def _on_insert(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            leaving = self._leaving
        if leaving:
            return {"error": "leaving"}
        if not self._synced.wait(self.settings.join_timeout):
            logger.warning(
                "peer %s runs a unique check before its join finished", self.peer_id
            )
        data = _dict(message, "job")
        job = _new_job_from_wire(data)
        hops = message.get("hops", 0)
        if not isinstance(hops, int) or isinstance(hops, bool):
            raise _Malformed(f"hops must be an int; got {hops!r}")
        owned = False
        if job.unique is not None and hops < _MAX_HOPS:
            # The sender's view of the members may lag behind this one's.
            forwarded, owned = self._forward(job, data, hops)
            if forwarded is not None:
                return forwarded
        try:
            inserted = self.instance._insert_here(job, owned)
        except (NotRunning, ShuttingDown):
            # stop() began after the check above: the sender tries the next
            # peer in line.
            return {"error": "leaving"}
        except _InsertInDoubt as error:
            # Sent on to an owner that joined since, which did not reply, so
            # the sender must not insert the job on another peer either.
            return {"error": str(error)}
        except (StagehandError, TypeError, ValueError) as error:
            # For example a queue that this peer lacks: the sender tries the
            # next peer in line.
            return {"refused": f"{type(error).__name__}: {error}"}
        return _insert_reply(inserted)

    def _forward(
        self, job: Job, data: dict[str, Any], hops: int
    ) -> tuple[dict[str, Any] | None, bool]:
        # Sends a routed insert on to the owner that this peer sees, if it
        # is another member, and returns its reply. Without a reply, this
        # peer inserts the job, and the flag is True if it does so as the
        # owner, False if as the last resort.
        try:
            key = fingerprint(job)
        except (KeyError, TypeError, ValueError):
            # Invalid unique settings: the insert here raises the error.
            return None, False
        with self._lock:
            owner = ranked(key, [self.peer_id, *self._members])[0]
            member = self._members.get(owner)
        if member is None:
            return None, True
        try:
            reply = member.connection.request(
                {"type": "insert", "job": data, "hops": hops + 1},
                self.settings.request_timeout + self.settings.join_timeout,
            )
        except NotDelivered:
            # It closed: once it is gone, the next owner takes the job.
            return None, True
        except ChannelError as error:
            return {"error": f"peer {owner} did not answer: {error}"}, False
        if reply.get("error") == "leaving":
            self._on_leave(owner)
            return None, True
        if "refused" in reply:
            # The owner cannot take it, so this peer, next in line for the
            # sender, does.
            return None, False
        return reply, False

    def _on_adopt(self, message: dict[str, Any]) -> dict[str, Any]:
        results: list[str | None] = []
        for data in _list(message, "jobs"):
            try:
                self.instance._adopt(job_from_wire(data))
            except (StagehandError, TypeError, ValueError) as error:
                results.append(f"{type(error).__name__}: {error}")
            else:
                results.append(None)
        return {"results": results}


# How many times a routed insert may be sent on to a peer that owns it in
# the view of the peer that received it.
_MAX_HOPS = 2

_NEW_JOB_FIELDS = (
    "worker",
    "queue",
    "args",
    "meta",
    "tags",
    "priority",
    "max_attempts",
    "unique",
    "schedule_in",
)


def _new_job_to_wire(job: Job) -> dict[str, Any]:
    data = {name: getattr(job, name) for name in _NEW_JOB_FIELDS}
    data["tags"] = list(job.tags)
    scheduled_at = job.scheduled_at
    data["scheduled_at"] = None if scheduled_at is None else scheduled_at.isoformat()
    return data


def _new_job_from_wire(data: dict[str, Any]) -> Job:
    # The insert on this peer checks every field, as it checks a Job(...)
    # built by hand; this checks only what building the Job needs.
    missing = [name for name in (*_NEW_JOB_FIELDS, "scheduled_at") if name not in data]
    if missing:
        raise _Malformed(f"the job lacks {missing}")
    if not isinstance(data["tags"], list):
        raise _Malformed(f"tags must be a list; got {data['tags']!r}")
    scheduled_at = _parse_time(data["scheduled_at"])
    return Job(
        worker=data["worker"],
        args=data["args"],
        queue=data["queue"],
        meta=data["meta"],
        tags=tuple(data["tags"]),
        priority=data["priority"],
        max_attempts=data["max_attempts"],
        unique=data["unique"],
        schedule_in=data["schedule_in"],
        scheduled_at=scheduled_at,
    )


def _insert_reply(inserted: Job) -> dict[str, Any]:
    # Only what the inserting peer sets on its Job, so that the reply stays
    # small however large the job's args are.
    return {
        "job": {
            "id": inserted.id,
            "state": inserted.state.value,
            "attempt": inserted.attempt,
            "inserted_at": _iso(inserted.inserted_at),
            "scheduled_at": _iso(inserted.scheduled_at),
        },
        "conflict": inserted.conflict,
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _apply_reply(job: Job, reply: dict[str, Any]) -> Job:
    # The job was inserted on its owner. The caller's Job shows the id,
    # state and times it got there; it does not follow later changes.
    data = reply["job"]
    target = job
    if reply.get("conflict"):
        target = job.snapshot()
        target.conflict = True
    target.id = data["id"]
    target.state = JobState(data["state"])
    target.attempt = data["attempt"]
    target.inserted_at = _parse_time(data["inserted_at"])
    target.scheduled_at = _parse_time(data["scheduled_at"])
    return target


def _entry_from_wire(entry: object, sender: str) -> tuple[str, RemoteEntry, float]:
    # A unique entry for a job on another peer: its fingerprint, a detached
    # record of the job for the duplicate check and for the copy that a
    # conflicting insert returns, and the seconds it has left.
    if not isinstance(entry, dict):
        raise _Malformed(f"an entry must be an object; got {entry!r}")
    key = _text(entry, "fingerprint")
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise _Malformed(f"fingerprint must be 64 hex digits; got {key!r}")
    expires_in = entry.get("expires_in")
    if (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, (int, float))
        or not 0 < expires_in <= 1e9
    ):
        raise _Malformed(f"expires_in must be seconds > 0; got {expires_in!r}")
    holder = entry.get("holder", sender)
    if not isinstance(holder, str) or not holder:
        raise _Malformed(f"holder must be a peer id; got {holder!r}")
    data = _dict(entry, "job")
    unique = _options.normalize_unique(data.get("unique"))
    if unique is None:
        raise _Malformed("the entry's job has no unique settings")
    job = RemoteEntry(
        worker=_text(data, "worker"),
        args=_options.normalize_json_dict(data.get("args"), "args"),
        queue=_text(data, "queue"),
        meta=_options.normalize_json_dict(data.get("meta"), "meta"),
        state=JobState(_text(data, "state")),
        id=_text(data, "id"),
        inserted_at=_parse_time(data.get("inserted_at")),
        unique=unique,
    )
    job.holder = holder
    return key, job, float(expires_in)


class _InsertInDoubt(StagehandError):
    """A routed insert whose owner may have inserted the job, or may not."""


class _Malformed(ValueError):
    """A request or reply from a peer lacks a field or has a wrong type."""


def _list(message: dict[str, Any], key: str) -> list[Any]:
    value = message.get(key)
    if not isinstance(value, list):
        raise _Malformed(f"{key!r} must be a list; got {value!r}")
    return value


def _dict(message: dict[str, Any], key: str) -> dict[str, Any]:
    value = message.get(key)
    if not isinstance(value, dict):
        raise _Malformed(f"{key!r} must be an object; got {value!r}")
    return value


def _text(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value:
        raise _Malformed(f"{key!r} must be a non-empty string; got {value!r}")
    return value


def _peer_entry(entry: object) -> tuple[str, tuple[str, int]]:
    # [peer id, IPv4 host, port], as join requests and replies carry them.
    if not isinstance(entry, list) or len(entry) != 3:
        raise _Malformed(f"a peer must be [id, host, port]; got {entry!r}")
    peer_id, host, port = entry
    if not isinstance(peer_id, str) or not isinstance(host, str):
        raise _Malformed(f"a peer must be [id, host, port]; got {entry!r}")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise _Malformed(
            f"a peer's host must be an IPv4 address; got {host!r}"
        ) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise _Malformed(f"a peer's port must be 1 to 65535; got {port!r}")
    return peer_id, (host, port)


def _entry_to_wire(
    key: str, job: Job, holder: str, now: datetime
) -> dict[str, Any] | None:
    # None for an entry that has expired or has no unique settings.
    expires_in = _expires_in(job, now)
    if expires_in is None:
        return None
    return {
        "fingerprint": key,
        "expires_in": expires_in,
        "holder": holder,
        "job": job.to_dict(),
    }


def _expires_in(job: Job, now: datetime) -> float | None:
    # Seconds the entry has left, its period counted from the insert, or
    # None for an entry that should not move. An entry without expiry gets a
    # billion seconds, since JSON has no infinity.
    if job.unique is None:
        return None
    period = job.unique["period"]
    if period is None or job.inserted_at is None:
        return 1e9
    left = float(period) - (now - job.inserted_at).total_seconds()
    return left if left > 0 else None


def _parse_time(value: object) -> Any:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Malformed(f"a time must be an ISO 8601 string; got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Malformed(f"not an ISO 8601 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise _Malformed(f"a time must have a UTC offset; got {value!r}")
    return parsed

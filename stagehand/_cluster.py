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
- Joining: a new peer sends ``join`` to each peer it finds. Each answers
  with the unique entries that the new peer now owns and the peers it
  knows. Unique inserts routed to the new peer wait until those answers
  are in, for at most ``join_timeout`` seconds.
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

from stagehand import _options
from stagehand._channel import (
    ChannelError,
    ChannelServer,
    Connection,
    NotDelivered,
    connect,
)
from stagehand._job import Job, JobState
from stagehand._leadership import Leadership
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
# Seconds between the attempts to join a peer again after its connection
# was lost; about 7.6 s in all.
_REJOIN_DELAYS = (0.1, 0.5, 1.0, 2.0, 4.0)
# Jobs per adopt request: about 300 bytes each in JSON, well under the
# channel's frame limit of 1 MiB.
_BATCH = 1000


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
        secret = secret.encode()
    if not isinstance(secret, bytes) or len(secret) < 16:
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
        number = int(port)
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
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise InvalidOption(f"cluster {key} must be seconds > 0; got {seconds!r}")
    return float(seconds)


class _Member:
    """A peer this one has a connection to."""

    __slots__ = ("address", "connection", "peer_id")

    def __init__(self, peer_id: str, address: tuple[str, int], connection: Connection):
        self.peer_id = peer_id
        self.address = address
        self.connection = connection


class ClusterLeadership(Leadership):
    """Leadership by the smallest peer id among the members."""

    def __init__(self, cluster: Cluster):
        super().__init__()
        self._cluster = cluster
        self._state: dict[str, Any] = {}

    def load_state(self, key: str) -> Any:
        return self._state.get(key)

    def save_state(self, key: str, value: Any) -> None:
        self._state[key] = value
        # In a thread of its own: the caller (cron) holds its lock, and a
        # slow member would hold it up.
        threading.Thread(
            target=self._cluster.broadcast,
            args=({"type": "state", "key": key, "value": value},),
            name="stagehand-cluster-state",
            daemon=True,
        ).start()

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
        self._members: dict[str, _Member] = {}
        # Addresses being joined, so that two discoveries of one peer make
        # one connection.
        self._joining: set[tuple[str, int]] = set()
        self._joins_done = threading.Condition(self._lock)
        self._leaving = False
        self._synced = threading.Event()
        self._closed = False
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
        )
        self._discovery: ZeroconfDiscovery | None = None
        self._round_robin = itertools.count()

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

    def survey(self) -> list[dict[str, Any]]:
        """Ask every member for its `local_status`; add this peer's own.

        A member that does not reply is listed with its ``error``.
        """
        with self._lock:
            members = list(self._members.values())
        statuses = [self.local_status()]
        for member in members:
            try:
                statuses.append(
                    member.connection.request(
                        {"type": "status"}, self.settings.request_timeout
                    )
                )
            except ChannelError as error:
                statuses.append({"peer": member.peer_id, "error": str(error)})
        return sorted(statuses, key=lambda status: status["peer"])

    def members(self) -> list[str]:
        """Return the peer ids of the members, not counting this peer."""
        with self._lock:
            return sorted(self._members)

    def leader(self) -> str:
        """Return the peer id of the current leader."""
        with self._lock:
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
            reply = member.connection.request(
                {"type": "join", "address": [host, port]},
                self.settings.request_timeout,
            )
        except ChannelError as error:
            logger.warning("peer %s did not answer join: %s", member.peer_id, error)
            self._drop(member)
            return
        if "error" in reply:
            # The peer is leaving, or failed to handle the join.
            logger.info("peer %s declined the join: %s", member.peer_id, reply["error"])
            self._drop(member)
            return
        try:
            self._receive_entries(member.peer_id, _list(reply, "entries"))
            for key, value in _dict(reply, "state").items():
                if self.leadership.load_state(key) is None:
                    self.leadership.receive_state(key, value)
            peers = [_peer_entry(entry) for entry in _list(reply, "peers")]
        except _Malformed as error:
            logger.warning(
                "peer %s sent a malformed join reply: %s", member.peer_id, error
            )
            return
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
            logger.warning("cannot reach the peer at %s:%d: %s", *address, error)
            return None
        peer_id = connection.remote_peer_id
        member = _Member(peer_id, address, connection)
        with self._lock:
            existing = self._members.get(peer_id)
            if peer_id != self.peer_id and existing is None and not self._closed:
                self._members[peer_id] = member
                holder.append(member)
        if not holder:
            connection.close()
            return existing
        logger.info("peer %s joined peer %s at %s:%d", self.peer_id, peer_id, *address)
        return member

    def _lost(self, member: _Member) -> None:
        # In the connection's reader thread, once it has closed. A member
        # that said it is leaving was removed before, so this one is gone
        # without a word: dead, or cut off. Joining it again tells which.
        with self._lock:
            if self._members.get(member.peer_id) is not member:
                return
            del self._members[member.peer_id]
            stopping = self._closed or self._leaving
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
        if not self._synced.is_set() or self._closed:
            return
        self.leadership.set_leader(self.leader() == self.peer_id and not self._leaving)

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

    def insert_unique(self, job: Job, insert_here: Callable[[Job], Job]) -> Job:
        """Insert a validated unique job on the peer that owns its fingerprint.

        Falls back to the next peer in rendezvous order when the owner
        cannot be reached, and to this peer last.
        """
        key = fingerprint(job)
        with self._lock:
            candidates = [self.peer_id, *self._members]
        for owner in ranked(key, candidates):
            if owner == self.peer_id:
                return self.insert_owned(job, insert_here)
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
                return self.insert_owned(job, insert_here)
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
                raise StagehandError(
                    f"unique job for {job.worker} was sent to its owner peer "
                    f"{owner}, which did not answer: {error}. It may have been "
                    "inserted there, so it was not inserted on another peer; "
                    f"look for it on {owner} before inserting it again"
                ) from None
            if reply.get("error") == "leaving":
                continue
            if "refused" in reply:
                logger.warning(
                    "peer %s refused unique job for %s: %s; trying the next peer",
                    owner,
                    job.worker,
                    reply["refused"],
                )
                continue
            if "error" in reply:
                raise StagehandError(
                    f"peer {owner} failed to insert the job: {reply['error']}"
                )
            return _apply_reply(job, reply)
        return self.insert_owned(job, insert_here)

    def insert_owned(self, job: Job, insert_here: Callable[[Job], Job]) -> Job:
        """Insert a unique job that this peer owns, with `insert_here`.

        Before the duplicate check, an entry for a job on another peer gets
        that job's current state from it.
        """
        key = fingerprint(job)
        entry = self.instance._unique.peek(key)
        if isinstance(entry, RemoteEntry):
            self._refresh(key, entry)
        return insert_here(job)

    def _refresh(self, key: str, entry: RemoteEntry) -> None:
        with self._lock:
            member = self._members.get(entry.holder)
        state: object = None
        if member is not None:
            try:
                reply = member.connection.request(
                    {"type": "job_state", "id": entry.id}, self.settings.request_timeout
                )
                state = reply.get("state")
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
            # The holder is gone (a crash loses its jobs; a graceful stop
            # hands unique jobs to their owner, which records them), or the
            # job ended and left its retention.
            self.instance._unique.discard(key, entry)
            return
        try:
            entry.state = JobState(str(state))
        except ValueError:
            logger.warning("peer %s reported an unknown state %r", entry.holder, state)

    def _receive_entries(self, sender: str, entries: list[Any]) -> None:
        table = self.instance._unique
        timer = self.instance.clock.monotonic
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
            table.put(key, job, timer() + expires_in)

    def _entries_owned_by(
        self, owners: list[str], keep: Callable[[str], bool]
    ) -> dict[str, list[dict[str, Any]]]:
        # Takes the unique entries whose owner among `owners` is not this
        # peer, grouped by owner, unless keep(owner) is true.
        table = self.instance._unique
        now = self.instance.clock.now()
        moving: dict[str, list[dict[str, Any]]] = {}
        for key, job in table.take(lambda key: not keep(ranked(key, owners)[0])):
            expires_in = _expires_in(job, now)
            if expires_in is None:
                continue
            owner = ranked(key, owners)[0]
            holder = job.holder if isinstance(job, RemoteEntry) else self.peer_id
            moving.setdefault(owner, []).append(
                {
                    "fingerprint": key,
                    "expires_in": expires_in,
                    "holder": holder,
                    "job": job.to_dict(),
                }
            )
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

    def hand_over(self, jobs: list[Job]) -> int:
        """Hand `jobs` to the members; return how many may be lost.

        Unique jobs go to the new owner of their fingerprint, others in turn.
        A batch that a member rejects as a whole goes to the next member;
        a batch whose delivery is in doubt is not sent again.
        """
        with self._lock:
            members = dict(self._members)
        if not jobs:
            return 0
        if not members:
            return len(jobs)
        order = sorted(members)
        groups: dict[str, list[Job]] = {}
        for job in jobs:
            if job.unique is not None:
                owner = ranked(fingerprint(job), order)[0]
            else:
                owner = order[next(self._round_robin) % len(order)]
            groups.setdefault(owner, []).append(job)
        lost = 0
        for owner, group in groups.items():
            for start in range(0, len(group), _BATCH):
                batch = group[start : start + _BATCH]
                lost += self._send_batch(batch, owner, order)
        return lost

    def _send_batch(self, batch: list[Job], owner: str, order: list[str]) -> int:
        # Tries `owner` first, then the others, while a member refuses jobs
        # for certain; returns the number of jobs that may be lost.
        pending = batch
        tried: list[str] = []
        for peer_id in [owner, *(p for p in order if p != owner)]:
            with self._lock:
                member = self._members.get(peer_id)
            if member is None:
                continue
            tried.append(peer_id)
            try:
                reply = member.connection.request(
                    {"type": "adopt", "jobs": [job_to_wire(job) for job in pending]},
                    max(self.settings.request_timeout, 30.0),
                )
            except ValueError as error:
                # Nothing was sent: the batch does not fit in one frame.
                if len(pending) == 1:
                    logger.error(
                        "job %s is too large to hand to another peer, and is lost: %s",
                        pending[0].id,
                        error,
                    )
                    return 1
                half = len(pending) // 2
                return self._send_batch(
                    pending[:half], peer_id, order
                ) + self._send_batch(pending[half:], peer_id, order)
            except ChannelError as error:
                logger.error(
                    "handing %d jobs to peer %s failed, and they may be lost: %s; "
                    "ids %s",
                    len(pending),
                    peer_id,
                    error,
                    [job.id for job in pending],
                )
                return len(pending)
            results = reply.get("results")
            if not isinstance(results, list) or len(results) != len(pending):
                logger.error(
                    "peer %s answered the hand-over of %d jobs with %r; they may "
                    "be lost: ids %s",
                    peer_id,
                    len(pending),
                    reply.get("error", reply),
                    [job.id for job in pending],
                )
                return len(pending)
            refused = [
                (job, reason)
                for job, reason in zip(pending, results, strict=True)
                if reason is not None
            ]
            for job, reason in refused:
                logger.warning("peer %s refused job %s: %s", peer_id, job.id, reason)
            logger.info(
                "handed %d jobs to peer %s", len(pending) - len(refused), peer_id
            )
            pending = [job for job, _ in refused]
            if not pending:
                return 0
        logger.error(
            "no peer took %d jobs (tried %s); they are lost: ids %s",
            len(pending),
            tried,
            [job.id for job in pending],
        )
        return len(pending)

    def hand_over_entries(self) -> None:
        """Send the unique entries to their new owners among the members."""
        with self._lock:
            order = sorted(self._members)
        if not order:
            return
        for owner, entries in self._entries_owned_by(order, lambda _: False).items():
            with self._lock:
                member = self._members.get(owner)
            if member is None:
                continue
            try:
                member.connection.request(
                    {"type": "entries", "entries": entries},
                    self.settings.request_timeout,
                )
            except ChannelError as error:
                logger.warning(
                    "%d unique entries not handed to peer %s: %s",
                    len(entries),
                    owner,
                    error,
                )

    def close(self) -> None:
        """Close every connection and the channel server."""
        with self._lock:
            self._closed = True
            members = list(self._members.values())
            self._members.clear()
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
        if kind == "insert":
            return self._on_insert(message)
        if kind == "adopt":
            return self._on_adopt(message)
        if kind == "entries":
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
            known = peer_id in self._members
        if not known:
            self._connect(address)
        with self._lock:
            owners = [self.peer_id, *self._members]
            peers = [
                [member.peer_id, *member.address]
                for member in self._members.values()
                if member.peer_id != peer_id
            ]
        entries = self._entries_owned_by(owners, lambda owner: owner != peer_id)
        self._update_leader()
        return {
            "entries": entries.get(peer_id, []),
            "peers": peers,
            "state": self.leadership.state(),
        }

    def _on_leave(self, peer_id: str) -> dict[str, Any]:
        with self._lock:
            member = self._members.pop(peer_id, None)
        if member is not None:
            logger.info("peer %s is leaving the cluster", peer_id)
            # Closed after the reply, so the leaving peer's request returns.
            threading.Thread(target=member.connection.close, daemon=True).start()
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
        job = _new_job_from_wire(_dict(message, "job"))
        try:
            inserted = self.instance._insert_here(job)
        except (NotRunning, ShuttingDown):
            # stop() began after the check above: the sender tries the next
            # peer in line.
            return {"error": "leaving"}
        except (StagehandError, TypeError, ValueError) as error:
            # For example a queue that this peer lacks: the sender tries the
            # next peer in line.
            return {"refused": f"{type(error).__name__}: {error}"}
        return {"job": inserted.to_dict(), "conflict": inserted.conflict}

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

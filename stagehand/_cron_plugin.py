"""The Cron plugin: inserts jobs on cron schedules, on the leader only.

One thread per plugin sleeps on the instance clock until the earliest next
slot of its entries, then inserts one job for each entry that is due. Each
job is unique per entry and slot, so a leader change, or two leaders for a
moment, cannot double a run. docs/cron.md describes the settings and what
happens to slots missed while the thread was held up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from stagehand._cron import CronExpression, parse
from stagehand._job import Job, JobState
from stagehand._worker import Worker, resolve_worker
from stagehand.exceptions import (
    InvalidCronExpression,
    InvalidOption,
    QueueNotConfigured,
    ShuttingDown,
    UnknownWorker,
)
from stagehand.plugins import Plugin

if TYPE_CHECKING:
    from stagehand._instance import Stagehand

__all__ = ["Cron", "CronEntry"]

logger = logging.getLogger(__name__)

#: Seconds a slot's fingerprint blocks a second insert of the same slot.
# NOTE: a slot caught up more than this late, that another leader already
# ran, runs twice: its fingerprint has expired by then.
UNIQUE_PERIOD = 24 * 3600.0
#: Seconds `Cron.stop` waits for the cron thread to end.
JOIN_TIMEOUT = 10.0

PLUGIN_OPTIONS = ("crontab", "timezone")
ENTRY_OPTIONS = (
    "args",
    "max_attempts",
    "meta",
    "priority",
    "queue",
    "tags",
    "timezone",
)
RESERVED_META = ("cron", "cron_entry", "cron_expr", "cron_slot")
_REJECTED_OPTIONS = {
    "unique": "the plugin makes each job unique per entry and slot itself",
    "schedule_in": "a cron job is inserted when its slot comes",
    "scheduled_at": "a cron job is inserted when its slot comes",
}
_UNIQUE = {
    "period": UNIQUE_PERIOD,
    "fields": ["worker", "queue", "meta"],
    "keys": ["cron_entry", "cron_slot"],
    "states": [state.value for state in JobState],
}
_MINUTE = timedelta(minutes=1)
_TINY = timedelta(microseconds=1)
# Key of the cron cursor in the state that leaders share.
_STATE_KEY = "cron.cursor"


@dataclass(frozen=True, slots=True, kw_only=True)
class CronEntry:
    """One validated crontab entry.

    Attributes:
        index: Position in the crontab, used in messages.
        cron: The parsed expression, bound to the entry's time zone.
        worker: The worker class.
        args: The job's args, as the worker will see them.
        meta: The user's meta, without the keys the plugin adds.
        options: The other `Worker.new` options given for the entry.
        queue: The queue the jobs go to.
        key: Identifies the entry among peers: a digest of the expression,
            time zone and args (worker and queue are fingerprinted apart).
    """

    index: int
    cron: CronExpression
    worker: type[Worker]
    args: dict[str, Any]
    meta: dict[str, Any]
    options: Mapping[str, Any]
    queue: str
    key: str

    @property
    def label(self) -> str:
        """``crontab[i] 'expression' (worker path)``, for messages."""
        path = self.worker._stagehand_path
        return f"crontab[{self.index}] {self.cron.expression!r} ({path})"

    def build(self, slot: datetime) -> Job:
        """Return the unsaved job for `slot`, an aware UTC datetime."""
        meta = {
            **self.meta,
            "cron": True,
            "cron_expr": self.cron.expression,
            "cron_entry": self.key,
            "cron_slot": slot.isoformat(),
        }
        return self.worker.new(self.args, **self.options, meta=meta, unique=_UNIQUE)


class Cron(Plugin):
    """Inserts a job for each crontab entry at each of its slots.

    Options (validated when the `Stagehand` instance is built):
        crontab: Required list of ``(expression, worker)`` or
            ``(expression, worker, options)`` entries. The worker is a
            `Worker` subclass or its dotted path. Options are the
            `Worker.new` options queue, max_attempts, priority, tags and
            meta, plus "args" (the job's args, default ``{}``) and
            "timezone" (overrides the plugin's).
        timezone: IANA zone name or `tzinfo` in which expressions are
            read. Defaults to None, meaning UTC.

    The cron thread, ``stagehand-cron-<instance name>``, inserts only while
    ``instance.leadership.is_leader`` is true. Jobs carry the meta keys
    "cron" (True), "cron_expr", "cron_entry" and "cron_slot" (the slot as
    UTC ISO 8601).
    """

    def __init__(self, instance: Stagehand, options: Mapping[str, Any]):
        super().__init__(instance, options)
        self._entries: tuple[CronEntry, ...] = tuple(options["crontab"])
        _check_queues(self._entries, instance)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._alive = False
        self._stopping = False
        self._leader = False
        self._cursor = datetime.min.replace(tzinfo=UTC)
        self._started_at = self._cursor
        self._next: list[datetime | None] | None = None
        self._seen: datetime | None = None
        self._ticks = 0
        # True while the cron thread inserts a job, without the lock.
        self._inserting = False

    def __repr__(self) -> str:
        return f"<Cron of {self.instance.name!r}, {len(self._entries)} entries>"

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> Mapping[str, Any]:
        """Check the options; return them with every entry parsed.

        Returns:
            ``{"crontab": tuple of CronEntry, "timezone": tzinfo}``.

        Raises:
            InvalidOption: An option is unknown or invalid; for an entry
                the message starts with ``crontab[i]:``. The subclasses
                InvalidCronExpression and UnknownWorker identify the
                invalid part of the entry.
        """
        unknown = sorted(set(options) - set(PLUGIN_OPTIONS))
        if unknown:
            raise InvalidOption(
                f"unknown Cron options {unknown}; valid options are "
                f"{list(PLUGIN_OPTIONS)}"
            )
        if "crontab" not in options:
            raise InvalidOption(
                "Cron option 'crontab' is missing; give a list of (expression, "
                "worker) entries, such as [('*/5 * * * *', 'myapp.workers.Poll')]"
            )
        zone = _check_zone(options.get("timezone"), "Cron timezone")
        return {"crontab": _check_crontab(options["crontab"], zone), "timezone": zone}

    # Lifecycle

    def start(self) -> None:
        """Start the cron thread; with an empty crontab, start nothing."""
        if self._thread is not None:
            return
        if not self._entries:
            logger.info("cron of instance %r has an empty crontab", self.instance.name)
            return
        with self._cond:
            self._cursor = self.instance.clock.now()
            self._started_at = self._cursor
            self._alive = True
            if self.instance.leadership.is_leader:
                # A peer that leads from the start may take over from one
                # that stepped down when it joined.
                self._cursor = self._resume_cursor()
                self.instance.leadership.save_state(
                    _STATE_KEY, self._cursor.isoformat()
                )
        self.instance.leadership.subscribe(self._on_leadership)
        thread = threading.Thread(
            target=self._run, name=f"stagehand-cron-{self.instance.name}", daemon=True
        )
        with self._cond:
            self._thread = thread
            thread.start()
            # A FakeClock wakes only conditions that have already waited on
            # it, so an advance() between the thread's first clock reading
            # and its first wait would be lost. Returning after that first
            # wait makes every advance() made after start() wake the thread.
            self._cond.wait_for(
                lambda: self._seen is not None or not self._alive, JOIN_TIMEOUT
            )
        logger.info(
            "cron of instance %r started with %d entries",
            self.instance.name,
            len(self._entries),
        )

    def stop(self) -> None:
        """Wake the cron thread and join it, waiting 10 s at most.

        Once this returns the plugin inserts no job, even if the thread
        has not ended yet.
        """
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            # An insert under way ends before stop() returns.
            self._cond.wait_for(lambda: not self._inserting, JOIN_TIMEOUT)
        self.instance.leadership.unsubscribe(self._on_leadership)
        thread.join(JOIN_TIMEOUT)
        if thread.is_alive():
            logger.error(
                "cron thread of instance %r did not end within %g s; it inserts "
                "no more jobs",
                self.instance.name,
                JOIN_TIMEOUT,
            )
            return
        logger.info("cron of instance %r stopped", self.instance.name)

    # Observation

    @property
    def ticks(self) -> int:
        """Passes of the cron thread that found at least one entry due."""
        return self._ticks

    def wait_caught_up(self, timeout: float | None = None) -> bool:
        """Wait until the thread has handled the clock's current time.

        Meant for tests with a `FakeClock`: after ``clock.advance(...)``,
        this returns once every job due at the new time has been inserted
        (or found to be a duplicate) and the thread sleeps again. A
        leadership change since the thread's last pass must be handled too.

        Args:
            timeout: Real seconds to wait at most; None waits without limit.

        Returns:
            True when caught up (at once for an empty crontab); False on
            timeout, or when the thread is not running.
        """
        if not self._entries:
            return True
        target = self.instance.clock.now()
        with self._cond:
            self._cond.wait_for(
                lambda: not self._alive or self._caught_up(target), timeout
            )
            return self._alive and self._caught_up(target)

    def _caught_up(self, target: datetime) -> bool:
        return self._seen is not None and self._seen >= target

    def _on_leadership(self, leader: bool) -> None:
        # Runs in the thread that changes leadership, such as a cluster's
        # join handler. The cron thread releases the lock while it inserts
        # (see _insert_unlocked), so this does not wait for an insert, which
        # may itself wait for that join.
        with self._cond:
            if leader and not self._leader and self._thread is not None:
                self._cursor = self._resume_cursor()
                self._next = None
                # Saved at once, so that a peer that takes over before the
                # first tick can read where this one began.
                self.instance.leadership.save_state(
                    _STATE_KEY, self._cursor.isoformat()
                )
            if leader != self._leader and self._thread is not None:
                logger.info(
                    "cron of instance %r %s leadership",
                    self.instance.name,
                    "gained" if leader else "lost",
                )
            self._leader = leader
            self._seen = None
            self._cond.notify_all()

    def _resume_cursor(self) -> datetime:
        # Slots that passed while another peer led were that peer's to run.
        # The current minute is checked again unless the old leader saved a
        # later cursor (processes sharing a leader lock share that state; in
        # one process the unique key turns a repeat into a conflict). Slots
        # before this plugin started never run, except in a cluster that
        # has a saved cursor: the peer that led until now stepped down when
        # this one joined, which may have been after the minute began.
        now = self.instance.clock.now()
        cursor = now.replace(second=0, microsecond=0) - _TINY
        saved = self.instance.leadership.load_state(_STATE_KEY)
        taking_over = False
        if isinstance(saved, str):
            try:
                parsed = datetime.fromisoformat(saved)
                if parsed.utcoffset() is None:
                    # The state may come from another peer; a time without
                    # an offset cannot be compared with the clock's.
                    raise ValueError("no UTC offset")
                cursor = max(cursor, parsed)
                taking_over = self.instance._cluster is not None
            except ValueError:
                logger.warning("ignoring an invalid saved cron cursor %r", saved)
        return cursor if taking_over else max(cursor, self._started_at)

    # The cron thread

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            logger.critical(
                "cron thread of instance %r crashed; no more cron jobs are inserted",
                self.instance.name,
                exc_info=True,
            )
        finally:
            with self._cond:
                self._alive = False
                self._cond.notify_all()

    def _loop(self) -> None:
        # The lock is held except while waiting and while inserting. An
        # insert begins only under the lock with _stopping unset, and stop()
        # waits for one under way, so no insert follows stop().
        clock = self.instance.clock
        with self._cond:
            while not self._stopping:
                now = clock.now()
                timeout = None
                if self._leader:
                    if self._due(now):
                        self._tick(now)
                    timeout = self._seconds_until_due(clock.now())
                self._seen = now
                self._cond.notify_all()
                if timeout is not None and timeout <= 0:
                    continue
                clock.wait(self._cond, timeout)

    def _next_slots(self) -> list[datetime | None]:
        if self._next is None:
            self._next = [_following(entry, self._cursor) for entry in self._entries]
        return self._next

    def _due(self, now: datetime) -> bool:
        return any(slot is not None and slot <= now for slot in self._next_slots())

    def _seconds_until_due(self, now: datetime) -> float | None:
        due = min(
            (slot for slot in self._next_slots() if slot is not None), default=None
        )
        return None if due is None else (due - now).total_seconds()

    def _tick(self, now: datetime) -> None:
        # The caller owns _cond.
        for entry, first in zip(self._entries, self._next_slots(), strict=True):
            if first is None or first > now:
                continue
            if self._stopping or not self._leader:
                # Changed while an earlier insert ran without the lock.
                return
            slot = _latest_slot(entry, first, now)
            _log_if_late(entry, first, slot, now)
            if not self._insert_unlocked(entry, slot):
                break
        self._cursor = now
        self._next = None
        self._ticks += 1
        if self._leader:
            self.instance.leadership.save_state(_STATE_KEY, now.isoformat())

    def _insert_unlocked(self, entry: CronEntry, slot: datetime) -> bool:
        # The caller holds _cond, which is released during the insert: in a
        # cluster the insert may go to a peer that is joining and holds it
        # until its join ends, and the join may change leadership, which
        # takes _cond.
        self._inserting = True
        self._cond.release()
        try:
            return self._insert(entry, slot)
        finally:
            self._cond.acquire()
            self._inserting = False
            self._cond.notify_all()

    def _insert(self, entry: CronEntry, slot: datetime) -> bool:
        """Insert the job of `entry` for `slot`.

        Returns:
            False if the instance rejected the insert because it is stopping.
        """
        try:
            job = self.instance.insert(entry.build(slot))
        except ShuttingDown:
            logger.info(
                "cron %s: instance %r is stopping; no job inserted for %s",
                entry.label,
                self.instance.name,
                slot.isoformat(),
            )
            return False
        except Exception:
            logger.error(
                "cron %s failed to insert its job for %s",
                entry.label,
                slot.isoformat(),
                exc_info=True,
            )
            return True
        if job.conflict:
            logger.debug(
                "cron %s: slot %s already has job %s",
                entry.label,
                slot.isoformat(),
                job.id,
            )
        else:
            logger.debug(
                "cron %s inserted job %s for %s", entry.label, job.id, slot.isoformat()
            )
        return True


def _log_if_late(
    entry: CronEntry, first: datetime, slot: datetime, now: datetime
) -> None:
    """Log at INFO when `slot` replaces missed slots or is a minute late."""
    if slot != first:
        logger.info(
            "cron %s was held up: its slots from %s to %s were missed; "
            "inserting one job, for %s",
            entry.label,
            first.isoformat(),
            slot.isoformat(),
            slot.isoformat(),
        )
    elif now - slot >= _MINUTE:
        logger.info(
            "cron %s was held up: inserting the job for %s %d s late",
            entry.label,
            slot.isoformat(),
            (now - slot).total_seconds(),
        )


def _following(entry: CronEntry, after: datetime) -> datetime | None:
    """Return the entry's first slot after `after`, in UTC, or None if none."""
    try:
        return entry.cron.next_after(after).astimezone(UTC)
    except InvalidCronExpression:
        logger.error("cron %s has no slot after %s", entry.label, after.isoformat())
        return None


def _latest_slot(entry: CronEntry, first: datetime, now: datetime) -> datetime:
    """Return the entry's last slot in [first, now]; `first` is a slot <= now.

    A window reaching back from `now` doubles until it contains a slot, and
    then the slots in that window are walked forward. The work grows with
    the log of the stall's length, not with the number of missed slots: a
    400-day stall of ``* * * * *`` takes two `next_after` calls.
    """
    candidate = first
    width = _MINUTE
    while now - width > first:
        found = _following(entry, now - width)
        if found is not None and found <= now:
            candidate = found
            break
        width *= 2
    while (following := _following(entry, candidate)) is not None and following <= now:
        candidate = following
    return candidate


# Validation


def _check_zone(value: object, name: str) -> tzinfo:
    if value is None:
        return UTC
    if isinstance(value, tzinfo):
        return value
    if isinstance(value, str):
        try:
            return ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise InvalidOption(
                f"{name} {value!r} was not found in the time zone database; use "
                "an IANA name such as 'Europe/London' or 'America/New_York'"
            ) from None
    raise InvalidOption(
        f"{name} must be an IANA zone name such as 'Europe/London', a tzinfo, "
        f"or None for UTC; got {value!r}"
    )


def _check_crontab(crontab: object, zone: tzinfo) -> tuple[CronEntry, ...]:
    if not isinstance(crontab, (list, tuple)):
        raise InvalidOption(
            "Cron crontab must be a list of (expression, worker) or "
            f"(expression, worker, options) entries; got {crontab!r}"
        )
    entries: list[CronEntry] = []
    seen: dict[tuple[type[Worker], str, str], int] = {}
    for index, item in enumerate(crontab):
        entry = _check_entry(index, item, zone)
        identity = (entry.worker, entry.queue, entry.key)
        if identity in seen:
            raise InvalidOption(
                f"crontab[{index}] repeats crontab[{seen[identity]}]: same expression, "
                "time zone, worker, queue and args, so the two would share one "
                "job per slot; remove one of them"
            )
        seen[identity] = index
        entries.append(entry)
    return tuple(entries)


def _check_entry(index: int, item: object, zone: tzinfo) -> CronEntry:
    """Validate crontab item `index`; `zone` is the plugin's time zone."""
    where = f"crontab[{index}]"
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise InvalidOption(
            f"{where} must be (expression, worker) or (expression, worker, "
            f"options); got {item!r}"
        )

    expression, worker, options = item if len(item) == 3 else (*item, {})
    if not isinstance(options, Mapping):
        raise InvalidOption(
            f"{where}: options must be a dict such as {{'queue': 'reports'}}; "
            f"got {options!r}"
        )
    _check_option_names(where, options)

    if "timezone" in options:
        zone = _check_zone(options["timezone"], f"{where}: timezone")
    cron = _parse(where, expression, zone)
    try:
        worker_class = resolve_worker(worker)
    except UnknownWorker as error:
        raise UnknownWorker(f"{where}: {error}") from None

    job_options = {
        name: value
        for name, value in options.items()
        if name not in ("args", "timezone")
    }
    probe = _probe(where, worker_class, options.get("args"), job_options)
    job_options.pop("meta", None)
    return CronEntry(
        index=index,
        cron=cron,
        worker=worker_class,
        args=probe.args,
        meta=probe.meta,
        options=job_options,
        queue=probe.queue,
        key=_entry_key(cron, probe.args),
    )


def _check_option_names(where: str, options: Mapping[str, Any]) -> None:
    for name in options:
        if name in _REJECTED_OPTIONS:
            raise InvalidOption(
                f"{where}: the option {name!r} is not allowed: "
                f"{_REJECTED_OPTIONS[name]}; remove it"
            )
        if name not in ENTRY_OPTIONS:
            raise InvalidOption(
                f"{where}: unknown option {name!r}; valid options are "
                f"{list(ENTRY_OPTIONS)}"
            )


def _parse(where: str, expression: object, zone: tzinfo) -> CronExpression:
    if not isinstance(expression, str):
        raise InvalidCronExpression(
            f"{where}: the expression must be a string such as '*/15 * * * *' "
            f"or '@daily'; got {expression!r}"
        )
    try:
        return parse(expression, zone)
    except InvalidCronExpression as error:
        raise InvalidCronExpression(f"{where}: {error}") from None


def _probe(
    where: str, worker: type[Worker], args: object, options: dict[str, Any]
) -> Job:
    """Build one job from the entry's options, so bad ones raise now."""
    try:
        probe = worker.new(args, **options)  # type: ignore[arg-type]
    except InvalidOption as error:
        raise type(error)(f"{where}: {error}") from None
    reserved = sorted(set(probe.meta) & set(RESERVED_META))
    if reserved:
        raise InvalidOption(
            f"{where}: meta keys {reserved} are set by the Cron plugin; rename them"
        )
    return probe


def _entry_key(cron: CronExpression, args: dict[str, Any]) -> str:
    zone = getattr(cron.tz, "key", None) or str(cron.tz)
    text = json.dumps(
        [cron.expression, zone, args], sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_queues(entries: tuple[CronEntry, ...], instance: Stagehand) -> None:
    for entry in entries:
        if entry.queue not in instance.queues:
            raise QueueNotConfigured(
                f"crontab[{entry.index}]: queue {entry.queue!r} is not configured "
                f"on instance {instance.name!r}; configured queues are "
                f"{sorted(instance.queues)}. Add it to queues={{...}} or give the "
                "entry another 'queue' option."
            )

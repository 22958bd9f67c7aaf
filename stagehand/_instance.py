"""The `Stagehand` instance: queues, scheduler, plugins and their lifecycle."""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from threading import get_ident
from typing import TYPE_CHECKING, Any, NoReturn, Self, TypeVar

from stagehand import _registry
from stagehand._clock import Clock, SystemClock
from stagehand._config import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_RETENTION_LIMIT,
    DEFAULT_RETENTION_PERIOD,
    DEFAULT_UNIQUE_LIMIT,
    build_settings,
)
from stagehand._control import _NEW, _RUNNING, _STOPPED, _STOPPING, Control
from stagehand._execute import Executor, current_instance
from stagehand._job import Job, JobState, ensure_fresh_ids, new_job_id, new_job_ids
from stagehand._leadership import FileLockLeadership, Leadership, SoloLeadership
from stagehand._queue import Queue
from stagehand._retention import Retention
from stagehand._scheduler import Scheduler
from stagehand._unique import UniqueTable
from stagehand._worker import check_job_fields, resolve_worker
from stagehand.exceptions import (
    InvalidOption,
    NotRunning,
    QueueNotConfigured,
    ShuttingDown,
    StagehandError,
)
from stagehand.plugins import Plugin

if TYPE_CHECKING:
    from stagehand._cluster import Cluster

__all__ = ["Stagehand"]

PluginT = TypeVar("PluginT", bound=Plugin)

logger = logging.getLogger(__name__)


class Stagehand(Control):
    """An instance: named queues of worker threads, a scheduler and plugins.

    Args:
        queues: Queue name to number of worker threads, or to a dict with
            "limit" and optionally "paused". Defaults to ``{"default": 10}``.
        plugins: ``(PluginClass, options)`` pairs, or classes; classes may be
            given by dotted path.
        testing: "disabled" runs jobs in worker threads. "manual" records
            inserted jobs without running them. "inline" runs each job in
            the inserting thread and returns it finished.
        shutdown_grace_period: Seconds `stop()` waits for executing jobs.
            Defaults to 15.
        cluster: None for a single process, or a dict that makes this
            instance a peer of a cluster: ``name`` and ``secret`` (the same
            on every peer), ``discovery`` (``"zeroconf"``, the default, or
            a list of ``"host:port"`` peer addresses), ``bind`` (the
            ``"host:port"`` to listen on; default ``"0.0.0.0:0"``), and
            ``discovery_timeout``, ``join_timeout`` and ``request_timeout``
            in seconds (defaults 1, 5 and 5). See docs/cluster.md.
        name: Registry name. The running instance named "default" serves
            `Job.insert()` and the module-level functions.
        clock: Time source; `stagehand.testing.FakeClock` in tests.
        retention_period: Seconds a finished job stays visible to `get_job`
            and `jobs`. Defaults to 300.
        retention_limit: Finished jobs kept at most (the oldest go first).
            Defaults to 10,000.
        unique_limit: Unique fingerprints remembered at most. Defaults to
            100,000.
        leader_lock: Path of a lock file shared by the processes of one
            host, so that only the process holding it leads (and runs
            cron). None (the default) makes this process its own leader.

    Raises:
        InvalidOption: A setting is invalid.
    """

    def __init__(
        self,
        *,
        queues: Mapping[str, Any] | None = None,
        plugins: Iterable[Any] | None = None,
        testing: str = "disabled",
        shutdown_grace_period: float = DEFAULT_GRACE_PERIOD,
        cluster: Mapping[str, Any] | None = None,
        name: str = _registry.DEFAULT_NAME,
        clock: Clock | None = None,
        retention_period: float = DEFAULT_RETENTION_PERIOD,
        retention_limit: int = DEFAULT_RETENTION_LIMIT,
        unique_limit: int = DEFAULT_UNIQUE_LIMIT,
        leader_lock: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = build_settings(
            queues=queues,
            plugins=plugins,
            testing=testing,
            shutdown_grace_period=shutdown_grace_period,
            cluster=cluster,
            name=name,
            clock=clock,
            retention_period=retention_period,
            retention_limit=retention_limit,
            unique_limit=unique_limit,
            leader_lock=leader_lock,
        )
        self.name = self.settings.name
        self.testing = self.settings.testing
        self.clock = self.settings.clock
        # Reads the time that inserts and attempts record. On the system
        # clock that is time.time_ns() (0.04 µs here against 0.14 for now()),
        # whose int the job's properties turn into a datetime when read.
        self._time: Callable[[], datetime | int] = (
            time.time_ns if type(self.clock) is SystemClock else self.clock.now
        )
        self._cluster: Cluster | None = None
        self.leadership: Leadership
        if self.settings.cluster is not None:
            # Imported here: zeroconf takes a while to import, and only
            # cluster peers need it.
            from stagehand._cluster import Cluster

            self._cluster = Cluster(self, self.settings.cluster)
            self.leadership = self._cluster.leadership
        elif self.settings.leader_lock is not None:
            self.leadership = FileLockLeadership(self.settings.leader_lock)
        else:
            self.leadership = SoloLeadership()
        self._lifecycle = threading.Lock()
        self._plugins_lock = threading.Lock()
        self._adopting = threading.Lock()
        self._state = _NEW
        self._stopped = threading.Event()
        self._executor = Executor(self)
        self._queues = {
            queue.name: Queue(
                queue.name,
                queue.limit,
                self._executor.run,
                _insert_sequence,
                paused=queue.paused,
                crashed=self._executor.crashed,
            )
            for queue in self.settings.queues
        }
        self._scheduler: Scheduler | None = None
        self._live: dict[str, Job] = {}
        self._retained = Retention(
            self.settings.retention_period,
            self.settings.retention_limit,
            self.clock.monotonic,
        )
        self._unique = UniqueTable(self.clock.monotonic, self.settings.unique_limit)
        self._recorded_lock = threading.Lock()
        # Notified, with the version bumped, each time a job is recorded, so
        # test helpers can wait for a job that another thread inserts.
        self._recorded_changed = threading.Condition(self._recorded_lock)
        self._recorded_version = 0
        self._recorded: list[Job] = []
        self._plugins: list[Plugin] = [
            plugin(self, options) for plugin, options in self.settings.plugins
        ]

    def __repr__(self) -> str:
        return f"<Stagehand {self.name!r} {self._state} testing={self.testing!r}>"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True between `start()` and the beginning of `stop()`."""
        return self._state == _RUNNING

    @property
    def queues(self) -> list[str]:
        """The configured queue names."""
        return list(self._queues)

    def plugin(self, kind: type[PluginT]) -> PluginT:
        """Return this instance's plugin of class `kind`, such as its `Cron`.

        Raises:
            LookupError: The instance has no plugin of that class.
        """
        for plugin in self._plugins:
            if isinstance(plugin, kind):
                return plugin
        raise LookupError(
            f"instance {self.name!r} has no {kind.__name__} plugin; its plugins "
            f"are {[type(plugin).__name__ for plugin in self._plugins]}"
        )

    # Lifecycle

    def start(self) -> Stagehand:
        """Start the queues, the scheduler and the plugins; return self.

        With ``testing="manual"`` or ``"inline"`` no thread starts and no
        plugin runs. Calling `start()` on a running instance does nothing.

        Raises:
            StagehandError: The instance was stopped; build a new one.
            InvalidOption: Another running instance has the same name.
        """
        with self._lifecycle:
            if self._state == _RUNNING:
                return self
            if self._state != _NEW:
                raise StagehandError(
                    f"instance {self.name!r} was stopped and cannot start again; "
                    "build a new Stagehand(...)"
                )
            _registry.register(self)
            ensure_fresh_ids()
            if self.testing == "disabled":
                self._scheduler = Scheduler(self.clock, self._promote, self.name)
                self._scheduler.start()
                for queue in self._queues.values():
                    queue.start()
            if isinstance(self.leadership, FileLockLeadership):
                self.leadership.start(self.name)
            self._state = _RUNNING
            atexit.register(self.stop)
        if self._cluster is not None:
            self._start_cluster()
        if self.testing == "disabled":
            self._start_plugins()
        logger.info(
            "stagehand instance %r started (testing=%s, queues %s)",
            self.name,
            self.testing,
            ", ".join(f"{queue.name}={queue.limit}" for queue in self._queues.values()),
        )
        return self

    def _start_cluster(self) -> None:
        # Joins the cluster before start() returns, so that the unique
        # entries this peer owns are here before the caller inserts.
        assert self._cluster is not None
        try:
            self._cluster.start()
        except BaseException:
            logger.exception("joining the cluster failed; stopping %r", self.name)
            self.stop()
            raise

    def stop(self) -> None:
        """Stop gracefully and return when done; calling it again does nothing.

        New inserts are rejected at once. Executing jobs get
        `shutdown_grace_period` seconds (real time) to finish; jobs still
        running then are abandoned, never started again, and logged by id.
        Jobs still queued or scheduled are lost, and their count is logged;
        a peer of a cluster hands them to the other peers first.
        """
        if current_instance() is self:
            # Waiting here would wait for the calling job itself, so the stop
            # runs in a thread of its own and this call returns at once.
            with self._lifecycle:
                running = self._state == _RUNNING
            if running:
                logger.info(
                    "stop() called from a job of %r; stopping in the background",
                    self.name,
                )
                threading.Thread(
                    target=self.stop, name=f"stagehand-stop-{self.name}"
                ).start()
            return
        with self._lifecycle:
            if self._state == _NEW:
                self._state = _STOPPED
                self._close_queues()
                self._stopped.set()
                return
            if self._state != _RUNNING:
                stopping_elsewhere = True
            else:
                stopping_elsewhere = False
                self._state = _STOPPING
        if stopping_elsewhere:
            self._stopped.wait()
            return
        logger.info("stagehand instance %r stopping", self.name)
        cluster = self._cluster
        try:
            if cluster is not None:
                # First, so that the other peers route nothing new here.
                cluster.withdraw()
            self._stop_plugins()
            if isinstance(self.leadership, FileLockLeadership):
                self.leadership.stop()
            self._close_queues()
            lost = 0
            if cluster is not None:
                # Queued jobs move at once rather than after the grace
                # period, and so do the unique entries, so that their new
                # owners check duplicates while this peer finishes its jobs.
                lost += cluster.hand_over(self._take_waiting_jobs())
                cluster.hand_over_entries()
                cluster.handed()
            self._abandon(self._wait_for_executing())
            if self._scheduler is not None:
                self._scheduler.stop()
            if cluster is not None:
                # Scheduled and retryable jobs, and jobs that failed or came
                # due during the grace period.
                lost += cluster.hand_over(self._take_waiting_jobs())
                cluster.hand_over_entries()
                cluster.close()
                if lost:
                    logger.warning(
                        "stagehand instance %r stopped; %d jobs could not be "
                        "handed to other peers and are lost",
                        self.name,
                        lost,
                    )
            self._count_lost()
        finally:
            if cluster is not None:
                # Also when a step above raised, so that no connection or
                # server outlives the instance. A second call does nothing.
                cluster.close()
            _registry.unregister(self)
            atexit.unregister(self.stop)
            self._state = _STOPPED
            self._stopped.set()
        logger.info("stagehand instance %r stopped", self.name)

    def _forget_after_fork(self) -> None:
        """Mark this copy of an instance stopped in a forked child process."""
        self._lifecycle = threading.Lock()
        self._state = _STOPPED
        self._stopped.set()
        atexit.unregister(self.stop)
        if isinstance(self.leadership, FileLockLeadership):
            self.leadership.forget_after_fork()

    def _start_plugins(self) -> None:
        # Under `_plugins_lock`, which stop() takes to stop them: a stop()
        # that began while start() joined a cluster has stopped the plugins
        # already, and none may start after it.
        failure: BaseException | None = None
        with self._plugins_lock:
            if self._state != _RUNNING:
                return
            for plugin in self._plugins:
                try:
                    plugin.start()
                except BaseException as error:
                    logger.exception(
                        "plugin %r failed to start; stopping instance %r",
                        plugin,
                        self.name,
                    )
                    failure = error
                    break
        if failure is not None:
            # A half-started instance would keep running unowned, so it
            # stops again before the error reaches the caller.
            self.stop()
            raise failure

    def _stop_plugins(self) -> None:
        with self._plugins_lock:
            for plugin in reversed(self._plugins):
                try:
                    plugin.stop()
                except Exception:
                    logger.exception("plugin %r failed to stop", plugin)

    def _close_queues(self) -> None:
        for queue in self._queues.values():
            queue.close()

    def _wait_for_executing(self) -> list[Job]:
        deadline = time.monotonic() + self.settings.shutdown_grace_period
        for queue in self._queues.values():
            queue.wait_idle(deadline, time.monotonic)
        return [
            job for job in list(self._live.values()) if job.state is JobState.EXECUTING
        ]

    def _abandon(self, jobs: list[Job]) -> None:
        for job in jobs:
            # None when the job runs in a caller's thread (inline, or a
            # testing drain), which records the outcome itself, or when its
            # attempt is recording its outcome already.
            if self._queues[job.queue].take_from_thread(job) is None:
                continue
            now = self.clock.now()
            job.errors.append(
                {
                    "attempt": job.attempt,
                    "at": now.isoformat(),
                    "error": "abandoned: still executing when the shutdown grace "
                    f"period of {self.settings.shutdown_grace_period:g} s ended",
                }
            )
            job.completed_at = now
            # The thread still runs the job; it counts as stuck until it
            # returns and finds that it lost the job.
            self._finish(job, JobState.DISCARDED)
            self._executor.emit_stop(job, 0.0)
            logger.warning(
                "job %s (%s) abandoned: still executing after the %g s grace period",
                job.id,
                job.worker,
                self.settings.shutdown_grace_period,
            )

    def _take_waiting_jobs(self) -> list[Job]:
        # Removes the available jobs of every queue and the jobs waiting in
        # the scheduler, so that none of them runs here, and returns them.
        jobs: list[Job] = []
        for name in self._queues:
            jobs.extend(self.drain_queue(name))
        if self._scheduler is not None:
            with self._scheduler.cond:
                waiting = self._scheduler.take_waiting_locked()
                for job in waiting:
                    self._live.pop(job.id, None)  # type: ignore[arg-type]
            for job in waiting:
                if job.unique is not None:
                    self._unique.forget(job)
            jobs.extend(waiting)
        return jobs

    def _count_lost(self) -> None:
        queued = sum(queue.available for queue in self._queues.values())
        waiting = self._scheduler.waiting if self._scheduler is not None else 0
        if queued or waiting:
            logger.warning(
                "stagehand instance %r stopped with %d available and %d scheduled "
                "or retryable jobs; they are lost",
                self.name,
                queued,
                waiting,
            )

    def check_cluster(self) -> dict[str, Any] | None:
        """Return this peer's view of its cluster, or None without a cluster.

        Returns:
            A dict with ``name`` (the cluster's), ``peer`` (this peer's
            id), ``address`` (``"host:port"`` of its channel, or None
            before `start()`), ``leader`` (the leader's peer id) and
            ``peers`` (the ids of the other peers it is connected to,
            sorted).
        """
        if self._cluster is None:
            return None
        return self._cluster.status()

    # Inserting

    def insert(self, job: Job) -> Job:
        """Insert one job and return it with `id` and `state` set.

        A unique job that duplicates a blocking job is not inserted; a copy
        of the existing job with ``conflict=True`` is returned instead. With
        ``testing="inline"`` the job runs before this returns.

        Raises:
            NotRunning, ShuttingDown: The instance is not accepting jobs.
            QueueNotConfigured: The job's queue is not one of this instance's.
            UnknownWorker: The job's worker cannot be found.
        """
        self.validate(job)
        if job.unique is None:
            return self._enqueue(job)
        if self._cluster is not None:
            return self._cluster.insert_unique(job, self._insert_unique_here)
        if self.testing != "inline":
            return self._unique.insert(job, self._enqueue)
        # The unique check holds a lock, and an inline job may insert jobs,
        # so the inline run happens after the check releases it.
        inserted = self._unique.insert(job, self._stamp_inline)
        if inserted is job:
            self._run_inline(job)
        return inserted

    def _insert_unique_here(
        self, job: Job, owns: Callable[[str], bool] | None
    ) -> Job | None:
        return self._unique.insert_if_owned(job, self._enqueue, owns)

    def _insert_here(self, job: Job, owned: bool) -> Job:
        # An insert that another peer routed here: a unique job whose
        # fingerprint this peer owns (`owned`), or that it takes as the
        # last resort.
        self.validate(job)
        if job.unique is None:
            return self._enqueue(job)
        assert self._cluster is not None
        return self._cluster.insert_owned(job, self._insert_unique_here, check=owned)

    def insert_all(self, jobs: Iterable[Job]) -> list[Job]:
        """Insert several jobs; if any is invalid, none is inserted.

        Returns:
            The inserted jobs (or conflict copies), in the given order.
        """
        batch = list(jobs)
        if self._state != _RUNNING and batch:
            # Raises TypeError for a value that is no Job, and NotRunning or
            # ShuttingDown for a Job.
            self.validate(batch[0])
        validate = self.validate
        queues = self._queues
        for job in batch:
            # The checks of validate() that a job from Worker.new passes,
            # inline; validate() itself runs for any other job.
            if (
                not isinstance(job, Job)
                or job.id is not None
                or job.state is not _AVAILABLE
                or job.cancel_requested
                or job.queue not in queues
                or job._worker_class is None
                or job.schedule_in is not None
            ):
                validate(job)
        # One C-level pass finds a repeated job; the loop that names it
        # runs only when there is one.
        if len(set(map(id, batch))) != len(batch):
            seen: set[int] = set()
            for index, job in enumerate(batch):
                if id(job) in seen:
                    raise InvalidOption(
                        f"jobs[{index}] appears twice in insert_all(); build one "
                        "job per insert with Worker.new(...)"
                    )
                seen.add(id(job))
        if self.testing == "disabled" and not any(job.unique for job in batch):
            return self._enqueue_batch(batch)
        return [self.insert(job) for job in batch]

    def validate(self, job: Job) -> None:
        """Check that `insert(job)` would accept `job`, without inserting it.

        Raises:
            The errors of `insert`, for the same reasons.
        """
        if not isinstance(job, Job):
            raise TypeError(
                f"insert() takes a stagehand.Job, such as MyWorker.new(args); got {job!r}"
            )
        if self._state != _RUNNING:
            self._raise_not_running(job)
        if job.id is not None:
            raise _inserted_twice(job)
        if job.state is not JobState.AVAILABLE or job.cancel_requested:
            # Only a hand-built Job(...) starts out like this. It would run
            # with a state or a cancel request that it never had.
            raise InvalidOption(
                f"a new job must have state='available' and "
                f"cancel_requested=False; got state={job.state.value!r}, "
                f"cancel_requested={job.cancel_requested!r}. Build it with "
                "Worker.new(...)"
            )
        if job.queue not in self._queues:
            self._raise_unknown_queue(job)
        if job._worker_class is None:
            # Built as Job(...) rather than Worker.new(), so nothing has
            # checked its fields yet.
            check_job_fields(job)
            job._worker_class = resolve_worker(job.worker)
        if job.schedule_in is not None:
            # A due time past the year 9999 fails here, before any insert.
            _due_at(self.clock.now(), job.schedule_in)

    def _raise_not_running(self, job: Job) -> NoReturn:
        if self._state in (_STOPPING, _STOPPED):
            raise ShuttingDown(
                f"instance {self.name!r} is stopping or stopped and accepts no "
                f"new jobs; job for {job.worker} was not inserted"
            )
        raise NotRunning(
            f"instance {self.name!r} is not started; call start() before inserting jobs"
        )

    def _raise_unknown_queue(self, job: Job) -> NoReturn:
        raise QueueNotConfigured(
            f"queue {job.queue!r} is not configured on instance {self.name!r}; "
            f"configured queues are {sorted(self._queues)}. Add it to "
            "queues={...} or pass queue=... to Worker.new()."
        )

    def _stamp(self, job: Job, now: datetime | int) -> float:
        # Returns the delay in seconds before the job is due. `now` comes
        # from self._time(): a datetime, or an int of ns since the epoch.
        # Two threads may insert the same Job object at once, and both pass
        # validate() before either sets the id. setdefault() is one step
        # under the GIL, so exactly one of them claims the job here.
        token = id(job)
        me = get_ident()
        if _stamping.setdefault(token, me) != me:
            raise _inserted_twice(job)
        try:
            if job.id is not None:
                raise _inserted_twice(job)
            # None, or the aware datetime that Worker.new or validate() checked.
            scheduled_at: datetime | int | None = job._scheduled_at
            if job.schedule_in is not None:
                delay = job.schedule_in
                scheduled_at = _due_at(now, delay)
            elif scheduled_at is not None:
                delay = _seconds_until(scheduled_at, now)  # type: ignore[arg-type]
            else:
                scheduled_at = now
                delay = 0.0
            job.id = new_job_id()
            job._sequence = next(_insert_sequence)
            job._inserted_at = now
            job._instance = self
            job._scheduled_at = scheduled_at
        finally:
            del _stamping[token]
        return delay

    def _enqueue(self, job: Job) -> Job:
        delay = self._stamp(job, self._time())
        if self.testing != "disabled":
            return self._enqueue_for_testing(job, delay)
        if delay > 0:
            # Marked scheduled before it becomes live, so the insert cannot
            # overwrite what a cancel_job that finds it does.
            job.state = JobState.SCHEDULED
        try:
            if delay > 0:
                self._live[job.id] = job  # type: ignore[index]
                self._scheduler.add_job(  # type: ignore[union-attr]
                    job,
                    self.clock.due(job._scheduled_at, self.clock.monotonic(), delay),
                    new=True,
                )
            else:
                # The push makes the job live once it is queued.
                self._queues[job.queue].push(job, self._live)
        except ShuttingDown:
            # stop() finished between validate() and here. A job that
            # cancel_job took meanwhile stays as it is: cancelled.
            if not self._unstamp([job]):
                return job
            raise
        return job

    def _adopt(self, job: Job) -> None:
        """Insert a job that another peer handed over, keeping its id.

        `job` comes from `job_from_wire`: checked, unsaved, and available,
        scheduled or retryable. It keeps its id, attempt, errors and times,
        and runs when `scheduled_at` comes, or at once if that has passed.

        Raises:
            NotRunning, ShuttingDown: The instance is not accepting jobs.
            QueueNotConfigured: The job's queue is not configured here.
            InvalidOption: A job with the same id is here already.
        """
        # One at a time, so two copies of one job cannot both pass the check
        # for its id.
        with self._adopting:
            if self._state != _RUNNING or self.testing != "disabled":
                self._raise_not_running(job)
            if job.queue not in self._queues:
                self._raise_unknown_queue(job)
            job_id: str = job.id  # type: ignore[assignment]
            if job_id in self._live or self._retained.get(job_id) is not None:
                raise InvalidOption(
                    f"job {job_id} is on this peer already, so this copy was "
                    "not adopted; a job runs on one peer only"
                )
            scheduled_at = job.scheduled_at
            delay = 0.0
            if scheduled_at is not None:
                delay = (scheduled_at - self.clock.now()).total_seconds()
            job._sequence = next(_insert_sequence)
            job._instance = self
            if delay > 0:
                if job.state is JobState.AVAILABLE:
                    job.state = JobState.SCHEDULED
                self._live[job_id] = job
                try:
                    self._scheduler.add_job(  # type: ignore[union-attr]
                        job,
                        self.clock.due(scheduled_at, self.clock.monotonic(), delay),
                        new=True,
                    )
                except ShuttingDown:
                    self._live.pop(job_id, None)
                    raise
            else:
                job.state = JobState.AVAILABLE
                self._queues[job.queue].push(job, self._live)
            if job.unique is not None:
                # The entry keeps the time it has left: its period counts
                # from the job's insert on the first peer.
                period = job.unique["period"]
                expires = None
                if period is not None and job.inserted_at is not None:
                    age = (self.clock.now() - job.inserted_at).total_seconds()
                    expires = self.clock.monotonic() + max(period - age, 0.0)
                self._unique.adopt(job, expires)

    def _unstamp(self, jobs: list[Job]) -> list[Job]:
        # Undoes the stamp of jobs whose insert failed, and returns them.
        # Skips jobs another thread has acted on since: cancelled, queued by
        # retry_job, or held by the scheduler. Each check and undo holds the
        # locks that cancel_job and retry_job hold, so neither acts on a job
        # between the two.
        undone = []
        for job in jobs:
            with self._locks_for(job):
                if (
                    job.state not in _UNSTAMPABLE
                    or job._queue_seq
                    or job._schedule_seq != 0
                ):
                    continue
                self._live.pop(job.id, None)  # type: ignore[arg-type]
                if job.schedule_in is not None or job._scheduled_at is job._inserted_at:
                    # _stamp set it; an explicit scheduled_at stays.
                    job._scheduled_at = None
                job.id = None
                job._inserted_at = None
                job.state = JobState.AVAILABLE
                job._instance = None
            undone.append(job)
        return undone

    def _stamp_due_now(self, batch: list[Job], now: datetime | int) -> None:
        # What _stamp does, for a batch of jobs that are due now, in one
        # pass. Each job is claimed in _stamping first, as _stamp claims it,
        # so another thread's insert of the same job raises in one of the two.
        me = get_ident()
        claim = _stamping.setdefault
        claimed = 0
        try:
            for job in batch:
                if claim(id(job), me) != me:
                    raise _inserted_twice(job)
                claimed += 1
            for job in batch:
                if job.id is not None:
                    raise _inserted_twice(job)
            for job, job_id, sequence in zip(
                batch,
                new_job_ids(len(batch)),
                itertools.islice(_insert_sequence, len(batch)),
                strict=True,
            ):
                job.id = job_id
                job._sequence = sequence
                job._inserted_at = now
                job._instance = self
                job._scheduled_at = now
        finally:
            for job in batch[:claimed]:
                del _stamping[id(job)]

    def _enqueue_batch(self, batch: list[Job]) -> list[Job]:
        now = self._time()
        by_queue: dict[str, list[Job]] = {}
        live = self._live
        scheduled: list[tuple[float, Job]] = []
        if all(job.schedule_in is None and job._scheduled_at is None for job in batch):
            # The common batch: nothing scheduled, so no delays to work out.
            self._stamp_due_now(batch, now)
            for job in batch:
                live[job.id] = job  # type: ignore[index]
            names = {job.queue for job in batch}
            if len(names) == 1:
                by_queue[names.pop()] = batch
            else:
                for job in batch:
                    by_queue.setdefault(job.queue, []).append(job)
        else:
            monotonic = self.clock.monotonic()
            delays: list[float] = []
            try:
                for job in batch:
                    delays.append(self._stamp(job, now))
            except InvalidOption:
                # Only the jobs this call stamped: the one that raised may
                # belong to another thread's insert.
                self._unstamp(batch[: len(delays)])
                raise
            for job, delay in zip(batch, delays, strict=True):
                if delay > 0:
                    job.state = JobState.SCHEDULED
                    scheduled.append(
                        (self.clock.due(job._scheduled_at, monotonic, delay), job)
                    )
                else:
                    by_queue.setdefault(job.queue, []).append(job)
                live[job.id] = job  # type: ignore[index]
        try:
            # Check the queues before the scheduler takes any job, because jobs it
            # has taken count as inserted.
            for name in by_queue:
                self._queues[name].ensure_open()
            if scheduled:
                self._scheduler.add_jobs(scheduled)  # type: ignore[union-attr]
        except ShuttingDown:
            self._unstamp(batch)
            raise
        pushed: list[Job] = []
        for name, jobs in by_queue.items():
            try:
                self._queues[name].push_many(jobs, inserted=True)
            except ShuttingDown:
                # stop() closed this queue after the check above. The jobs
                # already queued stay, and stop() counts and logs them.
                undone = self._unstamp([job for job in batch if job not in pushed])
                inserted_count = len(batch) - len(undone)
                raise ShuttingDown(
                    f"instance {self.name!r} began stopping during insert_all(); "
                    f"{inserted_count} of {len(batch)} jobs were inserted before that (stop() "
                    "counts those still queued or scheduled), the others were not "
                    "inserted"
                ) from None
            pushed.extend(jobs)
        return batch

    def _enqueue_for_testing(self, job: Job, delay: float) -> Job:
        if self.testing == "inline":
            self._stamped_for_inline(job)
            self._run_inline(job)
            return job
        job.state = JobState.SCHEDULED if delay > 0 else JobState.AVAILABLE
        self._live[job.id] = job  # type: ignore[index]
        with self._recorded_changed:
            self._record_locked(job)
        return job

    def _stamp_inline(self, job: Job) -> Job:
        self._stamp(job, self._time())
        return self._stamped_for_inline(job)

    def _stamped_for_inline(self, job: Job) -> Job:
        # Inline runs ignore the schedule: the job runs now, in this thread.
        job.state = JobState.EXECUTING
        self._live[job.id] = job  # type: ignore[index]
        return job

    def _run_inline(self, job: Job) -> None:
        try:
            self._executor.run(job, None)
        finally:
            # Wakes test helpers such as assert_enqueued that wait in other
            # threads for this job.
            with self._recorded_changed:
                self._recorded_version += 1
                self._recorded_changed.notify_all()

    def _record_locked(self, job: Job) -> None:
        # The caller holds _recorded_lock.
        if job not in self._recorded:
            self._recorded.append(job)
        self._recorded_version += 1
        self._recorded_changed.notify_all()

    # Engine callbacks

    def _promote(self, queue: str, jobs: list[Job]) -> None:
        self._queues[queue].push_many(jobs)

    def _hold(
        self, job: Job, state: JobState, scheduled_at: datetime, due: float
    ) -> bool:
        # Puts an executing job in `state` until `due`, on the clock's
        # monotonic scale. Returns False, changing nothing, when cancel_job
        # has requested its cancellation.
        if self._scheduler is None:
            # cancel_job takes this lock in testing modes.
            with self._recorded_lock:
                if job.cancel_requested:
                    return False
                job.state = state
                job.scheduled_at = scheduled_at
                return True
        return self._scheduler.hold(job, state, scheduled_at, due)

    def _finish(self, job: Job, state: JobState) -> None:
        # Retained before its final state is set, and that before it leaves
        # the live jobs: a reader that sees the final state finds the job in
        # retention, and get_job never misses it. The spent claim list goes
        # first, while no retry can have begun: a retained job that keeps it
        # gives the garbage collector one more object to walk.
        job._claim = None
        self._retained.add(job)
        job.state = state
        self._live.pop(job.id, None)  # type: ignore[arg-type]


def _inserted_twice(job: Job) -> InvalidOption:
    return InvalidOption(
        f"job {job.id or 'for ' + job.worker} was already inserted, or is being "
        "inserted by another thread; build a new job with Worker.new(...) for "
        "each insert"
    )


def _due_at(now: datetime | int, delay: float) -> datetime | int:
    if isinstance(now, int):
        # validate() checked the delay against the clock's datetime.
        return now + round(delay * 1e9)
    try:
        return now + timedelta(seconds=delay)
    except OverflowError:
        raise InvalidOption(
            f"schedule_in={delay:,.0f} s from {now.isoformat()} is past the year "
            "9999; schedule the job earlier"
        ) from None


def _seconds_until(due: datetime, now: datetime | int) -> float:
    if isinstance(now, int):
        return due.timestamp() - now / 1e9
    return float((due - now).total_seconds())


_insert_sequence = itertools.count(1)


def insert_mark() -> int:
    """Return a number that every later insert's `Job._sequence` exceeds."""
    return next(_insert_sequence)


# id() of each Job object being stamped, mapped to the stamping thread.
_stamping: dict[int, int] = {}
_UNSTAMPABLE = frozenset({JobState.AVAILABLE, JobState.SCHEDULED})
_AVAILABLE = JobState.AVAILABLE

"""One queue: a priority heap, and the pool of threads that runs its jobs.

Worker threads take jobs without a lock. Under CPython's global interpreter
lock, `heapq.heappop` on a list of ints and `dict.pop` each run as one
indivisible step. A thread takes the smallest key from the heap, then claims
its job by popping the key from `_pending`, so of several threads (a worker,
`cancel_job`, `drain`) that reach the same job, exactly one gets it. With a
lock on this path, eight threads on two cores formed a lock convoy in which
every job cost two context switches (docs/performance.md has the figures).

An insert pushes without a lock too. It stores the job in `_pending`
before it makes the job live, so a job that `cancel_job` or `drain_queue`
can see is always in `_pending` or claimed by a thread. Then it pushes the
key. Takes and pushes list themselves while under way (`_taking`,
`_pushing`), and `close`, `pause` and `cancel_job` wait for those that
began before them (`_settle`). A push looks at `closed` before and after it
queues the job, and takes the job back if the queue closed meanwhile, so an
insert either raises `ShuttingDown` or leaves a job that `stop()` counts.
With a lock here, four inserting threads convoyed on it as the takes did.

Retries, scheduled jobs coming due, threads going to sleep, pause, resume,
scale and close still take the condition `cond`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from heapq import heappush
from threading import get_ident
from typing import Any

from stagehand._job import Job, JobState
from stagehand.exceptions import ShuttingDown

__all__ = ["Queue"]

logger = logging.getLogger(__name__)

_AVAILABLE = JobState.AVAILABLE
_EXECUTING = JobState.EXECUTING
_WAITING = frozenset({JobState.SCHEDULED, JobState.RETRYABLE})

# Free-threaded builds (3.13t) run heappop in parallel with the inserts'
# heappush, so there a take pops under `cond`.
# NOTE: no free-threaded build exists on the test machines; that path is untested.
_GIL_ENABLED = getattr(sys, "_is_gil_enabled", lambda: True)()

# A heap entry is one int: the priority above bit 56, a sequence number
# below it. Ints compare faster than tuples and take 32 bytes, not 100.
_PRIORITY_SHIFT = 56

# Runs one job in a worker thread. Returns True when the job's timeout took
# the job from this thread, which must then exit: a replacement is running.
Runner = Callable[[Job, "Queue"], bool]


class Queue:
    """A queue's heap of available jobs and the threads that run them.

    Jobs leave the heap strictly by priority (0 first), then in the order
    they became available. Each heap entry is an int key that sorts that
    way; `_pending` maps the key to its job. An entry whose key is gone from
    `_pending` (the job was cancelled, drained or queued again) is skipped.

    Sequence numbers come from `numbers`, which the instance shares with its
    insert order, so a new job's key is its `_sequence` (plus its priority)
    and costs no extra int.

    Threads that find nothing to do sleep on a lock of their own without a
    timeout, so an idle queue uses no CPU.
    """

    def __init__(
        self,
        name: str,
        limit: int,
        runner: Runner,
        numbers: Iterator[int],
        *,
        paused: bool = False,
        crashed: Callable[[Job, BaseException], None] | None = None,
    ):
        self.name = name
        # Called with the job a worker thread was running when it crashed.
        self._crashed = crashed
        self.cond = threading.Condition(threading.Lock())
        self._heap: list[int] = []
        self._pending: dict[int, Job] = {}
        self._running: dict[int, Job] = {}
        # Threads between their check of `paused` and `_closed` and the
        # moment their job is marked executing; see `_settle`.
        self._taking: set[int] = set()
        # id() of each job part way through `push`, mapped to the pushing
        # thread. `_settle` waits for them.
        self._pushing: dict[int, int] = {}
        self._numbers = numbers
        self._runner = runner
        self.limit = limit
        self.paused = paused
        self.stuck = 0
        # Threads counted in `stuck` rather than `_threads`: their job was
        # taken from them, and a replacement has their slot.
        self._released: set[int] = set()
        self._threads = 0
        # The wake locks of idle threads, each held locked by its sleeping
        # thread; releasing one wakes that thread. Cheaper than waiting on
        # `cond`, which makes a new lock for every wait.
        self._sleepers: list[threading.Lock] = []
        self._closed = False
        self._started = False
        self._thread_numbers = itertools.count(1)

    @property
    def available(self) -> int:
        """Jobs waiting in the heap."""
        return len(self._pending)

    @property
    def executing(self) -> int:
        """Jobs running in this queue's threads, not counting stuck ones."""
        return len(self._running)

    # Starting and stopping

    def start(self) -> None:
        with self.cond:
            self._started = True
            self._spawn(self.limit - self._threads)

    def close(self) -> None:
        """Stop taking jobs from the heap. Running jobs finish; queued stay."""
        with self.cond:
            self._closed = True
            self._wake_all()
        self._settle()

    def wait_idle(self, deadline: float, monotonic: Callable[[], float]) -> bool:
        """Wait until no job executes or `deadline` passes; True if idle."""
        with self.cond:
            while self._running:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, threading.TIMEOUT_MAX))
            return True

    def _spawn(self, count: int) -> None:
        for _ in range(max(count, 0)):
            number = next(self._thread_numbers)
            thread = threading.Thread(
                target=self._work,
                name=f"stagehand-{self.name}-{number}",
                daemon=True,
            )
            self._threads += 1
            thread.start()

    def _wake_all(self) -> None:
        # Wakes every idle thread and every wait_idle() caller. The caller
        # must own `cond`.
        while self._wake_one():
            pass
        self.cond.notify_all()

    def _wake_one(self) -> bool:
        # Wakes one idle thread and returns False if none slept. A push
        # without the lock may pop the same list, so the pop itself tests it.
        try:
            wake = self._sleepers.pop()
        except IndexError:
            return False
        wake.release()
        return True

    def _settle(self) -> None:
        # Waits until no take is under way and every push under way at the
        # call has ended. Takes and pushes list themselves before they read
        # `paused` and `_closed`, so later ones read the values set before
        # the call. Later pushes are not waited for, because inserting
        # threads can keep `_pushing` from ever being empty.
        # The caller must not hold `cond`: a take can free a job whose
        # finalizer inserts, and free-threaded builds pop under `cond`. A
        # finalizer or signal handler run inside this thread's own take or
        # push may call this, and it does not wait for itself.
        me = threading.get_ident()
        pushing = self._pushing
        # copy() is one C call, so no push can change the dict during it.
        earlier = [token for token, owner in pushing.copy().items() if owner != me]
        while True:
            taking = self._taking
            if (not taking or (len(taking) == 1 and me in taking)) and not any(
                token in pushing for token in earlier
            ):
                return
            time.sleep(0)

    # Jobs in and out

    def _push_unlocked(self, job: Job, live: dict[str, Job]) -> None:
        """Queue one just-stamped job, make it live, and wake one idle thread.

        Args:
            live: The instance's table of live jobs, which gets the job once
                it is in `_pending`.

        Raises:
            ShuttingDown: The queue was closed by `stop()`; nothing changed.
        """
        # Every insert comes here, so _push_key and _key are written out.
        # While listed in `_pushing`, the push calls no Python code and raises
        # nothing itself, so no finalizer runs inside it. The wake-up, whose
        # pop may raise, comes after.
        token = id(job)
        pushing = self._pushing
        closed = True
        wake = False
        try:
            pushing[token] = get_ident()
            if not self._closed:
                key = job._sequence
                priority = job.priority
                if priority:
                    key |= priority << _PRIORITY_SHIFT
                job._queue_seq = key
                # No other thread can reach the job before it is live, and from
                # then on cancel_job and drain_queue find it in `_pending`.
                # A thread that pops the key finds the job there too.
                self._pending[key] = job
                live[job.id] = job  # type: ignore[index]
                heappush(self._heap, key)
                closed = self._closed
                if not closed:
                    # After the heappush: a thread going to sleep lists
                    # itself, then looks at the heap, so at least one of the
                    # two finds the other.
                    wake = bool(self._sleepers) and not self.paused
                elif self._pending.pop(key, None) is job:
                    # stop() closed the queue during the push. The job goes
                    # back, unrun and uncounted, and the insert raises.
                    live.pop(job.id, None)
                    job._queue_seq = 0
                else:
                    # cancel_job, drain_queue, or a thread whose take began
                    # before the close got the job: the insert succeeds.
                    closed = False
        finally:
            pushing.pop(token, None)
        if closed:
            self._check_open()
        if wake:
            self._wake_one()

    def _push_with_lock(self, job: Job, live: dict[str, Job]) -> None:
        with self.cond:
            self._push_unlocked(job, live)

    # Free-threaded builds run a push in parallel with other pushes and takes.
    push = _push_unlocked if _GIL_ENABLED else _push_with_lock

    def ensure_open(self) -> None:
        """Raise ShuttingDown if `stop()` closed this queue."""
        with self.cond:
            self._check_open()

    def _check_open(self) -> None:
        if self._closed:
            raise ShuttingDown(
                f"queue {self.name!r} is closed because its instance is stopping; "
                "the job was not inserted"
            )

    def push_locked(self, job: Job) -> None:
        """Add a job that is available again; the caller must own `cond`."""
        self._push_key(job, _key(job.priority, next(self._numbers)))

    def _push_key(self, job: Job, key: int) -> None:
        if self._pending.get(job._queue_seq) is job:
            return  # queued already; a job has one key at a time
        job.state = _AVAILABLE
        job._queue_seq = key
        # Pending first: a thread that pops the entry must find the job.
        self._pending[key] = job
        heapq.heappush(self._heap, key)
        if self._sleepers and not self.paused:
            self._wake_one()

    def push_many(self, jobs: Iterable[Job], *, inserted: bool = False) -> int:
        """Add the jobs that are not cancelled meanwhile; return how many.

        Args:
            inserted: True when the jobs were just inserted, so their
                `_sequence` orders them; False when they become available
                later (a scheduled or retried job), which takes a new number.
        """
        heap = self._heap
        pending = self._pending
        numbers = self._numbers
        added = 0
        push = heapq.heappush
        with self.cond:
            if inserted:
                self._check_open()
                for job in jobs:
                    if job.state is not _AVAILABLE or job._queue_seq:
                        # Cancelled, or cancelled and queued again by
                        # retry_job, since it was stamped.
                        continue
                    priority = job.priority
                    key = (
                        job._sequence
                        if priority == 0
                        else priority << _PRIORITY_SHIFT | job._sequence
                    )
                    job._queue_seq = key
                    pending[key] = job
                    push(heap, key)
                    added += 1
            else:
                for job in jobs:
                    # The scheduler marked the job -1 when it took it. A job
                    # cancelled and retried meanwhile is queued already, and
                    # one scheduled again waits for its new time.
                    if job.state not in _WAITING or job._schedule_seq != -1:
                        continue
                    job._schedule_seq = 0
                    job.state = _AVAILABLE
                    key = _key(job.priority, next(numbers))
                    job._queue_seq = key
                    pending[key] = job
                    push(heap, key)
                    added += 1
            for _ in range(added if not self.paused else 0):
                if not self._wake_one():
                    break
        return added

    def remove(self, job: Job) -> bool:
        """Take an available job out of the queue; True if this call got it.

        False means a worker thread claimed the job first: it is about to run.
        The heap entry stays and is skipped when it reaches the top.
        """
        return self._pending.pop(job._queue_seq, None) is job

    def taking(self) -> bool:
        """True while some thread is part way through taking a job."""
        return bool(self._taking)

    def pushing(self, job: Job) -> bool:
        """True while the insert of `job` is part way through its push."""
        return id(job) in self._pushing

    def settle(self) -> None:
        """Wait until takes and pushes under way have ended.

        After a `remove` that missed, the job is then executing, or its
        failed insert has taken it back.

        Call it without holding `cond` or the scheduler's lock.
        """
        self._settle()

    def drain_locked(self) -> list[Job]:
        """Remove every available job, in run order; the caller owns `cond`.

        The jobs are claimed under `cond`, so `cancel_job`, which takes it
        too, finds each job either queued or drained. Their heap entries
        stay, to be skipped: a push without the lock may add one at any
        moment, and clearing the heap then would lose it.
        """
        # NOTE: in a paused queue, skipped entries of drained and cancelled
        # jobs stay in the heap (about 40 bytes each) until threads run again.
        keys = sorted(self._heap)
        pending = self._pending
        drained = (pending.pop(key, None) for key in keys)
        return [job for job in drained if job is not None]

    # Control

    def pause(self) -> None:
        with self.cond:
            self.paused = True
        self._settle()

    def resume(self) -> None:
        with self.cond:
            self.paused = False
            self._wake_all()

    def scale(self, limit: int) -> None:
        """Set the number of threads; extra threads exit when they go idle."""
        with self.cond:
            self.limit = limit
            if self._started and not self._closed:
                self._spawn(limit - self._threads)
            self._wake_all()

    def release_stuck_slot(self, thread_id: int) -> None:
        """Hand the slot of a thread stuck in a job to a new thread.

        The caller has taken the job's claim from the thread. The stuck
        thread stops counting as executing and as a pool thread.
        """
        with self.cond:
            self._release_locked(thread_id)

    def take_from_thread(self, job: Job) -> int | None:
        """Take `job`'s claim from the pool thread running it, and release it.

        Returns:
            The thread's id, or None when no pool thread of this queue still
            has the claim: the job runs in a caller's thread, its attempt
            is recording its outcome, or its thread crashed.
        """
        with self.cond:
            # Under `cond`, so the crash handler of the thread, which also
            # takes it, either comes first and finds the job or finds the
            # thread released.
            claim = job._claim
            if not claim:
                return None
            try:
                thread_id = claim[0]
                if self._running.get(thread_id) is not job:
                    return None
                # The thread's own _try_claim may win this pop.
                claim.pop()
            except IndexError:
                return None
            self._release_locked(thread_id)
            return thread_id

    def _release_locked(self, thread_id: int) -> None:
        if self._running.pop(thread_id, None) is None:
            # The thread crashed first: its crash handler took it off the
            # count and started a replacement.
            return
        self.stuck += 1
        self._released.add(thread_id)
        self._threads -= 1
        if not self._closed:
            self._spawn(self.limit - self._threads)
        self._wake_all()

    def stats(self) -> dict[str, Any]:
        with self.cond:
            return {
                "queue": self.name,
                "limit": self.limit,
                "paused": self.paused,
                "available": self.available,
                "executing": self.executing,
                "stuck": self.stuck,
                "threads": self._threads,
            }

    # The worker thread

    def _work(self) -> None:
        try:
            self._work_loop()
        except BaseException as error:
            logger.critical(
                "worker thread %s of queue %r crashed",
                threading.current_thread().name,
                self.name,
                exc_info=True,
            )
            me = threading.get_ident()
            self._taking.discard(me)
            with self.cond:
                # A thread whose job was taken is released already, and its
                # job is no longer in `_running`; see take_from_thread.
                job = self._running.pop(me, None)
                released = me in self._released
                self._released.discard(me)
            if job is not None and self._crashed is not None:
                try:
                    self._crashed(job, error)
                except Exception:
                    logger.critical(
                        "failed to discard job %s after its thread crashed; it "
                        "stays executing",
                        job.id,
                        exc_info=True,
                    )
            with self.cond:
                if released:
                    # Its slot went to a replacement when its job was taken.
                    self.stuck -= 1
                else:
                    self._threads -= 1
                if not self._closed:
                    self._spawn(self.limit - self._threads)
                self._wake_all()

    def _work_loop(self) -> None:
        me = threading.get_ident()
        heap = self._heap
        pending = self._pending
        running = self._running
        taking = self._taking
        runner = self._runner
        pop = heapq.heappop if _GIL_ENABLED else self._pop_locked
        wake = threading.Lock()
        while True:
            taking.add(me)
            if self.paused or self._closed or self._threads > self.limit:
                taking.discard(me)
                if not self._wait_for_work(wake):
                    return
                continue
            try:
                key = pop(heap)
            except IndexError:
                taking.discard(me)
                if not self._wait_for_work(wake):
                    return
                continue
            job = pending.pop(key, None)
            if job is None:
                # Cancelled, drained, or queued again under a new number.
                taking.discard(me)
                continue
            # Claimed before it turns executing, so that a stop() that finds
            # it executing can always take the claim and abandon it.
            job._claim = [me]
            running[me] = job
            job.state = _EXECUTING
            taking.discard(me)
            if runner(job, self):
                with self.cond:
                    self.stuck -= 1
                    self._released.discard(me)
                return
            # A job that snoozed for 0 s may already run in another thread,
            # so the entry is keyed by this thread, not by the job.
            running.pop(me, None)
            if self._closed:
                with self.cond:
                    self._wake_all()

    def _pop_locked(self, heap: list[int]) -> int:
        with self.cond:
            return heapq.heappop(heap)

    def _wait_for_work(self, wake: threading.Lock) -> bool:
        # Sleeps until the heap has entries and the queue runs; False when
        # this thread must exit instead.
        with self.cond:
            while True:
                if self._closed or self._threads > self.limit:
                    self._threads -= 1
                    self._wake_all()
                    return False
                if self._heap and not self.paused:
                    return True
                wake.acquire()
                self._sleepers.append(wake)
                if self._heap and not self.paused:
                    # A push without the lock came between the two looks.
                    # If it took `wake` off the list meanwhile, it releases
                    # it, and the wait below returns at once.
                    try:
                        self._sleepers.remove(wake)
                    except ValueError:
                        pass
                    else:
                        wake.release()
                        return True
                self.cond.release()
                try:
                    # Blocks until a push or _wake_all() releases it.
                    wake.acquire()
                    wake.release()
                finally:
                    self.cond.acquire()


def _key(priority: int, number: int) -> int:
    return number if priority == 0 else priority << _PRIORITY_SHIFT | number

"""Running one attempt of a job and recording its outcome.

An attempt moves through four steps. Begin sets the attempt number, the
times and the claim. Run calls `perform`, under an optional timeout. Claim
settles the race between the worker thread and the timeout, so exactly one
of them finishes the attempt. Record applies the outcome: completed,
retried, snoozed, discarded or cancelled.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
import traceback
from datetime import datetime, timedelta
from time import perf_counter
from typing import TYPE_CHECKING, Any

from stagehand import events
from stagehand._job import MAX_DELAY, Cancel, Error, Job, JobState, Snooze
from stagehand._worker import Worker, default_backoff
from stagehand.exceptions import JobTimeout

if TYPE_CHECKING:
    from stagehand._instance import Stagehand
    from stagehand._queue import Queue

__all__ = ["Executor"]

logger = logging.getLogger(__name__)

# PyThreadState_SetAsyncExc raises an exception in another thread when it
# next checks for pending work (between Python bytecodes). It cannot interrupt a blocking C call (time.sleep, socket
# reads, C extensions), which receives the exception only once it returns.
_raise_in_thread = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)
_clear_in_thread = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


_running = threading.local()
_handlers = events._by_event
_COMPLETED = JobState.COMPLETED


def current_instance() -> Stagehand | None:
    """Return the instance whose job the calling thread is running, if any."""
    return getattr(_running, "instance", None)


def _try_claim(claim: list[int]) -> bool:
    # list.pop() is one C call under the GIL, so of the worker thread and the
    # timeout, exactly one gets the item.
    try:
        claim.pop()
    except IndexError:
        return False
    return True


class Executor:
    """Runs attempts for one instance, in worker threads or inline."""

    def __init__(self, instance: Stagehand):
        self._instance = instance
        self._clock = instance.clock
        self._now = instance.clock.now
        # Reads the time an attempt begins and ends: see Stagehand._time.
        self._time = instance._time

    # Running

    def run(self, job: Job, queue: Queue | None) -> bool:
        """Run one attempt of `job`.

        This is every job's path, so it avoids calls it does not need: a
        worker thread keeps its instance in `_running` between jobs, and a
        job that returns None is completed here.

        Returns:
            True when the job's timeout finished the attempt first; the
            calling thread must then exit, since a replacement runs.
        """
        instance = self._instance
        # The claim contains the id of the thread that runs the attempt. The
        # timeout or stop() that takes the claim needs it to free the slot.
        if queue is None:
            claim = job._claim = [threading.get_ident()]
        else:
            # The queue's thread claimed the job when it took it.
            claim = job._claim  # type: ignore[assignment]
            if not claim:
                # stop() abandoned the job before its attempt began.
                return True
        attempt = job.attempt + 1
        job.attempt = attempt
        job._attempted_at = self._time()
        # Kept for `crashed`, which must act only on this thread's attempt.
        _running.claim = claim
        if "job.start" in _handlers:
            events.emit(
                "job.start",
                {"system_time": time.time()},
                {"job": job, "instance": instance.name},
            )
        outer = getattr(_running, "instance", None)
        if outer is not instance:
            _running.instance = instance
        started = perf_counter()
        worker: Worker | None = None
        try:
            try:
                worker = job._worker_class()
            except BaseException as error:
                # A constructor that raises fails the attempt like perform.
                value = error
                won = _try_claim(claim)
            else:
                if worker._stagehand_has_timeout:
                    value, won = self._perform_with_timeout(job, worker, queue, claim)
                else:
                    try:
                        value = worker.perform(job)
                    except BaseException as error:
                        value = error
                    won = _try_claim(claim)
        finally:
            # Inline runs restore the caller's instance; a pool thread keeps
            # its own, since it runs no other instance's jobs.
            if outer is not instance and queue is None:
                _running.instance = outer
        if not won:
            return True
        duration = perf_counter() - started
        if value is None:
            job._completed_at = self._time()
            instance._finish(job, _COMPLETED)
            if "job.stop" in _handlers:
                self.emit_stop(job, duration)
        else:
            self.record(job, worker, value, duration)
        return False

    def _perform_with_timeout(
        self, job: Job, worker: Worker, queue: Queue | None, claim: list[int]
    ) -> tuple[Any, bool]:
        # The timeout raises JobTimeout in this thread only while `performing`
        # is set, checked and cleared under `guard`. Once it is cleared, a
        # JobTimeout still pending is cleared too, so none can land after
        # this method returns, in the queue's own locking code. A JobTimeout
        # that lands anywhere in here means the timeout owns the attempt.
        guard = threading.Lock()
        performing = [True]
        value: Any = None
        try:
            self._arm_timeout(job, worker, queue, claim, guard, performing)
            try:
                value = worker.perform(job)
            except BaseException as error:
                value = error
            with guard:
                performing[0] = False
            _clear_in_thread(threading.get_ident(), None)
            # A JobTimeout the worker raised itself is an ordinary failure:
            # the claim is still there to win.
            won = _try_claim(claim)
        except JobTimeout:
            performing[0] = False
            won = False
        return value, won

    def _arm_timeout(
        self,
        job: Job,
        worker: Worker,
        queue: Queue | None,
        claim: list[int],
        guard: threading.Lock,
        performing: list[bool],
    ) -> None:
        try:
            seconds = worker.timeout(job)
        except Exception:
            logger.exception(
                "timeout() of job %s failed; running without a timeout", job.id
            )
            return
        if seconds is None:
            return
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not seconds > 0
        ):
            logger.error(
                "timeout() of job %s returned %r, not seconds > 0 or None; "
                "running without a timeout",
                job.id,
                seconds,
            )
            return
        if seconds > MAX_DELAY:
            # Past 100 years (or inf) there is nothing to time out.
            return
        scheduler = self._instance._scheduler
        if scheduler is None:
            # NOTE: inline runs have no scheduler thread, so no timeout applies.
            return
        thread_id = threading.get_ident()
        due = self._clock.monotonic() + seconds

        def expire() -> None:
            with guard:
                if not _try_claim(claim):
                    return
                # Counted stuck before the thread can see JobTimeout and exit.
                if queue is not None:
                    queue.release_stuck_slot(thread_id)
                if performing[0]:
                    _raise_in_thread(thread_id, JobTimeout)
            logger.warning(
                "job %s (%s) timed out after %s s on attempt %d; its thread is "
                "interrupted at its next Python bytecode",
                job.id,
                job.worker,
                seconds,
                job.attempt,
            )
            message = f"JobTimeout: attempt {job.attempt} ran longer than {seconds} s"
            self._fail(job, worker, "timeout", message, None, float(seconds))

        scheduler.call_at(due, expire)

    # Recording

    def record(
        self, job: Job, worker: Worker | None, value: Any, duration: float
    ) -> None:
        """Apply the outcome `value` of an attempt to `job`.

        `worker` is None when the worker's constructor raised.
        """
        if value is None:
            # Most jobs return nothing: skip the checks below.
            self._complete(job, None, duration)
        elif isinstance(value, BaseException):
            text = "".join(traceback.format_exception(value))
            self._fail(job, worker, "exception", text, value, duration)
        elif isinstance(value, Error):
            self._fail(job, worker, "error", _reason_text(value.reason), None, duration)
        elif isinstance(value, Snooze):
            self._snooze(job, value.seconds, duration)
        elif isinstance(value, Cancel):
            self._cancel(job, value.reason, duration)
        else:
            self._complete(job, value, duration)

    def _complete(self, job: Job, value: Any, duration: float) -> None:
        job.result = value
        job.completed_at = self._clock.now()
        self._instance._finish(job, JobState.COMPLETED)
        self.emit_stop(job, duration)

    def _fail(
        self,
        job: Job,
        worker: Worker | None,
        kind: str,
        text: str,
        error: BaseException | None,
        duration: float,
    ) -> None:
        # The wall time first: with a FakeClock moved by another thread in
        # between, the due time then cannot come before scheduled_at.
        now = self._clock.now()
        monotonic = self._clock.monotonic()
        job.errors.append(
            {"attempt": job.attempt, "at": now.isoformat(), "error": text}
        )
        self._log_failure(job, kind, text, error)
        if job.cancel_requested:
            self._cancel_failed(job, now)
        elif job.attempt < job.max_attempts:
            delay = self._backoff(job, worker)
            retry_at = now + timedelta(seconds=delay)
            if self._instance._hold(
                job,
                JobState.RETRYABLE,
                retry_at,
                self._clock.due(retry_at, monotonic, delay),
            ):
                logger.info(
                    "job %s (%s) failed attempt %d of %d, retrying in %.1f s",
                    job.id,
                    job.worker,
                    job.attempt,
                    job.max_attempts,
                    delay,
                )
            else:
                # cancel_job ran while backoff() did.
                self._cancel_failed(job, now)
        else:
            job.completed_at = now
            logger.warning(
                "job %s (%s) discarded: attempt %d of %d failed",
                job.id,
                job.worker,
                job.attempt,
                job.max_attempts,
            )
            self._instance._finish(job, JobState.DISCARDED)
        if events.has_handlers("job.exception"):
            events.emit(
                "job.exception",
                {"duration": duration},
                {
                    "job": job,
                    "instance": self._instance.name,
                    "state": job.state,
                    "kind": kind,
                    "error": error if error is not None else text,
                },
            )
        self.emit_stop(job, duration)

    def _cancel_failed(self, job: Job, now: datetime) -> None:
        # A failed attempt of a job whose cancellation was requested ends it.
        job.completed_at = now
        logger.info("job %s failed after its cancellation was requested", job.id)
        self._instance._finish(job, JobState.CANCELLED)

    def _log_failure(
        self, job: Job, kind: str, text: str, error: BaseException | None
    ) -> None:
        if error is not None:
            logger.error(
                "job %s (%s) raised on attempt %d",
                job.id,
                job.worker,
                job.attempt,
                exc_info=error,
            )
        elif kind == "error":
            logger.error(
                "job %s (%s) failed attempt %d: %s",
                job.id,
                job.worker,
                job.attempt,
                text,
            )
        # A timeout was already logged, at WARNING, when it fired.

    def _snooze(self, job: Job, seconds: float, duration: float) -> None:
        if job.cancel_requested:
            self._cancel(job, "cancel requested while the job ran", duration)
            return
        # A snooze does not use up an attempt: the attempt still counts, and
        # max_attempts grows by one to make up for it.
        wake_at = self._clock.now() + timedelta(seconds=seconds)
        monotonic = self._clock.monotonic()
        job.max_attempts += 1
        if not self._instance._hold(
            job,
            JobState.SCHEDULED,
            wake_at,
            self._clock.due(wake_at, monotonic, seconds),
        ):
            # cancel_job ran after the check above.
            job.max_attempts -= 1
            self._cancel(job, "cancel requested while the job ran", duration)
            return
        logger.debug("job %s snoozed for %s s", job.id, seconds)
        self.emit_stop(job, duration)

    def _cancel(self, job: Job, reason: Any, duration: float) -> None:
        now = self._clock.now()
        job.errors.append(
            {
                "attempt": job.attempt,
                "at": now.isoformat(),
                "error": f"cancelled: {_reason_text(reason)}",
            }
        )
        job.completed_at = now
        logger.info("job %s (%s) cancelled by its worker", job.id, job.worker)
        self._instance._finish(job, JobState.CANCELLED)
        self.emit_stop(job, duration)

    def _backoff(self, job: Job, worker: Worker | None) -> float:
        if worker is None:
            return default_backoff(job.attempt)
        try:
            delay = worker.backoff(job)
        except Exception:
            logger.exception("backoff() of job %s failed; using the default", job.id)
            return default_backoff(job.attempt)
        if (
            isinstance(delay, bool)
            or not isinstance(delay, (int, float))
            # An int compares exactly, so a huge one is caught below rather
            # than overflowing in isfinite().
            or not (delay >= 0 and (isinstance(delay, int) or math.isfinite(delay)))
        ):
            logger.error(
                "backoff() of job %s returned %r, not seconds >= 0; using the default",
                job.id,
                delay,
            )
            return default_backoff(job.attempt)
        if delay > MAX_DELAY:
            logger.error(
                "backoff() of job %s returned %r s, more than 100 years; using %r",
                job.id,
                delay,
                MAX_DELAY,
            )
            return MAX_DELAY
        return float(delay)

    def crashed(self, job: Job, error: BaseException) -> None:
        """Discard `job`, whose thread failed outside `perform`.

        Without this the job would stay executing with no thread to finish
        it. It is not retried: the failure is Stagehand's, not the job's.
        """
        claim = getattr(_running, "claim", None)
        if claim is None or job._claim is not claim:
            # The job has moved on to another attempt, in another thread.
            return
        if claim and not _try_claim(claim):
            # Its timeout took the attempt and finishes the job.
            return
        if job.state is not JobState.EXECUTING:
            return
        now = self._now()
        job.errors.append(
            {
                "attempt": job.attempt,
                "at": now.isoformat(),
                "error": f"internal error: {error!r}",
            }
        )
        job.completed_at = now
        logger.error(
            "job %s (%s) discarded after an internal error", job.id, job.worker
        )
        self._instance._finish(job, JobState.DISCARDED)
        self.emit_stop(job, 0.0)

    def emit_stop(self, job: Job, duration: float) -> None:
        if events.has_handlers("job.stop"):
            events.emit(
                "job.stop",
                {"duration": duration},
                {"job": job, "instance": self._instance.name, "state": job.state},
            )


def _reason_text(reason: Any) -> str:
    return reason if isinstance(reason, str) else repr(reason)

"""Events: attach handlers to what Stagehand does, in the style of telemetry.

A handler is called as ``handler(event, measurements, metadata)`` in the
thread that emits the event (a worker thread for job events). Events:

=================  ==========================  ==============================
event              measurements                metadata
=================  ==========================  ==============================
``job.start``      ``system_time``             ``job``, ``instance``
``job.stop``       ``duration`` (seconds;      ``job``, ``instance``,
                   0 for a job cancelled or    ``state`` (the new state)
                   abandoned by the instance)
``job.exception``  ``duration`` (seconds)      ``job``, ``instance``,
                                               ``state``, ``kind``
                                               ("exception", "error",
                                               "timeout"), ``error``
``queue.pause``    (none)                      ``queue``, ``instance``
``queue.resume``   (none)                      ``queue``, ``instance``
``peer.join``      (none)                      ``peer``, ``instance``
``peer.leave``     (none)                      ``peer``, ``instance``
``leader.change``  (none)                      ``leader``, ``instance``
=================  ==========================  ==============================

A handler that raises is detached and the error is logged; the job or
operation that emitted the event carries on unaffected.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from stagehand.exceptions import JobTimeout

__all__ = ["EVENTS", "attach", "detach", "emit", "handlers", "has_handlers"]

logger = logging.getLogger(__name__)

EVENTS = frozenset(
    {
        "job.start",
        "job.stop",
        "job.exception",
        "queue.pause",
        "queue.resume",
        "peer.join",
        "peer.leave",
        "leader.change",
    }
)

Handler = Callable[[str, Mapping[str, Any], Mapping[str, Any]], Any]

_lock = threading.Lock()
# Each event maps to a tuple that is replaced, never mutated, so emit() reads
# it without taking the lock.
_by_event: dict[str, tuple[tuple[Hashable, Handler], ...]] = {}
_by_id: dict[Hashable, tuple[frozenset[str], Handler]] = {}


def attach(
    handler_id: Hashable, event_names: Iterable[str] | str, handler: Handler
) -> None:
    """Call `handler` for each of `event_names`.

    Raises:
        ValueError: `handler_id` is already attached, or an event name is
            unknown.
        TypeError: `handler` is not callable.
    """
    names = [event_names] if isinstance(event_names, str) else list(event_names)
    unknown = sorted(set(names) - EVENTS)
    if unknown or not names:
        raise ValueError(
            f"unknown event names {unknown or names!r}; valid names are "
            f"{sorted(EVENTS)}"
        )
    if not callable(handler):
        raise TypeError(f"handler must be callable; got {handler!r}")
    with _lock:
        if handler_id in _by_id:
            raise ValueError(
                f"a handler with id {handler_id!r} is already attached; "
                "detach it first or choose another id"
            )
        _by_id[handler_id] = (frozenset(names), handler)
        for name in set(names):
            _by_event[name] = (*_by_event.get(name, ()), (handler_id, handler))


def detach(handler_id: Hashable) -> bool:
    """Remove the handler attached as `handler_id`; False if there was none."""
    with _lock:
        entry = _by_id.pop(handler_id, None)
        if entry is None:
            return False
        for name in entry[0]:
            remaining = tuple(item for item in _by_event[name] if item[0] != handler_id)
            if remaining:
                _by_event[name] = remaining
            else:
                del _by_event[name]
        return True


def handlers() -> dict[Hashable, frozenset[str]]:
    """Return the attached handler ids and the events each one receives."""
    with _lock:
        return {handler_id: names for handler_id, (names, _) in _by_id.items()}


def has_handlers(event: str) -> bool:
    return event in _by_event


def emit(
    event: str, measurements: Mapping[str, Any], metadata: Mapping[str, Any]
) -> None:
    """Call every handler of `event`; detach and log any handler that raises."""
    for handler_id, handler in _by_event.get(event, ()):
        try:
            handler(event, measurements, metadata)
        except (KeyboardInterrupt, JobTimeout):
            raise
        except BaseException:
            detach(handler_id)
            logger.exception(
                "event handler %r raised on %r and was detached", handler_id, event
            )

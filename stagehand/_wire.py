"""Jobs as JSON objects, for handing them from one peer to another.

A job that moves to another peer keeps its id, attempt, errors and times.
`job_to_wire` returns the JSON object. `job_from_wire` checks every field
of an object received from a peer and builds an unsaved `Job` from it.
Peers are authenticated, but their data is checked like user input, and a
job whose worker is not an importable `Worker` subclass is rejected.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from stagehand import _options
from stagehand._job import Job, JobState
from stagehand._worker import resolve_worker
from stagehand.exceptions import InvalidOption

__all__ = ["MOVABLE_STATES", "job_from_wire", "job_to_wire"]

# The states in which a job may move: those of a job that waits to run.
MOVABLE_STATES = frozenset({JobState.AVAILABLE, JobState.SCHEDULED, JobState.RETRYABLE})

_FIELDS = frozenset(
    {
        "id",
        "worker",
        "queue",
        "args",
        "meta",
        "tags",
        "priority",
        "max_attempts",
        "attempt",
        "state",
        "inserted_at",
        "scheduled_at",
        "errors",
        "unique",
    }
)
# Fields that a job may lack: `attempted_at` is absent until a first attempt.
_OPTIONAL = frozenset({"attempted_at"})
_ERROR_KEYS = frozenset({"attempt", "at", "error"})


def job_to_wire(job: Job) -> dict[str, Any]:
    """Return the JSON object that carries `job` to another peer."""
    data = job.to_dict()
    del data["completed_at"], data["conflict"]
    if data["attempted_at"] is None:
        del data["attempted_at"]
    return data


def job_from_wire(data: object) -> Job:
    """Build an unsaved job from the JSON object `data` sent by a peer.

    Raises:
        InvalidOption: A field is missing, unknown or invalid, or the job is
            not in a state from which it may move.
        UnknownWorker: The worker is not an importable `Worker` subclass.
    """
    if not isinstance(data, dict):
        raise InvalidOption(f"a job must be a JSON object; got {_short(data)}")
    missing = _FIELDS - data.keys()
    unknown = data.keys() - _FIELDS - _OPTIONAL
    if missing or unknown:
        raise InvalidOption(
            f"a job must have the fields {sorted(_FIELDS)}, and may have "
            f"{sorted(_OPTIONAL)}; missing {sorted(missing)}, unknown "
            f"{sorted(unknown)}"
        )
    job_id = data["id"]
    if not isinstance(job_id, str) or not job_id or not job_id.isprintable():
        raise InvalidOption(
            f"job id must be a printable, non-empty string; got {job_id!r}"
        )
    worker_class = resolve_worker(data["worker"])
    try:
        state = JobState(data["state"])
    except ValueError:
        raise InvalidOption(f"job {job_id}: unknown state {data['state']!r}") from None
    if state not in MOVABLE_STATES:
        raise InvalidOption(
            f"job {job_id} is {state.value}; only available, scheduled and "
            "retryable jobs move between peers"
        )
    max_attempts = _options.check_max_attempts(data["max_attempts"])
    attempt = data["attempt"]
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        raise InvalidOption(f"job {job_id}: attempt must be an int; got {attempt!r}")
    if not 0 <= attempt <= max_attempts:
        raise InvalidOption(
            f"job {job_id}: attempt must be from 0 to max_attempts "
            f"({max_attempts}); got {attempt!r}"
        )
    attempted_at = data.get("attempted_at")
    job = Job(
        worker=worker_class._stagehand_path,
        args=_options.normalize_json_dict(data["args"], "args"),
        queue=_options.check_queue_name(data["queue"]),
        meta=_options.normalize_json_dict(data["meta"], "meta"),
        tags=_options.check_tags(data["tags"]),
        priority=_options.check_priority(data["priority"]),
        max_attempts=max_attempts,
        attempt=attempt,
        state=state,
        id=job_id,
        inserted_at=_time(job_id, "inserted_at", data["inserted_at"]),
        scheduled_at=_time(job_id, "scheduled_at", data["scheduled_at"]),
        attempted_at=(
            None
            if attempted_at is None
            else _time(job_id, "attempted_at", attempted_at)
        ),
        errors=_errors(job_id, data["errors"]),
        unique=_options.normalize_unique(data["unique"]),
        _worker_class=worker_class,
    )
    return job


def _time(job_id: str, name: str, value: object) -> datetime:
    if not isinstance(value, str):
        raise InvalidOption(
            f"job {job_id}: {name} must be an ISO 8601 string; got {_short(value)}"
        )
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidOption(
            f"job {job_id}: {name} is not an ISO 8601 time: {value!r}"
        ) from None
    try:
        return _options.check_scheduled_at(parsed)
    except InvalidOption as error:
        raise InvalidOption(f"job {job_id}: {name}: {error}") from None


def _errors(job_id: str, value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise InvalidOption(f"job {job_id}: errors must be a list; got {_short(value)}")
    for entry in value:
        if not isinstance(entry, dict) or entry.keys() != _ERROR_KEYS:
            raise InvalidOption(
                f"job {job_id}: each error must be an object with the keys "
                f"{sorted(_ERROR_KEYS)}; got {_short(entry)}"
            )
        attempt, at, text = entry["attempt"], entry["at"], entry["error"]
        if (
            isinstance(attempt, bool)
            or not isinstance(attempt, int)
            or not isinstance(at, str)
            or not isinstance(text, str)
        ):
            raise InvalidOption(
                f"job {job_id}: an error needs an int attempt and string at "
                f"and error; got {_short(entry)}"
            )
    return [dict(entry) for entry in value]


def _short(value: object) -> str:
    # Data from a peer may be large; an error message quotes only its start.
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."

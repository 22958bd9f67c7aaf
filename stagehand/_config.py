"""Validation of the settings of a `Stagehand` instance."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stagehand import _options
from stagehand._clock import Clock, SystemClock
from stagehand.exceptions import InvalidOption
from stagehand.plugins import Plugin

if TYPE_CHECKING:
    from stagehand._cluster import ClusterSettings

__all__ = ["QueueSettings", "Settings", "TESTING_MODES", "build_settings"]

TESTING_MODES = ("disabled", "manual", "inline")
DEFAULT_QUEUES: Mapping[str, int] = {"default": 10}
DEFAULT_GRACE_PERIOD = 15.0
DEFAULT_RETENTION_PERIOD = 300.0
DEFAULT_RETENTION_LIMIT = 10_000
DEFAULT_UNIQUE_LIMIT = 100_000
MAX_QUEUE_LIMIT = 1_000


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueSettings:
    """One queue: its number of worker threads and whether it starts paused."""

    name: str
    limit: int
    paused: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The validated settings of one instance; see `Stagehand` for each."""

    queues: tuple[QueueSettings, ...]
    plugins: tuple[tuple[type[Plugin], Mapping[str, Any]], ...]
    testing: str
    shutdown_grace_period: float
    cluster: ClusterSettings | None
    name: str
    clock: Clock
    retention_period: float
    retention_limit: int
    unique_limit: int
    leader_lock: str | None = None


def build_settings(
    *,
    queues: Mapping[str, Any] | None,
    plugins: Any,
    testing: str,
    shutdown_grace_period: float,
    cluster: Mapping[str, Any] | None,
    name: str,
    clock: Clock | None,
    retention_period: float,
    retention_limit: int,
    unique_limit: int,
    leader_lock: str | os.PathLike[str] | None = None,
) -> Settings:
    """Check every setting and return them as one `Settings`.

    Raises:
        InvalidOption: A setting is invalid; the message names it and the fix.
    """
    if testing not in TESTING_MODES:
        raise InvalidOption(
            f"testing must be one of {', '.join(map(repr, TESTING_MODES))}; got {testing!r}"
        )
    if not isinstance(name, str) or not name:
        raise InvalidOption(f"name must be a non-empty string; got {name!r}")
    if clock is not None and not isinstance(clock, Clock):
        raise InvalidOption(
            f"clock must be a stagehand.testing.FakeClock or another Clock; got {clock!r}"
        )
    cluster_settings = None
    if cluster is not None:
        from stagehand._cluster import check_cluster

        cluster_settings = check_cluster(cluster)
        if testing != "disabled":
            raise InvalidOption(
                f"cluster mode runs real worker threads, so it needs "
                f"testing='disabled'; got testing={testing!r}. Leave cluster out "
                "in tests that use a testing mode"
            )
        if leader_lock is not None:
            raise InvalidOption(
                "pass cluster or leader_lock, not both: the peers of a cluster "
                "elect their leader themselves"
            )
    return Settings(
        queues=_check_queues(DEFAULT_QUEUES if queues is None else queues),
        plugins=_check_plugins(plugins),
        testing=testing,
        shutdown_grace_period=_check_seconds(
            "shutdown_grace_period", shutdown_grace_period, allow_zero=True
        ),
        cluster=cluster_settings,
        name=name,
        clock=clock if clock is not None else SystemClock(),
        retention_period=_check_seconds(
            "retention_period", retention_period, allow_zero=True
        ),
        retention_limit=_check_count("retention_limit", retention_limit, minimum=0),
        unique_limit=_check_count("unique_limit", unique_limit, minimum=1),
        leader_lock=_check_leader_lock(leader_lock),
    )


def _check_leader_lock(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise InvalidOption(
            f"leader_lock must be the path of a lock file or None; got {value!r}"
        )
    path = os.fspath(value)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InvalidOption(
            f"leader_lock {path!r} is in a directory that does not exist; "
            f"create {directory!r} first"
        )
    return str(path)


def _check_seconds(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOption(f"{name} must be a number of seconds; got {value!r}")
    seconds = _options.as_float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise InvalidOption(
            f"{name} must be a finite number of seconds >= 0; got {_options.short_repr(value)}"
        )
    return seconds


def _check_count(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidOption(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


def check_limit(queue: str, limit: object) -> int:
    if (
        isinstance(limit, bool)
        or not isinstance(limit, int)
        or not 1 <= limit <= MAX_QUEUE_LIMIT
    ):
        raise InvalidOption(
            f"the limit of queue {queue!r} must be an int from 1 to "
            f"{MAX_QUEUE_LIMIT} (worker threads); got {limit!r}"
        )
    return limit


def _check_queues(queues: object) -> tuple[QueueSettings, ...]:
    if not isinstance(queues, Mapping) or not queues:
        raise InvalidOption(
            f"queues must be a non-empty dict of queue name to thread count, such "
            f'as {{"default": 10}}; got {queues!r}'
        )
    checked = []
    for name, value in queues.items():
        _options.check_queue_name(name, "queue name")
        paused = False
        if isinstance(value, Mapping):
            unknown = set(value) - {"limit", "paused"}
            if unknown or "limit" not in value:
                raise InvalidOption(
                    f"queue {name!r} must be an int or a dict with 'limit' and "
                    f"optionally 'paused'; got {dict(value)!r}"
                )
            paused = value.get("paused", False)
            if not isinstance(paused, bool):
                raise InvalidOption(
                    f"queue {name!r} paused must be True or False; got {paused!r}"
                )
            value = value["limit"]
        checked.append(
            QueueSettings(name=name, limit=check_limit(name, value), paused=paused)
        )
    return tuple(checked)


def _check_plugins(
    plugins: object,
) -> tuple[tuple[type[Plugin], Mapping[str, Any]], ...]:
    if plugins is None:
        return ()
    if isinstance(plugins, (str, Mapping)) or not isinstance(plugins, (list, tuple)):
        raise InvalidOption(
            f"plugins must be a list of (PluginClass, options) pairs; got {plugins!r}"
        )
    checked = []
    for index, item in enumerate(plugins):
        options: object = {}
        if isinstance(item, tuple):
            if len(item) != 2:
                raise InvalidOption(
                    f"plugins[{index}] must be (PluginClass, options); got {item!r}"
                )
            item, options = item
        plugin = resolve_plugin(item, index)
        if not isinstance(options, Mapping):
            raise InvalidOption(
                f"plugins[{index}] options must be a dict; got {options!r}"
            )
        checked.append((plugin, plugin.validate(options)))
    return tuple(checked)


def resolve_plugin(value: object, index: int) -> type[Plugin]:
    """Return the `Plugin` subclass named by a class or a dotted path."""
    target = value
    if isinstance(value, str):
        module_name, _, attribute = value.rpartition(".")
        try:
            target = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as error:
            raise InvalidOption(
                f"plugins[{index}]: cannot import {value!r} ({error}); write the "
                "dotted path of a Plugin class, such as 'stagehand.plugins.Cron'"
            ) from None
    if not (isinstance(target, type) and issubclass(target, Plugin)):
        raise InvalidOption(
            f"plugins[{index}] must be a stagehand.plugins.Plugin subclass or its "
            f"dotted path; got {value!r}"
        )
    return target

"""Django settings of Stagehand, with their defaults and their validation.

Settings read here:

``STAGEHAND``
    A dict of the keyword arguments of `stagehand.Stagehand`: queues,
    plugins, testing, shutdown_grace_period, cluster, clock,
    retention_period, retention_limit and unique_limit. Workers and plugins
    may be classes or dotted paths. Defaults to ``{}`` (the core defaults).
``STAGEHAND_AUTOSTART``
    None (default) lets the app decide which processes start the default
    instance; True starts it in every process when Django is ready; False
    never starts it (call `stagehand_django.lifecycle.start()` yourself).
``STAGEHAND_INSERT_ON_COMMIT``
    True makes ``job.insert()`` wait for the current transaction of the
    default database to commit, as ``job.insert(on_commit=True)`` does.
    Defaults to False.
``STAGEHAND_RUNTIME_DIR``
    Absolute path of the directory holding each running process's control
    socket, read by ``manage.py stagehand_status``. Defaults to a directory
    per user and project under `tempfile.gettempdir()`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

import stagehand
from stagehand import _config
from stagehand.exceptions import QueueNotConfigured

__all__ = [
    "Problem",
    "autostart",
    "insert_on_commit",
    "instance_kwargs",
    "problems",
    "runtime_dir",
]

# Keyword arguments of Stagehand(...) that STAGEHAND may hold, with defaults.
# "name" is left out: the app always manages the instance named "default".
_SIGNATURE = inspect.signature(stagehand.Stagehand.__init__)
DEFAULTS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in _SIGNATURE.parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "name"
}

_HINTS = {
    "queues": 'Use a dict of queue name to worker threads, such as {"default": 10}.',
    "plugins": "Use a list of (PluginClass or dotted path, options) pairs.",
    "leader_lock": 'Use an absolute path, such as BASE_DIR / "stagehand.lock".',
    "testing": 'Use "disabled" to run jobs, or "manual" or "inline" in tests.',
    "shutdown_grace_period": "Use a number of seconds, such as 15.",
    "cluster": 'Use a dict such as {"name": "shop", "secret": '
    'os.environ["STAGEHAND_SECRET"]}; see docs/cluster.md.',
    "clock": "Use a stagehand.Clock, such as stagehand.FakeClock(), or remove it.",
    "retention_period": "Use a number of seconds, such as 300.",
    "retention_limit": "Use an int >= 0, such as 10000.",
    "unique_limit": "Use an int >= 1, such as 100000.",
}
# The hint when the plugins list is well formed but a plugin rejects its
# options, such as a bad cron expression or worker path.
_PLUGIN_OPTIONS_HINT = (
    "Fix the plugin options that the message names; the list of "
    "(plugin, options) pairs itself is valid."
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One mistake in the settings, as a system check reports it."""

    id: str
    msg: str
    hint: str
    warning: bool = False


def problems() -> list[Problem]:
    """Return every mistake in the Stagehand settings; empty when all is well."""
    value = getattr(settings, "STAGEHAND", {})
    found = _stagehand_problems(value)
    found.extend(_flag_problems())
    found.extend(_task_problems(_configured_queues(value)))
    found.extend(_unknown_setting_problems())
    return found


KNOWN_SETTINGS = (
    "STAGEHAND",
    "STAGEHAND_AUTOSTART",
    "STAGEHAND_INSERT_ON_COMMIT",
    "STAGEHAND_RUNTIME_DIR",
)


def _unknown_setting_problems() -> list[Problem]:
    # A misspelled setting name is otherwise ignored without a word.
    found = []
    for name in dir(settings):
        if not name.startswith("STAGEHAND") or name in KNOWN_SETTINGS:
            continue
        close = difflib.get_close_matches(name, KNOWN_SETTINGS, n=1)
        found.append(
            Problem(
                id="stagehand.W001",
                msg=f"{name} is not a Stagehand setting and is ignored",
                hint=f"Did you mean {close[0]}?"
                if close
                else f"Stagehand reads {', '.join(KNOWN_SETTINGS)}.",
                warning=True,
            )
        )
    return found


_TASK_BACKEND = "stagehand_django.tasks.StagehandBackend"


def _configured_queues(value: object) -> set[str] | None:
    """Return the queue names that STAGEHAND configures, None if unknown.

    They are unknown when STAGEHAND or its "queues" is invalid, which
    another problem reports.
    """
    if not isinstance(value, Mapping):
        return None
    queues = value.get("queues")
    if queues is None:
        return set(_config.DEFAULT_QUEUES)
    if _value_problems("queues", queues):
        return None
    return set(queues)


def _task_problems(configured: set[str] | None) -> list[Problem]:
    # django.tasks registers its own checks only once it is imported, so the
    # entries of Stagehand task backends are checked here, and their queues
    # against `configured` unless that is None (unknown).
    backends = getattr(settings, "TASKS", {})
    found = []
    for alias, params in backends.items() if isinstance(backends, Mapping) else ():
        if not isinstance(params, Mapping):
            found.append(
                Problem(
                    id="stagehand.E010",
                    msg=f"TASKS[{alias!r}] must be a dict of backend settings; "
                    f"got {params!r}",
                    hint=f'Write TASKS = {{{alias!r}: {{"BACKEND": '
                    f'"{_TASK_BACKEND}", "QUEUES": ["default"]}}}}.',
                )
            )
            continue
        if params.get("BACKEND") != _TASK_BACKEND:
            continue
        names = params.get("QUEUES", ["default"])
        if not isinstance(names, (list, tuple, set, frozenset)) or not all(
            isinstance(name, str) for name in names
        ):
            found.append(
                Problem(
                    id="stagehand.E010",
                    msg=f"TASKS[{alias!r}]['QUEUES'] must be a list of queue "
                    f"names; got {names!r}",
                    hint='Write a list of Stagehand queue names, such as "QUEUES": '
                    '["default", "mailers"], or remove QUEUES to use ["default"].',
                )
            )
            continue
        if configured is None:
            continue
        missing = sorted(set(names) - configured)
        if missing:
            found.append(
                Problem(
                    id="stagehand.E008",
                    msg=f"TASKS[{alias!r}]['QUEUES'] names queues {missing} that "
                    "STAGEHAND['queues'] does not configure",
                    hint="Add them to STAGEHAND['queues'] or remove them from QUEUES.",
                )
            )
    return found


def _stagehand_problems(value: object) -> list[Problem]:
    if not isinstance(value, Mapping):
        return [
            Problem(
                id="stagehand.E001",
                msg=f"STAGEHAND must be a dict; got {value!r}",
                hint='Write STAGEHAND = {"queues": {"default": 10}}, or remove it.',
            )
        ]
    found = []
    for key in value:
        if key == "name":
            found.append(
                Problem(
                    id="stagehand.E002",
                    msg=f"STAGEHAND['name'] cannot be set; got {value[key]!r}",
                    hint="Remove it: Django manages the instance named 'default', "
                    "which job.insert() uses.",
                )
            )
        elif key not in DEFAULTS:
            found.append(
                Problem(
                    id="stagehand.E003",
                    msg=f"STAGEHAND has an unknown key {key!r}",
                    hint=f"Valid keys are {', '.join(sorted(DEFAULTS))}.",
                )
            )
    for key in DEFAULTS:
        if key not in value:
            continue
        # A relative leader_lock is reported as such even when the core would
        # also reject it, because the core resolves it against this process's
        # working directory.
        relative = _leader_lock_problems(value[key]) if key == "leader_lock" else []
        found.extend(relative or _value_problems(key, value[key]))
    if not found:
        found.extend(_cluster_problems(value))
    if not found:
        found.extend(_instance_problems(value))
    return found


def _cluster_problems(value: Mapping[str, Any]) -> list[Problem]:
    # The settings that cluster mode rules out, each valid on its own.
    if value.get("cluster") is None:
        return []
    testing = value.get("testing", "disabled")
    if testing != "disabled":
        return [
            Problem(
                id="stagehand.E004",
                msg=f"STAGEHAND['cluster'] needs testing='disabled'; got "
                f"testing={testing!r}",
                hint="Remove 'cluster' from STAGEHAND in the settings that tests "
                "use, or set testing to 'disabled'.",
            )
        ]
    if value.get("leader_lock") is not None:
        return [
            Problem(
                id="stagehand.E004",
                msg="STAGEHAND has both 'cluster' and 'leader_lock'",
                hint="Remove 'leader_lock': the peers of a cluster elect their "
                "cron leader themselves.",
            )
        ]
    return []


def _leader_lock_problems(value: object) -> list[Problem]:
    # The core accepts a relative path, which each process resolves against
    # its own working directory, so processes started from different
    # directories would elect their cron leaders through different files.
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        return []  # the core's check reports these
    if os.path.isabs(value):
        return []
    return [
        Problem(
            id="stagehand.E009",
            msg=f"STAGEHAND['leader_lock'] must be an absolute path; got {value!r}",
            hint="Processes started from different directories would use "
            f"different lock files and each lead cron. {_HINTS['leader_lock']}",
        )
    ]


def _instance_problems(value: Mapping[str, Any]) -> list[Problem]:
    # Plugins check some settings only against the whole instance (a cron
    # entry's queue must be one of the instance's queues). Building an
    # instance starts no thread and registers nothing, so check builds one
    # and drops it. It is named "default", as the real instance is, because
    # the name appears in the plugins' error messages.
    kwargs = {key: value[key] for key in value if key in DEFAULTS}
    kwargs["name"] = "default"
    try:
        stagehand.Stagehand(**kwargs)
    except (ValueError, TypeError) as error:
        # Every other key passed its own check before this runs, so the
        # error comes from a plugin.
        hint = "Make the plugin options agree with the rest of STAGEHAND."
        if isinstance(error, QueueNotConfigured):
            hint = (
                "Add the queue to STAGEHAND['queues'], or change the plugin "
                "options to use a configured queue."
            )
        return [
            Problem(
                id="stagehand.E004",
                msg=f"STAGEHAND['plugins'] is invalid: {error}",
                hint=hint,
            )
        ]
    return []


def _value_problems(key: str, value: object) -> list[Problem]:
    # Each key is checked alone against core defaults for the others, so that
    # every bad key gets its own message.
    arguments = {**DEFAULTS, "name": "default", key: value}
    try:
        _config.build_settings(**arguments)
    except (ValueError, TypeError) as error:
        hint = _HINTS.get(key, "See docs/django.md.")
        if key == "plugins" and _is_plugin_list(value):
            hint = _PLUGIN_OPTIONS_HINT
        return [
            Problem(
                id="stagehand.E004",
                msg=f"STAGEHAND[{key!r}] is invalid: {error}",
                hint=hint,
            )
        ]
    return []


def _is_plugin_list(value: object) -> bool:
    """Return whether `value` is a well-formed list of (plugin, options) pairs.

    This repeats the structural checks of the core's plugin validation, but
    not the plugins' checks of their own options.
    """
    if value is None:
        return True
    if isinstance(value, (str, Mapping)) or not isinstance(value, (list, tuple)):
        return False
    for index, item in enumerate(value):
        options: object = {}
        if isinstance(item, tuple):
            if len(item) != 2:
                return False
            item, options = item
        if not isinstance(options, Mapping):
            return False
        try:
            _config.resolve_plugin(item, index)
        except (ValueError, TypeError):
            return False
    return True


def _flag_problems() -> list[Problem]:
    found = []
    value = getattr(settings, "STAGEHAND_AUTOSTART", None)
    if value is not None and not isinstance(value, bool):
        found.append(
            Problem(
                id="stagehand.E005",
                msg=f"STAGEHAND_AUTOSTART must be None, True or False; got {value!r}",
                hint="None lets the app decide per process; see docs/django.md.",
            )
        )
    value = getattr(settings, "STAGEHAND_INSERT_ON_COMMIT", False)
    if not isinstance(value, bool):
        found.append(
            Problem(
                id="stagehand.E006",
                msg=f"STAGEHAND_INSERT_ON_COMMIT must be True or False; got {value!r}",
                hint="True makes job.insert() wait for the transaction to commit.",
            )
        )
    value = getattr(settings, "STAGEHAND_RUNTIME_DIR", None)
    if value is not None and (
        not isinstance(value, (str, os.PathLike)) or not os.path.isabs(value)
    ):
        found.append(
            Problem(
                id="stagehand.E007",
                msg=f"STAGEHAND_RUNTIME_DIR must be an absolute path; got {value!r}",
                hint="Use a directory only this user can write, or remove the setting.",
            )
        )
    elif value is not None and (blocker := _non_directory_in(value)) is not None:
        found.append(
            Problem(
                id="stagehand.E007",
                msg=f"STAGEHAND_RUNTIME_DIR cannot be created, because {blocker!r} "
                f"is not a directory: {value!r}",
                hint="Use a directory only this user can write, or remove the setting.",
            )
        )
    elif value is not None and len(os.fsencode(value)) > _MAX_RUNTIME_DIR_BYTES:
        found.append(
            Problem(
                id="stagehand.E007",
                msg=f"STAGEHAND_RUNTIME_DIR is too long for Unix socket paths "
                f"({len(os.fsencode(value))} bytes; at most "
                f"{_MAX_RUNTIME_DIR_BYTES}): {value!r}",
                hint="Use a shorter directory, such as one under /run or /tmp.",
            )
        )
    return found


def _non_directory_in(path: str | os.PathLike[str]) -> str | None:
    """Return the closest existing part of `path` if it is not a directory."""
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent
    return None if os.path.isdir(current) else current


# A Unix socket path holds at most 107 bytes on Linux; each socket is named
# "<pid>.sock" in the runtime directory, and a pid has at most 7 digits.
_MAX_RUNTIME_DIR_BYTES = 107 - len("/4194304.sock")


def _raise_first(found: list[Problem]) -> None:
    if found:
        first = found[0]
        raise ImproperlyConfigured(f"{first.msg}. {first.hint} ({first.id})")


def instance_kwargs() -> dict[str, Any]:
    """Return the keyword arguments of the default instance, from STAGEHAND.

    Raises:
        ImproperlyConfigured: A setting is invalid; ``manage.py check``
            lists every mistake.
    """
    value = getattr(settings, "STAGEHAND", {})
    _raise_first(_stagehand_problems(value))
    return {**dict(value), "name": "default"}


def autostart() -> bool | None:
    """Return STAGEHAND_AUTOSTART: None, True or False."""
    _raise_first(_flag_problems())
    value: bool | None = getattr(settings, "STAGEHAND_AUTOSTART", None)
    return value


def insert_on_commit() -> bool:
    """Return STAGEHAND_INSERT_ON_COMMIT (default False)."""
    value = getattr(settings, "STAGEHAND_INSERT_ON_COMMIT", False)
    return value if isinstance(value, bool) else False


def testing_mode() -> str:
    """Return the configured testing mode, "disabled" when unset or invalid."""
    value = getattr(settings, "STAGEHAND", {})
    mode = value.get("testing", "disabled") if isinstance(value, Mapping) else None
    return mode if mode in _config.TESTING_MODES else "disabled"


def runtime_dir() -> str:
    """Return the directory of control sockets for this project.

    The default is ``<tempdir>/stagehand-<uid>-<hash>``, where the hash is
    taken from the project's directory: ``BASE_DIR``, or else the directory
    of the settings module's top package. So processes of one project share
    it even when they use different settings modules (``settings.web`` and
    ``settings.worker``), and two projects of one user do not.
    """
    value = getattr(settings, "STAGEHAND_RUNTIME_DIR", None)
    if value is not None:
        _raise_first(_flag_problems())
        return str(os.fspath(value))
    digest = hashlib.sha256(_project_dir().encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"stagehand-{os.getuid()}-{digest}")


def _project_dir() -> str:
    base = getattr(settings, "BASE_DIR", None)
    if base is not None:
        return str(os.path.realpath(os.fspath(base)))
    top = (settings.SETTINGS_MODULE or "").partition(".")[0]
    try:
        spec = importlib.util.find_spec(top) if top else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        # Settings configured in code, with no module: the working directory.
        return f"{top}|{os.getcwd()}"
    return os.path.dirname(os.path.realpath(spec.origin))

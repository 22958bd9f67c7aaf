"""Starting and stopping the default instance in each Django process.

Which processes start it (with ``STAGEHAND_AUTOSTART = None``, the
default):

- every process, when ``STAGEHAND["testing"]`` is "manual" or "inline"
  (no thread runs in those modes), when Django is ready;
- the serving child of ``manage.py runserver`` (``RUN_MAIN=true``, or
  ``--noreload``), when Django is ready; never the autoreloader's parent;
- ``manage.py stagehand_worker``, which starts it itself;
- no other management command (migrate, shell, check, test, ...);
- any other program, such as gunicorn, uWSGI or an ASGI server: lazily, on
  the first request the process serves, or from a post-fork hook
  (`post_worker_init` for gunicorn). The process that forks workers, such as
  gunicorn's master under ``--preload``, serves no request and so runs no
  job threads.

``STAGEHAND_AUTOSTART = True`` starts it in every process when Django is
ready; False never starts it (call `start` yourself).

The instance stops gracefully at interpreter exit (`stop` is registered
with `atexit`), which is how runserver, gunicorn workers and uWSGI workers
end on a clean exit. Nothing here installs a signal handler.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import get_commands, load_command_class
from django.core.management.base import ALL_CHECKS
from django.core.signals import request_started

import stagehand
from stagehand.exceptions import InvalidOption
from stagehand_django import conf, db
from stagehand_django.control import ControlPlugin, prepare_directory

__all__ = [
    "decide",
    "install",
    "post_worker_init",
    "runs_system_checks",
    "start",
    "stop",
]

logger = logging.getLogger(__name__)

EAGER, LAZY, NEVER = "eager", "lazy", "never"
# Seconds `stop` waits for worker threads to exit once the instance stopped.
THREAD_EXIT_WAIT = 2.0
_MANAGE_PROGRAMS = ("manage.py", "django-admin", "django-admin.py")

_lock = threading.Lock()
_owned: stagehand.Stagehand | None = None
_stopped = False


def _forget_after_fork() -> None:
    global _lock, _owned, _stopped
    _lock = threading.Lock()
    _owned = None
    _stopped = False


os.register_at_fork(after_in_child=_forget_after_fork)


def management_command(argv: list[str] | None = None) -> str | None:
    """Return the management command this process runs, or None."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return None
    program = argv[0]
    name = os.path.basename(program)
    is_django_main = (
        name == "__main__.py" and os.path.basename(os.path.dirname(program)) == "django"
    )
    if name not in _MANAGE_PROGRAMS and not is_django_main:
        return None
    return argv[1] if len(argv) > 1 else "help"


def decide(argv: list[str] | None = None) -> str:
    """Return when this process starts the default instance.

    Returns:
        "eager" (when Django is ready), "lazy" (on the first request or a
        post-fork hook) or "never".
    """
    argv = sys.argv if argv is None else argv
    if management_command(argv) == "stagehand_status":
        # The status command reports on other processes and must not count,
        # or lead cron, itself.
        return NEVER
    flag = conf.autostart()
    if flag is not None:
        return EAGER if flag else NEVER
    if conf.testing_mode() != "disabled":
        return EAGER
    command = management_command(argv)
    if command is None:
        return LAZY
    if command == "runserver" and (
        os.environ.get("RUN_MAIN") == "true" or _without_reloader(argv)
    ):
        return EAGER
    return NEVER


def _without_reloader(argv: list[str]) -> bool:
    # argparse takes any unambiguous prefix of an option, and runserver's
    # --nothreading and --nostatic share "--no", so "--nor" is the shortest
    # prefix that means --noreload.
    return any(
        len(arg) >= len("--nor") and "--noreload".startswith(arg) for arg in argv
    )


def install() -> None:
    """Start now or connect the lazy start; called by the app's ready().

    A settings error is not raised, so that ``manage.py check`` can still
    report it. It is logged, except in a management command that runs the
    system checks and those report a Stagehand error themselves.
    """
    try:
        when = decide()
        if when == EAGER:
            start()
    except ImproperlyConfigured as error:
        # The checks cannot find some start errors, such as an unusable
        # runtime directory, so those are logged in every process.
        reported = any(not problem.warning for problem in conf.problems())
        if reported and runs_system_checks():
            return
        advice = " Run manage.py check to list every mistake." if reported else ""
        logger.error("Stagehand was not started: %s%s", error, advice)
        return
    if when == LAZY:
        request_started.connect(_start_on_request, dispatch_uid=__name__)


# Commands that run every system check in their own code, not through
# BaseCommand.requires_system_checks. The test runner calls check. Stagehand's
# check has no tag, so "check --tag" skips it.
_CHECKING_COMMANDS = ("check", "test")


def runs_system_checks(argv: list[str] | None = None) -> bool:
    """Return whether this process is a management command that runs
    Stagehand's system check before doing its work."""
    argv = sys.argv if argv is None else argv
    command = management_command(argv)
    if command is None or "--skip-checks" in argv:
        return False
    if command in _CHECKING_COMMANDS:
        return command != "check" or not any(
            arg in ("-t", "--tag") or arg.startswith("--tag=") for arg in argv
        )
    try:
        app_name = get_commands()[command]
        command_class = load_command_class(app_name, command)
    except (KeyError, ImportError, AttributeError):
        # Django reports an unknown or broken command when it loads it next.
        return False
    return bool(command_class.requires_system_checks == ALL_CHECKS)


def _start_on_request(sender: Any, **kwargs: Any) -> None:
    if _owned is not None or _stopped:
        return
    if getattr(sender, "__module__", "") == "django.test.client":
        return
    start()


def post_worker_init(worker: Any) -> None:
    """Gunicorn hook: start the instance in each worker once its app loaded.

    Use it in ``gunicorn.conf.py``:
    ``from stagehand_django.lifecycle import post_worker_init``.
    """
    start()


def start() -> stagehand.Stagehand:
    """Start the default instance from the settings, once per process.

    Returns the running default instance, which may be one that other code
    started. With ``testing="disabled"`` the instance also serves a control
    socket for ``manage.py stagehand_status``.

    Raises:
        ImproperlyConfigured: The settings are invalid, or the runtime
            directory (``STAGEHAND_RUNTIME_DIR``) cannot be created or cannot
            hold the control socket.
    """
    global _owned, _stopped
    with _lock:
        current = stagehand.default_instance()
        if current is not None:
            return current
        instance = _build()
        instance.start()
        db.keeper.instance = instance
        _owned = instance
        _stopped = False
        # Registered after the instance registered its own stop, so that this
        # one runs first at exit and also closes database connections.
        atexit.unregister(stop)
        atexit.register(stop)
    return instance


def _build() -> stagehand.Stagehand:
    kwargs = conf.instance_kwargs()
    if kwargs.get("testing", "disabled") == "disabled":
        directory = conf.runtime_dir()
        try:
            prepare_directory(directory)
        except (OSError, InvalidOption) as error:
            raise _runtime_dir_error(directory, error) from error
        control = (_RuntimeDirControlPlugin, {"directory": directory})
        kwargs["plugins"] = [*(kwargs.get("plugins") or ()), control]
        if "leader_lock" not in kwargs and kwargs.get("cluster") is None:
            # The processes of this project on this host elect one cron
            # leader, so forked server workers do not each run cron. The
            # peers of a cluster elect theirs over the network instead.
            kwargs["leader_lock"] = os.path.join(directory, "leader.lock")
    try:
        return stagehand.Stagehand(**kwargs)
    except (ValueError, TypeError) as error:
        raise ImproperlyConfigured(
            f"STAGEHAND is invalid: {error} Run manage.py check for every mistake."
        ) from error


class _RuntimeDirControlPlugin(ControlPlugin):
    """The control plugin, which reports an unusable runtime directory as a
    settings error. The instance stops itself before the error reaches
    `start`'s caller."""

    def start(self) -> None:
        try:
            super().start()
        except (OSError, InvalidOption) as error:
            raise _runtime_dir_error(self.options["directory"], error) from error


def _runtime_dir_error(directory: str, error: Exception) -> ImproperlyConfigured:
    fix = "Set STAGEHAND_RUNTIME_DIR to an absolute path that this user can create"
    if getattr(settings, "STAGEHAND_RUNTIME_DIR", None) is None:
        where = f"The default runtime directory {directory!r}"
        fix += "."
    else:
        where = f"STAGEHAND_RUNTIME_DIR {directory!r}"
        fix += ", or remove the setting to use the default."
    return ImproperlyConfigured(
        f"{where} cannot hold Stagehand's control socket: {error}. {fix}"
    )


def stop() -> None:
    """Stop the instance that `start` started, gracefully; then close the
    database connections of its worker threads.

    Calling it again, or when nothing was started, does nothing.
    """
    global _owned, _stopped
    with _lock:
        instance, _owned = _owned, None
        _stopped = True
    if instance is None:
        return
    instance.stop()
    db.keeper.close_exited(deadline=time.monotonic() + THREAD_EXIT_WAIT)
    if db.keeper.instance is instance:
        db.keeper.instance = None

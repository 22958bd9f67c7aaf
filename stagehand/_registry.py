"""Running instances by name, and the default instance."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from stagehand.exceptions import InvalidOption

if TYPE_CHECKING:
    from stagehand._instance import Stagehand

__all__ = ["default_instance", "get_instance", "register", "unregister"]

DEFAULT_NAME = "default"

_lock = threading.Lock()
_instances: dict[str, Stagehand] = {}


def _forget_after_fork() -> None:
    # Only the forking thread survives a fork, so the child's copies of
    # running instances have no worker threads. They are marked stopped and
    # forgotten; the child starts its own instance (forking servers such as
    # gunicorn start one per worker).
    for instance in list(_instances.values()):
        instance._forget_after_fork()
    _instances.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def register(instance: Stagehand) -> None:
    with _lock:
        current = _instances.get(instance.name)
        if current is not None and current is not instance:
            raise InvalidOption(
                f"a Stagehand instance named {instance.name!r} is already running; "
                "stop it first or give this one another name=..."
            )
        _instances[instance.name] = instance


def unregister(instance: Stagehand) -> None:
    with _lock:
        if _instances.get(instance.name) is instance:
            del _instances[instance.name]


def get_instance(name: str) -> Stagehand | None:
    return _instances.get(name)


def default_instance() -> Stagehand | None:
    """Return the running instance named "default", or None."""
    return _instances.get(DEFAULT_NAME)

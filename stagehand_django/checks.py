"""System checks of the Stagehand settings (``manage.py check``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.core import checks

from stagehand_django import conf

__all__ = ["check_settings"]


def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Report each mistake in STAGEHAND and the STAGEHAND_* settings.

    Ids: E001 STAGEHAND is not a dict, E002 a ``name`` key, E003 an unknown
    key, E004 an invalid value (the core's validation message), E005
    STAGEHAND_AUTOSTART, E006 STAGEHAND_INSERT_ON_COMMIT, E007
    STAGEHAND_RUNTIME_DIR, E008 a Stagehand task backend naming a queue
    that STAGEHAND does not configure, E009 a relative
    STAGEHAND['leader_lock'] path, E010 a TASKS entry that is not a dict
    or a Stagehand task backend whose QUEUES is not a list of names, W001
    a STAGEHAND* setting that Stagehand does not read (a misspelling).
    """
    messages: list[checks.CheckMessage] = []
    for problem in conf.problems():
        level = checks.Warning if problem.warning else checks.Error
        messages.append(level(problem.msg, hint=problem.hint, id=problem.id))
    return messages

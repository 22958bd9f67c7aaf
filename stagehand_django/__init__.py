"""Django integration of Stagehand.

Add ``"stagehand_django"`` to ``INSTALLED_APPS`` and put the keyword
arguments of `stagehand.Stagehand` in ``settings.STAGEHAND``; docs/django.md
describes the settings, the processes that run jobs, the management
commands, the test case and the django.tasks backend.

Importing this package reads no settings and starts nothing.
"""

from __future__ import annotations

__all__: list[str] = []

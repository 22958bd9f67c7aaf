"""Plugins: components that start and stop with an instance.

A plugin is a `Plugin` subclass listed in the instance's ``plugins``
setting as ``(PluginClass, {options})``, or as the class alone. Its options
are validated when the instance is built, so a bad setting raises at
``Stagehand(...)``; the plugin runs between `start()` and `stop()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stagehand._instance import Stagehand

__all__ = ["Cron", "Plugin"]  # noqa: F822 - Cron is loaded by __getattr__


class Plugin:
    """Base class of plugins.

    Subclasses override `validate` to check their options and return them
    normalized, and `start`/`stop` to run. The instance is built before
    plugins start, so a plugin may insert jobs, read ``instance.clock`` and
    follow ``instance.leadership``.
    """

    def __init__(self, instance: Stagehand, options: Mapping[str, Any]):
        self.instance = instance
        self.options = options

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> Mapping[str, Any]:
        """Return the options normalized, or raise InvalidOption."""
        return options

    def start(self) -> None:
        """Start the plugin's work; called by `Stagehand.start()`."""

    def stop(self) -> None:
        """Stop the plugin's work; called first by `Stagehand.stop()`."""


def __getattr__(name: str) -> Any:
    # The cron plugin is imported on first use so that importing this module
    # does not import the cron engine.
    if name == "Cron":
        from stagehand._cron_plugin import Cron

        return Cron
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

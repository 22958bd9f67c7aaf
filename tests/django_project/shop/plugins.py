"""A plugin that inserts one FileWorker job when its instance starts."""

from __future__ import annotations

from django_project.shop.workers import FileWorker
from stagehand.plugins import Plugin


class StartupJob(Plugin):
    """Options: {"fifo": path}; the job logs to ``<fifo>.log``."""

    def start(self) -> None:
        fifo = self.options["fifo"]
        FileWorker.new({"path": f"{fifo}.log", "fifo": fifo}).insert(self.instance)

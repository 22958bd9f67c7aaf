"""Stagehand, driven only through its public API.

The engine runs workers by dotted path, so the worker class lives at module
level here. Until the engine can be imported, :meth:`StagehandSystem.probe`
raises and the suite reports Stagehand as skipped.
"""

from __future__ import annotations

import importlib
from typing import Any

from bench.systems.base import System
from bench.track import perform

stagehand: Any
IMPORT_ERROR: Exception | None = None
try:
    stagehand = importlib.import_module("stagehand")
    Worker: Any = stagehand.Worker
except Exception as error:  # the engine is still being written
    stagehand = None
    IMPORT_ERROR = error
    Worker = object


class NoopWorker(Worker):  # type: ignore[misc]
    """Worker whose job only records itself in the benchmark's tracker."""

    queue = "default"

    def perform(self, job: Any) -> None:
        perform(job.args)


class StagehandSystem(System):
    """One ``Stagehand`` instance with a single queue of W workers."""

    name = "stagehand"
    distributions = ("stagehand",)

    @classmethod
    def probe(cls) -> str:
        if IMPORT_ERROR is not None:
            raise RuntimeError(_not_importable(IMPORT_ERROR))
        missing = [
            name for name in ("Stagehand", "Worker") if not hasattr(stagehand, name)
        ]
        if missing:
            error = ImportError(f"stagehand has no {', '.join(missing)}")
            raise RuntimeError(_not_importable(error))
        version = getattr(stagehand, "__version__", None)
        return f"stagehand {version}" if version else super().probe()

    def __init__(self, workers: int, options: dict[str, Any]) -> None:
        super().__init__(workers, options)
        self._instance = stagehand.Stagehand(queues={"default": workers})

    def start(self) -> None:
        self._instance.start()

    def start_paused(self) -> None:
        self._instance.start()
        self._instance.pause_queue("default")

    def insert(self, args: dict[str, Any]) -> None:
        self._instance.insert(NoopWorker.new(args))

    def insert_all(self, batch: list[dict[str, Any]]) -> None:
        self._instance.insert_all([NoopWorker.new(args) for args in batch])

    def insert_in(self, args: dict[str, Any], seconds: float) -> None:
        self._instance.insert(NoopWorker.new(args, schedule_in=seconds))

    def stop(self) -> None:
        self._instance.stop()


def _not_importable(error: Exception) -> str:
    return f"stagehand engine not importable yet: {type(error).__name__}: {error}"

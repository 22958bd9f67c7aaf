"""Registry of the systems under test, in the order the report lists them."""

from __future__ import annotations

import importlib

from bench.systems.base import System, Unsupported

#: System name -> "module:class". Stagehand comes first, then the baselines.
SYSTEMS: dict[str, str] = {
    "stagehand": "bench.systems.stagehand_runner:StagehandSystem",
    "threadpool": "bench.systems.threadpool:ThreadPoolSystem",
    "heapq": "bench.systems.heap_pool:HeapPoolSystem",
    "huey": "bench.systems.huey_runner:HueySystem",
    "huey-1ms": "bench.systems.huey_runner:HueyFastSystem",
    "dramatiq": "bench.systems.dramatiq_runner:DramatiqSystem",
    "apscheduler": "bench.systems.apscheduler_runner:APSchedulerSystem",
    "rq": "bench.systems.rq_runner:RQSystem",
    "celery": "bench.systems.celery_runner:CelerySystem",
}

#: Systems that need a redis-server started by the suite.
REDIS_SYSTEMS = ("rq", "celery")


def load(name: str) -> type[System]:
    """Import and return the adapter class registered as ``name``.

    Raises:
        KeyError: ``name`` is not in :data:`SYSTEMS`.
    """
    module_name, class_name = SYSTEMS[name].split(":")
    module = importlib.import_module(module_name)
    system: type[System] = getattr(module, class_name)
    return system


__all__ = ["REDIS_SYSTEMS", "SYSTEMS", "System", "Unsupported", "load"]

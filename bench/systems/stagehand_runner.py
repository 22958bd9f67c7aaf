"""Stagehand, driven only through its public API.

The engine runs workers by dotted path, so the worker class lives at module
level here. Until the engine can be imported, :meth:`StagehandSystem.probe`
raises and the suite reports Stagehand as skipped.
"""

from __future__ import annotations

import importlib
import json
import secrets
import subprocess
import sys
from time import perf_counter
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

    def cluster(self, routed: int, handed: int, timeout: float) -> dict[str, Any]:
        cluster_name = f"bench-{secrets.token_hex(4)}"
        survivors = [_Survivor(cluster_name) for _ in range(2)]
        try:
            addresses = [survivor.address for survivor in survivors]
            self._instance = stagehand.Stagehand(
                name="bench-b9",
                queues={"default": self.workers},
                cluster={
                    "name": cluster_name,
                    "secret": _SECRET,
                    "discovery": addresses,
                    "bind": "127.0.0.1:0",
                },
            )
            self._instance.start()
            owner = survivors[0].peer_id
            jobs = _owned_by(owner, routed, self._instance)
            began = perf_counter()
            for job in jobs:
                self._instance.insert(job)
            routed_s = perf_counter() - began
            if any(self._instance.get_job(job.id) is not None for job in jobs):
                raise RuntimeError("a routed unique job stayed on this peer")

            self._instance.pause_queue("default")
            self._instance.insert_all([NoopWorker.new({"i": i}) for i in range(handed)])
            began = perf_counter()
            self._instance.stop()
            handoff_s = perf_counter() - began
            received = sum(survivor.available() for survivor in survivors) - routed
        finally:
            for survivor in survivors:
                survivor.kill()
        return {
            "routed_per_s": routed / routed_s,
            "handoff_s": handoff_s,
            "received": received,
        }


_SECRET = "benchmark secret, not for production"

# A peer in a child process whose queue never runs, so the jobs it gets
# cost it no CPU. It prints its peer id and address, then its number of
# available jobs for each line it reads.
_SURVIVOR = """
import json, sys
import stagehand
import bench.systems.stagehand_runner
peer = stagehand.Stagehand(
    name="survivor",
    queues={"default": {"limit": 1, "paused": True}},
    cluster={"name": sys.argv[1], "secret": sys.argv[2], "discovery": [],
             "bind": "127.0.0.1:0"},
)
peer.start()
status = peer.check_cluster()
print(json.dumps([status["peer"], status["address"]]), flush=True)
for _ in sys.stdin:
    print(peer.check_queue("default")["available"], flush=True)
"""


class _Survivor:
    """A cluster peer in a child process, for B9."""

    def __init__(self, cluster_name: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _SURVIVOR, cluster_name, _SECRET],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("a B9 survivor peer failed to start; see stderr")
        self.peer_id, self.address = json.loads(line)

    def available(self) -> int:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write("count\n")
        self._process.stdin.flush()
        return int(self._process.stdout.readline())

    def kill(self) -> None:
        self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()


def _owned_by(owner: str, count: int, instance: Any) -> list[Any]:
    # Unique jobs whose fingerprint `owner` owns among the cluster's peers.
    # The only use of Stagehand's private modules here: it picks the jobs
    # before the measurement and is not part of it.
    from stagehand._rendezvous import ranked
    from stagehand._unique import fingerprint

    status = instance.check_cluster()
    peers = [status["peer"], *status["peers"]]
    jobs = []
    candidate = 0
    while len(jobs) < count:
        job = NoopWorker.new({"i": -1 - candidate}, unique={"period": 600})
        candidate += 1
        if ranked(fingerprint(job), peers)[0] == owner:
            jobs.append(job)
    return jobs


def _not_importable(error: Exception) -> str:
    return f"stagehand engine not importable yet: {type(error).__name__}: {error}"

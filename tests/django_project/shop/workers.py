"""Workers of the test project."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from django.db import connections

from django_project.shop.models import Note
from stagehand import Job, Worker

logger = logging.getLogger(__name__)

# What ConnectionProbe saw, by job id: filled in worker threads.
probes: dict[str, dict[str, Any]] = {}
probes_lock = threading.Lock()


class FileWorker(Worker):
    """Appends "started <pid>" to a file, waits on a FIFO if given, then
    appends "finished <pid>"."""

    max_attempts = 1

    def perform(self, job: Job) -> str:
        path = job.args["path"]
        with open(path, "a") as out:
            out.write(f"started {os.getpid()}\n")
        fifo = job.args.get("fifo")
        if fifo:
            logger.info("job %s waiting on %s", job.id, fifo)
            with open(fifo) as release:
                release.read()
        with open(path, "a") as out:
            out.write(f"finished {os.getpid()}\n")
        logger.info("job %s finished", job.id)
        return "done"


class NoteWorker(Worker):
    """Writes a Note and returns the number of notes."""

    def perform(self, job: Job) -> int:
        Note.objects.create(text=job.args["text"])
        return Note.objects.count()


class ConnectionProbe(Worker):
    """Queries a database alias and records the thread's connection."""

    queue = "mailers"
    max_attempts = 1

    def perform(self, job: Job) -> None:
        alias = job.args["alias"]
        wrapper = connections[alias]
        opened_before = wrapper.connection is not None
        count = Note.objects.using(alias).count()
        if job.args.get("break_autocommit"):
            wrapper.set_autocommit(False)
        with probes_lock:
            probes[job.id] = {
                "wrapper": wrapper,
                "raw": wrapper.connection,
                "opened_before": opened_before,
                "thread": threading.current_thread(),
                "count": count,
            }

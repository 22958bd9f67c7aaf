"""Views of the test project."""

from __future__ import annotations

import os

from django.http import HttpRequest, JsonResponse

import stagehand
from django_project.shop.workers import FileWorker


def enqueue(request: HttpRequest) -> JsonResponse:
    args = {"path": request.GET["path"]}
    if "fifo" in request.GET:
        args["fifo"] = request.GET["fifo"]
    job = FileWorker.new(args).insert()
    return JsonResponse({"id": job.id, "pid": os.getpid()})


def status(request: HttpRequest) -> JsonResponse:
    instance = stagehand.default_instance()
    return JsonResponse(
        {"pid": os.getpid(), "running": instance is not None and instance.running}
    )

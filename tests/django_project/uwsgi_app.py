"""WSGI entry point, URLconf and view of the uWSGI tests.

``application`` serves the project's URLs plus ``/start_job/``. With
``STAGEHAND_TEST_UWSGI_POSTFORK=true`` each worker starts its instance from
a ``uwsgidecorators.postfork`` hook, as docs/django.md suggests.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import django
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, JsonResponse
from django.http.response import HttpResponseBase
from django.urls import path

from django_project.support import WAIT
from stagehand import events

django.setup(set_prefix=False)

# Models, and the views that use them, can be imported only after setup().
from django_project.shop.workers import FileWorker  # noqa: E402
from django_project.urls import urlpatterns as project_urlpatterns  # noqa: E402

logger = logging.getLogger(__name__)


def start_job(request: HttpRequest) -> JsonResponse:
    """Insert a FileWorker job and respond once its attempt has started.

    Query: ``path``, the job's output file; ``job_fifo``, a FIFO the job
    blocks on; ``request_fifo``, a FIFO the request then blocks on, which
    keeps this worker busy so that the next request goes to another one.
    """
    args = {"path": request.GET["path"]}
    if "job_fifo" in request.GET:
        args["fifo"] = request.GET["job_fifo"]
    started: set[str | None] = set()
    condition = threading.Condition()

    def on_start(
        event: str, measurements: Mapping[str, Any], metadata: Mapping[str, Any]
    ) -> None:
        with condition:
            started.add(metadata["job"].id)
            condition.notify_all()

    handler_id = (__name__, object())
    events.attach(handler_id, ["job.start"], on_start)
    try:
        job = FileWorker.new(args).insert()
        with condition:
            if not condition.wait_for(lambda: job.id in started, WAIT):
                raise RuntimeError(
                    f"timed out after {WAIT} s waiting for job {job.id} to start"
                )
    finally:
        events.detach(handler_id)
    if "request_fifo" in request.GET:
        logger.info("request holding on %s", request.GET["request_fifo"])
        with open(request.GET["request_fifo"]) as release:
            release.read()
    return JsonResponse({"id": job.id, "pid": os.getpid()})


urlpatterns = [*project_urlpatterns, path("start_job/", start_job)]


class Handler(WSGIHandler):
    """Django's WSGI handler, resolving URLs with this module."""

    def get_response(self, request: HttpRequest) -> HttpResponseBase:
        request.urlconf = __name__
        return super().get_response(request)


application = Handler()

if os.environ.get("STAGEHAND_TEST_UWSGI_POSTFORK") == "true":
    from uwsgidecorators import postfork

    from stagehand_django.lifecycle import start

    postfork(start)

"""Settings of the Django project used by the tests.

Subprocess tests (runserver, gunicorn, stagehand_worker) vary the Stagehand
settings through STAGEHAND_TEST_* environment variables.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = "stagehand-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "django_project.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "stagehand_django",
    "django_project.shop",
]
MIDDLEWARE: list[str] = []

_DB_NAME = os.environ.get("STAGEHAND_TEST_DB", ":memory:")
# A file, not memory: Django never closes an in-memory SQLite connection,
# and the tests check that worker threads close theirs.
_TEST_DB = os.path.join(tempfile.gettempdir(), f"stagehand-test-{os.getpid()}.sqlite3")
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": _DB_NAME,
        "TEST": {"NAME": _TEST_DB},
    },
    # The same database with persistent connections, for the hygiene tests.
    "persistent": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": _DB_NAME,
        "CONN_MAX_AGE": None,
        "TEST": {"MIRROR": "default"},
    },
}


def _plugins() -> list[tuple[str, dict[str, str]]]:
    fifo = os.environ.get("STAGEHAND_TEST_STARTUP_JOB")
    if not fifo:
        return []
    return [("django_project.shop.plugins.StartupJob", {"fifo": fifo})]


STAGEHAND = {
    "queues": {"default": 4, "mailers": 2},
    "testing": os.environ.get("STAGEHAND_TEST_TESTING", "disabled"),
    "shutdown_grace_period": 20,
    "plugins": _plugins(),
}
# "true" and "false" give True and False; another value is used as it is,
# so that tests can see how an invalid STAGEHAND_AUTOSTART is reported.
_AUTOSTART = os.environ.get("STAGEHAND_TEST_AUTOSTART") or None
STAGEHAND_AUTOSTART = {"true": True, "false": False}.get(_AUTOSTART or "", _AUTOSTART)
STAGEHAND_RUNTIME_DIR = os.environ.get("STAGEHAND_TEST_RUNTIME_DIR") or None

TASKS = {
    "default": {
        "BACKEND": "stagehand_django.tasks.StagehandBackend",
        "QUEUES": ["default", "mailers"],
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(process)d %(name)s %(message)s"}},
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "loggers": {
        "stagehand": {"handlers": ["stderr"], "level": "INFO"},
        "stagehand_django": {"handlers": ["stderr"], "level": "INFO"},
        "django_project": {"handlers": ["stderr"], "level": "INFO"},
    },
}

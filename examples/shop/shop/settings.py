"""Settings of the example shop: Stagehand runs the jobs, mail goes to files."""

from __future__ import annotations

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "example-only-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
ROOT_URLCONF = "shop.urls"
WSGI_APPLICATION = "shop.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "stagehand_django",
    "orders",
]
MIDDLEWARE: list[str] = []
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}
}

# Each sent message becomes a file in sent-mail/.
EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
EMAIL_FILE_PATH = BASE_DIR / "sent-mail"
DEFAULT_FROM_EMAIL = "shop@example.com"

STAGEHAND = {
    "queues": {"default": 5, "mailers": 2},
    "plugins": [
        (
            "stagehand.plugins.Cron",
            {"crontab": [("* * * * *", "orders.workers.DigestWorker")]},
        )
    ],
    "shutdown_grace_period": 10,
}
# Insert jobs when the view's transaction commits, not before.
STAGEHAND_INSERT_ON_COMMIT = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "stagehand": {"handlers": ["console"], "level": "INFO"},
        "stagehand_django": {"handlers": ["console"], "level": "INFO"},
        "orders": {"handlers": ["console"], "level": "INFO"},
    },
}

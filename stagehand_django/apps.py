"""The Django app of Stagehand: ``INSTALLED_APPS += ["stagehand_django"]``."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class StagehandConfig(AppConfig):
    """Registers the system checks, the transaction hook and the job events.

    `ready` also starts the default instance in the processes that run jobs
    from the start (see `stagehand_django.lifecycle`); other serving
    processes start it on their first request.
    """

    name = "stagehand_django"
    label = "stagehand"
    verbose_name = "Stagehand"
    default = True

    def ready(self) -> None:
        from stagehand_django import db, lifecycle, transactions
        from stagehand_django.checks import check_settings

        checks.register(check_settings)
        transactions.install()
        db.keeper.attach()
        lifecycle.install()

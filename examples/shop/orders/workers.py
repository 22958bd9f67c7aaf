"""The shop's jobs."""

from __future__ import annotations

import logging

from django.core.mail import send_mail

from orders.models import Order
from stagehand import Job, Worker

logger = logging.getLogger(__name__)


class ConfirmationWorker(Worker):
    """Emails the confirmation of one order."""

    queue = "mailers"
    max_attempts = 5

    def perform(self, job: Job) -> int:
        order = Order.objects.get(pk=job.args["order_id"])
        return send_mail(
            subject=f"Order {order.pk}: {order.item}",
            message=f"Thank you! Your {order.item} is on its way.",
            from_email=None,
            recipient_list=[order.email],
        )


class DigestWorker(Worker):
    """Run by cron every minute: logs how many orders exist."""

    def perform(self, job: Job) -> int:
        count = Order.objects.count()
        logger.info("digest: %d orders so far", count)
        return count

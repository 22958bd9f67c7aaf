"""POST /order/?email=...&item=... stores an order and emails a confirmation."""

from __future__ import annotations

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from orders.models import Order
from orders.workers import ConfirmationWorker


@csrf_exempt
def place_order(request: HttpRequest) -> JsonResponse:
    with transaction.atomic():
        order = Order.objects.create(
            email=request.GET.get("email", "ada@example.com"),
            item=request.GET.get("item", "teapot"),
        )
        # STAGEHAND_INSERT_ON_COMMIT: the job is inserted when this block
        # commits, so the worker always finds the order.
        job = ConfirmationWorker.new({"order_id": order.pk}).insert()
    return JsonResponse({"order": order.pk, "job": job.id})

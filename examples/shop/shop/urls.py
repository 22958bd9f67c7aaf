from __future__ import annotations

from django.urls import path

from orders import views

urlpatterns = [path("order/", views.place_order)]

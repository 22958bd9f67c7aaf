from __future__ import annotations

from django.urls import path

from django_project.shop import views

urlpatterns = [
    path("enqueue/", views.enqueue),
    path("status/", views.status),
]

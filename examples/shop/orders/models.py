from __future__ import annotations

from django.db import models


class Order(models.Model):
    email = models.EmailField()
    item = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)

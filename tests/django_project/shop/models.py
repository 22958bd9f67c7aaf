from __future__ import annotations

from django.db import models


class Note(models.Model):
    """A row written by the jobs and views of the tests."""

    text = models.CharField(max_length=200)

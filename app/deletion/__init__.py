"""Deletion requests, schedules, versions and lineage (DESIGN §5)."""

from __future__ import annotations

from typing import Any

from celery import Celery

from app import documents
from app.records import Records


def reindex(records: Records, celery: Celery) -> dict[str, Any]:
    """Put requests and schedules back in the index, their Redis slots and the schedules' redbeat entries."""
    from app.deletion import requests, schedules

    found = documents.reindex(records)
    return {
        "unlearning_requests": requests.reindex(records, found["requests"]),
        "schedules": schedules.reindex(records, celery, found["schedules"]),
    }

"""Rebuilding the Redis index from object storage (`amend reindex`, and the API at start-up on an empty index).

Kept apart from `app.queue` because it reaches every kind of record, the deletion requests and schedules
included, while the queue module is imported by job admission.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from app import metrics
from app.deletion import reindex as deletion_reindex
from app.queue import enqueue
from app.records import Records, redis_errors


def reindex_and_requeue(records: Records, celery: Celery) -> dict[str, Any]:
    """Rebuild the index from storage and re-enqueue the active jobs whose messages were lost with it; rebuild
    the job counts (`GET /v1/stats`, the running gauge), the deletion requests' and schedules' index entries
    and re-register the schedules with redbeat."""
    result = records.reindex()
    with redis_errors():
        metrics.rebuild_counts(records.index, result.pop("job_states"))
    for job_id, job_type in result.pop("lost_jobs"):
        enqueue(celery, job_id, job_type)
        result["requeued"] = result.get("requeued", 0) + 1
    result.update(deletion_reindex(records, celery))
    return result

"""The Celery configuration shared by the API (which only sends) and the workers (which run).

The API enqueues by task name, so it never imports `workers` or torch.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.records import Records
from app.settings import Settings

RUN_JOB = "workers.run_job"
REAP = "workers.reap"
JOB_TYPES = ("merge", "unlearn", "compress")


def queue_for(job_type: str) -> str:
    return f"amend.{job_type}"


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.job_time_limit + 60,
        "task_soft_time_limit": settings.job_time_limit,
        "task_default_queue": queue_for("merge"),
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # a redelivery safety net only: leases in Redis (workers/lease.py) recover a dead worker's job
            # much sooner, and a second copy of a running job is a no-op.
            "visibility_timeout": settings.job_time_limit + 600,
        },
        "worker_hijack_root_logger": False,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


def make_celery(settings: Settings, name: str = "amend") -> Celery:
    celery = Celery(name)
    celery.conf.update(celery_config(settings))
    return celery


def enqueue(celery: Celery, job_id: str, job_type: str) -> None:
    celery.send_task(RUN_JOB, args=[job_id], queue=queue_for(job_type))


def reindex_and_requeue(records: Records, celery: Celery) -> dict[str, Any]:
    """Rebuild the index from storage and re-enqueue the active jobs whose messages were lost with it."""
    result = records.reindex()
    for job_id, job_type in result.pop("lost_jobs"):
        enqueue(celery, job_id, job_type)
        result["requeued"] = result.get("requeued", 0) + 1
    return result

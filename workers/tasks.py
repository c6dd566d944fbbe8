"""Thin tasks: take an id, re-read state, run the pipeline. Names are explicit and stable."""

from __future__ import annotations

from app import logs
from app.deletion.schedules import FIRE_TASK
from app.queue import RUN_JOB
from workers.celery_app import celery_app
from workers.jobs.run import run_job as run_pipeline


@celery_app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> None:
    # every line this job logs carries its id, and once the record is read its tenant and the id of the request
    # that submitted it (the record keeps it); until then, or for a job no request made, the message's id
    with logs.context(job_id=job_id, request_id=getattr(run_job.request, "id", None)):
        run_pipeline(job_id)


@celery_app.task(name=FIRE_TASK, acks_late=True)
def fire_schedule(tenant: str, schedule_id: str, slot: str) -> None:
    """Sent by beat (celery-redbeat) at a schedule's slot: submit its job through the API's admission."""
    from datetime import datetime

    from app.deletion.schedules import fire
    from workers.jobs.context import services

    settings, records = services()
    with logs.context(request_id=getattr(fire_schedule.request, "id", None)):  # the job it submits keeps this id
        fire(records, settings, celery_app, tenant, schedule_id, datetime.fromisoformat(slot))

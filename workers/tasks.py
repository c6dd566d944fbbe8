"""Thin tasks: take an id, re-read state, run the pipeline. Names are explicit and stable."""

from __future__ import annotations

from app import logs
from app.queue import RUN_JOB
from workers.celery_app import celery_app
from workers.jobs.run import run_job as run_pipeline


@celery_app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> None:
    # every line this job logs carries its id, its tenant (bound once the record is read) and the message's id
    with logs.context(job_id=job_id, request_id=getattr(run_job.request, "id", None)):
        run_pipeline(job_id)

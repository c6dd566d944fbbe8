"""Thin tasks: take an id, re-read state, run the pipeline. Names are explicit and stable."""

from __future__ import annotations

from app.queue import RUN_JOB
from workers.celery_app import celery_app
from workers.jobs.run import run_job as run_pipeline


@celery_app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> None:
    run_pipeline(job_id)
